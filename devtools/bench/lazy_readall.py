#!/usr/bin/env python3
"""Read-all through a cold lazy mount against the same image's local layers (issue 20's aim:
at most 2x), both in the same run: the daemon's wall and CPU time.

Usage: python3 -m devtools.bench.lazy_readall --image REF@sha256:D --layers @FILE.layers
           [--runs N] [--fetch-unit SIZE] [--py-spy OUT.svg|.txt] [--extra ARG]...
Each run: kernel caches dropped, the lazy cache emptied, ``erofs-fuse mount --foreground``
started, ``tar -C MNT -cf - . | wc -c`` timed, unmounted; the daemon's CPU time from wait4.
Also times the mount until ready and a ``find MNT`` walk on a fresh cold lazy mount.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ERofs = [sys.executable, "-m", "erofs_fuse.cli.main"]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def one(args: list[str], mnt: str, walk: str, spy: str | None) -> dict[str, float]:
    drop_caches()
    t0 = time.monotonic()
    cmd = ERofs + ["mount", "--foreground", *args, mnt]
    if spy:
        cmd = ["py-spy", "record", "-r", "200", "-s", *(["--gil"] if os.environ.get("SPY_GIL") else []), "-o", spy,
               "-f", "raw" if spy.endswith(".txt") else "flamegraph", "--"] + cmd
    proc = subprocess.Popen(cmd, stderr=None if os.environ.get("SHOWERR") else subprocess.DEVNULL)
    while not mounted(mnt):
        if proc.poll() is not None:
            raise SystemExit(f"mount failed: {' '.join(cmd)}")
        time.sleep(0.005)
    ready = time.monotonic() - t0
    t1 = time.monotonic()
    if walk == "tar":
        out = subprocess.run(f"tar -C {mnt} -cf - . | wc -c", shell=True, check=True,
                             capture_output=True, text=True).stdout.strip()
    else:
        out = subprocess.run(f"find {mnt} | wc -l", shell=True, check=True,
                             capture_output=True, text=True).stdout.strip()
    wall = time.monotonic() - t1
    subprocess.run(["fusermount", "-u", mnt], check=True)
    _, status, usage = os.wait4(proc.pid, 0)
    return {"ready": ready, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "out": float(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--walk", choices=["tar", "find"], default="tar")
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
                rows[case] = one(args, mnt, ns.walk, spy)
            load = os.getloadavg()[0]
            line = "  ".join(f"{c}: ready {r['ready']:.2f} s, {ns.walk} {r['wall']:.2f} s, "
                             f"cpu {r['cpu']:.2f} s ({r['out']:.0f})" for c, r in rows.items())
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
