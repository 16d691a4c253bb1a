#!/usr/bin/env python3
"""Run ``erofs-fuse image pull|import ...`` under cProfile, its conversion workers too.

Usage: python3 -m devtools.bench.profiled_pull STATS_DIR IMAGE_ARGS...
(used by ``scripts/bench-pull --profile`` when py-spy is not installed). The command itself runs
in this process (``STATS_DIR/main.prof``); each worker, a forkserver child, runs this module's
``profiled_work`` instead of the workers module's ``_work``, which the forkserver finds by name
and which writes ``STATS_DIR/worker-PID.prof`` when the job returns. Each process also writes
its CPU time (user + system seconds) to ``.cpu`` beside its profile: the workers are children
of the forkserver, which nobody waits for, so no rusage of the command's counts them.
"""

from __future__ import annotations

import cProfile
import os
import resource
import sys
from multiprocessing.connection import Connection

from erofs_fuse.oci import workers

STATS_DIR = "EROFS_BENCH_PROFILE_DIR"


def dump(prof: cProfile.Profile, path: str) -> None:
    """The profile at ``path``.prof and this process's CPU seconds at ``path``.cpu."""
    prof.dump_stats(path + ".prof")
    used = resource.getrusage(resource.RUSAGE_SELF)
    with open(path + ".cpu", "w", encoding="ascii") as f:
        f.write(f"{used.ru_utime + used.ru_stime:.3f}\n")


def profiled_work(job: workers.Job, conn: Connection) -> None:
    prof = cProfile.Profile()
    try:
        prof.runcall(workers._work, job, conn)
    finally:
        dump(prof, os.path.join(os.environ[STATS_DIR], f"worker-{os.getpid()}"))


def main(out: str, args: list[str]) -> int:
    from devtools.bench import profiled_pull  # not __main__: the forkserver imports it by name
    from erofs_fuse.cli.main import main as cli_main

    os.environ[STATS_DIR] = out  # before the forkserver starts: it inherits the environment
    workers._work = profiled_pull.profiled_work  # looked up when a job starts
    prof = cProfile.Profile()
    try:
        return prof.runcall(cli_main, ["image", *args])
    finally:
        dump(prof, os.path.join(out, "main"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
