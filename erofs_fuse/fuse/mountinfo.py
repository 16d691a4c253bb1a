"""What the kernel says of mounts: FUSE mountpoints from mountinfo, and whether a daemon is gone.

Read from ``/proc/self/mountinfo``, never by touching the mountpoint: a stat of a dead FUSE
mount hangs or fails.
"""

from __future__ import annotations

import errno
import os
import threading


def unescape_mount_path(field_: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit() and i + 4 <= len(field_):
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mounted_fuse(path: str) -> bool:
    """Whether ``path`` is a FUSE mountpoint (read from mountinfo: touching a dead one hangs)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and unescape_mount_path(fields[4]) == path:
                if right.split(" ", 1)[0].startswith("fuse"):
                    return True
    return False


def mountpoint_path(arg: str) -> str:
    # resolve symlinks of the parent only: stat of a dead FUSE mountpoint fails
    parent, base = os.path.split(os.path.abspath(arg))
    return os.path.join(os.path.realpath(parent), base)


def is_stale(path: str, wait: float = 5.0) -> bool:
    """Whether the daemon of the FUSE mount at ``path`` is gone.

    Asked with statfs, which always reaches the daemon (a stat may be answered from the kernel's
    attribute cache, kept a day here, and would pass on a dead mount). A live daemon answers at
    once; one that does not answer within ``wait`` seconds is not taken for dead, and the
    probe is left blocked in a daemon thread rather than hanging the command.
    """
    outcome: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or 0)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(wait)
    # ENOTCONN once the connection is gone; ECONNABORTED while it is being torn down
    return bool(outcome) and outcome[0] in (errno.ENOTCONN, errno.ECONNABORTED)

