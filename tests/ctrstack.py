"""A containerd of its own with ``erofs-fuse snapshotter`` as a proxy plugin, driven by ``ctr``.

``containerd_stack()`` starts Debian 12's containerd (1.6) with a temporary config, root, state
directory and socket (never the system service) and our snapshotter, and stops both, unmounting
everything under the temporary directory, whatever happened. Used by
``tests/test_snapshotter.py`` and ``scripts/bench-snapshotter``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from helpers import require_tool
from mounting import env, require_fuse

SNAPSHOTTER = "erofs-fuse"
NS = "default"

CONFIG = """\
version = 2
root = "{tmp}/containerd/root"
state = "{tmp}/containerd/state"
{disabled}

[debug]
  level = "debug"

[grpc]
  address = "{tmp}/containerd.sock"

[ttrpc]
  address = "{tmp}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{tmp}/opt"

[proxy_plugins]
  [proxy_plugins.{name}]
    type = "snapshot"
    address = "{tmp}/snapshotter.sock"
"""
NO_CRI = 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
# CRI pulling through our snapshotter, with the labels that let it fetch the layers itself
# (containerd-client.md 4.1). CRI loads without CNI plugins or config: empty directories of
# its own keep it away from the host's.
CRI = """
[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{name}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{tmp}/cni/bin"
    conf_dir = "{tmp}/cni/conf"
"""
CRI_NS = "k8s.io"  # CRI's namespace, always


@dataclass
class Stack:
    tmp: Path
    root: Path  # the snapshotter's
    address: str  # containerd's socket
    log: Path
    snapshotter: subprocess.Popen[bytes] | None = None
    debug: bool = True  # the snapshotter logs every call (the tests read it)
    ns: str = NS  # the namespace ctr works in
    # --mount-linger: none in tests (they check that a chain's mount goes with its last user);
    # None, the snapshotter's default (the benchmarks measure what users get)
    linger: float | None = 0.0
    args: tuple[str, ...] = ()  # more options of the snapshotter

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(["ctr", "-a", self.address, "-n", self.ns, *args],
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (
                f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n"
                f"--- snapshotter log ---\n{self.snapshotter_log()}")
        return proc.stdout

    @property
    def containerd_log(self) -> Path:
        """containerd's output, at debug level (``diff applied``: a layer it unpacked)."""
        return self.tmp / "containerd.log"

    def snapshotter_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def chain_mounts(self) -> list[str]:
        prefix = str(self.root / "mounts") + "/"
        return [m for m in mounts_under(str(self.tmp)) if m.startswith(prefix)]

    def rootfs(self, cid: str) -> Path:
        """A running container's root filesystem as the host sees it: the overlay that the
        shim mounts on its bundle's ``rootfs`` (runc's own mounts, /proc and /dev, are in the
        container's mount namespace, not on it)."""
        path = self.tmp / "containerd/state/io.containerd.runtime.v2.task" / self.ns / cid / "rootfs"
        assert str(path) in mounts_under(str(path)), f"{path} is not a mount"
        return path

    def remove_container(self, cid: str) -> None:
        """Kill a container started with ``ctr run -d`` (if it runs), then remove its task and
        the container (and with it its active snapshot)."""
        self.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        wait_for(lambda: "RUNNING" not in self.ctr("task", "ls", check=False)
                 .split(cid)[-1].split("\n")[0], 30, f"{cid} to stop")
        self.ctr("task", "rm", cid, check=False)
        self.ctr("container", "rm", cid, check=False)

    def start_snapshotter(self) -> None:
        sock = self.tmp / "snapshotter.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        with open(self.log, "ab") as log:
            self.snapshotter = proc = subprocess.Popen(
                [sys.executable, "-m", "erofs_fuse", "snapshotter", "--root", str(self.root),
                 "--address", str(sock), *(["--debug"] if self.debug else []),
                 *([] if self.linger is None else ["--mount-linger", str(self.linger)]),
                 *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=self.snapshotter_env())
        wait_for(lambda: sock.exists() or proc.poll() is not None, 30, "the snapshotter")
        assert proc.poll() is None, f"snapshotter died: {self.snapshotter_log()}"

    def snapshotter_env(self) -> dict[str, str]:
        """Registry credentials (CRI pulls) from ``docker_config``, never the host's."""
        return {**env(), "DOCKER_CONFIG": str(self.docker_config)}

    @property
    def docker_config(self) -> Path:
        return self.tmp / "docker"

    def wait_reachable(self) -> None:
        """Until containerd reaches the (restarted) snapshotter: its gRPC client may still be
        in reconnect backoff (up to 3 s), and a GC pass that fails then is not retried until
        the next change, leaving snapshots behind."""
        def reached() -> bool:
            proc = subprocess.run(["ctr", "-a", self.address, "-n", NS, "snapshots",
                                   "--snapshotter", SNAPSHOTTER, "usage"],
                                  capture_output=True, text=True)
            return proc.returncode == 0
        wait_for(reached, 30, "containerd to reach the snapshotter")

    def stop_snapshotter(self, sig: int = signal.SIGTERM) -> None:
        stop(self.snapshotter, sig=sig)
        self.snapshotter = None


def chain_daemon(mountpoint: str) -> int:
    """The pid of the mount daemon of ``mountpoint``: the process holding its --log file."""
    log = mountpoint + ".log"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == log:
                        return int(pid)
    raise AssertionError(f"no process holds {log}")


def mounts_under(prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                out.append(point)
    return out


def unmount_all(prefix: str) -> None:
    for _ in range(5):
        points = mounts_under(prefix)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
    assert not mounts_under(prefix), f"mounts left under {prefix}: {mounts_under(prefix)}"


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15,
         sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def containerd_stack(*, debug: bool = True, cri: bool = False,
                     linger: float | None = 0.0) -> Iterator[Stack]:
    """containerd and our snapshotter, ready for ``ctr``; both stopped afterwards. With
    ``cri``, containerd's CRI plugin is loaded, pulling with our snapshotter (CRI_NS)."""
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "fsck.erofs"):
        require_tool(tool)
    require_fuse()
    tmp = Path(tempfile.mkdtemp(prefix="efs-snap-", dir="/tmp"))  # socket paths stay short
    containerd = None
    s = Stack(tmp, tmp / "snapshotter", str(tmp / "containerd.sock"), tmp / "snapshotter.log",
              debug=debug, linger=linger)
    try:
        config = CONFIG.format(tmp=tmp, name=SNAPSHOTTER, disabled="" if cri else NO_CRI)
        if cri:
            config += CRI.format(tmp=tmp, name=SNAPSHOTTER)
            for d in ("cni/bin", "cni/conf"):
                (tmp / d).mkdir(parents=True)
        (tmp / "config.toml").write_text(config)
        s.start_snapshotter()
        with open(s.containerd_log, "wb") as log:
            containerd = subprocess.Popen(
                ["containerd", "--config", str(tmp / "config.toml")],
                stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert containerd is not None and containerd.poll() is None, \
                (tmp / "containerd.log").read_text(errors="replace")[-4000:]
            return subprocess.run(["ctr", "-a", s.address, "version"],
                                  capture_output=True).returncode == 0

        wait_for(ready, 30, "containerd")
        yield s
    finally:
        try:
            stop(containerd)
            s.stop_snapshotter()
        finally:
            unmount_all(str(tmp))
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def direct_snapshotter(prefix: str = "efs-snapd-", linger: float | None = 0.0,
                       args: tuple[str, ...] = ()) -> Iterator[tuple[object, Stack]]:
    """A snapshotter of its own (no containerd: its GC would remove snapshots it does not
    know) and a gRPC stub of the snapshots API talking to it; ``args``: more options."""
    import grpc

    from erofs_fuse.containerd.api import snapshots_pb2_grpc

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    s = Stack(tmp, tmp / "snapshotter", "", tmp / "snapshotter.log", linger=linger,
              args=args)
    channel = None
    try:
        s.start_snapshotter()
        channel = grpc.insecure_channel(f"unix://{tmp}/snapshotter.sock")
        yield snapshots_pb2_grpc.SnapshotsStub(channel), s
    finally:
        try:
            if channel is not None:
                channel.close()
            s.stop_snapshotter()
        finally:
            unmount_all(str(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
