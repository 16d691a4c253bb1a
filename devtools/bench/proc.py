"""Run one command as a child and measure it: wall time, CPU time and peak RSS of the whole
process tree (used by ``scripts/bench-convert``).

CPU time comes from ``wait4`` (the kernel's accounting of the child and of every descendant it
waited for). The largest RSS comes from GNU time's ``%M`` (the same accounting, one process
further down): the ``ru_maxrss`` of a process this Python process spawns directly starts at
this process's own RSS, which the kernel records for the spawned child at its ``exec``, so a
small program would show ~25 MiB; ``/usr/bin/time`` is small. Descendants that outlive their
parent (multiprocessing's forkserver is never waited for by ``convert-image``) would escape
both, so this process makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): orphans are
reparented to it and reaped here, with their usage. The *sum* of the tree's RSS at any moment
(what ``convert-image -j 2`` holds with two workers) is sampled from ``/proc`` every
``SAMPLE_EVERY`` seconds; a peak shorter than that can be missed.
"""

from __future__ import annotations

import ctypes
import os
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
SAMPLE_EVERY = 0.02
REAP_GRACE = 30.0  # seconds orphans get to exit after the child itself has
PAGE = os.sysconf("SC_PAGE_SIZE")
TIME = "/usr/bin/time"  # GNU time (Debian package "time")


@dataclass(frozen=True)
class Sample:
    wall: float      # seconds
    cpu: float       # user + system seconds of the child and all its descendants
    rss_mib: float   # the largest single process's peak RSS (wait4 ru_maxrss)
    tree_mib: float  # the largest sampled sum of the tree's RSS


class CommandFailed(Exception):
    """A measured command exited non-zero; ``str()`` is one line with the end of its output."""


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _rss_pages(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(root: int) -> int:
    """The summed RSS of ``root`` and its descendants, now (orphans reparented to this process
    are found as its own children)."""
    total, todo, seen = 0, [root, *children(os.getpid())], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid == os.getpid():
            continue
        seen.add(pid)
        total += _rss_pages(pid)
        todo.extend(children(pid))
    return total * PAGE


class _TreeSampler(threading.Thread):
    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.root))
            self._done.wait(SAMPLE_EVERY)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Sample:
    """Run ``cmd`` (stdin /dev/null, stdout and stderr to ``log``) and measure it; raises
    ``CommandFailed`` if it, or a descendant left behind, does not exit 0."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    rss_file = log.with_name(log.name + ".rss")
    timed = [TIME, "-f", "%M", "-o", str(rss_file), *cmd]
    try:
        t0 = time.perf_counter()
        pid = os.posix_spawn(TIME, timed, env if env is not None else dict(os.environ),
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, fd, 1),
                                           (os.POSIX_SPAWN_DUP2, fd, 2)])
    finally:
        os.close(fd)
    sampler = _TreeSampler(pid)
    sampler.start()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    tree = sampler.stop()
    cpu = usage.ru_utime + usage.ru_stime
    lines = rss_file.read_text().split() if rss_file.exists() else []
    maxrss = int(lines[-1]) if lines and lines[-1].isdigit() else 0  # KiB
    for orphan_usage in _reap_orphans():
        cpu += orphan_usage.ru_utime + orphan_usage.ru_stime
        maxrss = max(maxrss, orphan_usage.ru_maxrss)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise CommandFailed(f"{' '.join(cmd[:4])}{' ...' if len(cmd) > 4 else ''}: exit {code}: "
                            f"{tail[0][-300:]}")
    return Sample(wall, cpu, maxrss / 1024, max(tree, maxrss * 1024) / 2**20)


def _reap_orphans() -> list[resource.struct_rusage]:
    """Wait for descendants reparented to this process (it runs one command at a time, so every
    child left is one); give up after ``REAP_GRACE`` seconds."""
    out: list[resource.struct_rusage] = []
    deadline = time.monotonic() + REAP_GRACE
    while True:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid:
            out.append(usage)
        elif time.monotonic() > deadline:
            raise CommandFailed("a descendant of the measured command did not exit")
        else:
            time.sleep(0.01)
