"""``push``: an image's layers as native EROFS blobs in a registry, each with its Merkle tree.

The source is an OCI image (layout directory or archive: its tar layers are converted, ``-j N``
worker processes at a time, into a temporary directory, sealed) or a ``.layers`` file (layers
already converted: each is sealed again into the temporary directory, and refused if its
fs-verity digest is not the one listed). Then, per distinct layer, two blobs:

- the EROFS image, media type ``application/vnd.erofs.layer.v1`` (containerd 2.3's
  ``MediaTypeErofsLayer``, uncompressed: its differ copies such a blob as the layer as is), in
  the image manifest's ``layers``, annotated (``ANNOTATIONS``) with its fs-verity digest, the
  tree blob's digest, size and the offset of the tree in it, and the diff_id of the tar it was
  made from;
- the sealed sidecar (``LAYER.verity``: a veritysetup superblock block then the fs-verity
  Merkle tree, or the bare tree), media type ``TREE_MEDIA_TYPE``.

The config is the source's, with ``rootfs.diff_ids`` the EROFS blobs' own digests: containerd
2.3's EROFS differ returns the blob's descriptor as the diff of an uncompressed EROFS layer.

Reachability. distribution 2.8.2's garbage collector marks only a manifest's ``config`` and
``layers`` (an annotation protects nothing), and a tree listed in the image's ``layers`` would
be one layer too many for containerd (one diff_id per layer). So the trees are the ``layers``
of a second manifest, an OCI 1.1 artifact (``artifactType`` ``TREES_ARTIFACT_TYPE``, the empty
config, ``subject`` = the image manifest), tagged as the distribution spec's referrers tag
schema says for registries without the referrers API: an index at tag ``sha256-<image hex>``
listing it, so OCI 1.1 tools find it. That alone does not keep the trees: with
``--delete-untagged`` 2.8.2 deletes every untagged manifest, and it does not follow an index
to the blobs of the manifests it lists (tested: the trees were collected). So the artifact
also has a tag of its own, ``sha256-<image hex>.verity`` (cosign's ``.sig`` convention), and
survives ``garbage-collect`` with or without ``--delete-untagged``. Trust does not depend on
any of this: the image manifest's annotations name each tree by digest.

Order: blobs (each looked for first, HEAD, then linked from the ``--mount-from``
repositories when the registry has it there, and sent only when missing), the trees' artifact
and its tag, and the image manifest last, under REF's tag. A push cut short leaves only blobs
and manifests no tag reaches: garbage.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, TextIO

from ..erofs.errors import ErofsError
from ..erofs.image import Image
from ..erofs.overlay_xattrs import shows_xattrs
from ..mkfs import ConvertOptions
from ..oci.image import Platform, resolve_image
from ..oci.layers_file import load_layers_file
from ..oci.layout import OciError, open_layout, parse_json
from ..oci.progress import ProgressView, TransferView, human_size
from ..oci.workers import output_name, plan, run_jobs
from ..verity.formats import VERITY_MAGIC, hash_area_offset, parse_verity_superblock
from ..verity.sealing import seal
from .client import RegistryClient
from .errors import NotFound, RegistryError
from .reference import Reference
from .upload import bytes_chunks, file_chunks

__all__ = ["ANNOTATIONS", "LAYER_MEDIA_TYPE", "PushRequest", "TREES_ARTIFACT_TYPE",
           "TREE_MEDIA_TYPE", "push"]

LAYER_MEDIA_TYPE = "application/vnd.erofs.layer.v1"
TREE_MEDIA_TYPE = "application/vnd.erofs-fuse.verity.tree.v1"
TREES_ARTIFACT_TYPE = "application/vnd.erofs-fuse.verity.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
TREES_TAG_SUFFIX = ".verity"  # the trees' own tag: sha256-<image hex>.verity


@dataclass(frozen=True)
class Annotations:
    verity: str = "org.erofs-fuse.verity.digest"  # sha256:<hex>, fs-verity digest of the blob
    tree: str = "org.erofs-fuse.verity.tree.digest"  # the tree blob's digest
    tree_size: str = "org.erofs-fuse.verity.tree.size"  # its bytes (decimal)
    tree_offset: str = "org.erofs-fuse.verity.tree.offset"  # where the tree starts in it
    diff_id: str = "org.erofs-fuse.tar.diff-id"  # the layer tar this blob was made from
    # "true": the layer shows no xattr (none but overlayfs's own): a lazy pull's chain of such
    # layers is mounted -o noxattr; absent: not known
    xattr_free: str = "org.erofs-fuse.xattr-free"


ANNOTATIONS = Annotations()


@dataclass(frozen=True)
class PushRequest:
    source: str
    ref: str
    plain_http: bool
    jobs: int
    options: ConvertOptions
    quiet: bool
    platform: Platform | None = None
    ref_name: str | None = None
    mount_from: tuple[str, ...] = ()  # repositories of the same registry to link blobs from


@dataclass(frozen=True)
class Sealed:
    """A layer file and its sidecar, as pushed."""

    path: str
    tree_path: str
    verity: str
    diff_id: str  # of the tar it was made from
    digest: str
    size: int
    tree_digest: str
    tree_size: int
    tree_offset: int
    xattr_free: bool = False  # shows no xattr (the writer's count, or a walk of the layer)

    def descriptor(self) -> dict[str, Any]:
        a = ANNOTATIONS
        annotations = {a.verity: self.verity, a.tree: self.tree_digest,
                       a.tree_size: str(self.tree_size), a.tree_offset: str(self.tree_offset),
                       a.diff_id: self.diff_id}
        if self.xattr_free:
            annotations[a.xattr_free] = "true"
        return {"mediaType": LAYER_MEDIA_TYPE, "digest": self.digest, "size": self.size,
                "annotations": annotations}

    def tree_descriptor(self) -> dict[str, Any]:
        return {"mediaType": TREE_MEDIA_TYPE, "digest": self.tree_digest,
                "size": self.tree_size, "annotations": {ANNOTATIONS.verity: self.verity}}


class PushError(RegistryError):
    """The source cannot be pushed as asked (a one-line message; bad input)."""


def push(req: PushRequest, stderr: TextIO | None = None) -> str:
    """Push ``req.source`` to ``req.ref``; the pushed manifest as ``REF@sha256:<hex>``."""
    out = stderr or sys.stderr
    ref = Reference.parse(req.ref)
    if ref.digest is not None:
        raise PushError(f"{req.ref}: push to a tag, not a digest (the digest is the result)")
    with tempfile.TemporaryDirectory(prefix="erofs-fuse-push-") as tmp:
        if req.source.endswith(".layers") and os.path.isfile(req.source):
            layers, config = _from_layers_file(req.source, tmp, out, req.quiet)
        else:
            layers, config = _from_image(req, tmp, out)
        with RegistryClient(plain_http=True if req.plain_http else None) as client:
            return _publish(client, ref, layers, config, req.jobs, out, req.quiet,
                            req.mount_from)


# sources --------------------------------------------------------------------------------------
def _from_image(req: PushRequest, tmp: str, out: TextIO
                ) -> tuple[list[Sealed], Mapping[str, Any]]:
    image = resolve_image(req.source, req.platform, req.ref_name)
    options = ConvertOptions(block_size=req.options.block_size,
                             whiteouts=req.options.whiteouts, compress=req.options.compress,
                             compress_level=req.options.compress_level, seal=True)
    jobs = plan(image, tmp, options)
    view = ProgressView(out, len(image.layers), jobs, quiet=req.quiet)
    view.note(f"{image.source}: {image.platform or 'no platform'}, {len(image.layers)} "
              f"layers to convert")
    try:
        results = run_jobs(jobs, min(req.jobs, max(len(jobs), 1)), view)
    finally:
        view.close()
    verity = {job.layer.diff_id: results[job.key].verity for job in jobs}
    free = {job.layer.diff_id: results[job.key].shown_xattr_inodes == 0 for job in jobs}
    layers = []
    for layer in image.layers:
        path = os.path.join(tmp, output_name(layer.diff_id))
        digest = verity.get(layer.diff_id)
        assert digest is not None  # sealed conversions always report it
        layers.append(_sealed(path, path + ".verity", digest, layer.diff_id,
                              free[layer.diff_id]))
    return layers, image.config_content


def _from_layers_file(path: str, tmp: str, out: TextIO, quiet: bool
                      ) -> tuple[list[Sealed], Mapping[str, Any]]:
    listed = load_layers_file(path)
    config = _config_of(listed.image, listed.config, path)
    layers = []
    for k, layer in enumerate(listed.layers):
        where = f"{path}: layer {k} ({layer.path})"
        xattr_free = _checked_layer(layer.path, where)
        sidecar = os.path.join(tmp, f"{k}.verity")
        before = _identity(layer.path)
        result = seal(layer.path, sidecar)
        if layer.verity is not None and result.digest != layer.verity:
            raise PushError(f"{where}: has fs-verity digest {result.digest}, the file lists "
                            f"{layer.verity}: changed since it was converted")
        sealed = _sealed(layer.path, sidecar, result.digest, layer.diff_id, xattr_free)
        if _identity(layer.path) != before:  # the tree and the digest would not pair
            raise PushError(f"{where}: changed while it was being read")
        layers.append(sealed)
        if not quiet:
            print(f"layer {k + 1}/{len(listed.layers)} {layer.diff_id[:19]}: sealed",
                  file=out, flush=True)
    return layers, config


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _checked_layer(path: str, where: str) -> bool:
    """Whether the layer shows no xattr, once its every inode is checked: a layer written with
    ``--objects`` keeps its files' bytes in an object store, and pushed alone it would be an
    image without file contents, so it is refused."""
    shown = False
    try:
        with contextlib.closing(Image.open(path)) as image:
            for name, inode in image.walk():
                if inode.is_reg and inode.is_metacopy:
                    raise PushError(f"{where}: metadata-only ({name.decode(errors='replace')} "
                                    "has its bytes in an object store): convert without "
                                    "--objects to push it")
                if not shown and inode.info.xattr_icount:
                    shown = shows_xattrs(xname for xname, _ in inode.xattrs())
    except ErofsError as exc:
        raise PushError(f"{where}: {exc}") from None
    return not shown


def _config_of(image: str, digest: str, where: str) -> Mapping[str, Any]:
    """The config ``digest`` of the image a layers file was converted from."""
    try:
        layout = open_layout(image)
        hexa = digest.removeprefix("sha256:")
        loc = layout.find("blobs/sha256/" + hexa)
        if loc is None or len(hexa) != 64:
            raise OciError(f"{image}: config {digest} is missing")
        data = layout.read_blob(digest, loc.size, 8 << 20, f"{image}: config")
        return parse_json(data, f"{image}: config {digest[:19]}")
    except OciError as exc:
        raise PushError(f"{where}: its image's config is needed: {exc}") from None


def _sealed(path: str, tree_path: str, verity: str, diff_id: str, xattr_free: bool) -> Sealed:
    with open(tree_path, "rb") as f:
        head = f.read(4096)
    offset = 0
    if head.startswith(VERITY_MAGIC):
        sb = parse_verity_superblock(head)
        offset = hash_area_offset(0, sb.hash_block_size, True)
    return Sealed(path, tree_path, verity, diff_id, _file_digest(path), os.path.getsize(path),
                  _file_digest(tree_path), os.path.getsize(tree_path), offset, xattr_free)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# documents ------------------------------------------------------------------------------------
def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data), **extra}


def config_bytes(config: Mapping[str, Any], layers: list[Sealed]) -> bytes:
    """The source's config with ``rootfs.diff_ids`` the EROFS blobs' digests."""
    doc = dict(config)
    doc["rootfs"] = {"type": "layers", "diff_ids": [layer.digest for layer in layers]}
    return _json(doc)


def manifest_bytes(config: bytes, layers: list[Sealed]) -> bytes:
    return _json({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                  "config": _desc(CONFIG_TYPE, config),
                  "layers": [layer.descriptor() for layer in layers]})


def trees_bytes(layers: list[Sealed], subject: bytes) -> bytes:
    trees = list({layer.tree_digest: layer.tree_descriptor() for layer in layers}.values())
    return _json({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                  "artifactType": TREES_ARTIFACT_TYPE, "config": _desc(EMPTY_TYPE, EMPTY),
                  "layers": trees, "subject": _desc(MANIFEST_TYPE, subject)})


def referrers_tag(manifest: bytes) -> str:
    """The distribution spec's referrers tag schema: ``sha256-<hex>`` of the subject."""
    return "sha256-" + hashlib.sha256(manifest).hexdigest()


