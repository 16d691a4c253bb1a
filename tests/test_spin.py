"""The request loop polls for the next request before it sleeps (``mount --spin USEC``,
``-o spin=USEC``; third_party/pyfuse3/05-spin-before-sleep.patch): right after answering, the
daemon's serving thread is running, not asleep, for up to that long; with ``--spin 0`` it
sleeps at once, as before. Checked by the thread's state, not by timing the requests (the gain
depends on the machine: waking a sleeping thread is what costs on a VM whose idle CPUs halt).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import mkfs_erofs
from mounting import daemon_pids, env, fuse_mount, states_after_lookups

SAMPLES = 30


def make_layer(tmp: Path) -> str:
    """A one-file layer made by the real mkfs.erofs."""
    src = tmp / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    mkfs_erofs(str(src), str(tmp / "l.erofs"))
    return str(tmp / "l.erofs")


def serving_thread_states(mountpoint: str) -> str:
    (pid,) = daemon_pids(mountpoint)
    return states_after_lookups(pid, mountpoint, SAMPLES)


def test_daemon_polls_before_it_sleeps(tmp_path: Path) -> None:
    layer = make_layer(tmp_path)
    with fuse_mount([layer], "--spin", "50000") as m:
        os.listdir(m.mountpoint)  # served: the loop is past start-up
        spinning = serving_thread_states(m.mountpoint)
    with fuse_mount([layer], "-o", "spin=0") as m:
        os.listdir(m.mountpoint)
        sleeping = serving_thread_states(m.mountpoint)
    # R: running (or runnable, when it yields the CPU to the thread it just answered)
    assert spinning.count("R") >= SAMPLES * 2 // 3, spinning
    assert sleeping.count("R") <= SAMPLES // 3, sleeping


def test_spin_option_forms(tmp_path: Path) -> None:
    layer = make_layer(tmp_path)
    for args, message in [
        (["-o", "spin"], "mount: -o spin: expected -o spin=USEC (0 or more)"),
        (["-o", "spin=-1"], "mount: -o spin=-1: expected -o spin=USEC (0 or more)"),
        (["--spin", "2000000"], "mount: --spin 2000000: expected 0 to 1000000 microseconds"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "mount", "--layers", layer,
                               *args, str(tmp_path)], capture_output=True, text=True, env=env())
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"erofs-fuse: {message}"], (args, proc.stderr)
    # with other options in one -o list, and not handed to FUSE (which would refuse it)
    with fuse_mount([layer], "-o", "allow_other,spin=10") as m:
        assert os.listdir(m.mountpoint) == ["f"]
        opts = next(line.split()[3] for line in open("/proc/mounts", encoding="utf-8")
                    if line.split()[1] == m.mountpoint)
        assert "spin" not in opts and "allow_other" in opts
