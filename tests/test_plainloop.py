"""The daemon's request loop without trio (``fuse/plainloop.py``, pyfuse3 patch 07).

A mount that never hands a read to a thread is served by its one thread without trio: it
answers as trio's loop did (the same bytes as the kernel's erofs), ends on SIGTERM, SIGINT and
SIGHUP as it did, and trio's loop still serves the mounts that need threads (``--threads``;
lazy layers, in ``test_lazy.py``) or ask for it (``EROFS_FUSE_LOOP=trio``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from collections.abc import Generator

import pyfuse3
import pytest

from helpers import ROOT, corpus, kernel_erofs
from mounting import daemon_pids, fuse_mount, is_mounted, wait_until

PLAIN = "serving without trio"

ELIGIBLE = """
import sys
from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse.operations import Operations
from erofs_fuse.fuse.overlay import MergedTree
from erofs_fuse.fuse.plainloop import eligible
tree = MergedTree([Image.open(sys.argv[1])])
print(eligible(Operations(tree)), eligible(Operations(tree, read_threads=2)),
      eligible(Operations(tree, blocking_reads=True)))
import trio  # as in the snapshotter's fork server: still served without it
print(eligible(Operations(tree)))
"""


def _eligible(**env: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", ELIGIBLE, corpus("plain.erofs")],
                          capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, **env})
    return proc.stdout.split()


def test_only_mounts_without_threads_are_eligible() -> None:
    assert _eligible() == ["True", "False", "False", "True"]
    assert _eligible(EROFS_FUSE_LOOP="trio") == ["False", "False", "False", "False"]


def _same_as_kernel(mnt: str, ref: str, rel: str) -> None:
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(ref))
    with open(os.path.join(mnt, rel), "rb") as mine, open(os.path.join(ref, rel), "rb") as theirs:
        assert mine.read() == theirs.read()


def test_a_plain_mount_is_served_without_trio() -> None:
    with kernel_erofs(corpus("lz4.erofs")) as ref, \
            fuse_mount([corpus("lz4.erofs")], "--debug") as m:
        _same_as_kernel(m.mountpoint, ref, "big/mixed.bin")
        text = m.log_text()
        assert PLAIN in text
        # the warm-up (decompressors, collector) ran once INIT was answered, as in trio's loop
        wait_until(lambda: "start-up objects frozen" in m.log_text(), what="the warm-up")


@pytest.mark.parametrize("args,env", [(("--threads", "2"), ()),
                                      ((), ("env", "EROFS_FUSE_LOOP=trio"))])
def test_mounts_with_threads_or_that_ask_are_served_by_trio(
        args: tuple[str, ...], env: tuple[str, ...]) -> None:
    with kernel_erofs(corpus("lz4.erofs")) as ref, \
            fuse_mount([corpus("lz4.erofs")], "--debug", *args, prefix=env) as m:
        _same_as_kernel(m.mountpoint, ref, "big/zeros-with-tail.bin")
        assert PLAIN not in m.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_each_stop_signal_unmounts_a_plain_mount(sig: signal.Signals) -> None:
    with fuse_mount([corpus("plain.erofs")], "--debug") as m:
        os.listdir(m.mountpoint)
        (pid,) = daemon_pids(m.mountpoint)
        os.kill(pid, sig)  # while the daemon waits for a request
        wait_until(lambda: not is_mounted(m.mountpoint), what="the unmount")
        wait_until(lambda: not daemon_pids(m.mountpoint), what="the daemon to exit")
        text = m.log_text()
        assert PLAIN in text and f"{sig.name}: unmounting" in text, text
        assert "Traceback" not in text, text


@types.coroutine
def _suspend() -> Generator[None, None, None]:
    yield  # what an await of an event loop's primitive does


def test_a_handler_that_suspends_without_a_loop_is_failed_not_left_hanging() -> None:
    # patch 07 runs each handler to its end: one that would wait for an event loop is thrown
    # RuntimeError there, and its own error path answers the request (EIO, in ours)
    run_inline = getattr(pyfuse3, "_run_inline")
    seen: list[str] = []

    async def waits_for_a_loop() -> None:
        try:
            await _suspend()
        except RuntimeError as exc:
            seen.append(str(exc))

    async def quick() -> None:
        seen.append("answered")

    run_inline(waits_for_a_loop())
    run_inline(quick())
    assert len(seen) == 2 and "suspended" in seen[0] and seen[1] == "answered"
