"""``scripts/fuzz --mode mount``: one mutant mounted by a forked erofs-fuse daemon and walked.

The worker has imported the daemon and forks one daemon per mutant (``mount -f``, the real
entry point), waits for the mount, walks it, stops the daemon with SIGTERM and checks that it
unmounted and exited 0. A watchdog thread ends a stuck FUSE connection when one operation
exceeds ``--timeout`` (the daemon's stack dumped to its log first).
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable

from devtools.fuzz.image_mutants import stack_for
from devtools.fuzz.lib_mode import CHUNK, ENTRY_CAP, FILE_CAP, READ_CAP

def mount_info(path: str) -> tuple[int, str] | None:
    """(FUSE connection number, filesystem type) of the mount at ``path``, or None.

    Read from mountinfo: touching a hung FUSE mountpoint would hang the caller."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == path:
                major, minor = (int(x) for x in fields[2].split(":"))
                fstype = line.partition(" - ")[2].split(" ", 1)[0]
                return (major << 20) | minor, fstype
    return None


def abort_connection(conn: int) -> None:
    try:
        with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass


def force_unmount(mnt: str) -> None:
    for _ in range(3):
        info = mount_info(mnt)
        if info is None:
            return
        if info[1].startswith("fuse"):
            abort_connection(info[0])
        subprocess.run(["umount", "-l", mnt], capture_output=True)


class Watchdog(threading.Thread):
    """Aborts the FUSE connection when one operation of the walker runs over ``timeout``."""

    def __init__(self, conn: int, timeout: float, daemon_pid: int) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.timeout = timeout
        self.daemon_pid = daemon_pid
        self.op: str | None = None
        self.op_start = 0.0
        self.fired: str | None = None
        self.rss_kb = 0
        self._halt = threading.Event()

    def begin(self, what: str) -> None:
        self.op_start = time.monotonic()
        self.op = what

    def end(self) -> None:
        self.op = None

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            op = self.op
            if op is not None and time.monotonic() - self.op_start > self.timeout:
                self.fired = f"{op}: over {self.timeout:g} s"
                self.rss_kb = _vm_hwm_kb(self.daemon_pid)
                with_pid(self.daemon_pid, signal.SIGUSR1)  # its Python stack, into its log
                time.sleep(0.3)
                # the blocked request fails at once: through the control filesystem if it is
                # mounted (it is not mounted here, to leave the machine as it was), and anyway
                # when the (stuck) daemon dies, since it holds the only /dev/fuse descriptor
                abort_connection(self.conn)
                with_pid(self.daemon_pid, signal.SIGKILL)
                return


def with_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _entry_paths(top: str) -> list[str]:
    return [e.path for e in os.scandir(top)]


class MountWalk:
    """Walk and read a mounted tree; every single operation timed by the watchdog."""

    def __init__(self, mnt: str, dog: Watchdog) -> None:
        self.mnt = mnt
        self.dog = dog
        self.errnos: dict[str, int] = {}
        self.entries = 0
        self.bytes = 0
        self.slowest = 0.0

    def op(self, what: str, fn: Callable[[], object]) -> object:
        if self.dog.fired:
            raise TimeoutError(self.dog.fired)
        self.dog.begin(what)
        start = time.monotonic()
        try:
            return fn()
        except OSError as exc:
            if self.dog.fired:
                raise TimeoutError(self.dog.fired) from exc
            key = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.errnos[key] = self.errnos.get(key, 0) + 1
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                raise ConnectionError("the daemon went away") from exc
            return None
        finally:
            self.dog.end()
            self.slowest = max(self.slowest, time.monotonic() - start)

    def run(self) -> None:
        budget = READ_CAP
        self.op("statvfs", lambda: os.statvfs(self.mnt))
        stack = [self.mnt]
        while stack and self.entries < ENTRY_CAP:
            top = stack.pop()
            listing = self.op(f"scandir {top}", partial(_entry_paths, top))
            for path in listing or []:  # type: ignore[attr-defined]
                self.entries += 1
                st = self.op(f"lstat {path}", partial(os.lstat, path))
                names = self.op(f"listxattr {path}",
                                partial(os.listxattr, path, follow_symlinks=False))
                for xname in (names or [])[:16]:  # type: ignore[index]
                    self.op(f"getxattr {path} {xname}",
                            partial(os.getxattr, path, xname, follow_symlinks=False))
                if st is None:
                    continue
                mode = st.st_mode  # type: ignore[attr-defined]
                if (mode & 0o170000) == 0o040000:
                    stack.append(path)
                elif (mode & 0o170000) == 0o120000:
                    self.op(f"readlink {path}", partial(os.readlink, path))
                elif (mode & 0o170000) == 0o100000 and budget > 0:
                    budget -= self.read_file(path, min(FILE_CAP, budget))

    def read_file(self, path: str, cap: int) -> int:
        fd = self.op(f"open {path}", lambda: os.open(path, os.O_RDONLY | os.O_NOFOLLOW))
        if fd is None:
            return 0
        got = 0
        try:
            while got < cap:
                chunk = self.op(f"read {path} at {got}",
                                lambda: os.pread(fd, min(CHUNK, cap - got), got))  # type: ignore[arg-type]
                if not chunk:
                    break
                got += len(chunk)  # type: ignore[arg-type]
        finally:
            self.op(f"close {path}", lambda: os.close(fd))  # type: ignore[arg-type]
        self.bytes += got
        return got


