"""``devtools/bench/requests.py``: FUSE requests counted by opcode for one mount only.

No count is checked exactly (the kernel decides them); only that the tracepoint sees this
mount's requests, names their opcodes, and none of another mount's.
"""

from __future__ import annotations

import os

from devtools.bench.requests import RequestTrace, kernel_dev
from helpers import corpus
from mounting import fuse_mount


def test_counts_this_mounts_requests_by_opcode() -> None:
    with fuse_mount([corpus("plain.erofs")]) as ours, fuse_mount([corpus("plain.erofs")]) as other:
        trace = RequestTrace(kernel_dev(ours.mountpoint))
        trace.start()
        try:
            names = os.listdir(ours.mountpoint)
            for name in names:
                os.lstat(os.path.join(ours.mountpoint, name))
            os.listdir(other.mountpoint)
        finally:
            counts = trace.stop()
    assert names
    assert counts["READDIRPLUS"] >= 1 and "LOST" not in counts
    assert set(counts) <= {"READDIRPLUS", "LOOKUP", "GETATTR", "OPENDIR", "RELEASEDIR",
                           "GETXATTR", "STATFS", "ACCESS"}
    with fuse_mount([corpus("plain.erofs")]) as again:
        trace = RequestTrace(kernel_dev(again.mountpoint))
        trace.start()
        counts = trace.stop()
    assert sum(counts.values()) == 0  # nothing done: nothing counted
