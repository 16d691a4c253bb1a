"""Memory of the snapshotter and its chain mounts: proportional set size (PSS) from
``/proc/PID/smaps_rollup`` (used by ``scripts/bench-pull``).

PSS shares every page among the processes that map it: the chain mount daemons are forked from
one forker, so the interpreter and the modules they share are counted once in all, and the sum
over processes is what they take together. The snapshotter is its gRPC process and its forker
(its child); the chain mounts are nobody's children (they outlive a snapshotter restart) and
are found by their process title, ``erofs-fuse mount <id> <root>/mounts/<id>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .proc import children


@dataclass(frozen=True)
class Memory:
    snapshotter_mib: float  # the snapshotter and its forker
    mounts_mib: float       # every chain mount daemon under the root, summed
    mounts: int             # how many there are


def pss_kib(pid: int) -> int:
    """The process's PSS in KiB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0




def chain_mount_pids(root: str) -> list[int]:
    """The mount daemons of chains under the snapshotter root ``root``."""
    prefix = b"erofs-fuse mount "
    where = (os.path.join(root, "mounts") + "/").encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().rstrip(b"\0")
        except OSError:
            continue
        if cmdline.startswith(prefix) and where in cmdline:
            out.append(int(name))
    return sorted(out)


def memory(snapshotter_pid: int, root: str) -> Memory:
    mounts = chain_mount_pids(root)
    own = [snapshotter_pid] + [p for p in children(snapshotter_pid) if p not in mounts]
    return Memory(sum(map(pss_kib, own)) / 1024, sum(map(pss_kib, mounts)) / 1024, len(mounts))