def _daemon_child(layers: list[str], mnt: str, log_path: str) -> None:
    """In the forked child: become the erofs-fuse daemon (foreground), never return."""
    code = 70
    try:
        logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(logfd, 2)
        os.close(null)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        faulthandler.enable(file=sys.stderr)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        from erofs_fuse.cli.mount import main as mount_main

        code = mount_main(["-f", "--layers", ",".join(layers), mnt])
    except BaseException:  # noqa: BLE001 - report whatever it was in the log, as a crash
        traceback.print_exc()
        code = 71
    finally:
        sys.stderr.flush()
        os._exit(code)


def _reap(pid: int, wait: float) -> int | None:
    """The exit status of ``pid`` if it ends within ``wait`` seconds (None: still running)."""
    deadline = time.monotonic() + wait
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


CRASH_MARKS = ("internal error", "Traceback", "Fatal Python error", "CRITICAL")


def run_mount_mutant(path: str, name: str, args: argparse.Namespace, workdir: str) -> dict[str, object]:
    """Mount the mutant with erofs-fuse, walk and read it, unmount; record the daemon's fate."""
    mnt = os.path.join(workdir, "mnt")
    log_path = os.path.join(workdir, "daemon.log")
    os.makedirs(mnt, exist_ok=True)
    start = time.monotonic()
    result: dict[str, object] = {"status": "ok"}
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _daemon_child(stack_for(name, path), mnt, log_path)
    status: int | None = None
    conn = -1
    try:
        deadline = time.monotonic() + 10 + args.timeout
        while True:
            info = mount_info(mnt)
            if info is not None:
                conn = info[0]
                break
            status = _reap(pid, 0)
            if status is not None:
                code = os.waitstatus_to_exitcode(status)
                text = read_log(log_path)
                clean = code == 2 and not any(m in text for m in CRASH_MARKS)
                result.update(status="refused" if clean else "crash", exit=code,
                              error=text[-600:] if not clean else text.strip()[-200:])
                return result
            if time.monotonic() > deadline:
                with_pid(pid, signal.SIGUSR1)
                time.sleep(0.2)
                result.update(status="hang", error="the mount did not come up",
                              log=read_log(log_path)[-3000:])
                return result
            time.sleep(0.005)
        dog = Watchdog(conn, args.timeout, pid)
        dog.start()
        walk = MountWalk(mnt, dog)
        try:
            walk.run()
        except TimeoutError as exc:
            result.update(status="hang", error=str(exc))
        except ConnectionError as exc:
            result.update(status="crash", error=str(exc))
        finally:
            dog.stop()
        result.update(entries=walk.entries, bytes=walk.bytes, errnos=walk.errnos,
                      slowest=round(walk.slowest, 3))
        result["rss_kb"] = _vm_hwm_kb(pid) or dog.rss_kb
        if result["status"] == "ok":
            status = _reap(pid, 0)
            if status is not None:
                result.update(status="crash", error="the daemon exited while mounted",
                              exit=os.waitstatus_to_exitcode(status))
        if result["status"] == "ok":
            # SIGTERM must unmount and end the daemon with status 0
            os.kill(pid, signal.SIGTERM)
            status = _reap(pid, max(args.timeout, 5))
            if status is None:
                with_pid(pid, signal.SIGUSR1)
                time.sleep(0.2)
                result.update(status="hang", error="SIGTERM did not end the daemon")
            elif os.waitstatus_to_exitcode(status) != 0:
                result.update(status="crash", exit=os.waitstatus_to_exitcode(status),
                              error="the daemon's exit status after SIGTERM")
            elif mount_info(mnt) is not None:
                result.update(status="crash", error="still mounted after SIGTERM")
    finally:
        if status is None:
            with_pid(pid, signal.SIGKILL)
            status = _reap(pid, 30)
        force_unmount(mnt)
        text = read_log(log_path)
        if result["status"] == "ok" and any(m in text for m in CRASH_MARKS):
            result.update(status="crash", error="the daemon logged an internal error")
        if result["status"] in ("crash", "hang") and "log" not in result:
            result["log"] = text[-4000:]
    result["seconds"] = round(time.monotonic() - start, 3)
    return result


def read_log(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
