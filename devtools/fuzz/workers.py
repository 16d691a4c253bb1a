"""The worker processes of ``scripts/fuzz``: each reads mutant indexes on stdin and answers one
JSON line a mutant; ``Worker`` is the coordinator's handle on one (started through the entry
point with the hidden ``--worker`` flag, in a session of its own).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Iterator

from devtools import ROOT
from devtools.fuzz.image_mutants import Corpus
from devtools.fuzz.lib_mode import INTERNAL, inject, run_lib_mutant
from devtools.fuzz.mount_mode import force_unmount, run_mount_mutant

ENTRY = ROOT / "scripts" / "fuzz"
MUTANT_BUDGET = 240.0  # seconds a whole mutant may take before the worker is killed (a hang)


def worker(args: argparse.Namespace) -> int:
    """Reads mutant indexes on stdin, answers one JSON line each."""
    if args.mode == "convert":
        from devtools.fuzz import convert_mode

        return convert_mode.worker(args)
    corpus = Corpus(args.images)
    inject(args.inject)
    workdir = args.workdir
    path = os.path.join(workdir, "mutant.erofs")
    dump = open(os.path.join(workdir, "stack.txt"), "w+")
    if args.mode == "mount":
        import erofs_fuse.cli.mount  # noqa: F401 - imported once, forked per mutant
    else:
        logging.getLogger("erofs_fuse").addHandler(INTERNAL)
        logging.getLogger("erofs_fuse").propagate = False
    print("ready", flush=True)
    for line in sys.stdin:
        index = int(line)
        name, kind, data = corpus.mutant(args.seed, index)
        with open(path, "wb") as f:
            f.write(data)
        dump.seek(0)
        dump.truncate()
        about = {"index": index, "image": name, "kind": kind,
                 "sha": hashlib.sha256(data).hexdigest()[:16]}

        def on_hang(what: str, about: dict[str, object] = about) -> None:
            # the operation cannot be interrupted: report it and end this worker
            dump.flush()
            dump.seek(0)
            record = {"status": "hang", "error": what, "stack": dump.read()[-4000:],
                      "fatal": True, **about}
            print(json.dumps(record), flush=True)
            os._exit(3)

        if args.mode == "lib":
            result = run_lib_mutant(path, name, index, args, workdir, dump, on_hang)
        else:
            result = run_mount_mutant(path, name, args, workdir)
        result.update(about)
        print(json.dumps(result), flush=True)
    return 0


class Worker:
    def __init__(self, args: argparse.Namespace, number: int, base: str) -> None:
        self.workdir = os.path.join(base, f"w{number}")
        os.makedirs(self.workdir, exist_ok=True)
        cmd = [sys.executable, str(ENTRY), "--worker", "--mode", args.mode, "--seed", str(args.seed),
               "--timeout", str(args.timeout), "--extract-every", str(args.extract_every),
               "--workdir", self.workdir, "--images", *args.images]
        if args.mode == "convert":
            cmd += ["--memory", str(args.memory), "--kernel-every", str(args.kernel_every)]
            cmd += ["--tars", *args.tars] if args.tars else []
            cmd += ["--crashes", os.path.abspath(args.crashes)] if args.crashes else []
        env = None
        if args.inject:
            cmd += ["--inject", args.inject]
            # the fault replaces a method, which the compiled modules' direct calls would not
            # see: the worker and the daemons it forks run the Python sources (native.py)
            env = {**os.environ, "EROFS_FUSE_PURE": "1"}
        # a session of its own: killing it takes any daemon it forked along
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True, env=env)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.index: int | None = None
        self.started = 0.0

    def send(self, index: int) -> None:
        assert self.proc.stdin is not None
        self.index = index
        self.started = time.monotonic()
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        force_unmount(os.path.join(self.workdir, "mnt"))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def selected(args: argparse.Namespace) -> Iterator[int]:
    if args.only is not None:
        yield args.only
        return
    yield from range(args.start, args.start + args.count, args.every)
