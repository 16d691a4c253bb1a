"""Opening a layer for reading: find its Merkle tree (sidecars), check the tree's root against
what is trusted for the layer, and wrap the file in a ``VerifiedBlob``, or hand back the plain
file when nothing is trusted.

Sidecars (where the tree is), found as ``TrustSpec.sidecar`` or next to the layer:
``LAYER.verity`` = veritysetup hash device (superblock block + tree, what ``seal`` writes) or
a raw fs-verity tree (``fsverity digest --out-merkle-tree``); ``LAYER.dmverity`` = containerd
layout. Formats are told apart by the tree size that follows from the trusted data size, then
by the superblock magic; a wrong guess can only fail verification, never pass bad data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..blob import Blob, FileBlob
from .blob import DEFAULT_TREE_CACHE_BYTES, MerkleTree, VerifiedBlob
from .formats import (
    VERITY_MAGIC,
    FormatError,
    HashParams,
    SaltMode,
    hash_area_offset,
    parse_fsverity_descriptor,
    parse_verity_superblock,
)
from .trust import (
    Anchor,
    ContainerdVerity,
    DmVerityRoot,
    FsVerityDigest,
    IntegrityError,
    TrustSpec,
    is_dmverity_json,
    read_dmverity_json,
)


@dataclass(frozen=True, slots=True)
class _DescriptorRoot:
    """The root named by a descriptor already checked against the trusted digest."""

    root: bytes

    def check_root(self, root: bytes, params: HashParams, data_size: int, name: str) -> None:
        if root != self.root:
            raise IntegrityError(
                f"Merkle tree root {root.hex()} differs from the trusted fs-verity "
                f"descriptor's {self.root.hex()} (tree changed?)", image=name)


# loading trees from sidecars ----------------------------------------------------------------

def fsverity_tree(blob: Blob, trust: FsVerityDigest, sidecar: Blob | None,
                  descriptor: bytes | None = None) -> MerkleTree:
    """The tree of ``blob`` checked against an fs-verity digest. ``sidecar`` is a veritysetup
    hash device (unsalted, same parameters) or a raw ``--out-merkle-tree`` file; ``descriptor``
    (``--out-descriptor``) is needed for a salt or a non-default block size, and ignored unless
    it hashes to the trusted digest."""
    params = HashParams.fsverity(trust.alg)
    data_size = blob.size
    anchor: Anchor = trust
    if descriptor is not None and _digest_of(trust.alg, descriptor) == trust.digest:
        try:
            desc = parse_fsverity_descriptor(descriptor)
        except FormatError as exc:
            raise IntegrityError(f"trusted fs-verity descriptor: {exc}", image=blob.name) from None
        if desc.data_size != blob.size:
            raise IntegrityError(
                f"layer has {blob.size} bytes, its trusted fs-verity descriptor says "
                f"{desc.data_size}", image=blob.name)
        params, anchor = desc.params, _DescriptorRoot(desc.root)
    tree = MerkleTree(params, data_size, sidecar, 0, anchor)
    if tree.tree_bytes:
        tree.offset = _locate_fsverity_tree(tree, sidecar, blob.name)
    return tree


def _digest_of(alg: str, data: bytes) -> bytes:
    return hashlib.new(alg, data).digest()


def _locate_fsverity_tree(tree: MerkleTree, sidecar: Blob | None, name: str) -> int:
    need = tree.tree_bytes
    if sidecar is None:
        raise IntegrityError(
            f"no Merkle tree for this layer (expected LAYER.verity of {need} bytes; "
            "make it with `erofs-fuse seal`)", image=name)
    if sidecar.size == need:
        return 0
    if sidecar.size >= 512 and sidecar.read(0, 8) == VERITY_MAGIC:
        return _fsverity_in_hash_device(tree, sidecar, name)
    raise IntegrityError(
        f"sidecar {sidecar.name} has {sidecar.size} bytes; the tree of this {tree.data_size}-byte "
        f"layer has {need} (or more with a veritysetup superblock): wrong sidecar, or the "
        "layer changed", image=name)


def _fsverity_in_hash_device(tree: MerkleTree, sidecar: Blob, name: str) -> int:
    try:
        sb = parse_verity_superblock(sidecar.read(0, 512))
    except FormatError as exc:
        raise IntegrityError(f"sidecar {sidecar.name}: {exc}", image=name) from None
    p = tree.params
    # fs-verity pads the salt and dm-verity does not: only unsalted trees coincide
    if (sb.hash_type, sb.salt, sb.alg, sb.data_block_size, sb.hash_block_size) != (
            1, b"", p.alg, p.data_block_size, p.hash_block_size) or p.salt:
        raise IntegrityError(
            f"sidecar {sidecar.name} is a dm-verity hash device ({sb.alg}, "
            f"{len(sb.salt)}-byte salt, blocks {sb.data_block_size}/{sb.hash_block_size}) that "
            "an fs-verity digest cannot check; use its dm-verity root", image=name)
    covered = sb.data_blocks * sb.data_block_size  # veritysetup covers whole blocks only
    if covered != tree.data_size:
        raise IntegrityError(
            f"layer has {tree.data_size} bytes, its sidecar {sidecar.name} was made for "
            f"{sb.data_blocks} blocks of {sb.data_block_size} ({covered} bytes): layer or "
            "sidecar changed", image=name)
    offset = hash_area_offset(0, p.hash_block_size, True)
    if sidecar.size < offset + tree.tree_bytes:
        raise IntegrityError(f"sidecar {sidecar.name} is truncated", image=name)
    return offset


def dmverity_tree(blob: Blob, trust: DmVerityRoot, sidecar: Blob,
                  hash_offset: int = 0) -> MerkleTree:
    """The tree of ``blob`` checked against a dm-verity root. ``sidecar`` is a veritysetup hash
    device with its superblock (or none, ``--no-superblock``, unsalted) at ``hash_offset``;
    it may be ``blob`` itself (containerd appends the tree to the layer)."""
    salt, offset = b"", hash_offset
    name = blob.name
    if sidecar.size >= hash_offset + 512 and sidecar.read(hash_offset, 8) == VERITY_MAGIC:
        try:
            sb = parse_verity_superblock(sidecar.read(hash_offset, 512))
        except FormatError as exc:
            raise IntegrityError(f"hash device {sidecar.name}: {exc}", image=name) from None
        trusted = (trust.alg, trust.data_block_size, trust.hash_block_size, trust.data_blocks,
                   trust.hash_type)
        found = (sb.alg, sb.data_block_size, sb.hash_block_size, sb.data_blocks, sb.hash_type)
        if found != trusted:
            raise IntegrityError(
                f"hash device {sidecar.name} superblock says (alg, data/hash block size, data "
                f"blocks, type) = {found}, trusted is {trusted}", image=name)
        salt = sb.salt
        offset = hash_area_offset(hash_offset, trust.hash_block_size, True)
    mode = SaltMode.DM_PREFIX if trust.hash_type == 1 else SaltMode.DM_SUFFIX
    params = HashParams(trust.alg, trust.data_block_size, trust.hash_block_size, salt, mode)
    return MerkleTree(params, trust.data_size, sidecar, offset, trust)


def containerd_trust(blob: Blob, info: ContainerdVerity) -> DmVerityRoot:
    """The trust a ``.dmverity`` file gives when the caller opts into believing it: block size
    from the superblock at ``hashoffset``, required equal to the hash block size."""
    off = info.hash_offset
    if blob.size < off + 512 or blob.read(off, 8) != VERITY_MAGIC:
        raise IntegrityError(f"no veritysetup superblock at hashoffset {off}", image=blob.name)
    try:
        sb = parse_verity_superblock(blob.read(off, 512))
    except FormatError as exc:
        raise IntegrityError(f"superblock at hashoffset {off}: {exc}", image=blob.name) from None
    bs = sb.data_block_size
    if bs != sb.hash_block_size or off % bs or off == 0:
        raise IntegrityError(
            f"containerd layout with data/hash blocks {bs}/{sb.hash_block_size} and "
            f"hashoffset {off} is not trusted without an explicit --dm-verity root",
            image=blob.name)
    return DmVerityRoot(info.root, off // bs, bs, bs)


# opening a layer ----------------------------------------------------------------------------

def open_layer_blob(path: str, trust: TrustSpec | None, *, require: bool,
                    name: str | None = None,
                    cache_bytes: int = DEFAULT_TREE_CACHE_BYTES) -> Blob:
    """Open a layer file for reading: verified when ``trust`` names a root, plain otherwise.
    Raises ``IntegrityError`` if the layer does not match, or nothing is trusted and
    ``require`` is set; ``OSError`` if a file cannot be opened."""
    trust = trust if trust is not None else TrustSpec()
    blob = FileBlob(path, name)
    owned: list[Blob] = [blob]
    try:
        tree: MerkleTree | None = None
        if trust.fsverity is not None:
            tree = _fsverity_for(path, blob, trust, owned)
        elif trust.dmverity is not None or trust.trust_dmverity_sidecar:
            tree = _dmverity_for(path, blob, trust, owned)
        if tree is not None:
            return VerifiedBlob(blob, tree, cache_bytes=cache_bytes)
        if require:
            raise IntegrityError(
                "no trusted digest for this layer, and verity is required", image=blob.name)
        return blob
    except BaseException:
        for b in owned:
            b.close()
        raise


def _find_sidecar(path: str, trust: TrustSpec, suffixes: tuple[str, ...]) -> str | None:
    if trust.sidecar is not None:
        if not os.path.exists(trust.sidecar):
            raise IntegrityError(f"sidecar {trust.sidecar} does not exist", image=path)
        return trust.sidecar
    for suffix in suffixes:
        if os.path.exists(path + suffix):
            return path + suffix
    return None


def _fsverity_for(path: str, blob: Blob, trust: TrustSpec, owned: list[Blob]) -> MerkleTree:
    assert trust.fsverity is not None
    side_path = _find_sidecar(path, trust, (".verity",))
    sidecar: Blob | None = None
    descriptor: bytes | None = None
    if side_path is not None:
        if is_dmverity_json(side_path):
            raise IntegrityError(
                f"{side_path} is a containerd dm-verity description, which an fs-verity "
                "digest cannot check; give its dm-verity root", image=blob.name)
        sidecar = FileBlob(side_path)
        owned.append(sidecar)
        descriptor = _read_small(side_path + ".desc")
    return fsverity_tree(blob, trust.fsverity, sidecar, descriptor)


def _read_small(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except FileNotFoundError:
        return None


def _dmverity_for(path: str, blob: Blob, trust: TrustSpec, owned: list[Blob]) -> MerkleTree | None:
    explicit = trust.dmverity
    suffixes = (".verity", ".dmverity") if explicit is not None else (".dmverity",)
    side_path = _find_sidecar(path, trust, suffixes)
    if side_path is None:
        if explicit is None:
            return None
        raise IntegrityError(
            f"no hash tree for the dm-verity root (expected {path}.verity or {path}.dmverity)",
            image=blob.name)
    if is_dmverity_json(side_path):
        info = read_dmverity_json(side_path)
        if explicit is not None and info.root != explicit.root:
            raise IntegrityError(
                f"{side_path} names root {info.root.hex()}, trusted is {explicit.root.hex()}",
                image=blob.name)
        dm = explicit if explicit is not None else containerd_trust(blob, info)
        return dmverity_tree(blob, dm, blob, info.hash_offset)
    if explicit is None:
        return None  # a plain tree file, but no root to check it against
    sidecar = FileBlob(side_path)
    owned.append(sidecar)
    return dmverity_tree(blob, explicit, sidecar)
