"""What one snapshotter claims for itself: its state directory (an exclusive lock) and its unix
socket (a path nobody else serves on), and gives back at stop only if still its own.

Exit codes of the refusals: 2 when the argument itself is wrong whatever runs (the address is
not a socket, ``--root`` is not a directory); 1 when the argument is right but taken right now
(a server answers on the socket, another snapshotter holds the root).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat

from ..console import CliError

LOCK = "lock"  # under the root: flock'ed while a snapshotter runs; holds its pid


def lock_root(root: str) -> int:
    """Take the root's exclusive lock (non-blocking) and write our pid into it; the returned
    descriptor holds the lock until it is closed (or the process ends). Refuses, naming the
    holder's pid, when another snapshotter runs on ``root``.

    The descriptor is close-on-exec, and the caller takes the lock after forking the mount
    forker: a flock belongs to the open file, so a mount daemon that inherited it would hold
    the root locked after the snapshotter stopped, and refuse its restart."""
    path = os.path.join(root, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CliError(f"--root {root}: cannot open its lock file: {exc.strerror or exc}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CliError(f"--root {root}: in use by another snapshotter (pid {holder})", 1)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _answers(path: str) -> bool:
    """Whether a server accepts connections on the unix socket ``path``; only a refused
    connection (nobody listens: a killed predecessor's socket) counts as no."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except OSError as exc:
            if exc.errno == errno.EAGAIN:  # the listen backlog is full: someone listens
                return True
            raise CliError(f"--address {path}: {exc.strerror or exc}", 1) from None
        return True


def clear_stale_socket(address: str) -> None:
    """Make ``address`` free for us: nothing there, or a stale socket, which is removed.
    Anything else is refused: a path that is not a socket (exit 2), a socket that answers
    (exit 1: another snapshotter, or another server, serves there)."""
    try:
        st = os.lstat(address)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise CliError(f"--address {address}: exists and is not a socket")
    if _answers(address):
        raise CliError(f"--address {address}: a server is listening on it already", 1)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)


def staging_path(address: str) -> str:
    """Where gRPC binds before the socket is linked at ``address``. gRPC removes the path it
    bound when it stops, whatever socket is there by then; binding here, then linking the
    socket at ``address`` and removing this name, leaves the removal of ``address`` to us
    (``release_socket``). Short: a unix socket path has at most 107 bytes."""
    return os.path.join(os.path.dirname(address), f".s{os.getpid()}")


def publish_socket(staged: str, address: str) -> tuple[int, int]:
    """Link the bound socket at ``staged`` to ``address`` (refusing if something appeared
    there meanwhile: link never replaces) and return its (st_dev, st_ino)."""
    try:
        os.link(staged, address)
    except FileExistsError:
        raise CliError(f"--address {address}: created by someone else while we started", 1)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
    st = os.lstat(address)
    return st.st_dev, st.st_ino


def release_socket(address: str, ours: tuple[int, int]) -> None:
    """Remove ``address`` only if it is still the socket we bound (same inode): a successor
    may have bound its own there since."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(address)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ours:
            os.unlink(address)
