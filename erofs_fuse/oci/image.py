"""Resolving an OCI image to its layers: index, manifest, config, platform.

Spec: OCI image-spec v1.1: ``image-layout.md`` (``oci-layout``, ``index.json``,
``blobs/<alg>/<hex>``), ``image-index.md``, ``manifest.md``, ``descriptor.md`` (digests, sizes,
platforms), ``config.md`` (``rootfs.diff_ids`` and the ChainID rule). Docker's schema 2 manifest
and manifest list are read as their OCI twins, since ``docker save`` and registries still write
them.

``resolve_image(path, platform)`` follows ``index.json`` through nested indexes to the manifest
of one platform, reads its config and returns the layers bottom to top, each with its blob's
``BlobLocation`` (a file, a byte offset and a size; ``layout.py`` finds blobs in a layout
directory or in an archive, read in place), which ``open_blob`` streams.

Everything read is untrusted. Manifests, indexes and configs are read only up to
``MAX_JSON_BYTES`` and must hash to their descriptor's digest; a layer blob is hashed while it is
streamed and ``BlobStream.finish`` refuses a mismatch. Only ``sha256`` digests are accepted
(so a digest names a file ``blobs/sha256/<64 hex>``: it cannot name a path outside the layout),
every list and nesting depth is bounded, and layer media types outside ``LAYER_MEDIA_TYPES``
are refused. Every failure is an ``OciError`` with a one-line message.
"""

from __future__ import annotations

import hashlib
import os
import platform as _platform
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from .layout import (BlobLocation, BlobStream, CheckedStream, Layout, OciError, open_layout,
                     parse_json)

__all__ = [
    "BlobLocation", "BlobStream", "CheckedStream", "Descriptor", "Layer", "OciError",
    "Platform", "RemoteBlob", "ResolvedImage", "chain_ids", "config_diff_ids", "host_platform",
    "image_name", "open_blob", "resolve_image", "sanitize_name",
]

INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
CONFIG_TYPES = frozenset({
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
})
# media type -> compression of the tar stream (the writer detects it by magic as well)
LAYER_MEDIA_TYPES: Mapping[str, str | None] = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # the full reference, which docker save writes

MAX_JSON_BYTES = 4 << 20  # containerd's limit for a manifest or an index
MAX_INDEX_DEPTH = 4  # index.json -> image index -> manifest is depth 1
MAX_DESCRIPTORS = 4096  # entries of one index, layers of one manifest
MAX_BLOB_SIZE = 1 << 48
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TOKEN = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")



# platforms ------------------------------------------------------------------------------------
# platform.machine() -> (GOARCH, variant), the names OCI platforms use
_MACHINES: Mapping[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""), "arm64": ("arm64", ""), "aarch64_be": ("arm64be", ""),
    "armv8l": ("arm", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""), "i486": ("386", ""), "i586": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "ppc64": ("ppc64", ""), "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""), "mips64": ("mips64", ""), "mips": ("mips", ""),
    "loongarch64": ("loong64", ""),
}
# a variant left out means this one (containerd's normalisation)
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]`` with OCI (Go) names; an empty variant is unspecified."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts) or \
                not all(_TOKEN.fullmatch(p) for p in parts):
            raise OciError(f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64")
        arch, variant = _MACHINES.get(parts[1], (parts[1], ""))
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else variant)

    def matches(self, other: Platform) -> bool:
        """Whether ``other`` (an image's platform) is one this wanted platform accepts: same
        os and architecture, and the same variant unless this one leaves it open."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self._variant() == other._variant()

    def _variant(self) -> str:
        return self.variant or _DEFAULT_VARIANT.get(self.architecture, "")


def host_platform() -> Platform:
    """This machine's platform: linux and the GOARCH of ``platform.machine()``."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINES.get(machine, (machine, ""))
    return Platform("linux", arch, variant if arch == "arm" else "")


# descriptors ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None


