#!/usr/bin/env python3
"""FUSE requests by opcode and daemon CPU per workload: numbers that do not depend on load.

Usage: python3 -m devtools.bench.requests [--stacks fuse,overlay,kernel] [--workloads ...]
           [--ovl-opts OPTS] [--mount-opts OPTS] [--verity] [--held] [--runs N]
           [--layers L0,L1,L2] [--work DIR]

Stacks, over the same layers: ``fuse`` (erofs-fuse alone), ``overlay`` (kernel overlayfs with
the erofs-fuse mount as its one lowerdir, an upperdir and a workdir: what the snapshotter hands
a container; ``--ovl-opts`` adds mount options; ``--mount-opts`` adds ``-o`` options of
erofs-fuse mount to both FUSE stacks, e.g. ``noxattr`` as the snapshotter mounts xattr-free
chains), ``kernel`` (kernel erofs + overlayfs: no FUSE requests, wall time only). Workloads:
walk, read-all, python (as ``scripts/bench``), after dropping caches.

``--verity``: the FUSE stacks check every block against ``erofs-fuse seal`` roots
(``--verity-roots``, ``--require-verity``), as the snapshotter's chain mounts do.
``--held``: each stack is mounted once and its daemon warmed by one untimed walk and read-all,
then every measurement drops the kernel's caches only: a container's view of a snapshotter's
chain mount, which the image's containers share and which outlives each of them. Without it each
measurement mounts afresh (the daemon's caches cold too, as a first use after ``mount``). The
two answer different questions: on the bench stack's python imports a fresh mount spent 20 ms
in READDIRPLUS (listings merged and inodes parsed for the first time), a held one 2 ms.

Requests are counted with the kernel's ``fuse:fuse_request_send`` tracepoint in a tracefs
instance of our own (other users of tracing are not disturbed), filtered to the connection of
the erofs-fuse mount. With ``fuse:fuse_request_end`` as well, each opcode's requests are also
timed from send to end: how long callers waited on the daemon in all (the reply's trip back
and the caller's wake-up after it are not in it). The daemon's read bytes (``rchar`` of
/proc/PID/io: its layers, and the requests themselves, a few KiB) say how much data crossed it.
Needs root.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from devtools.bench.stacks import ErofsFuseStack, KernelStack, Stack, check, children_of, \
    cpu_seconds, force_unmount, seal, vm_hwm_kib

TRACEFS = "/sys/kernel/tracing"
_OPCODE = re.compile(rb"opcode \d+ \((\w+)\)")
# "<task>-<pid> [cpu] <flags> <seconds>: fuse_request_send: connection N req ID opcode ..."
_EVENT = re.compile(rb" ([0-9]+\.[0-9]+): fuse_request_(send|end): connection \d+ req (\d+)")
IMPORTS = "import json, ssl, email.mime.text, http.client, asyncio"
CHROOT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def kernel_dev(mountpoint: str) -> int:
    """The kernel's dev_t (MKDEV: major << 20 | minor) of the newest mount at ``mountpoint``,
    from mountinfo (a stat() would itself be a FUSE request)."""
    dev = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                dev = fields[2]
    if dev is None:
        raise RuntimeError(f"{mountpoint}: not mounted")
    major, minor = (int(x) for x in dev.split(":"))
    return major << 20 | minor


class RequestTrace:
    """Counts FUSE requests sent to one connection, by opcode, between start() and stop(),
    and how long they took in all (``waited``: opcode -> seconds, send to end)."""

    EVENTS = ("events/fuse/fuse_request_send/", "events/fuse/fuse_request_end/")

    def __init__(self, connection: int, buffer_kb: int = 32768) -> None:
        if not os.path.isdir(os.path.join(TRACEFS, "events")):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
        self.dir = os.path.join(TRACEFS, "instances", f"erofs-fuse-requests-{os.getpid()}")
        self.connection = connection
        self.buffer_kb = buffer_kb
        self.waited: dict[str, float] = {}

    def _write(self, rel: str, value: str) -> None:
        with open(os.path.join(self.dir, rel), "w", encoding="ascii") as f:
            f.write(value)

    def start(self) -> None:
        os.mkdir(self.dir)
        self._write("buffer_size_kb", str(self.buffer_kb))
        for event in self.EVENTS:
            self._write(event + "filter", f"connection == {self.connection}")
            self._write(event + "enable", "1")
        self._write("tracing_on", "1")

    def stop(self) -> collections.Counter[str]:
        self._write("tracing_on", "0")
        counts: collections.Counter[str] = collections.Counter()
        sent: dict[bytes, tuple[str, float]] = {}
        waited: dict[str, float] = collections.defaultdict(float)
        with open(os.path.join(self.dir, "trace"), "rb") as f:
            for line in f:
                found = _EVENT.search(line)
                if found is None:
                    continue
                when, kind, req = float(found.group(1)), found.group(2), found.group(3)
                if kind == b"send":
                    m = _OPCODE.search(line)
                    if m:
                        op = m.group(1).decode().removeprefix("FUSE_")
                        counts[op] += 1
                        sent[req] = (op, when)
                elif req in sent:  # a FORGET is sent and never ended: it has no reply
                    op, then = sent.pop(req)
                    waited[op] += when - then
        self.waited = dict(waited)
        overrun = 0
        for cpu in os.listdir(os.path.join(self.dir, "per_cpu")):
            with open(os.path.join(self.dir, "per_cpu", cpu, "stats"), encoding="ascii") as st:
                for text in st:
                    if text.startswith("overrun:"):
                        overrun += int(text.split()[1])
        for event in self.EVENTS:
            self._write(event + "enable", "0")
        os.rmdir(self.dir)
        if overrun:
            counts["LOST"] = overrun
        return counts


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


class OverlayOverFuse(ErofsFuseStack):
    """Kernel overlayfs (upper, work, one lowerdir = the erofs-fuse mount)."""

    def __init__(self, layers: list[Path], base: Path, options: str = "",
                 extra: list[str] | None = None) -> None:
        super().__init__(layers, base, extra, name="overlay", label="overlay over erofs-fuse")
        self.options = options
        self.fuse_mnt = str(self.base / "merged")
        self.mnt = str(self.base / "container")

    def mount(self) -> None:
        super().mount()
        for sub in ("upper", "work"):
            shutil.rmtree(self.base / sub, ignore_errors=True)
        upper, work, mnt = self._dir("upper"), self._dir("work"), self._dir("container")
        opts = f"lowerdir={self.fuse_mnt},upperdir={upper},workdir={work}"
        if self.options:
            opts += "," + self.options
        check(["mount", "-t", "overlay", "overlay", "-o", opts, mnt])
        self._mounts.append(mnt)


def run_workload(wl: str, mnt: str) -> str:
    if wl == "walk":
        cmd = ["find", mnt, "-printf", "%s %m %i\n"]
        out = subprocess.run(cmd, capture_output=True, check=True).stdout
        return f"{len(out.splitlines())} entries"
    if wl == "read-all":
        cmd = ["sh", "-c", 'tar -C "$1" -cf - . 2>/dev/null | wc -c', "sh", mnt]
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() + " bytes"
    if wl == "python":
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        subprocess.run([chroot, mnt, "python3", "-c", IMPORTS], env=CHROOT_ENV, check=True)
        return "ok"
    raise ValueError(wl)


def answered(stack: Stack) -> None:
    """Wait until the stack's FUSE mount answers. Its mount command may return before (the
    kernel holds the first request until the daemon has loaded trio and answered INIT): that
    start-up, timed by scripts/bench as "mount-answer", is not the workload's."""
    if stack.fuse:
        os.stat(getattr(stack, "fuse_mnt", stack.mnt))


