"""FUSE mounts of committed layer chains, started from a fork server.

Why a fork server: a new mount must not pay an interpreter start (``erofs-fuse mount`` takes
0.2 s or more, most of it imports; docs/snapshotter.md has the measurement). The command line
imports ``erofs_fuse.cli.mount`` and the snapshotter forks one child, the *forker*, before it
starts any thread (grpc's included: forking a process that runs threads is unsafe). For each
mount the forker forks a worker that runs that module's ``main(argv)`` (handed in as
``mount_main``: nothing here imports the command line), which double-forks the daemon and
returns once the kernel's INIT has been served, as on the command line. The daemons are nobody's children: they outlive a snapshotter restart, so running
containers keep their root filesystems. A forker that dies (killed, out of memory) is replaced
at the next mount by a fresh interpreter running the same loop: forking the snapshotter again
is no longer safe once its threads run. Each worker, and so its daemon, takes the process title
``erofs-fuse mount <id> <mountpoint>``: never the snapshotter's command line.

One mount per distinct chain: a chain is fixed by its top committed snapshot (parents never
change), so the mountpoint is ``<root>/mounts/<id of the top>``. Its users are the active
snapshots and views whose parent is that snapshot, counted in the database, never in memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from ..fuse.mountinfo import mounted_fuse
from ..lazy.cache import DEFAULT_CACHE_SIZE
from ..lazy.source import is_lazy
from .proctitle import set_title

log = logging.getLogger("erofs_fuse.snapshotter")

MountMain = Callable[[list[str]], int]  # erofs-fuse mount's entry point: argv -> exit status


class MountError(Exception):
    """A mount could not be made; the message is the mount command's one line."""


class Forker:
    """The fork server: ``mount(argv, title)`` runs ``erofs-fuse mount ARGV`` in a forked
    worker whose process title (``ps``, /proc/PID/cmdline, ``pkill -f``) is ``title``."""

    def __init__(self, mount_main: MountMain) -> None:
        # mount_main's module is imported already, before the fork: each worker starts warm
        self.mount_main = mount_main
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None  # a replacement forker
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            code = 1
            try:
                serve_forks(theirs, mount_main)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self._attach(pid, ours)

    def _attach(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.reader = sock.makefile("rb")

    def mount(self, argv: Sequence[str], title: str) -> None:
        request = json.dumps({"argv": list(argv), "title": title}).encode() + b"\n"
        with self.lock:
            line = self._exchange(request)
            if line is None:
                log.warning("the mount fork server (pid %d) is gone; starting another", self.pid)
                self._replace()
                line = self._exchange(request)
        if line is None:
            raise MountError("the mount fork server is gone")
        reply = json.loads(line)
        if reply["code"] != 0:
            raise MountError(reply["error"] or f"erofs-fuse mount exited with {reply['code']}")

    def _exchange(self, request: bytes) -> bytes | None:
        """The forker's reply line; None if it is gone."""
        try:
            self.sock.sendall(request)
            line = self.reader.readline()
        except OSError:
            return None
        return line or None

    def _replace(self) -> None:
        """Start a new forker in a fresh interpreter (this process runs threads now: forking
        it is unsafe) that imports ``mount_main`` by name: one interpreter start, once."""
        self._close_current()
        ours, theirs = socket.socketpair()
        main = self.mount_main
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REPLACEMENT, main.__module__, main.__name__,
             str(theirs.fileno())], pass_fds=(theirs.fileno(),))
        theirs.close()
        self._attach(self.proc.pid, ours)

    def _close_current(self) -> None:
        self.reader.close()
        self.sock.close()  # the forker reads EOF and exits
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def close(self) -> None:
        self._close_current()


# The replacement forker's program: serve_forks with the mount entry point named in argv.
_REPLACEMENT = ("import importlib, socket, sys\n"
                "from erofs_fuse.snapshotter.mounts import serve_forks\n"
                "main = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])\n"
                "serve_forks(socket.socket(fileno=int(sys.argv[3])), main)\n")


