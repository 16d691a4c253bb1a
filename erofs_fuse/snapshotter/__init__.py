"""A containerd proxy snapshotter: each committed layer one sealed EROFS file, root filesystems
served by erofs-fuse mounts (``erofs-fuse snapshotter``).

Modules (containerd's snapshots protocol is declared in ``erofs_fuse/containerd/api/``):
``store`` (sqlite state), ``mounts`` (the mount fork server and chain mounts), ``core`` (the
operations), ``filters`` (List's filter expressions), ``service`` (gRPC), ``server`` (the
command and its lifecycle).
"""