def _check_digest(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise OciError(f"{where}: digest is not a string")
    if _DIGEST.fullmatch(value):
        return value
    alg = value.partition(":")[0]
    if ":" in value and alg != "sha256" and _TOKEN.fullmatch(alg):
        raise OciError(f"{where}: digest algorithm {alg!r} is not supported (only sha256)")
    raise OciError(f"{where}: malformed digest {value[:80]!r}")


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OciError(f"{where}: expected a JSON object")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise OciError(f"{where}: {key} is {'missing' if value is None else 'not a string'}")
    return value


def json_list(obj: Mapping[str, Any], key: str, where: str,
              limit: int = MAX_DESCRIPTORS) -> list[Any]:
    """``obj[key]``, checked to be a list of at most ``limit`` entries."""
    value = obj.get(key)
    if not isinstance(value, list):
        raise OciError(f"{where}: {key} is {'missing' if value is None else 'not a list'}")
    if len(value) > limit:
        raise OciError(f"{where}: {key} has {len(value)} entries, more than the {limit} allowed")
    return value


def _platform_of(value: object, where: str) -> Platform | None:
    if value is None:
        return None
    obj = _obj(value, f"{where}: platform")
    return Platform(_str(obj, "os", f"{where}: platform"),
                    _str(obj, "architecture", f"{where}: platform"),
                    _str(obj, "variant", f"{where}: platform", required=False))


def parse_descriptor(value: object, where: str) -> Descriptor:
    obj = _obj(value, where)
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_SIZE:
        raise OciError(f"{where}: size {size!r} is not a byte count")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise OciError(f"{where}: annotations are not a map of strings")
    return Descriptor(_str(obj, "mediaType", where), _check_digest(obj.get("digest"), where),
                      size, annotations, _platform_of(obj.get("platform"), where))



# the image ------------------------------------------------------------------------------------
class RemoteBlob(Protocol):
    """A layer blob elsewhere (a registry's, ``registry.RemoteLayer``): picklable, so a worker
    process opens its own stream."""

    def open(self, name: str, on_read: Callable[[int], None] | None) -> CheckedStream: ...


@dataclass(frozen=True)
class Layer:
    """One layer, ``index`` 0 at the bottom, with the uncompressed tar's ``diff_id``."""

    index: int
    media_type: str
    digest: str  # of the blob as stored (compressed)
    size: int
    diff_id: str
    chain_id: str
    location: BlobLocation | RemoteBlob

    @property
    def compression(self) -> str | None:
        return LAYER_MEDIA_TYPES[self.media_type]


@dataclass(frozen=True)
class ResolvedImage:
    source: str
    name: str  # for file names: see image_name
    ref_name: str | None
    manifest_digest: str
    config_digest: str
    platform: Platform | None  # the manifest's, from its index entry or else its config
    layers: tuple[Layer, ...]
    manifest: Descriptor | None = None
    config: Descriptor | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)  # its index.json entry's
    config_content: Mapping[str, Any] = field(default_factory=dict)  # the config, parsed


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class _Candidate:
    manifest: Descriptor
    top: Descriptor  # its entry in index.json, which carries the ref name

    @property
    def ref_name(self) -> str | None:
        return self.top.annotations.get(REF_NAME)


def resolve_image(source: str, platform: Platform | None = None,
                  ref: str | None = None) -> ResolvedImage:
    """The image in the layout or archive ``source`` for ``platform`` (default: this
    machine's), restricted to index.json entries named ``ref`` when given."""
    layout = open_layout(source)
    index = parse_json(layout.read_file("index.json", MAX_JSON_BYTES), f"{source}: index.json")
    tops = _index_entries(index, f"{source}: index.json")
    if ref is not None:
        tops = _named(tops, ref, source)
    candidates: list[_Candidate] = []
    for k, top in enumerate(tops):
        _collect(layout, top, top, f"{source}: index.json manifests[{k}]", 0, candidates)
    chosen = choose(candidates, platform, source)
    return _read_image(layout, chosen, platform)


def _named(tops: list[Descriptor], ref: str, source: str) -> list[Descriptor]:
    """The index.json entries ``ref`` names: by full reference (containerd's annotation, which
    docker save writes; ``debian:12`` is ``docker.io/library/debian:12``), else by OCI ref
    name. Several images answering the name is refused: a tag such as ``12`` may be debian's
    and alpine's alike."""
    full = [d for d in tops if d.annotations.get(CONTAINERD_NAME) is not None and
            normalized_reference(d.annotations[CONTAINERD_NAME]) == normalized_reference(ref)]
    named = full or [d for d in tops if d.annotations.get(REF_NAME) == ref]
    if not named:
        names = sorted({_shown_name(d) for d in tops} - {"-"})
        raise OciError(f"{source}: no image named {ref!r} (names: {', '.join(names) or '-'})")
    if len({d.digest for d in named}) > 1:
        raise OciError(f"{source}: --ref {ref} is ambiguous, it names "
                       f"{', '.join(sorted({_shown_name(d) for d in named}))}: give the full "
                       "name")
    return named


