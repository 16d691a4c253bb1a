"""The lifecycle of the containerd proxy snapshotter (``erofs-fuse snapshotter``, whose
arguments ``erofs_fuse.cli.snapshotter`` parses).

Order: the command line configures logging (stderr, for systemd's journal) and imports the
mount code; here we refuse an address that is not ours to take (``claims.py``), fork the mount
forker (before any thread exists), lock the root, open the store and sweep what a crash left,
then serve gRPC on the unix socket until SIGTERM or SIGINT, which stop the server (in-flight
calls get a grace period), remove the socket if it is still ours, and close the store, the lock
and the forker. The FUSE mounts of running containers are left in place: they are independent
daemons, and the next start adopts them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from concurrent import futures

from ..console import CliError
from ..lazy.cache import DEFAULT_CACHE_SIZE
from .claims import (clear_stale_socket, lock_root, publish_socket, release_socket,
                     staging_path)
from .mounts import MountMain

log = logging.getLogger("erofs_fuse.snapshotter")

DEFAULT_ROOT = "/var/lib/erofs-fuse/snapshotter"
DEFAULT_ADDRESS = "/run/erofs-fuse/snapshotter.sock"
MAX_MESSAGE = 16 << 20  # containerd's limit, each way
GRACE = 10.0  # seconds in-flight calls get at SIGTERM


def serve(root: str, address: str, mount_main: MountMain, *, linger: float = 0.0,
          cache_size: int = DEFAULT_CACHE_SIZE, spin_us: int | None = None) -> int:
    """Serve until SIGTERM or SIGINT; ``mount_main`` is ``erofs-fuse mount``'s entry point,
    which the forker runs for each chain mount; ``cache_size``: the bytes the lazy layers'
    block cache may hold (each chain mount with a lazy layer gets it as --cache-size);
    ``spin_us``: each chain mount's --spin (None: mount's default)."""
    from .mounts import Forker

    os.makedirs(root, mode=0o700, exist_ok=True)
    try:
        os.makedirs(os.path.dirname(address), exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CliError(f"--address {address}: {os.path.dirname(address)} is not a "
                       "directory") from None
    except OSError as exc:
        raise CliError(f"--address {address}: {exc.strerror or exc}") from None
    clear_stale_socket(address)  # before the forker: a refusal leaves nothing to stop
    forker = Forker(mount_main)  # first: no thread may exist when it forks
    with contextlib.ExitStack() as stack:
        stack.callback(forker.close)
        stack.callback(os.close, lock_root(root))  # after the fork, before the sweep
        import grpc

        from ..containerd.api import snapshots_pb2_grpc as pb_grpc
        from .core import Snapshotter
        from .service import Service

        snapshotter = Snapshotter(root, forker, linger=linger, cache_size=cache_size,
                                  spin_us=spin_us)
        stack.callback(snapshotter.close)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE)])
        pb_grpc.add_SnapshotsServicer_to_server(  # type: ignore[no-untyped-call]
            Service(snapshotter), server)
        staged = staging_path(address)
        if server.add_insecure_port(f"unix://{staged}") == 0:
            raise CliError(f"--address {address}: cannot listen", 1)
        ours = publish_socket(staged, address)
        stack.callback(release_socket, address, ours)  # runs after the server's stop
        stop = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.start()
        stack.callback(lambda: server.stop(GRACE).wait())
        log.info("serving containerd snapshots on %s, root %s", address, root)
        while not stop.wait(3600):
            pass
    log.info("stopped")
    return 0