def read_bytes(pid: int) -> int:
    """Bytes ``pid`` and the processes it started (erofs-fuse's object worker) have read with
    read syscalls so far (``rchar``); a process that is gone counts 0."""
    total = 0
    for p in [pid, *children_of(pid)]:
        try:
            with open(f"/proc/{p}/io", encoding="ascii") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total


def warm(stack: Stack) -> None:
    """What a held chain mount has seen before a container's workload: one walk and one read of
    everything (untimed)."""
    for wl in ("walk", "read-all"):
        run_workload(wl, stack.mnt)


def measure(stack: Stack, wl: str, held: bool = False) -> dict[str, object]:
    """One cold run of ``wl``: on a fresh mount, or (``held``) on the stack's mount as it is,
    which the caller has made and warmed."""
    drop_caches()
    if not held:
        stack.mount()
    try:
        answered(stack)
        fuse_mnt = getattr(stack, "fuse_mnt", stack.mnt)
        trace = RequestTrace(kernel_dev(fuse_mnt)) if stack.fuse else None
        drop_caches()
        pids = stack.daemon_pids()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        read0 = sum(read_bytes(p) for p in pids)
        if trace:
            trace.start()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        what = run_workload(wl, stack.mnt)
        secs = time.perf_counter() - t0
        counts = trace.stop() if trace else collections.Counter()
        waited = trace.waited if trace else {}
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        read = sum(read_bytes(p) for p in pids) - read0
        rss = sum(vm_hwm_kib(p) for p in pids) / 1024
    finally:
        if not held:
            stack.unmount()
    return {"stack": stack.name, "workload": wl, "seconds": secs, "cpu": cpu, "rss_mib": rss,
            "read_mib": read / 2**20, "load": load, "held": held,
            "requests": dict(counts.most_common()), "total": sum(counts.values()),
            "waited": waited, "result": what}