def _shown_name(desc: Descriptor) -> str:
    return desc.annotations.get(CONTAINERD_NAME) or desc.annotations.get(REF_NAME) or "-"


def normalized_reference(name: str) -> str:
    """``name`` as docker and containerd complete it: ``debian`` is
    ``docker.io/library/debian:latest``, ``me/app:1`` is ``docker.io/me/app:1``."""
    first, slash, rest = name.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + name
    domain, _, path = name.partition("/")
    if domain == "docker.io" and "/" not in path:
        name = f"docker.io/library/{path}"
    last = name.rpartition("/")[2]
    if ":" not in last and "@" not in last:
        name += ":latest"
    return name


def _index_entries(index: Mapping[str, Any], where: str) -> list[Descriptor]:
    if index.get("schemaVersion") != 2:
        raise OciError(f"{where}: schemaVersion {index.get('schemaVersion')!r} is not 2")
    return [parse_descriptor(v, f"{where} manifests[{k}]")
            for k, v in enumerate(json_list(index, "manifests", where))]


def _collect(layout: Layout, desc: Descriptor, top: Descriptor, where: str, depth: int,
             out: list[_Candidate]) -> None:
    """Append the image manifests reachable from ``desc``; entries of other media types
    (attestations, artifacts) are not images and are passed over."""
    if desc.media_type in MANIFEST_TYPES:
        out.append(_Candidate(desc, top))
        if len(out) > MAX_DESCRIPTORS:
            raise OciError(f"{where}: more than {MAX_DESCRIPTORS} manifests")
    elif desc.media_type in INDEX_TYPES:
        if depth >= MAX_INDEX_DEPTH:
            raise OciError(f"{where}: indexes nested deeper than {MAX_INDEX_DEPTH}")
        here = f"{layout.source}: index {desc.digest[:19]}"
        index = parse_json(layout.read_blob(desc.digest, desc.size, MAX_JSON_BYTES, where), here)
        _check_media_type(index, desc, here)
        for k, child in enumerate(_index_entries(index, here)):
            _collect(layout, child, top, f"{here} manifests[{k}]", depth + 1, out)


def _check_media_type(doc: Mapping[str, Any], desc: Descriptor, where: str) -> None:
    declared = doc.get("mediaType")
    if declared is not None and declared != desc.media_type:
        raise OciError(f"{where}: says it is {declared!r}, its descriptor says {desc.media_type}")


def choose(candidates: list[_Candidate], wanted: Platform | None, source: str) -> _Candidate:
    """The manifest for ``wanted`` (default: this machine); or else the one manifest that
    names no platform (a single-image index)."""
    want = wanted or host_platform()
    unique = {c.manifest.digest: c for c in candidates}
    matched = [c for c in unique.values()
               if c.manifest.platform is not None and want.matches(c.manifest.platform)]
    if len(matched) == 1:
        return matched[0]
    if matched:
        platforms = sorted({str(c.manifest.platform) for c in matched})
        if len(platforms) > 1:
            raise OciError(f"{source}: several manifests match {want} ({', '.join(platforms)}): "
                           "choose one with --platform")
        raise OciError(f"{source}: several images for {want} (names: "
                       f"{', '.join(sorted(_shown_name(c.top) for c in matched))}): choose "
                       "one with --ref")
    bare = [c for c in unique.values() if c.manifest.platform is None]
    if len(bare) == 1:
        return bare[0]
    if bare:
        raise OciError(f"{source}: {len(bare)} manifests name no platform: choose one with --ref")
    have = sorted({str(c.manifest.platform) for c in unique.values()})
    raise OciError(f"{source}: no image for {want} (the image has: {', '.join(have) or 'none'})")


