"""``devtools/bench/requests.py``: FUSE requests counted by opcode for one mount only.

No count is checked exactly (the kernel decides them); only that the tracepoint sees this
mount's requests, names their opcodes, and none of another mount's; and, counted by it, that
the kernel sends every ioctl on (there is nothing to cut there). The daemons' CPU time is
counted to the nanosecond.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import termios
import threading
import time
from pathlib import Path
from typing import cast

import pytest

from devtools.bench.requests import RequestTrace, answered, kernel_dev, measure, report, \
    stacks_named, warm
from devtools.bench.stacks import ErofsFuseStack, cpu_seconds
from erofs_fuse.fuse.daemon import READ_AHEAD_KB
from helpers import corpus, kernel_erofs
from mounting import fuse_mount

Counts = dict[str, int]


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
    # each answered opcode is timed, send to end
    assert set(trace.waited) == set(counts) and all(t > 0 for t in trace.waited.values())
    with fuse_mount([corpus("plain.erofs")]) as again:
        trace = RequestTrace(kernel_dev(again.mountpoint))
        trace.start()
        counts = trace.stop()
    assert sum(counts.values()) == 0  # nothing done: nothing counted


def test_the_time_in_requests_is_the_callers_wait() -> None:
    # one caller, one request at a time: the waits add up to less than the caller's own time
    # around them, and a file's read is one READ whose wait is in it
    path = os.path.join("sizes", "text-65543")
    with fuse_mount([corpus("plain.erofs")]) as fuse:
        target = os.path.join(fuse.mountpoint, path)
        trace = RequestTrace(kernel_dev(fuse.mountpoint))
        trace.start()
        try:
            start = time.monotonic()
            with open(target, "rb") as f:
                data = f.read()
            elapsed = time.monotonic() - start
        finally:
            counts = trace.stop()
    assert len(data) == 65543
    assert counts["READ"] >= 1 and counts["LOOKUP"] >= 1
    assert 0 < sum(trace.waited.values()) < elapsed
    assert report({"stack": "fuse", "workload": "read", "seconds": elapsed, "cpu": 0.0,
                   "rss_mib": 0.0, "load": 0.0, "requests": dict(counts),
                   "total": sum(counts.values()), "waited": trace.waited,
                   "result": "ok"}).count(" ms)") == len(counts)


def test_cpu_seconds_counts_every_thread_finer_than_clock_ticks() -> None:
    # the daemons' CPU per workload is 0.05-0.1 s: whole 10 ms ticks would hide what a change
    # saves, so it is the scheduler's nanoseconds, summed over the (live) threads
    start = cpu_seconds(os.getpid())
    done = threading.Event()

    def spin_then_wait() -> None:
        while cpu_seconds(os.getpid()) < start + 0.02:
            pass
        done.wait()

    worker = threading.Thread(target=spin_then_wait)
    worker.start()
    try:
        while cpu_seconds(os.getpid()) < start + 0.02:
            pass
        with open(f"/proc/{os.getpid()}/schedstat", encoding="ascii") as f:
            main_thread = int(f.read().split()[0]) / 1e9
        total = cpu_seconds(os.getpid())
    finally:
        done.set()
        worker.join()
    assert total > main_thread  # the worker's run time is in it
    ticks = total * os.sysconf("SC_CLK_TCK")
    assert ticks != int(ticks)  # not a count of clock ticks


def test_isatty_costs_an_ioctl_request_each_time_and_answers_as_the_kernel() -> None:
    # Python asks isatty() (TCGETS) of every file it opens with default buffering: 115 of the
    # 578 requests of the bench's python imports. libfuse answers ENOSYS (pyfuse3 has no ioctl
    # handler), which the kernel turns into ENOTTY, as the kernel's erofs answers, but does not
    # remember: no INIT flag, FOPEN flag or errno stops the next one (Linux 6.18).
    path = "sizes/text-4097"
    with kernel_erofs(corpus("plain.erofs")) as kmnt:
        fd = os.open(os.path.join(kmnt, path), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as kernel_error:
                fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        finally:
            os.close(fd)
    with fuse_mount([corpus("plain.erofs")]) as fuse:
        fd = os.open(os.path.join(fuse.mountpoint, path), os.O_RDONLY)
        try:
            trace = RequestTrace(kernel_dev(fuse.mountpoint))
            trace.start()
            try:
                answers = [os.isatty(fd) for _ in range(3)]
                with pytest.raises(OSError) as fuse_error:
                    fcntl.ioctl(fd, termios.TCGETS, bytes(64))
            finally:
                counts = trace.stop()
        finally:
            os.close(fd)
    assert answers == [False] * 3
    assert fuse_error.value.errno == kernel_error.value.errno == errno.ENOTTY
    assert counts["IOCTL"] == 4, counts


def test_the_bench_mounts_this_checkout_from_any_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "python -m erofs_fuse" puts the working directory first on the import path: a bench run
    # from another checkout (the shell's default here is the main one) measured that one's code
    decoy = tmp_path / "other-checkout" / "erofs_fuse"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(decoy.parent)
    stack = ErofsFuseStack([Path(os.path.relpath(corpus("plain.erofs")))], Path("stack"))
    stack.mount()
    try:
        assert "big" in os.listdir(stack.mnt)
        assert stack.mnt == str(decoy.parent / "stack" / "merged")
    finally:
        stack.unmount()


def test_a_workload_is_measured_on_a_mount_that_answers(tmp_path: Path) -> None:
    # the mount command returns before the daemon has loaded trio and answered INIT: without
    # the wait, a cold workload's daemon CPU held that start-up (0.09 -> 0.18 s for the python
    # imports) and its first requests ran before the read-ahead was raised (80 more READs)
    stack = ErofsFuseStack([Path(corpus("plain.erofs"))], tmp_path / "stack")
    stack.mount()
    try:
        answered(stack)
        dev = f"{kernel_dev(stack.mnt) >> 20}:{kernel_dev(stack.mnt) & 0xFFFFF}"
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", encoding="ascii") as f:
            assert int(f.read()) == READ_AHEAD_KB  # raised by the first request served
    finally:
        stack.unmount()


def test_a_held_stack_is_measured_on_one_warmed_daemon_that_verifies(tmp_path: Path) -> None:
    # --held --verity: a container's view of a snapshotter's chain mount. The same daemon serves
    # every measurement and keeps its caches while the kernel's are dropped: a walk then reads
    # no layer bytes, a read of everything reads the files' data again (the kernel asks anew),
    # and the daemon checks every block against the roots that seal made
    layer = tmp_path / "plain.erofs"
    shutil.copyfile(corpus("plain.erofs"), layer)
    (stack,) = stacks_named(["fuse"], [layer], tmp_path / "work", "", "noxattr", verity=True)
    stack.mount()
    try:
        answered(stack)
        warm(stack)
        (pid,) = stack.daemon_pids()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"--require-verity" in argv and b"--verity-roots" in argv
        walk = measure(stack, "walk", held=True)
        read_all = measure(stack, "read-all", held=True)
        assert stack.daemon_pids() == [pid]  # still mounted, by the same daemon
    finally:
        stack.unmount()
    assert walk["held"] and cast(Counts, walk["requests"]).get("READDIRPLUS", 0) >= 1
    assert cast(Counts, read_all["requests"]).get("READ", 0) >= 1
    walk_read, read_all_read = cast(float, walk["read_mib"]), cast(float, read_all["read_mib"])
    # the largest file (256 KiB and 4 bytes, not inline in the metadata the daemon keeps) at least
    assert read_all_read * 2**20 >= 262148
    assert walk_read < read_all_read
    assert "read " in report(read_all)
