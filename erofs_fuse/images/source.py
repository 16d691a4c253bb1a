"""Where an image comes from: an OCI archive or layout (``oci.image``) or a registry
(``registry``), resolved to one platform's manifest. Both give a ``SourceImage``: the manifest and
config exactly as they were (they go into containerd's content store), the layers with their
diff_ids and chain ids and where each blob is streamed from, and the name to register."""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy.layer import lazy_verity, lazy_xattr_free
from ..lazy.source import LazySource
from ..oci.image import (CONTAINERD_NAME, LAYER_MEDIA_TYPES, MAX_JSON_BYTES, REF_NAME, Layer,
                         OciError, Platform, ResolvedImage, chain_ids, config_diff_ids,
                         resolve_image)
from ..oci.layout import open_layout
from ..registry import Reference, RegistryClient, RegistryError, RemoteLayer
from ..registry.client import Resolved


class NameMissing(OciError):
    """An archive whose index names no full reference, and no ``--name``."""


@dataclass(frozen=True)
class Document:
    """A manifest or config blob as containerd stores it."""

    media_type: str
    digest: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class LazyLayer:
    """Where a layer of a lazy pull stays, and its fs-verity digest (the manifest's)."""

    source: LazySource
    verity: str
    xattr_free: bool = False  # push's annotation says the layer shows no xattr


@dataclass(frozen=True)
class SourceImage:
    name: str  # the image record's name
    manifest: Document
    config: Document
    image: ResolvedImage  # layers bottom to top: diff_id, chain_id, blob location
    lazy: tuple[LazyLayer, ...] = ()  # a lazy pull's: one per layer, bottom to top


def from_archive(path: str, platform: Platform | None, name: str | None) -> SourceImage:
    """The image in the OCI archive or layout ``path``, named ``name``, else by its index
    entry's ``io.containerd.image.name``, else by its ``org.opencontainers.image.ref.name``
    when that is a full reference (not a tag alone)."""
    image = resolve_image(path, platform)
    assert image.manifest is not None and image.config is not None
    layout = open_layout(path)
    mdesc, cdesc = image.manifest, image.config
    manifest = layout.read_blob(mdesc.digest, mdesc.size, MAX_JSON_BYTES,
                                f"{path}: manifest {mdesc.digest[:19]}")
    config = layout.read_blob(cdesc.digest, cdesc.size, MAX_JSON_BYTES,
                              f"{path}: config {cdesc.digest[:19]}")
    chosen = name or archive_name(image)
    if not chosen:
        raise NameMissing(f"{path}: the image has no full reference name "
                          f"({CONTAINERD_NAME} or {REF_NAME}): give one with --name")
    return SourceImage(chosen, Document(mdesc.media_type, mdesc.digest, manifest),
                       Document(cdesc.media_type, cdesc.digest, config), image)


def archive_name(image: ResolvedImage) -> str | None:
    """containerd's annotation as written; else the OCI ref name if it is a full reference
    (``docker.io/library/x:1``, ``host:5000/a/b:t``), normalized as a pull would name it."""
    given = image.annotations.get(CONTAINERD_NAME)
    if given:
        return given
    ref_name = image.annotations.get(REF_NAME, "")
    if "/" not in ref_name:  # a tag alone ("latest", "v1"), as skopeo and buildkit write
        return None
    try:
        return str(Reference.parse(ref_name))
    except RegistryError:
        return None


def from_registry(client: RegistryClient, text: str, platform: Platform | None, *,
                  lazy: bool = False, plain_http: bool = False,
                  lazy_if_native: bool = False) -> SourceImage:
    """The image ``text`` names in its registry; named by the reference, normalized
    (``busybox`` is ``docker.io/library/busybox:latest``). ``lazy``: its layers must be
    native EROFS layers as push makes them (each its own diff_id), to be read in place.
    ``lazy_if_native``: read in place if they are, converted otherwise (CRI's pulls in the
    snapshotter): ``lazy`` of the result is empty for an image to convert."""
    ref = Reference.parse(text)
    got = client.resolve(ref, platform)
    where = f"{ref}: config {got.config.descriptor.digest[:19]}"
    diff_ids = config_diff_ids(got.config.content, len(got.layers), where)
    lazy_layers: tuple[LazyLayer, ...] = ()
    if lazy or lazy_if_native:
        try:
            lazy_layers = native_layers(ref, got, diff_ids, plain_http)
        except OciError:
            if lazy:
                raise
    layers = []
    for k, (desc, diff_id, chain) in enumerate(zip(got.layers, diff_ids, chain_ids(diff_ids))):
        if not lazy_layers and desc.media_type not in LAYER_MEDIA_TYPES:
            raise OciError(f"{ref}: layer {k}: unsupported media type {desc.media_type!r}")
        layers.append(Layer(k, desc.media_type, desc.digest, desc.size, diff_id, chain,
                            RemoteLayer(client, got.pinned, desc)))
    mdesc, cdesc = got.manifest.descriptor, got.config.descriptor
    image = ResolvedImage(str(ref), str(ref), None, mdesc.digest, cdesc.digest, got.platform,
                          tuple(layers), mdesc, cdesc)
    return SourceImage(str(ref), Document(mdesc.media_type, mdesc.digest, got.manifest.data),
                       Document(cdesc.media_type, cdesc.digest, got.config.data), image,
                       lazy_layers)


def native_layers(ref: Reference, got: Resolved, diff_ids: list[str],
                  plain_http: bool = False) -> tuple[LazyLayer, ...]:
    """Each layer of ``got`` (bottom first) as it stays in its registry, to be read lazily,
    if the image is one erofs-fuse push made: every layer a native EROFS layer with push's
    verity annotations, and the config's diff_ids its blobs' digests. OciError naming the
    first layer that is not (a RemoteLayerError for the media type or annotations)."""
    pinned = f"{ref.host}/{ref.repository}@{got.manifest_digest}"
    out = []
    for k, (desc, diff_id) in enumerate(zip(got.layers, diff_ids)):
        name = f"{ref}: layer {k}"
        verity = lazy_verity(desc, f"{name} (without --lazy, it is converted)")
        if diff_id != desc.digest:
            raise OciError(f"{name}: its diff_id {diff_id[:19]} is not its blob's digest "
                           f"{desc.digest[:19]}, as erofs-fuse push writes the config")
        out.append(LazyLayer(LazySource(pinned, k, plain_http), verity, lazy_xattr_free(desc)))
    return tuple(out)