def serve_forks(sock: socket.socket, mount_main: MountMain) -> None:
    """The forker's loop: one JSON ``{argv, title}`` per line in, one JSON ``{code, error}``
    per line out."""
    import signal

    from ..fuse.daemon import import_serving_modules

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C of a foreground snapshotter: it stops us
    import_serving_modules()  # once here, not in every forked mount
    reader = sock.makefile("rb")
    for line in reader:
        request = json.loads(line)
        err = os.memfd_create("erofs-fuse-mount-stderr")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reader.close()
                sock.close()
                os.dup2(err, 2)
                os.close(err)
                # The daemon (forked by mount_main) keeps this title. Without it, it shows the
                # snapshotter's command line, and `pkill -f 'erofs-fuse snapshotter'` would kill
                # the root filesystems of running containers with the snapshotter.
                set_title(request["title"])
                code = mount_main(request["argv"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        text = os.pread(err, 65536, 0).decode(errors="replace").strip()
        os.close(err)
        sock.sendall(json.dumps({"code": code, "error": text}).encode() + b"\n")


def mounted(path: str) -> bool:
    """Whether ``path`` is a FUSE mountpoint (from mountinfo, without touching it)."""
    return mounted_fuse(path)


def alive(path: str, wait: float = 5.0) -> bool:
    """Whether the mount's daemon still answers: a dead one gives ENOTCONN at once. The probe
    runs in a thread so that a hung daemon cannot hang the caller; one that does not answer
    within ``wait`` counts as alive (mounting over it would not help)."""
    dead: list[bool] = []

    def probe() -> None:
        try:
            os.stat(path)
        except OSError as exc:
            dead.append(exc.errno in (errno.ENOTCONN, errno.ECONNABORTED))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(wait)
    return not (dead and dead[0])


def unmount(path: str) -> None:
    """Unmount a FUSE mount; detach it lazily if it is busy or its daemon is dead."""
    if not mounted(path):
        return
    r = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
    if r.returncode != 0:
        log.warning("%s: %s; detaching it", path, r.stderr.strip() or "cannot unmount")
        subprocess.run(["umount", "-l", path], capture_output=True, text=True)


class ChainMounts:
    """Mountpoints ``<root>/mounts/<id>`` of chains, each a merged erofs-fuse mount."""

    def __init__(self, root: str, forker: Forker, cache_dir: str,
                 cache_size: int = DEFAULT_CACHE_SIZE, spin_us: int | None = None) -> None:
        self.dir = os.path.join(root, "mounts")
        os.makedirs(self.dir, exist_ok=True)
        self.forker = forker
        self.cache_dir = cache_dir  # lazy layers' block cache
        self.cache_size = cache_size  # its limit in bytes (snapshotter --cache-size)
        self.spin_us = spin_us  # each mount's --spin (snapshotter --mount-spin); None: default

    def path(self, top_id: int) -> str:
        return os.path.join(self.dir, str(top_id))

    def ensure(self, top_id: int, layers: Sequence[tuple[str, str]], *,
               noxattr: bool = False) -> str:
        """The mount of the chain ``layers`` (bottom first: (layer file or lazy source,
        fs-verity digest)) whose top is ``top_id``, made (or made again, if its daemon died)
        when needed. A lazy layer's digest is its pinned manifest's: the mount takes it from
        there (and verifies it always), so it gets no --verity. ``noxattr``: every layer is
        known to show no xattr (``mount -o noxattr``)."""
        path = self.path(top_id)
        if mounted(path):
            if alive(path):
                return path
            log.warning("%s: the mount's daemon is gone; mounting it again", path)
            unmount(path)
        os.makedirs(path, exist_ok=True)
        # allow_other: the shim and containers' users are other processes. suid and dev:
        # overlayfs opens lower files through this mount, so its nodev would refuse the
        # image's device nodes; the mountpoint itself is only reachable by root (ROOT is 0700).
        argv = ["--layers", ",".join(layer for layer, _ in layers), "--allow-other", "--suid",
                "--dev", "--require-verity", "--log", path + ".log"]
        for index, (layer, digest) in enumerate(layers):
            if not is_lazy(layer):
                argv += ["--verity", f"{index}={digest}"]
        if any(is_lazy(layer) for layer, _ in layers):
            argv += ["--cache", self.cache_dir, "--cache-size", str(self.cache_size)]
        if noxattr:
            argv.append("--no-xattr")
        if self.spin_us is not None:
            argv += ["--spin", str(self.spin_us)]
        argv.append(path)
        start = time.monotonic()
        self.forker.mount(argv, f"erofs-fuse mount {top_id} {path}")
        log.info("mounted chain %d (%d layers%s%s) at %s in %.0f ms", top_id, len(layers),
                 ", noxattr" if noxattr else "",
                 "" if self.spin_us is None else f", spin {self.spin_us} us", path,
                 (time.monotonic() - start) * 1000)
        return path

    def release(self, top_id: int) -> None:
        """Unmount the chain's mount (if mounted) and remove its mountpoint and log."""
        path = self.path(top_id)
        if mounted(path):
            unmount(path)
            log.info("unmounted chain %d", top_id)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        with contextlib.suppress(OSError):
            os.unlink(path + ".log")

    def existing(self) -> list[int]:
        """Ids of the mountpoints present (mounted or not)."""
        out = []
        for name in os.listdir(self.dir):
            if name.isdigit():
                out.append(int(name))
        return out