# publishing -----------------------------------------------------------------------------------
class _Stopped(Exception):
    """An upload abandoned because another failed or the push was interrupted."""


@dataclass(frozen=True)
class _Blob:
    label: str
    size: int
    path: str | None  # a file, or else
    data: bytes = b""


def _publish(client: RegistryClient, ref: Reference, layers: list[Sealed],
             config: Mapping[str, Any], jobs: int, out: TextIO, quiet: bool,
             mount_from: tuple[str, ...] = ()) -> str:
    cbytes = config_bytes(config, layers)
    manifest = manifest_bytes(cbytes, layers)
    trees = trees_bytes(layers, manifest)
    blobs: dict[str, _Blob] = {}
    for k, layer in enumerate(layers):
        label = f"layer {k + 1}/{len(layers)} {layer.diff_id[:19]}"
        blobs.setdefault(layer.digest, _Blob(label, layer.size, layer.path))
        blobs.setdefault(layer.tree_digest, _Blob(label + " tree", layer.tree_size,
                                                  layer.tree_path))
    for name, data in (("config", cbytes), ("empty config", EMPTY)):
        blobs.setdefault(_desc("", data)["digest"], _Blob(name, len(data), None, data))
    view = TransferView(out, sum(b.size for b in blobs.values()), quiet=quiet)
    stop = threading.Event()

    def sent(digest: str, done: int) -> None:
        if stop.is_set():  # raised inside the request's body: the upload is abandoned
            raise _Stopped()
        view.progress(digest, done)

    def send(digest: str) -> None:
        blob = blobs[digest]
        if client.blob_exists(ref, digest):
            view.finished(digest, f"{blob.label}: present", blob.size)
            return
        for repository in mount_from:
            if client.mount_blob(ref, digest, repository):
                view.finished(digest, f"{blob.label}: mounted from {repository}", blob.size)
                return
        began = time.monotonic()
        view.started(digest, blob.label, blob.size)
        opener = (file_chunks(blob.path, functools.partial(sent, digest))
                  if blob.path is not None else bytes_chunks(blob.data))
        client.push_blob(ref, digest, blob.size, opener, name=blob.label)
        view.finished(digest, f"{blob.label}: pushed {human_size(blob.size)} in "
                      f"{time.monotonic() - began:.1f} s")

    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, 8)))
    try:
        for _ in pool.map(send, list(blobs)):
            pass
    finally:
        # on a failure or Ctrl-C: nothing more starts, uploads under way stop at their next
        # chunk (what they sent is an unfinished session, which the registry purges)
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        view.close()
    tag = referrers_tag(manifest)
    trees_digest = client.push_manifest(ref, tag + TREES_TAG_SUFFIX, trees, MANIFEST_TYPE)
    index = _referrers_index(client, ref, tag, {
        **_desc(MANIFEST_TYPE, trees), "artifactType": TREES_ARTIFACT_TYPE})
    client.push_manifest(ref, tag, index, INDEX_TYPE)
    digest = client.push_manifest(ref, ref.tag or "latest", manifest, MANIFEST_TYPE)
    view.note(f"pushed {ref}; Merkle trees: {trees_digest[:19]}, tag {tag}{TREES_TAG_SUFFIX}")
    return str(ref.with_digest(digest))


def _referrers_index(client: RegistryClient, ref: Reference, tag: str,
                     entry: dict[str, Any]) -> bytes:
    """The referrers index at ``tag`` with ``entry`` added (others' entries kept)."""
    entries: list[Any] = []
    try:
        found = client.fetch_manifest(Reference(ref.host, ref.repository, tag))
        if found.descriptor.media_type == INDEX_TYPE:
            old = found.content.get("manifests")
            entries = [e for e in old if isinstance(e, dict) and
                       e.get("digest") != entry["digest"]] if isinstance(old, list) else []
    except NotFound:
        pass
    return _json({"schemaVersion": 2, "mediaType": INDEX_TYPE,
                  "manifests": entries + [entry]})
