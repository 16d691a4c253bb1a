"""A containerd client: content, images, leases and snapshots over containerd's gRPC socket
(no FUSE, no trio). ``erofs-fuse image pull/import`` registers converted images with it.

Modules: ``api/`` (our .proto declarations of containerd's API, wire-compatible with 1.6, and
the code ``scripts/gen-proto`` generates; the snapshotter serves the same snapshots service),
``client`` (the connection, namespace and lease headers), ``content``, ``images``, ``leases``,
``snapshots`` (through containerd, with the remote-snapshot sequence), ``labels`` (GC and
snapshot labels), ``records`` (plain records), ``errors``.

    with Client("/run/containerd/containerd.sock", "default") as client:
        with client.lease() as leased:
            leased.content.write_blob(f"config-{digest}", data, digest, len(data))
            leased.images.put("example:latest", Descriptor(media_type, digest, size))
"""

from .client import DEFAULT_ADDRESS, Client
from .content import Content
from .errors import AlreadyExists, ContainerdError, FailedPrecondition, NotFound, Unavailable
from .images import Images
from .labels import (DIFF_ID_LABEL, GC_EXPIRE, GC_REF_CONTENT, GC_REF_SNAPSHOT, GC_ROOT,
                     LAYER_LABEL, LAZY_LABEL, SNAPSHOT_REF, UNCOMPRESSED, VERITY_LABEL,
                     XATTR_FREE_LABEL, index_gc_labels, manifest_gc_labels, snapshot_gc_label)
from .leases import Leases
from .records import ContentInfo, Descriptor, ImageRecord, Lease, Mount, SnapshotInfo
from .snapshots import RemotePrepare, Snapshots, unpack_key

__all__ = [
    "DEFAULT_ADDRESS", "DIFF_ID_LABEL", "GC_EXPIRE", "GC_REF_CONTENT", "GC_REF_SNAPSHOT",
    "GC_ROOT", "LAYER_LABEL", "LAZY_LABEL", "SNAPSHOT_REF", "UNCOMPRESSED", "VERITY_LABEL",
    "XATTR_FREE_LABEL",
    "AlreadyExists", "Client", "ContainerdError", "Content",
    "ContentInfo", "Descriptor", "FailedPrecondition", "ImageRecord", "Images", "Lease",
    "Leases", "Mount", "NotFound", "RemotePrepare", "SnapshotInfo", "Snapshots", "Unavailable",
    "index_gc_labels", "manifest_gc_labels", "snapshot_gc_label", "unpack_key",
]
