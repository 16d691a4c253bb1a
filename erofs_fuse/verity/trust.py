"""Trusted input for verity: digests, dm-verity roots, containerd ``.dmverity`` files, the
``fsverity digest`` roots file, and the mount command's verity options.

Option grammar (``parse_trust_args``; LAYER is a 0-based index into the layer list as given,
bottom first, or the layer path as given):

* ``--verity LAYER=sha256:HEX`` (or ``sha512:HEX``): fs-verity file digest.
* ``--verity-roots FILE``: lines ``sha256:HEX PATH`` (``fsverity digest L1 L2 ...`` output);
  blank and ``#`` lines skipped. A line applies to the layer with the same path string, else
  the same real path (relative paths tried from the cwd, then from FILE's directory), else
  the only entry with the same basename. Explicit ``--verity``/``--dm-verity`` win.
* ``--dm-verity LAYER=[dm-verity:][ALG:]ROOT:BLOCKS[:DATA_BLOCK_SIZE[:HASH_BLOCK_SIZE]]``.
* ``--verity-sidecar LAYER=PATH``: the tree file (or containerd ``.dmverity`` JSON).
* ``--trust-dmverity-sidecar``: believe the root in ``LAYER.dmverity`` files.
* ``--require-verity``: handled by ``open_layer_blob(require=True)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import AbstractSet, Callable, Iterable, Protocol, Sequence, TypeVar

from ..erofs.errors import CorruptImageError
from .formats import ALG_BY_DIGEST_SIZE, FormatError, HashParams, SaltMode, fsverity_digest

MAX_JSON_SIDECAR = 1 << 16


class IntegrityError(CorruptImageError):
    """Layer bytes, or its tree, do not match the trusted digest (or cannot be checked)."""

    kind = "integrity error"


class TrustError(ValueError):
    """The trusted input as given is unusable: a malformed value, a layer named twice or not at
    all, an unreadable roots file. The message is one line naming the option; the caller words
    it for its user (``erofs-fuse: MESSAGE`` on the command line)."""


def _hex_bytes(text: str, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise FormatError(f"{what} {text!r} is not hex") from None
    if len(value) not in ALG_BY_DIGEST_SIZE:
        raise FormatError(f"{what} of {len(value)} bytes matches no supported hash")
    return value


# trusted values -----------------------------------------------------------------------------

class Anchor(Protocol):
    """Checks the root hash of a tree against trusted input; raises ``IntegrityError``."""

    def check_root(self, root: bytes, params: HashParams, data_size: int, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class FsVerityDigest:
    """An fs-verity file digest, ``ALG:HEX`` as ``fsverity digest`` prints it."""

    alg: str
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> FsVerityDigest:
        alg, sep, hexpart = text.strip().partition(":")
        if not sep or alg not in ("sha256", "sha512"):
            raise FormatError(f"{text!r} is not an fs-verity digest (sha256:HEX or sha512:HEX)")
        digest = _hex_bytes(hexpart, "fs-verity digest")
        if ALG_BY_DIGEST_SIZE[len(digest)] != alg:
            raise FormatError(f"{alg} digest with {len(digest)} bytes")
        return cls(alg, digest)

    def __str__(self) -> str:
        return f"{self.alg}:{self.digest.hex()}"

    def check_root(self, root: bytes, params: HashParams, data_size: int, name: str) -> None:
        got = fsverity_digest(params, data_size, root)
        if params.alg != self.alg or got != self.digest:
            raise IntegrityError(
                f"fs-verity digest mismatch: layer of {data_size} bytes with its Merkle tree "
                f"gives {params.alg}:{got.hex()}, trusted is {self} (layer or tree changed?)",
                image=name)


@dataclass(frozen=True, slots=True)
class DmVerityRoot:
    """A dm-verity root hash plus the trusted geometry it was made for."""

    root: bytes
    data_blocks: int
    data_block_size: int = 4096
    hash_block_size: int = 4096
    hash_type: int = 1

    def __post_init__(self) -> None:
        if len(self.root) not in ALG_BY_DIGEST_SIZE:
            raise FormatError(f"dm-verity root of {len(self.root)} bytes")
        if self.data_blocks < 1:
            raise FormatError("dm-verity needs at least one data block")
        if self.hash_type not in (0, 1):
            raise FormatError(f"dm-verity hash type {self.hash_type}")

    @property
    def alg(self) -> str:
        return ALG_BY_DIGEST_SIZE[len(self.root)]

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @classmethod
    def parse(cls, text: str) -> DmVerityRoot:
        """``[dm-verity:][ALG:]ROOT:BLOCKS[:DATA_BLOCK_SIZE[:HASH_BLOCK_SIZE]]``."""
        fields = text.strip().split(":")
        if fields and fields[0] == "dm-verity":
            fields = fields[1:]
        alg = fields.pop(0) if fields and not _is_hex(fields[0]) else None
        if not 2 <= len(fields) <= 4 or not all(f.isdigit() for f in fields[1:]):
            raise FormatError(f"{text!r} is not ROOT:BLOCKS[:DATA_BLOCK_SIZE[:HASH_BLOCK_SIZE]]")
        root = _hex_bytes(fields[0], "dm-verity root")
        sizes = [int(f) for f in fields[1:]]
        dbs = sizes[1] if len(sizes) > 1 else 4096
        spec = cls(root, sizes[0], dbs, sizes[2] if len(sizes) > 2 else dbs)
        if alg is not None and alg != spec.alg:
            raise FormatError(f"{alg} does not give a {len(root)}-byte root")
        HashParams(spec.alg, spec.data_block_size, spec.hash_block_size,
                   mode=SaltMode.DM_PREFIX)  # validates the block sizes
        return spec

    def __str__(self) -> str:
        sizes = ""
        if (self.data_block_size, self.hash_block_size) != (4096, 4096):
            sizes = f":{self.data_block_size}:{self.hash_block_size}"
        return f"dm-verity:{self.alg}:{self.root.hex()}:{self.data_blocks}{sizes}"

    def check_root(self, root: bytes, params: HashParams, data_size: int, name: str) -> None:
        if root != self.root:
            raise IntegrityError(
                f"dm-verity root mismatch: the tree gives {root.hex()}, trusted is "
                f"{self.root.hex()} (layer or tree changed?)", image=name)


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)


# containerd's layout and the per-layer spec -------------------------------------------------

@dataclass(frozen=True, slots=True)
class ContainerdVerity:
    """``LAYER.dmverity`` of containerd's EROFS differ: root hash and where the tree starts."""

    root: bytes
    hash_offset: int


