"""The labels containerd gives meaning to: garbage-collection roots and references, lease
expiry, and the remote-snapshot target (shared/docs/containerd-client.md, 1.5 to 1.7 and 3.1).

containerd's GC keeps an object when something refers to it: an image record keeps its target
blob, a blob keeps the blobs named by its ``containerd.io/gc.ref.content.*`` labels (index →
manifests, manifest → config and layers) and the snapshot named by
``containerd.io/gc.ref.snapshot.<snapshotter>`` (config → the image's top chain id), and a
lease keeps everything made under it until it is deleted or expires.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

GC_ROOT = "containerd.io/gc.root"
GC_EXPIRE = "containerd.io/gc.expire"
GC_REF_CONTENT = "containerd.io/gc.ref.content"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot"
SNAPSHOT_REF = "containerd.io/snapshot.ref"  # Prepare's target: the remote-snapshot protocol
UNCOMPRESSED = "containerd.io/uncompressed"  # on a layer blob: its diff_id
MAX_LABEL = 4096  # containerd refuses a label whose key plus value is longer

# Ours, on a remote-snapshot Prepare (erofs-fuse image pull/import): the converted layer the
# snapshotter takes in. Only ``containerd.io/snapshot/`` labels reach a snapshotter.
LAYER_LABEL = "containerd.io/snapshot/erofs-fuse.layer"  # absolute path of FILE (+ FILE.verity)
DIFF_ID_LABEL = "containerd.io/snapshot/erofs-fuse.diff-id"  # sha256:<the layer's diff_id>
VERITY_LABEL = "containerd.io/snapshot/erofs-fuse.verity"  # sha256:<FILE's fs-verity digest>
# Instead of LAYER_LABEL (erofs-fuse image pull --lazy): the layer stays in its registry, read
# lazily; the value is a ``lazy.source`` string, lazy:HOST/REPO@sha256:MANIFEST#INDEX. The
# diff_id is the blob's digest (push's config), the verity label the layer's annotated digest.
LAZY_LABEL = "containerd.io/snapshot/erofs-fuse.lazy"
# With LAYER_LABEL: "true" when the writer found that the layer shows no xattr (none but
# overlayfs's own, trusted.overlay.*): a chain of such layers is mounted -o noxattr, which spares
# the kernel a GETXATTR per file. Absent (older clients, lazy layers): not known, may show some.
XATTR_FREE_LABEL = "containerd.io/snapshot/erofs-fuse.xattr-free"

# CRI's, on each layer's Prepare when its ``disable_snapshot_annotations`` is false
# (containerd-client.md 4.2): where the snapshotter can fetch the layers itself.
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"  # the reference as pulled
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"  # the platform manifest's digest
CRI_LAYER = "containerd.io/snapshot/cri.layer-digest"  # this layer's blob digest
CRI_LAYERS = "containerd.io/snapshot/cri.image-layers"  # this and the layers above, commas


def expire_at(ttl: timedelta, now: datetime | None = None) -> str:
    """The ``containerd.io/gc.expire`` value (RFC 3339, UTC) ``ttl`` from now."""
    when = (now or datetime.now(timezone.utc)) + ttl
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def manifest_gc_labels(config: str, layers: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Labels for a manifest blob that keep its config and the layer blobs that were stored
    (as containerd's ``images.ChildGCLabels``: ``…content.config``, ``…content.l.<i>``)."""
    out = {f"{GC_REF_CONTENT}.config": config}
    out.update((f"{GC_REF_CONTENT}.l.{i}", digest) for i, digest in enumerate(layers))
    return out


def index_gc_labels(manifests: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Labels for an index blob that keep its manifests (``…content.m.<i>``)."""
    return {f"{GC_REF_CONTENT}.m.{i}": digest for i, digest in enumerate(manifests)}


def snapshot_gc_label(snapshotter: str, chain_id: str) -> dict[str, str]:
    """The label for an image's config blob that keeps its snapshot chain: the top chain id in
    ``snapshotter`` (the snapshot's name as clients see it)."""
    return {f"{GC_REF_SNAPSHOT}.{snapshotter}": chain_id}