def _read_image(layout: Layout, chosen: _Candidate, wanted: Platform | None) -> ResolvedImage:
    source = layout.source
    mdesc = chosen.manifest
    where = f"{source}: manifest {mdesc.digest[:19]}"
    manifest = parse_json(layout.read_blob(mdesc.digest, mdesc.size, MAX_JSON_BYTES, where),
                          where)
    _check_media_type(manifest, mdesc, where)
    if manifest.get("schemaVersion") != 2:
        raise OciError(f"{where}: schemaVersion {manifest.get('schemaVersion')!r} is not 2")
    cdesc = parse_descriptor(manifest.get("config"), f"{where}: config")
    if cdesc.media_type not in CONFIG_TYPES:
        raise OciError(f"{where}: config media type {cdesc.media_type!r}: not a container image")
    blobs = [parse_descriptor(v, f"{where}: layers[{k}]")
             for k, v in enumerate(json_list(manifest, "layers", where))]
    for k, desc in enumerate(blobs):
        if desc.media_type not in LAYER_MEDIA_TYPES:
            raise OciError(f"{where}: layer {k}: unsupported media type {desc.media_type!r}")
    cwhere = f"{source}: config {cdesc.digest[:19]}"
    config = parse_json(layout.read_blob(cdesc.digest, cdesc.size, MAX_JSON_BYTES,
                                         f"{where}: config"), cwhere)
    diff_ids = config_diff_ids(config, len(blobs), cwhere)
    found = _platform_of_config(config, cwhere)
    if wanted is not None and mdesc.platform is None and found is not None and \
            not wanted.matches(found):
        raise OciError(f"{source}: the image is for {found}, not {wanted}")
    layers = tuple(
        Layer(k, d.media_type, d.digest, d.size, diff_id, chain,
              layout.locate(d.digest, d.size, f"{where}: layer {k}"))
        for k, (d, diff_id, chain) in enumerate(zip(blobs, diff_ids, chain_ids(diff_ids))))
    return ResolvedImage(source, image_name(source, chosen.top.annotations), chosen.ref_name,
                         mdesc.digest, cdesc.digest, mdesc.platform or found, layers, mdesc,
                         cdesc, chosen.top.annotations, config)


def config_diff_ids(config: Mapping[str, Any], nlayers: int, where: str) -> list[str]:
    rootfs = _obj(config.get("rootfs"), f"{where}: rootfs")
    if rootfs.get("type") != "layers":
        raise OciError(f"{where}: rootfs type {rootfs.get('type')!r} is not 'layers'")
    values = json_list(rootfs, "diff_ids", f"{where}: rootfs")
    if len(values) != nlayers:
        raise OciError(f"{where}: {len(values)} diff_ids for {nlayers} layers")
    return [_check_digest(v, f"{where}: diff_ids[{k}]") for k, v in enumerate(values)]


def _platform_of_config(config: Mapping[str, Any], where: str) -> Platform | None:
    os_, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
        return None
    variant = config.get("variant")
    return Platform(os_, arch, variant if isinstance(variant, str) else "")


# names ----------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 100


def image_name(source: str, annotations: Mapping[str, str]) -> str:
    """A file name for the image: its full reference (containerd's annotation, else the OCI
    ref name; a bare tag is put after the layout's base name), else the layout's base name;
    anything but letters, digits and ``._+-`` becomes ``_``."""
    base = os.path.basename(os.path.normpath(os.path.abspath(source)))
    for suffix in (".tar", ".oci", ".ociarchive"):
        base = base.removesuffix(suffix)
    ref = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME) or ""
    if ref and not any(c in ref for c in "/:@"):
        ref = f"{base}-{ref}"  # a tag alone, as skopeo writes it
    return sanitize_name(ref or base)


def sanitize_name(text: str) -> str:
    name = _UNSAFE.sub("_", text).lstrip(".-_")[:MAX_NAME]
    return name or "image"


def open_blob(layer: Layer, on_read: Callable[[int], None] | None = None) -> CheckedStream:
    """The layer's blob as a stream, checked against its digest by ``finish()``."""
    name = f"layer {layer.index}"
    if isinstance(layer.location, BlobLocation):
        return BlobStream(layer.location, layer.digest, name, on_read)
    return layer.location.open(name, on_read)