def read_dmverity_json(path: str) -> ContainerdVerity:
    """Parse ``LAYER.dmverity``; ``IntegrityError`` if it is not one."""
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{path}: not a containerd .dmverity file ({why})")

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_SIDECAR + 1)
        doc = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise bad(str(exc)) from None
    if len(raw) > MAX_JSON_SIDECAR or not isinstance(doc, dict):
        raise bad("not a small JSON object")
    roothash, offset = doc.get("roothash"), doc.get("hashoffset")
    if not isinstance(roothash, str) or type(offset) is not int or offset < 0:
        raise bad("needs a roothash string and a hashoffset integer")
    try:
        return ContainerdVerity(_hex_bytes(roothash, "roothash"), offset)
    except FormatError as exc:
        raise bad(str(exc)) from None


def is_dmverity_json(path: str) -> bool:
    if path.endswith(".dmverity"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"{") and os.path.getsize(path) <= MAX_JSON_SIDECAR


@dataclass(frozen=True, slots=True)
class TrustSpec:
    """What the caller trusts for one layer file, and where its tree is (default: next to it)."""

    fsverity: FsVerityDigest | None = None
    dmverity: DmVerityRoot | None = None
    sidecar: str | None = None
    trust_dmverity_sidecar: bool = False


# the roots file -----------------------------------------------------------------------------

def read_digests_file(path: str) -> list[tuple[FsVerityDigest, str]]:
    """``(digest, path)`` for each line ``ALG:HEX PATH`` (what ``fsverity digest`` prints);
    blank lines and ``#`` comments (``seal``'s dm-verity lines) are skipped."""
    out = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\r\n").lstrip()  # the path may end in spaces: keep them
            if not text.strip() or text.startswith("#"):
                continue
            digest, _, layer = text.partition(" ")
            try:
                if not layer:
                    raise FormatError("expected 'sha256:HEX PATH'")
                out.append((FsVerityDigest.parse(digest), layer))
            except FormatError as exc:
                raise FormatError(f"{path}:{lineno}: {exc}") from None
    return out


