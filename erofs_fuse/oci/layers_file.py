"""``NAME.layers``: the layer stack of a converted image, as ``convert-image`` writes it and
``mount --layers @NAME.layers`` reads it.

One JSON object (UTF-8)::

    {
      "format": "erofs-fuse.layers.v1",
      "image": "/abs/path/of/the/layout-or-archive",
      "name": "docker.io_library_debian_12",
      "ref": "docker.io/library/debian:12",          # null without a ref name
      "manifest": "sha256:...", "config": "sha256:...",
      "platform": "linux/amd64",                      # null if neither index nor config says
      "layers": [                                     # BOTTOM TO TOP, as in the manifest
        {"path": "sha256-<diff_id hex>.erofs",        # relative to this file's directory
         "diff_id": "sha256:...",                     # of the uncompressed layer tar
         "chain_id": "sha256:...",                    # OCI ChainID of the stack up to here
         "digest": "sha256:...",                      # of the layer blob as distributed
         "size": 123456,                              # bytes of the .erofs file
         "verity": "sha256:..."}                      # its fs-verity digest: sealed only
      ]
    }

A reader needs ``format`` and, per layer, ``path``; ``verity``, when present, is a trusted root
of that layer (as ``--verity INDEX=sha256:HEX``). Other keys are information, and unknown keys
are ignored, so later versions may add some without changing ``format``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..blob import write_atomic

if TYPE_CHECKING:  # imported when a digest is met: a mount without one imports no verity code
    from ..verity.trust import FsVerityDigest, TrustSpec

FORMAT = "erofs-fuse.layers.v1"
SUFFIX = ".layers"
MAX_FILE_BYTES = 16 << 20


class LayersFileError(ValueError):
    """A ``.layers`` file that cannot be read; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class ListedLayer:
    """A layer as a ``.layers`` file lists it; ``path`` relative to the file's directory."""

    path: str
    diff_id: str
    chain_id: str
    digest: str
    size: int
    verity: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "diff_id": self.diff_id,
                               "chain_id": self.chain_id, "digest": self.digest,
                               "size": self.size}
        if self.verity is not None:
            out["verity"] = self.verity
        return out


@dataclass(frozen=True)
class LayersFile:
    image: str
    name: str
    ref: str | None
    manifest: str
    config: str
    platform: str | None
    layers: tuple[ListedLayer, ...]

    def dumps(self) -> str:
        doc = {"format": FORMAT, "image": self.image, "name": self.name, "ref": self.ref,
               "manifest": self.manifest, "config": self.config, "platform": self.platform,
               "layers": [layer.to_json() for layer in self.layers]}
        import json  # here, as below: every mount imports this module, few name a file

        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write_layers_file(path: str, content: LayersFile) -> None:
    """Write atomically: a mount reading the old file never sees half of the new one."""
    write_atomic(path, content.dumps().encode("utf-8"))


def load_layers_file(path: str) -> LayersFile:
    """Everything ``path`` says (``push`` needs the digests, not only the paths); each
    layer's ``path`` resolved against the file's directory."""
    doc = _read_doc(path)
    base = os.path.dirname(path)

    def text(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> Any:
        value = obj.get(key)
        if (value is None and optional) or isinstance(value, str):
            return value
        raise LayersFileError(f"{where}: {key!r} is not a string")

    layers = []
    for k, entry in enumerate(doc["layers"]):
        where = f"{path}: layer {k}"
        if not isinstance(entry, dict):
            raise LayersFileError(f"{where}: not a JSON object")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LayersFileError(f"{where}: 'size' is not a byte count")
        layers.append(ListedLayer(
            os.path.join(base, _mount_layer(entry, "", where).path),
            text(entry, "diff_id", where), text(entry, "chain_id", where),
            text(entry, "digest", where), size, text(entry, "verity", where, optional=True)))
    return LayersFile(text(doc, "image", path), text(doc, "name", path),
                      text(doc, "ref", path, optional=True), text(doc, "manifest", path),
                      text(doc, "config", path), text(doc, "platform", path, optional=True),
                      tuple(layers))


@dataclass(frozen=True)
class MountLayer:
    """What a mount takes from a listed layer: its path (resolved) and trusted digest."""

    path: str
    verity: FsVerityDigest | None


def read_layers_file(path: str) -> list[MountLayer]:
    """The layers of ``path``, bottom to top, with paths resolved against its directory."""
    doc = _read_doc(path)
    base = os.path.dirname(path)
    return [_mount_layer(entry, base, f"{path}: layer {k}")
            for k, entry in enumerate(doc["layers"])]


def _read_doc(path: str) -> dict[str, Any]:
    """The JSON object of a layers file, its format checked and ``layers`` a list."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise LayersFileError(f"{path}: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise LayersFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    import json

    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise LayersFileError(f"{path}: not a layers file ({str(exc)[:100]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise LayersFileError(f"{path}: not a layers file (format {found!r}, expected {FORMAT})")
    entries = doc.get("layers")
    if not isinstance(entries, list):
        raise LayersFileError(f"{path}: 'layers' is not a list")
    return doc


def _mount_layer(entry: object, base: str, where: str) -> MountLayer:
    if not isinstance(entry, dict):
        raise LayersFileError(f"{where}: not a JSON object")
    rel = entry.get("path")
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise LayersFileError(f"{where}: 'path' is not a file name")
    verity = entry.get("verity")
    if verity is None:
        return MountLayer(os.path.join(base, rel), None)
    if not isinstance(verity, str):
        raise LayersFileError(f"{where}: 'verity' is not a string")
    from ..verity.formats import FormatError
    from ..verity.trust import FsVerityDigest

    try:
        return MountLayer(os.path.join(base, rel), FsVerityDigest.parse(verity))
    except FormatError as exc:
        raise LayersFileError(f"{where}: verity: {exc}") from None


def expand_layers(spec: str) -> tuple[list[str], dict[int, FsVerityDigest]]:
    """The ``--layers`` list ``spec`` (comma-separated, bottom to top) with each ``@FILE``
    item replaced by the layers of that ``.layers`` file; also the digests those files trust,
    by index in the expanded list."""
    layers: list[str] = []
    digests: dict[int, FsVerityDigest] = {}
    for item in filter(None, spec.split(",")):
        if not item.startswith("@"):
            layers.append(item)
            continue
        for listed in read_layers_file(item[1:]):
            if listed.verity is not None:
                digests[len(layers)] = listed.verity
            layers.append(listed.path)
    return layers, digests


def with_listed_digests(trust: list[TrustSpec],
                        digests: dict[int, FsVerityDigest]) -> list[TrustSpec]:
    """``trust`` (one spec per layer, or empty) with the listed digests added to layers the
    command line gave no root: an explicit ``--verity``/``--dm-verity`` wins."""
    if not digests:
        return trust
    from ..verity.trust import TrustSpec

    out = []
    for index, spec in enumerate(trust):
        digest = digests.get(index)
        if digest is not None and spec.fsverity is None and spec.dmverity is None:
            spec = TrustSpec(digest, None, spec.sidecar, spec.trust_dmverity_sidecar)
        out.append(spec)
    return out
