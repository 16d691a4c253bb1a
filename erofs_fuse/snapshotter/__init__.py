"""A containerd proxy snapshotter: each committed layer one sealed EROFS file, root filesystems
served by erofs-fuse mounts (``erofs-fuse snapshotter``).

Modules: ``api/`` (our .proto files and the code ``scripts/gen-proto`` generates from them),
``store`` (sqlite state), ``mounts`` (the mount fork server and chain mounts), ``core`` (the
operations), ``filters`` (List's filter expressions), ``service`` (gRPC), ``server`` (the
command and its lifecycle).
"""
