#!/usr/bin/env python3
"""Read-all through a cold lazy mount against the same image's local layers (issue 20's aim:
at most 2x), both in the same run: the daemon's wall and CPU time.

Usage: python3 -m devtools.bench.lazy_readall --image REF@sha256:D --layers @FILE.layers
           [--runs N] [--walk tar|find|ssl] [--warm] [--only lazy|local]
           [--py-spy OUT.svg|OUT.txt] [--extra=--fetch-unit=1M]...
(``--extra``: more mount options for the lazy mount; SPY_GIL=1: py-spy samples the GIL holder)
Each run: kernel caches dropped, the lazy cache emptied, ``erofs-fuse mount --foreground``
started, ``tar -C MNT -cf - . | wc -c`` timed, unmounted; the daemon's CPU time from wait4.
``--walk find``: a ``find MNT`` walk instead; ``--walk ssl``: ``chroot MNT python3 -c 'import
ssl'`` (first output of a program). After the walk, with ``--warm``: caches dropped and the
read-all again (the block cache now full). Bytes fetched: the blocks allocated in the cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

CLI = [sys.executable, "-m", "erofs_fuse.cli.main"]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def one(args: list[str], mnt: str, walk: str, spy: str | None,
        warm: bool) -> dict[str, float]:
    drop_caches()
    t0 = time.monotonic()
    cmd = CLI + ["mount", "--foreground", *args, mnt]
    if spy:
        cmd = ["py-spy", "record", "-r", "200", "-s", *(["--gil"] if os.environ.get("SPY_GIL") else []), "-o", spy,
               "-f", "raw" if spy.endswith(".txt") else "flamegraph", "--"] + cmd
    proc = subprocess.Popen(cmd, stderr=None if os.environ.get("SHOWERR") else subprocess.DEVNULL)
    while not mounted(mnt):
        if proc.poll() is not None:
            raise SystemExit(f"mount failed: {' '.join(cmd)}")
        time.sleep(0.005)
    ready = time.monotonic() - t0
    wall, out = timed(WALKS[walk].format(mnt=mnt))
    row = {"ready": ready, "wall": wall, "out": float(out or 0)}
    if warm:
        drop_caches()
        row["warm"], _ = timed(WALKS["tar"].format(mnt=mnt))
    row["pss"] = pss_mb(proc.pid)
    subprocess.run(["fusermount", "-u", mnt], check=True)
    _, status, usage = os.wait4(proc.pid, 0)
    row["cpu"] = usage.ru_utime + usage.ru_stime
    return row


WALKS = {"tar": "tar -C {mnt} -cf - . | wc -c", "find": "find {mnt} | wc -l",
         "ssl": "chroot {mnt} python3 -c 'import ssl'"}


def timed(command: str) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run(command, shell=True, check=True, capture_output=True,
                         text=True).stdout.strip()
    return time.monotonic() - started, out


def pss_mb(pid: int) -> float:
    """The daemon's proportional set size after the walk (0 under py-spy: not our child)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def allocated(root: str) -> int:
    total = 0
    for path, _, files in os.walk(root):
        total += sum(os.lstat(os.path.join(path, f)).st_blocks * 512 for f in files
                     if f == "data")
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--walk", choices=sorted(WALKS), default="tar")
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--py-spy")
    ap.add_argument("--extra", action="append", default=[])
    ap.add_argument("--only", choices=["lazy", "local"])
    ns = ap.parse_args()
    mnt = tempfile.mkdtemp(prefix="lazy-readall-")
    cache = tempfile.mkdtemp(prefix="lazy-cache-", dir="/var/tmp")
    try:
        for run in range(ns.runs):
            rows = {}
            for case in ("local", "lazy") if run % 2 == 0 else ("lazy", "local"):
                if ns.only and case != ns.only:
                    continue
                if case == "lazy":
                    shutil.rmtree(cache)
                    os.mkdir(cache)
                    args = ["--image", ns.image, "--plain-http", "--cache", cache, *ns.extra]
                else:
                    args = ["--layers", ns.layers]
                spy = ns.py_spy if case == "lazy" else None
                rows[case] = one(args, mnt, ns.walk, spy, ns.warm)
                if case == "lazy":
                    rows[case]["fetched"] = allocated(cache) / 1e6
            load = os.getloadavg()[0]
            line = "  ".join(f"{c}: ready {r['ready']:.2f} s, {ns.walk} {r['wall']:.2f} s, "
                             + (f"warm {r['warm']:.2f} s, " if "warm" in r else "")
                             + (f"fetched {r['fetched']:.1f} MB, " if "fetched" in r else "")
                             + f"cpu {r['cpu']:.2f} s, PSS {r['pss']:.0f} MB ({r['out']:.0f})"
                             for c, r in rows.items())
            if len(rows) == 2:
                line += (f"  ratio wall {rows['lazy']['wall'] / rows['local']['wall']:.2f}x"
                         f" cpu {rows['lazy']['cpu'] / rows['local']['cpu']:.2f}x")
            print(f"run {run}: {line}  load {load:.2f}", flush=True)
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount", "-u", mnt])
        os.rmdir(mnt)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
