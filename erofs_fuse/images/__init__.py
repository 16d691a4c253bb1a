"""``erofs-fuse image pull/import``: an OCI image registered with containerd, every layer
converted at once in worker processes straight from its compressed blob, and handed to our
snapshotter through containerd with the remote-snapshot protocol; no FUSE, nothing from the
command line.

    target = Target("/run/containerd/containerd.sock", "default", "erofs-fuse")
    done = pull_image("127.0.0.1:5000/team/app:v1", target, Settings(jobs=4))
    done = import_image("app.tar", target, Settings(), name="example.com/app:1")
    print(done.name, done.manifest_digest)

Modules: ``source`` (an archive, layout or registry image resolved to manifest, config and
layers), ``register`` (the containerd sequence, under one lease).
"""

from .register import (DEFAULT_STAGING, NotOurSnapshotter, Registered, Settings,
                       SnapshotterUnavailable, Target, import_image, pull_image, register)
from .source import NameMissing, SourceImage, from_archive, from_registry

__all__ = [
    "DEFAULT_STAGING", "NameMissing", "NotOurSnapshotter", "Registered", "Settings",
    "SnapshotterUnavailable", "SourceImage", "Target", "from_archive", "from_registry", "import_image", "pull_image",
    "register",
]
