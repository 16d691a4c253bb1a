"""The process title of a mount daemon: what ``ps``, /proc/PID/cmdline and ``pkill -f`` see.

``setproctitle`` rewrites the memory the kernel shows as the command line (the argv area, grown
into the environment's, which it copies away first). It finds that area through the
environment: with an empty one it leaves the title unchanged, without an error. Then the kernel
is told to show a buffer of ours instead (``prctl(PR_SET_MM_ARG_START/END)``; it needs
CAP_SYS_RESOURCE, which root has on a host but not in every container), or, last, the original
argv strings are overwritten with as much of the title as fits. Each result is read back from
/proc/self/cmdline, the only place that tells whether it worked.
"""

from __future__ import annotations

import ctypes
import logging
import os

import setproctitle

log = logging.getLogger("erofs_fuse.snapshotter")

PR_SET_MM = 35  # <linux/prctl.h>
PR_SET_MM_ARG_START = 8
PR_SET_MM_ARG_END = 9

_kept: list[ctypes.Array[ctypes.c_char]] = []  # buffers the kernel shows: never freed


def _cmdline() -> bytes:
    with open("/proc/self/cmdline", "rb") as f:
        return f.read()


def _shown(title: str) -> bool:
    """Whether the kernel shows ``title`` as our whole command line (setproctitle pads it
    with NULs)."""
    return _cmdline().rstrip(b"\0") == title.encode()


def _prctl_set_mm(option: int, addr: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    # every argument a full long: prctl is variadic, and the kernel refuses garbage in the
    # high half of the unused ones
    args = (PR_SET_MM, option, addr, 0, 0)
    if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
        log.debug("prctl(PR_SET_MM, %d): %s", option, os.strerror(ctypes.get_errno()))
        return False
    return True


def _point_kernel_at(title: str, original: tuple[int, int]) -> bool:
    """Make the kernel's argv range a NUL-terminated copy of ``title`` (ours, on the heap).
    The heap lies below the stack's argv area, so the new start (below the old end) is set
    before the new end: the kernel refuses a range whose start passes its end. If the end
    is refused, the start is put back: a range from the heap to the stack is no title."""
    buf = ctypes.create_string_buffer(title.encode())  # with its NUL
    start = ctypes.addressof(buf)
    if not _prctl_set_mm(PR_SET_MM_ARG_START, start):
        return False
    if not _prctl_set_mm(PR_SET_MM_ARG_END, start + len(buf)):
        _prctl_set_mm(PR_SET_MM_ARG_START, original[0])
        return False
    _kept.append(buf)
    return True


def _argv_area() -> tuple[int, int]:
    """(start, end) of the argv strings the kernel shows: fields 48 and 49 of
    /proc/self/stat (proc(5)), counted after the parenthesised command name."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[45]), int(fields[46])  # field 3 is fields[0]


def _overwrite_argv(title: str, original: tuple[int, int]) -> str:
    """Write ``title`` over the original argv strings, cut to their length (the last byte
    stays NUL, or the kernel would read on into the environment); the title shown."""
    start, end = original
    shown = title.encode()[:end - start - 1]
    ctypes.memmove(start, shown.ljust(end - start, b"\0"), end - start)
    return shown.decode(errors="replace")


def set_title(title: str) -> bool:
    """Show ``title`` as this process's command line (its children inherit it); whether it
    is shown whole. Tried in turn: setproctitle; the kernel pointed at a copy (root on a
    host); the original argv strings overwritten, the title cut to their length (it still
    starts with the daemon's name: never the snapshotter's command line)."""
    original = _argv_area()  # setproctitle writes inside it, never moves it
    setproctitle.setproctitle(title)
    if _shown(title) or (_point_kernel_at(title, original) and _shown(title)):
        return True
    if _argv_area() != original:
        log.warning("cannot set the process title %r: the kernel's argv range moved", title)
        return False
    cut = _overwrite_argv(title, original)
    if _shown(cut):
        log.warning("process title cut to %r (no room for %r)", cut, title)
        return False
    log.warning("cannot set the process title %r: it shows %r", title,
                _cmdline().replace(b"\0", b" ").strip().decode(errors="replace"))
    return False
