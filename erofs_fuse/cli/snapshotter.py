"""``erofs-fuse snapshotter``: its arguments; the service is ``erofs_fuse.snapshotter``."""

from __future__ import annotations

import argparse
import logging
import os

from ..console import PROG, CliError, print_error
from ..snapshotter.server import DEFAULT_ADDRESS, DEFAULT_ROOT, serve

DEFAULT_LINGER = 60.0  # seconds; a lingering mount costs about 13 MB (PSS, bench-pull)
DEFAULT_CACHE_SIZE = "10G"  # as mount's --cache-size (lazy.cache.DEFAULT_CACHE_SIZE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} snapshotter",
        description="Serve containerd's snapshots API (a [proxy_plugins] snapshotter) on a "
        "unix socket: each committed layer is one sealed EROFS file, root filesystems are "
        "served by erofs-fuse mounts. Runs in the foreground and logs to stderr.")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--address", default=DEFAULT_ADDRESS,
                   help=f"unix socket to listen on (default {DEFAULT_ADDRESS})")
    p.add_argument("--mount-linger", type=float, default=DEFAULT_LINGER, metavar="SECONDS",
                   help="how long a chain's mount outlives its last container, so the next "
                   "container of the same image starts without mounting (default "
                   "%(default)s; 0: unmount at once)")
    p.add_argument("--cache-size", default=DEFAULT_CACHE_SIZE, metavar="SIZE",
                   help="bytes the block cache of lazy layers (ROOT/cache) may hold, as "
                   "mount's --cache-size (K, M, G, T suffixes; default %(default)s); whole "
                   "layers no mount uses are evicted, least recently used first")
    p.add_argument("--mount-spin", type=int, metavar="USEC",
                   help="how long each chain mount's daemon polls for the next request before "
                   "it sleeps, as mount's --spin (default: mount's, 200; 0: never)")
    p.add_argument("--debug", action="store_true",
                   help="log every call: method, key, parent, outcome and time")
    return p


def state_dir(root: str) -> str:
    """``root``, made if missing; refused in one line if it cannot be a directory."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CliError(f"--root {root}: not a directory") from None
    except OSError as exc:
        raise CliError(f"--root {root}: {exc.strerror or exc}") from None
    return root


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from . import mount  # before the fork server starts: each mount's worker starts warm
        from .lazy_mount import parse_size
        from .mount import checked_spin

        if ns.mount_linger < 0:
            raise CliError("snapshotter: --mount-linger must be 0 or more")
        if ns.mount_spin is not None:
            checked_spin(ns.mount_spin, "snapshotter: --mount-spin")
        cache_size = parse_size(ns.cache_size, "--cache-size", "snapshotter")
        root = state_dir(os.path.abspath(ns.root))
        return serve(root, os.path.abspath(ns.address), mount.main, linger=ns.mount_linger,
                     cache_size=cache_size, spin_us=ns.mount_spin)
    except CliError as exc:
        print_error(str(exc))
        return exc.code