def _same_file(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


RootsEntry = tuple[FsVerityDigest, str, str]  # digest, path as written, roots file directory


def _match_roots(layer: str, entries: list[RootsEntry]) -> FsVerityDigest | None:
    """The digest a roots file gives ``layer``: the first non-empty tier of matches (same
    string, same file from the cwd, same file from the roots file's directory, the only entry
    with that basename) must agree on one digest."""
    base = os.path.basename(layer)
    same_base = [e for e in entries if os.path.basename(e[1]) == base]
    tiers = [
        [e for e in entries if e[1] == layer],
        [e for e in entries if _same_file(e[1], layer)],
        [e for e in entries if _same_file(os.path.join(e[2], e[1]), layer)],
        same_base if len(same_base) == 1 else [],
    ]
    for tier in tiers:
        digests = {digest for digest, _, _ in tier}
        if len(digests) > 1:
            raise TrustError(f"--verity-roots: several digests for layer {layer}")
        if digests:
            return digests.pop()
    return None


# the mount options --------------------------------------------------------------------------

def _layer_index(key: str, layers: Sequence[str], option: str, index_base: int) -> int:
    if key.isdigit():
        index = int(key) - index_base
        if 0 <= index < len(layers):
            return index
        raise TrustError(f"{option} {key}: no such layer (layers are numbered {index_base}.."
             f"{index_base + len(layers) - 1})")
    matches = [i for i, layer in enumerate(layers) if _same_file(key, layer)]
    if len(matches) != 1:
        which = "no" if not matches else "more than one"
        raise TrustError(f"{option} {key}: {which} layer is that file")
    return matches[0]


def _split_keyed(value: str, option: str, last: bool) -> tuple[str, str]:
    # digests and roots hold no '=', so a path key may; a sidecar path may, so split first
    key, sep, rest = value.rpartition("=") if last else value.partition("=")
    if not sep or not key or not rest:
        raise TrustError(f"{option} {value!r}: expected LAYER=VALUE")
    return key, rest


def _keyed(value: str, option: str, layers: Sequence[str], index_base: int,
           taken: AbstractSet[int]) -> tuple[int, str]:
    key, text = _split_keyed(value, option, last=True)
    index = _layer_index(key, layers, option, index_base)
    if index in taken:
        raise TrustError(f"{option} {value}: layer {key} already has a trusted digest")
    return index, text


T = TypeVar("T")


def _parse_or_fail(parse: Callable[[str], T], text: str, context: str) -> T:
    try:
        return parse(text)
    except FormatError as exc:
        raise TrustError(f"{context}: {exc}") from None


def parse_trust_args(
    layers: Sequence[str],
    *,
    verity: Iterable[str] = (),
    verity_roots: Iterable[str] = (),
    dm_verity: Iterable[str] = (),
    verity_sidecar: Iterable[str] = (),
    trust_dmverity_sidecar: bool = False,
    index_base: int = 0,
) -> list[TrustSpec]:
    """One ``TrustSpec`` per layer from the mount options (grammar in the module docstring).
    Errors are ``TrustError`` (one line)."""
    fs: dict[int, FsVerityDigest] = {}
    dm: dict[int, DmVerityRoot] = {}
    sidecars: dict[int, str] = {}
    for value in verity:
        index, text = _keyed(value, "--verity", layers, index_base, fs.keys() | dm.keys())
        fs[index] = _parse_or_fail(FsVerityDigest.parse, text, f"--verity {value}")
    for value in dm_verity:
        index, text = _keyed(value, "--dm-verity", layers, index_base, fs.keys() | dm.keys())
        dm[index] = _parse_or_fail(DmVerityRoot.parse, text, f"--dm-verity {value}")
    for value in verity_sidecar:
        key, path = _split_keyed(value, "--verity-sidecar", last=False)
        index = _layer_index(key, layers, "--verity-sidecar", index_base)
        if index in sidecars:
            raise TrustError(f"--verity-sidecar {value}: layer {key} already has a sidecar")
        sidecars[index] = path
    _apply_roots_files(layers, verity_roots, fs, dm)
    return [TrustSpec(fs.get(i), dm.get(i), sidecars.get(i), trust_dmverity_sidecar)
            for i in range(len(layers))]


def _apply_roots_files(layers: Sequence[str], files: Iterable[str],
                       fs: dict[int, FsVerityDigest], dm: dict[int, DmVerityRoot]) -> None:
    entries: list[RootsEntry] = []
    for path in files:
        try:
            found = read_digests_file(path)
        except OSError as exc:
            raise TrustError(f"--verity-roots {path}: {exc.strerror}") from None
        except FormatError as exc:
            raise TrustError(f"--verity-roots {exc}") from None
        entries.extend((digest, p, os.path.dirname(path)) for digest, p in found)
    for index, layer in enumerate(layers):
        if entries and index not in fs and index not in dm:
            digest = _match_roots(layer, entries)
            if digest is not None:
                fs[index] = digest
