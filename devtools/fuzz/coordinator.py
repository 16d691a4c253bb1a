"""The coordinator of ``scripts/fuzz``: hands mutant indexes to ``--jobs`` workers, replaces a
worker that died or hung, tallies the records and returns the summary."""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from devtools.fuzz.image_mutants import Corpus
from devtools.fuzz.mount_mode import read_log
from devtools.fuzz.report import PROGRESS_EVERY, Tally, progress_line
from devtools.fuzz.workers import MUTANT_BUDGET, Worker, selected


def run(args: argparse.Namespace) -> dict[str, object]:
    total = sum(1 for _ in selected(args))
    indexes = selected(args)
    base = tempfile.mkdtemp(prefix="erofs-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    tally = Tally()
    started = time.monotonic()
    workers = [Worker(args, k, base) for k in range(args.jobs)]
    busy = {w: False for w in workers}
    last_report = started

    def feed(w: Worker) -> None:
        index = next(indexes, None)
        if index is None:
            busy[w] = False
        else:
            w.send(index)
            busy[w] = True

    def replace(w: Worker) -> Worker:
        w.kill()
        k = workers.index(w)
        workers[k] = nw = Worker(args, k, base)
        del busy[w]
        busy[nw] = False
        return nw

    try:
        for w in workers:
            feed(w)
        while any(busy.values()):
            ready, _, _ = select.select([w.proc.stdout for w in workers
                                         if busy[w] and w.proc.stdout is not None], [], [], 0.5)
            for w in list(workers):
                if not busy[w]:
                    continue
                if w.proc.stdout in ready:
                    line = w.proc.stdout.readline() if w.proc.stdout else ""
                    if not line:  # the worker died: a crash of the interpreter itself
                        rec: dict[str, object] = {"index": w.index, "status": "crash",
                                                  "error": "worker died"}
                        w = replace(w)
                    else:
                        rec = json.loads(line)
                        if rec.get("fatal"):  # the worker reported a hang and ended
                            w = replace(w)
                elif time.monotonic() - w.started > MUTANT_BUDGET:
                    rec = {"index": w.index, "status": "hang",
                           "seconds": round(time.monotonic() - w.started, 1),
                           "error": "the whole mutant ran over its budget",
                           "stack": read_log(os.path.join(w.workdir, "stack.txt"))[-3000:]}
                    w = replace(w)
                else:
                    continue
                tally.add(rec)
                now = time.monotonic()
                if args.progress and (now - last_report > PROGRESS_EVERY or tally.done == total):
                    last_report = now
                    print(progress_line(tally.done, total, tally.counts, tally.peak_rss,
                                        now - started), file=sys.stderr, flush=True)
                feed(w)
    finally:
        for w in workers:
            if busy.get(w):
                w.kill()
            else:
                w.close()
        shutil.rmtree(base, ignore_errors=True)
    return tally.summary(args, time.monotonic() - started)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(args: argparse.Namespace) -> int:
    """``scripts/fuzz`` with its parsed arguments: its exit status."""
    if args.worker:
        from devtools.fuzz.workers import worker

        return worker(args)
    # stopped by a signal (SIGINT is ignored in background jobs): kill the workers and their
    # daemons, unmount, then exit
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.mode == "mount":
        assert os.geteuid() == 0, "mount mode needs root (FUSE mounts, connection aborts)"
        assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    if args.only is not None and args.save and args.mode == "convert":
        from devtools.fuzz import convert_mode

        print(convert_mode.save(args, args.save))
    elif args.only is not None and args.save:
        name, kind, data = Corpus(args.images).mutant(args.seed, args.only)
        out = Path(args.save) / f"mutant-{args.seed}-{args.only}-{name}"
        out.write_bytes(data)
        print(f"{out} ({kind})")
    summary = run(args)
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("findings", "by_kind", "splits")}))
    return 1 if summary["bugs"] else 0
