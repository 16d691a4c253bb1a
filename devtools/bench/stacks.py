"""The stacks ``scripts/bench`` compares: ways to mount the same layers as one merged tree.

Each stack mounts itself under its own directory and unmounts everything it mounted, whatever
happened; ``daemon_pids`` names its FUSE daemons (for VmHWM).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from devtools import ROOT


def env() -> dict[str, str]:
    """This checkout first on the import path. Commands run as ``python -m erofs_fuse`` also run
    from it (``cwd=ROOT``): ``-m`` puts the working directory before PYTHONPATH, so started from
    another checkout they would measure that one's code."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[4] == path for line in f)


def check(cmd: list[str], **kw: object) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}...: exit {proc.returncode}: "
                           f"{proc.stderr.strip()[-500:]}")


def force_unmount(path: str) -> None:
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        if not mounted(path):
            return
        subprocess.run(cmd, capture_output=True)
        if mounted(path):
            time.sleep(0.1)


def pids_naming(paths: list[str]) -> list[int]:
    """Processes (not this one) with one of ``paths`` as a command-line argument."""
    want = {os.fsencode(p) for p in paths}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a in want for a in args):
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``'s threads so far, and of the processes it started that
    still run (erofs-fuse's object worker), to the nanosecond: the scheduler's run time of each
    (``/proc/PID/task/TID/schedstat``). ``/proc/PID/stat`` counts clock ticks, 10 ms each here,
    too coarse for the 0.05-0.1 s a daemon spends on a workload such as the python imports; it
    is the fallback. A thread or process that has exited is no longer counted (the daemons keep
    theirs: pyfuse3's workers, trio's thread cache, fuse-overlayfs's, the object worker)."""
    return sum(_own_cpu_seconds(p) for p in [pid, *children_of(pid)])


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started (and theirs), still running."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _own_cpu_seconds(pid: int) -> float:
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Stack:
    """One way of mounting ``layers`` (bottom to top) at ``<base>/merged``."""

    name = "?"
    label = "?"
    fuse = True

    def __init__(self, layers: list[Path], base: Path) -> None:
        # absolute: the erofs-fuse commands run from the checkout (see ``env``)
        self.layers = [os.path.abspath(p) for p in layers]
        self.base = Path(os.path.abspath(base))
        self.mnt = str(self.base / "merged")
        self._mounts: list[str] = []  # in mount order

    def _dir(self, name: str) -> str:
        path = self.base / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def mount(self) -> None:
        raise NotImplementedError

    def daemon_pids(self) -> list[int]:
        return pids_naming(self._mounts) if self.fuse else []

    def unmount(self) -> None:
        pids = self.daemon_pids()
        for path in reversed(self._mounts):
            force_unmount(path)
        self._mounts.clear()
        deadline = time.monotonic() + 60
        while pids and time.monotonic() < deadline:  # a daemon may write a profile on exit
            pids = [p for p in pids if alive(p)]
            time.sleep(0.02)

    def _kernel_erofs(self) -> list[str]:
        dirs = []
        for k, layer in enumerate(self.layers):
            d = self._dir(f"layer{k}")
            check(["mount", "-t", "erofs", "-o", "ro,loop", layer, d])
            self._mounts.append(d)
            dirs.append(d)
        return dirs

    def _lowerdir(self, dirs: list[str]) -> str:
        return "lowerdir=" + ":".join(reversed(dirs))  # overlayfs: top first


class KernelStack(Stack):
    name, label, fuse = "kernel", "kernel erofs + overlayfs", False

    def mount(self) -> None:
        dirs = self._kernel_erofs()
        mnt = self._dir("merged")
        check(["mount", "-t", "overlay", "overlay", "-o", self._overlay_options(dirs), mnt])
        self._mounts.append(mnt)

    def _overlay_options(self, dirs: list[str]) -> str:
        return self._lowerdir(dirs)


class KernelContainerStack(KernelStack):
    """Kernel erofs + overlayfs with an upper and a work directory: a container's root as
    containerd's overlayfs snapshotter mounts one, over erofs layers (the container
    benchmarks' reference for the snapshotter's layers)."""

    name, label = "kernel-erofs", "kernel erofs + overlayfs (upper, work)"

    def _overlay_options(self, dirs: list[str]) -> str:
        return (f"{self._lowerdir(dirs)},upperdir={self._dir('upper')},"
                f"workdir={self._dir('work')}")


def committed_layers(snapshotter_root: Path) -> list[Path]:
    """The ``layer.erofs`` files of an erofs-fuse snapshotter holding one image, bottom layer
    first: snapshot ids grow in the order containerd unpacks the layers."""
    snapshots = snapshotter_root / "snapshots"
    ids = sorted(int(d.name) for d in snapshots.iterdir()
                 if d.name.isdigit() and (d / "layer.erofs").is_file())
    return [snapshots / str(i) / "layer.erofs" for i in ids]


class FuseOverlayStack(Stack):
    name, label = "fuse-overlayfs", "fuse-overlayfs over kernel erofs"

    def mount(self) -> None:
        dirs = self._kernel_erofs()
        mnt = self._dir("merged")
        check(["fuse-overlayfs", "-o", self._lowerdir(dirs), mnt])
        self._mounts.append(mnt)


class ErofsfuseStack(Stack):
    name, label = "erofsfuse", "erofsfuse x3 + fuse-overlayfs"

    def __init__(self, layers: list[Path], base: Path, binary: str) -> None:
        super().__init__(layers, base)
        self.binary = binary

    def mount(self) -> None:
        dirs = []
        for k, layer in enumerate(self.layers):
            d = self._dir(f"layer{k}")
            check([self.binary, layer, d])
            self._mounts.append(d)
            dirs.append(d)
        mnt = self._dir("merged")
        check(["fuse-overlayfs", "-o", self._lowerdir(dirs), mnt])
        self._mounts.append(mnt)


class ErofsFuseStack(Stack):
    """erofs-fuse itself; ``profile``: the daemon runs in the foreground under cProfile and
    writes its stats to that file when unmounted."""

    name, label = "erofs-fuse", "erofs-fuse"

    def __init__(self, layers: list[Path], base: Path, extra: list[str] | None = None,
                 name: str | None = None, label: str | None = None) -> None:
        super().__init__(layers, base)
        self.extra = extra or []
        if name:
            self.name = name
        if label:
            self.label = label
        self.profile: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def args(self, mnt: str) -> list[str]:
        return ["--layers", ",".join(self.layers), "--log", str(self.base / "daemon.log"),
                *self.extra, mnt]

    def mount(self) -> None:
        mnt = self._dir("merged")
        if self.profile is None:
            check([sys.executable, "-m", "erofs_fuse", "mount", *self.args(mnt)], env=env(),
                  cwd=ROOT)
            self._mounts.append(mnt)
            return
        cmd = [sys.executable, "-m", "devtools.bench.profiled_mount", self.profile,
               "--foreground", *self.args(mnt)]
        self._proc = subprocess.Popen(cmd, env=env(), stderr=subprocess.DEVNULL, cwd=ROOT)
        self._mounts.append(mnt)
        while not mounted(mnt):
            if self._proc.poll() is not None:
                raise RuntimeError(f"profiled daemon exited ({self._proc.returncode})")
            time.sleep(0.005)

    def daemon_pids(self) -> list[int]:
        if self._proc is not None:
            return [self._proc.pid]
        return pids_naming(self._mounts)

    def unmount(self) -> None:
        super().unmount()
        if self._proc is not None:
            self._proc.wait(timeout=120)
            self._proc = None


def supports(option: str) -> bool:
    """Whether ``erofs-fuse mount`` of this checkout accepts ``option``."""
    proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "mount", "--help"],
                          capture_output=True, text=True, env=env(), cwd=ROOT)
    return option in proc.stdout


def seal(layers: list[Path], work: Path) -> Path:
    """LAYER.verity sidecars and the roots file ``erofs-fuse seal`` prints (made once)."""
    roots = work / "verity-roots.txt"
    newest = max(p.stat().st_mtime for p in layers)
    if roots.exists() and roots.stat().st_mtime >= newest and all(
            Path(f"{p}.verity").exists() for p in layers):
        return roots
    proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "seal", *map(str, layers)],
                          capture_output=True, text=True, env=env(), cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"erofs-fuse seal failed: {proc.stderr.strip()}")
    roots.write_text(proc.stdout)
    return roots


def cleanup(base: Path) -> None:
    """Unmount anything left below ``base`` (an interrupted earlier run)."""
    prefix = str(base) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for path in reversed(points):
        force_unmount(path)
    if base.exists():
        shutil.rmtree(base, ignore_errors=True)