def report(r: dict[str, Any]) -> str:
    """One line per measurement: wall time, daemon CPU and memory, then per opcode the count
    and the milliseconds callers waited on it."""
    waited: dict[str, float] = r["waited"]
    reqs = " ".join(f"{op} {n}" + (f" ({waited[op] * 1000:.1f} ms)" if op in waited else "")
                    for op, n in r["requests"].items())
    in_requests = f"  in requests {sum(waited.values()):.3f} s" if waited else ""
    read = f"  read {r['read_mib']:.1f} MiB" if r.get("read_mib") else ""
    return (f"{r['stack']:8} {r['workload']:9} {r['seconds']:.3f} s  daemon CPU {r['cpu']:.3f} s"
            f"{read}  peak RSS {r['rss_mib']:.0f} MiB  load {r['load']:.1f}{in_requests}"
            f"  requests {r['total']}: {reqs}  [{r['result']}]")


def stacks_named(names: list[str], layers: list[Path], work: Path,
                 ovl_opts: str, mount_opts: str = "", verity: bool = False) -> Iterator[Stack]:
    extra = ["-o", mount_opts] if mount_opts else []
    if verity and {"fuse", "overlay"} & set(names):
        work.mkdir(parents=True, exist_ok=True)
        extra += ["--verity-roots", str(seal(layers, work)), "--require-verity"]
    for name in names:
        base = work / name
        base.mkdir(parents=True, exist_ok=True)
        force_unmount(str(base / "container"))
        force_unmount(str(base / "merged"))
        if name == "fuse":
            yield ErofsFuseStack(layers, base, extra)
        elif name == "overlay":
            yield OverlayOverFuse(layers, base, ovl_opts, extra)
        elif name == "kernel":
            yield KernelStack(layers, base)
        else:
            raise SystemExit(f"unknown stack {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stacks", default="fuse,overlay,kernel")
    p.add_argument("--workloads", default="walk,read-all,python")
    p.add_argument("--ovl-opts", default="")
    p.add_argument("--mount-opts", default="", help="-o options of erofs-fuse mount")
    p.add_argument("--verity", action="store_true",
                   help="the FUSE stacks verify every block (erofs-fuse seal roots)")
    p.add_argument("--held", action="store_true",
                   help="mount each stack once and warm its daemon; drop only kernel caches")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--layers", default=",".join(
        f"/var/tmp/erofs-fuse-bench/layer{k}.erofs" for k in range(3)))
    p.add_argument("--work", default="/var/tmp/erofs-fuse-requests")
    ns = p.parse_args()
    layers = [Path(x) for x in ns.layers.split(",")]
    work = Path(ns.work)
    stacks = list(stacks_named(ns.stacks.split(","), layers, work, ns.ovl_opts,
                                ns.mount_opts, ns.verity))
    mounted: list[Stack] = []
    try:
        if ns.held:
            for stack in stacks:
                stack.mount()
                mounted.append(stack)
                answered(stack)
                warm(stack)
        for _ in range(ns.runs):
            for wl in ns.workloads.split(","):
                for stack in stacks:
                    print(report(measure(stack, wl, held=ns.held)), flush=True)
    finally:
        for stack in mounted:
            stack.unmount()
    return 0


if __name__ == "__main__":
    sys.exit(main())
