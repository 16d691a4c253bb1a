"""Helpers for tests that mount: erofs-fuse mounts in a subprocess, kernel overlayfs mounts.

Every mount made here is unmounted in a ``finally``, whatever the test did. A missing component
(``/dev/fuse``, ``fusermount3``, the overlay filesystem) fails the test: it is never skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Sequence

# The commands exactly as cli/main.py dispatches them (mount.main / mount.umount_main).
MOUNT_CMD = [sys.executable, "-c",
             "import sys; from erofs_fuse.cli.mount import main; sys.exit(main(sys.argv[1:]))"]
UMOUNT_CMD = [sys.executable, "-c",
              "import sys; from erofs_fuse.cli.mount import umount_main; "
              "sys.exit(umount_main(sys.argv[1:]))"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout first on the import path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def require_fuse() -> None:
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: FUSE mounts cannot be tested"
    assert shutil.which("fusermount3"), "fusermount3 is not installed (package fuse3)"


def require_overlay() -> None:
    with open("/proc/filesystems", encoding="ascii") as f:
        if "overlay" in f.read():
            return
    subprocess.run(["modprobe", "overlay"], capture_output=True)
    with open("/proc/filesystems", encoding="ascii") as f:
        assert "overlay" in f.read(), "the kernel has no overlay filesystem"


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[4] == path for line in f)


def force_unmount(path: str) -> None:
    """Unmount ``path`` however it can be done (a test may have left a daemon dead or alive)."""
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True)
    assert not is_mounted(path), f"{path} is still mounted"


def wait_until(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def daemon_pids(mountpoint: str) -> list[int]:
    """Processes whose command line names ``mountpoint`` (the background daemon)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(mountpoint) in args and any(b"erofs_fuse" in a for a in args):
            pids.append(int(entry))
    return pids


class FuseMount:
    """A running erofs-fuse mount: its mountpoint and its daemon's log."""

    def __init__(self, mountpoint: str, log: str) -> None:
        self.mountpoint = mountpoint
        self.log = log

    def log_text(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def states_after_lookups(pid: int, directory: str, samples: int, settle: float = 0.002) -> str:
    """The state letter (R, S, ...) of daemon ``pid``'s serving thread ``settle`` seconds after
    each of ``samples`` lookups of new names in ``directory`` (each one LOOKUP round trip).
    Sampled at once, a busy machine wakes this process so fast that a daemon still on its way
    back to sleep reads R (28 of 30 in a full test run with spin 0); 2 ms later it has slept,
    unless it is polling for longer than that."""
    stat = f"/proc/{pid}/task/{pid}/stat"  # the main thread runs trio and pyfuse3's loop
    states = []
    for i in range(samples):
        assert not os.path.exists(f"{directory}/missing-{i}")
        time.sleep(settle)
        with open(stat, encoding="ascii") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return "".join(states)


@contextlib.contextmanager
def fuse_mount(layers: Sequence[str], *args: str,
               prefix: Sequence[str] = ()) -> Iterator[FuseMount]:
    """``erofs-fuse mount --layers ...`` in the background (run by ``prefix``, a command such
    as ``prlimit``, if given); always unmounted afterwards."""
    require_fuse()
    mnt = tempfile.mkdtemp(prefix="erofs-fuse-test-")
    log = mnt + ".log"
    cmd = [*prefix, *MOUNT_CMD, "--layers", ",".join(layers), "--log", log, *args, mnt]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=60)
        assert proc.returncode == 0, f"mount failed ({proc.returncode}): {proc.stderr}"
        assert is_mounted(mnt), "mount returned 0 but nothing is mounted"
        yield FuseMount(mnt, log)
    finally:
        force_unmount(mnt)
        wait_until(lambda: not daemon_pids(mnt), what="the daemon to exit")
        os.rmdir(mnt)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)


@contextlib.contextmanager
def kernel_overlay(lowers_top_first: Sequence[str]) -> Iterator[str]:
    """Kernel overlayfs with only lower layers (read-only), unmounted afterwards."""
    require_overlay()
    assert len(lowers_top_first) >= 2, "overlayfs needs two lower layers when it has no upper"
    mnt = tempfile.mkdtemp(prefix="erofs-ovl-")
    spec = ":".join(lowers_top_first)
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={spec}", mnt],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"overlay mount failed: {proc.stderr}"
    try:
        yield mnt
    finally:
        force_unmount(mnt)
        os.rmdir(mnt)


@contextlib.contextmanager
def kernel_erofs_stack(images: Sequence[str]) -> Iterator[list[str]]:
    """Each image mounted by the kernel's erofs (bottom to top, as given)."""
    from helpers import kernel_erofs

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(kernel_erofs(img)) for img in images]
