#!/usr/bin/env python3
"""Cold workloads in long-lived containers: erofs-fuse's snapshotter against containerd's
overlayfs snapshotter, many rounds, for differences too small for ``scripts/bench-snapshotter``.

Usage: python3 -m devtools.bench.container_workloads [--rounds N]
           [--workloads python,find,read-all]

One containerd of its own (``tests/ctrstack.py``) imports ``scripts/bench-snapshotter``'s python
image into each snapshotter once and starts one container on each (``sleep infinity``). Then,
``--rounds`` times, for each workload and each snapshotter in turn (the order alternates):
drop caches, run the workload against the container's root filesystem from the host (as
``bench-snapshotter``: ``find -printf``, ``tar -cf - . | wc -c``, ``chroot ROOT python3 -c
'import ...'``), and note the wall time and the CPU time of the erofs-fuse mount daemons (their
threads' schedstat). Unlike ``bench-snapshotter`` it never imports again between rounds, so a
round takes seconds and the chain mount's daemon stays the same process: the figures are the
request path's, not the import's. A third root takes its turn in each round: the kernel's erofs
and overlayfs over the ``layer.erofs`` files of erofs-fuse's snapshotter (``kernel-erofs``, as
in ``bench-snapshotter``). Prints medians, minima and the ratios per workload. Needs root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from devtools import ROOT
from devtools import images as snapshotter_images
from devtools.bench.stacks import KernelContainerStack, committed_layers, cpu_seconds

sys.path.insert(0, str(ROOT / "tests"))
from ctrstack import containerd_stack  # noqa: E402

SNAPSHOTTERS = ["erofs-fuse", "overlayfs"]
REFERENCE = "kernel-erofs"  # the kernel's erofs + overlayfs over erofs-fuse's layer files
COLUMNS = SNAPSHOTTERS + [REFERENCE]
WORKLOADS = ["python", "find", "read-all"]
IMPORTS = "import json, ssl, email.mime.text, http.client, asyncio"  # as scripts/bench
CHROOT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


def fuse_daemons() -> list[int]:
    """Processes holding /dev/fuse open: the chain mounts' daemons (and the snapshotter's
    fork server, which serves nothing)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse" for fd in fds):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def command(workload: str, root: str) -> list[str]:
    if workload == "python":
        return ["/usr/sbin/chroot", root, "python3", "-c", IMPORTS]
    if workload == "find":
        return ["find", root, "-printf", "%s %m %i\n"]
    return ["sh", "-c", 'tar -C "$1" -cf - . 2>/dev/null | wc -c', "sh", root]


def timed_round(workload: str, root: str, daemons: list[int]) -> tuple[float, float]:
    """Wall seconds of one cold run and the daemons' CPU seconds during it."""
    drop_caches()
    cpu0 = sum(cpu_seconds(pid) for pid in daemons)
    t0 = time.perf_counter()
    subprocess.run(command(workload, root), env=CHROOT_ENV, stdout=subprocess.DEVNULL,
                   check=True)
    wall = time.perf_counter() - t0
    return wall, sum(cpu_seconds(pid) for pid in daemons) - cpu0


def report(workload: str, walls: dict[str, list[float]], cpus: list[float]) -> None:
    med = {column: statistics.median(xs) for column, xs in walls.items()}
    for column in COLUMNS:
        print(f"{workload:9} {column:12} median {med[column]:.3f} s  "
              f"min {min(walls[column]):.3f} s")
    print(f"{workload:9} erofs-fuse daemon CPU median {statistics.median(cpus):.3f} s; "
          f"ratio {med['erofs-fuse'] / med['overlayfs']:.2f} "
          f"({REFERENCE}: {med[REFERENCE] / med['overlayfs']:.2f})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    ns = p.parse_args()
    workloads = ns.workloads.split(",")
    if os.geteuid() != 0 or not set(workloads) <= set(WORKLOADS):
        sys.exit(f"container_workloads: needs root; workloads are {','.join(WORKLOADS)}")
    archive, _ = snapshotter_images.oci_archive("python", snapshotter_images.DEFAULT_WORK)
    with containerd_stack(debug=False, linger=None) as stack:
        roots: dict[str, str] = {}
        cids: list[str] = []
        reference: KernelContainerStack | None = None
        try:
            for snap in SNAPSHOTTERS:
                image = f"example.com/workloads-{snap}:v1"
                stack.ctr("images", "import", "--snapshotter", snap, "--index-name", image,
                          str(archive), timeout=1800)
                cid = f"workloads-{os.getpid()}-{snap}"
                stack.ctr("run", "-d", "--snapshotter", snap, image, cid, "sleep", "infinity")
                cids.append(cid)
                roots[snap] = str(stack.rootfs(cid))
            reference = KernelContainerStack(committed_layers(stack.root), stack.tmp / REFERENCE)
            reference.mount()
            roots[REFERENCE] = reference.mnt
            daemons = fuse_daemons()
            for workload in workloads:
                walls: dict[str, list[float]] = {column: [] for column in COLUMNS}
                cpus: list[float] = []
                for n in range(ns.rounds):
                    for column in COLUMNS if n % 2 == 0 else COLUMNS[::-1]:
                        wall, cpu = timed_round(workload, roots[column], daemons)
                        walls[column].append(wall)
                        if column == "erofs-fuse":
                            cpus.append(cpu)
                report(workload, walls, cpus)
        finally:
            if reference is not None:
                reference.unmount()
            for cid in cids:
                stack.remove_container(cid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
