#!/usr/bin/env python3
"""Read-all of one tree as a full layer against the same tree as a metadata layer with its
object store (``--data-dir``; issue 21's aim: at most 1.5x), daemon CPU and wall, interleaved.

Usage: python3 -m devtools.bench.objects_readall [--runs N] [--mode cold|warm|both]
           [--cases full,full-verity,meta] [--checkout NAME=DIR]... [--requests]
           [--source DIR] [--work DIR] [--profile DIR] [--extra=--OPTION]...

Inputs, made once in ``--work`` (default /var/tmp/erofs-fuse-objects/readall) from ``--source``
(default the Debian base ``scripts/measure-objects`` builds): ``full.erofs`` (``erofs-fuse
convert``), ``meta.erofs`` and ``store/`` (``convert --objects``: big objects keep their trees),
``full.erofs.verity`` and its roots (``seal``, for ``full-verity``). Cases: ``full``,
``full-verity`` (``--verity-roots``), ``meta`` (``--data-dir store``; ``--extra`` adds mount
options to it), and for each ``--checkout NAME=DIR`` ``meta@NAME``: the meta case run by the
code of another checkout (a worktree of main, say), for before/after in the same run.

Each run, for each case in turn (the order rotated every run): a fresh mount, caches dropped
(``warm``: then the layer files and the store read back into the page cache), ``tar -C MNT
-cf - . | wc -c`` timed, the daemon's CPU from its threads' schedstat
(``stacks.cpu_seconds``), unmounted. Prints every run, then medians and ratios to ``full``
(of the medians, and the median of each run's own ratio). The load average is printed with each
run: other work on the machine shows in wall time more than in CPU seconds.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from devtools import ROOT
from devtools.bench.requests import RequestTrace, drop_caches, kernel_dev, run_workload
from devtools.bench.stacks import ErofsFuseStack, check, cleanup, cpu_seconds, env, seal

SOURCE = Path("/var/tmp/erofs-fuse-objects/base")
WORK = Path("/var/tmp/erofs-fuse-objects/readall")


class CheckoutStack(ErofsFuseStack):
    """erofs-fuse as the code of ``root`` (another checkout) runs it."""

    def __init__(self, layers: list[Path], base: Path, root: Path, extra: list[str],
                 name: str) -> None:
        super().__init__(layers, base, extra, name=name)
        self.root = root

    def mount(self) -> None:
        mnt = self._dir("merged")
        e = dict(os.environ)
        e["PYTHONPATH"] = str(self.root)
        check([sys.executable, "-m", "erofs_fuse", "mount", *self.args(mnt)], env=e,
              cwd=self.root)
        self._mounts.append(mnt)


def inputs(source: Path, work: Path) -> dict[str, Path]:
    """The full layer, the metadata layer and its store, made from ``source`` when missing."""
    work.mkdir(parents=True, exist_ok=True)
    full, meta, store = work / "full.erofs", work / "meta.erofs", work / "store"
    cli = [sys.executable, "-m", "erofs_fuse", "convert"]
    if not full.exists():
        print(f"== convert {source} {full}", file=sys.stderr)
        check([*cli, str(source), str(full)], env=env(), cwd=ROOT)
    if not meta.exists():
        print(f"== convert --objects {store} {source} {meta}", file=sys.stderr)
        check([*cli, "--objects", str(store), str(source), str(meta)], env=env(), cwd=ROOT)
    return {"full": full, "meta": meta, "store": store}


def warm_up(paths: dict[str, Path]) -> None:
    """Every byte a read-all can ask for, in the page cache."""
    subprocess.run(["sh", "-c", 'cat "$1" "$2" >/dev/null; find "$3/" -type f -exec cat {} + '
                    '>/dev/null', "sh", str(paths["full"]), str(paths["meta"]),
                    str(paths["store"])], check=True)


def one(stack: ErofsFuseStack, mode: str, paths: dict[str, Path],
        requests: bool) -> dict[str, object]:
    drop_caches()
    stack.mount()
    try:
        trace = RequestTrace(kernel_dev(stack.mnt)) if requests else None
        drop_caches()
        if mode == "warm":
            warm_up(paths)
        pids = stack.daemon_pids()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        load = os.getloadavg()[0]
        if trace:
            trace.start()
        t0 = time.perf_counter()
        out = run_workload("read-all", stack.mnt)
        wall = time.perf_counter() - t0
        counts = trace.stop() if trace else collections.Counter()
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    finally:
        stack.unmount()
    return {"wall": wall, "cpu": cpu, "load": load, "out": out,
            "requests": " ".join(f"{k} {v}" for k, v in counts.most_common())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", choices=["cold", "warm", "both"], default="both")
    ap.add_argument("--cases", default="full,meta")
    ap.add_argument("--checkout", action="append", default=[],
                    help="NAME=DIR: another checkout; adds the case meta@NAME")
    ap.add_argument("--requests", action="store_true", help="count FUSE requests (tracefs)")
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--profile", type=Path, help="cProfile the meta daemon: DIR/meta-N.prof")
    ap.add_argument("--extra", action="append", default=[], help="a mount option for meta")
    ns = ap.parse_args()
    paths = inputs(ns.source, ns.work)
    mounts = ns.work / "mnt"
    cleanup(mounts)
    checkouts = dict(c.split("=", 1) for c in ns.checkout)
    names = ns.cases.split(",") + [f"meta@{name}" for name in checkouts]
    stacks: dict[str, ErofsFuseStack] = {}
    for name in names:
        base = mounts / name.replace("@", "-")
        if name == "full":
            stacks[name] = ErofsFuseStack([paths["full"]], base, name=name)
        elif name == "full-verity":
            roots = seal([paths["full"]], ns.work)
            stacks[name] = ErofsFuseStack([paths["full"]], base, ["--verity-roots", str(roots)],
                                          name=name)
        elif name == "meta":
            stacks[name] = ErofsFuseStack([paths["meta"]], base,
                                          ["--data-dir", str(paths["store"]), *ns.extra],
                                          name=name)
        elif name.startswith("meta@"):
            stacks[name] = CheckoutStack([paths["meta"]], base,
                                         Path(checkouts[name[5:]]).resolve(),
                                         ["--data-dir", str(paths["store"])], name)
        else:
            raise SystemExit(f"unknown case {name}")
    modes = ["cold", "warm"] if ns.mode == "both" else [ns.mode]
    rows: dict[tuple[str, str], list[dict[str, object]]] = collections.defaultdict(list)
    try:
        for run in range(ns.runs):
            order = names[run % len(names):] + names[:run % len(names)]
            for mode in modes:
                for name in order:
                    stack = stacks[name]
                    if ns.profile and name == "meta":
                        ns.profile.mkdir(parents=True, exist_ok=True)
                        stack.profile = str(ns.profile / f"{mode}-{run}.prof")
                    row = one(stack, mode, paths, ns.requests)
                    rows[mode, name].append(row)
                    print(f"run {run} {mode} {name:11} wall {row['wall']:.3f} s  cpu "
                          f"{row['cpu']:.3f} s  load {row['load']:.2f}  {row['out']}  "
                          f"{row['requests']}", flush=True)
    finally:
        cleanup(mounts)
    for mode in modes:
        full = rows.get((mode, "full"))
        for name in names:
            got = rows[mode, name]
            wall = statistics.median(float(r["wall"]) for r in got)  # type: ignore[arg-type]
            cpu = statistics.median(float(r["cpu"]) for r in got)  # type: ignore[arg-type]
            line = f"median {mode} {name:11} wall {wall:.3f} s  cpu {cpu:.3f} s"
            if full and name != "full":
                fw = statistics.median(float(r["wall"]) for r in full)  # type: ignore[arg-type]
                fc = statistics.median(float(r["cpu"]) for r in full)  # type: ignore[arg-type]
                pw = statistics.median(float(a["wall"]) / float(b["wall"])  # type: ignore[arg-type]
                                       for a, b in zip(got, full))
                pc = statistics.median(float(a["cpu"]) / float(b["cpu"])  # type: ignore[arg-type]
                                       for a, b in zip(got, full))
                line += (f"  vs full: wall {wall / fw:.2f}x cpu {cpu / fc:.2f}x"
                         f" (paired {pw:.2f}x, {pc:.2f}x)")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
