"""The mount's daemon: the one owner of its life cycle once the command line has parsed it.

``erofs_fuse.cli.mount`` parses the arguments into a ``MountConfig``; this module opens and
validates every layer, settles where the daemon logs, and, unless ``--foreground``, forks: the
parent waits on a pipe until the daemon says the mount is made or why it could not mount, and
exits 0, or with the daemon's one line (2 for bad input, 1 otherwise). As with libfuse's own
daemons (``fuse_daemonize``), "made" is the mount(2) call: the kernel holds every request to
the mount until the daemon has answered its INIT, so the first access waits for that instead
of the command. That lets trio (about 40 ms of imports, a third of the command's start-up) load
after the mount is made, while the caller goes on; a mount that hands no read to a thread is
served without trio at all (``plainloop``). The daemon configures logging (to ``--log
FILE`` or ``-o log=FILE``, else syslog, else a file under /run or the user's state directory:
never nowhere), serves until unmounted or signalled (SIGTERM, SIGINT and SIGHUP end the
request loop) and always finishes with ``pyfuse3.close(unmount=True)``.
Logging is configured here and nowhere else.

One module of about 485 lines: the life cycle is one sequence (open, fork, mount, report,
serve, unmount) whose steps share the config, the report pipe and the order of their failures.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import signal
import stat
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import pyfuse3

from ..blob import Blob, FileBlob
from ..console import EXIT_USAGE, PROG, CliError
from ..erofs.errors import ErofsError
from ..erofs.image import Image
from . import plainloop, warmup
from .idmap import IDENTITY, IdMap
from .mountinfo import unescape_mount_path
from .operations import DEFAULT_READ_THREADS, DEFAULT_SPIN_US, DEFAULT_TIMEOUT, Operations
from .overlay import MergedTree

if TYPE_CHECKING:
    from ..verity import TrustSpec

log = logging.getLogger("erofs_fuse")

EXIT_MOUNT_FAILED = 1
SUBTYPE = "erofs-fuse"
# The syslog socket; EROFS_FUSE_SYSLOG names another one, or none when set empty.
SYSLOG_SOCKET = os.environ.get("EROFS_FUSE_SYSLOG", "/dev/log")
_READY = b"ready\n"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each unmounts


@dataclass
class MountConfig:
    layers: list[str]
    mountpoint: str
    devices: dict[int, list[str]] = field(default_factory=dict)
    foreground: bool = False
    debug: bool = False
    options: set[str] = field(default_factory=set)
    fsname: str = SUBTYPE
    log_file: str | None = None
    read_threads: int = DEFAULT_READ_THREADS
    timeout: float = DEFAULT_TIMEOUT
    trust: list[TrustSpec] = field(default_factory=list)  # one per layer, or empty
    require_verity: bool = False
    data_dirs: list[str] = field(default_factory=list)  # object stores (objects.py), in order
    require_object_verity: bool = False
    idmap: IdMap = IDENTITY
    syslog: str | None = None  # the socket a background daemon logs to, without a log file
    # layers whose reads may wait for a network (lazy layers): reads are served from threads
    blocking_reads: bool = False
    # the tree shows no xattr: getxattr answers ENOSYS once, and the kernel asks no more
    noxattr: bool = False
    # µs the request loop polls for the next request before it sleeps (DEFAULT_SPIN_US)
    spin_us: int = DEFAULT_SPIN_US
    # run in the serving process (after the fork) before it serves: background work such as
    # a lazy layer's fill, whose threads would not survive the fork
    on_serve: list[Callable[[], None]] = field(default_factory=list)



def open_layers(cfg: MountConfig, opened: Mapping[int, Image] | None = None) -> list[Image]:
    """Open and validate every layer, but those ``opened`` already (by index: lazy layers,
    which the caller opens); one CliError naming the first layer that fails (then the layers
    opened here are closed, those given are the caller's)."""
    images: list[Image] = []
    own: list[Image] = []
    try:
        for index, path in enumerate(cfg.layers):
            if opened is not None and index in opened:
                images.append(opened[index])
                continue
            trust = cfg.trust[index] if cfg.trust else None
            own.append(_open_layer(index, path, cfg.devices.get(index, []), trust,
                                   cfg.require_verity))
            images.append(own[-1])
    except BaseException:
        for image in own:
            image.close()
        raise
    return images


def _open_layer(index: int, path: str, devices: list[str], trust: TrustSpec | None = None,
                require_verity: bool = False) -> Image:
    for name in [path, *devices]:
        if os.path.isdir(name):
            raise CliError(f"{name}: is a directory, not an EROFS image")
    verified = require_verity or (
        trust is not None and (trust.fsverity or trust.dmverity or trust.trust_dmverity_sidecar))
    if devices and verified:
        # the trusted root covers the layer file only: bytes from its devices would be served
        # unverified, which verification promises never to do
        raise CliError(f"{path} (layer {index}): verification of extra device files is not "
                       "supported; mount this layer without a trusted root")
    blob: Blob | None = None
    device_blobs: list[Blob] = []
    try:
        blob = _open_layer_blob(path, trust, require_verity)
        for dev in devices:
            device_blobs.append(FileBlob(dev))
        return Image(blob, device_blobs, name=path)  # named by its path in every error
    except BaseException as exc:
        for b in ([blob] if blob is not None else []) + device_blobs:
            b.close()
        if isinstance(exc, OSError):
            raise CliError(f"{exc.filename or path}: {exc.strerror or exc}") from exc
        if isinstance(exc, ErofsError):
            raise CliError(f"{path} (layer {index}): {exc.message}") from exc
        raise


def _open_layer_blob(path: str, trust: TrustSpec | None, require_verity: bool) -> Blob:
    if trust is None and not require_verity:
        return FileBlob(path)  # nothing to verify: the integrity code is not even imported
    from ..verity.layer import open_layer_blob

    return open_layer_blob(path, trust, require=require_verity)



def check_log_file(path: str | None) -> None:
    """The daemon's log must open (an unwritable one would only show after the fork)."""
    if path is not None:
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise CliError(f"--log {path}: {exc.strerror}") from exc


def default_log_file() -> str:
    """Where a background daemon logs when given no log file and there is no syslog (a
    container): /run/erofs-fuse for root, the XDG state directory for a user."""
    if os.geteuid() == 0:
        return "/run/erofs-fuse/erofs-fuse.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "erofs-fuse", "erofs-fuse.log")


def choose_daemon_log(cfg: MountConfig) -> None:
    """Settle, before the fork, where the daemon's log lines go: the log file asked for, else
    syslog when its socket takes a connection, else ``default_log_file()``. Never nowhere: the
    one line per corrupt block or verification failure is the only report of it."""
    if cfg.log_file is None and SYSLOG_SOCKET:
        try:
            import socket  # here: a mount with a log file never needs it (3 ms of start-up)

            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            with probe:
                probe.connect(SYSLOG_SOCKET)
            cfg.syslog = SYSLOG_SOCKET
            return
        except OSError:
            pass  # no syslog here (containers): a file
    if cfg.log_file is None:
        path = default_log_file()
        try:
            os.makedirs(os.path.dirname(path), mode=0o755 if os.geteuid() == 0 else 0o700,
                        exist_ok=True)
        except OSError as exc:
            raise CliError(f"no syslog ({SYSLOG_SOCKET or 'EROFS_FUSE_SYSLOG empty'}) and "
                           f"{os.path.dirname(path)}: {exc.strerror}: give --log FILE") from exc
        cfg.log_file = path
    check_log_file(cfg.log_file)


def fuse_options(cfg: MountConfig) -> set[str]:
    options = set(cfg.options)
    # libfuse splits options at commas; a backslash keeps one in the value
    options.add("fsname=" + cfg.fsname.replace("\\", "\\\\").replace(",", "\\,"))
    options.add(f"subtype={SUBTYPE}")
    return options


# logging --------------------------------------------------------------------------------------
def configure_logging(cfg: MountConfig, *, daemon: bool) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if not daemon:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    elif cfg.log_file:
        handler = logging.FileHandler(cfg.log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s " + PROG + "[%(process)d] %(levelname)s %(message)s"))
    else:
        from logging.handlers import SysLogHandler  # only here: 5 ms a file-logging mount saves

        assert cfg.syslog is not None, "choose_daemon_log settles on a file or syslog"
        handler = SysLogHandler(cfg.syslog)
        handler.setFormatter(logging.Formatter(PROG + "[%(process)d]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    # pyfuse3's own debug lines are per request and worker: only with --debug
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if cfg.debug else logging.WARNING)


# serving --------------------------------------------------------------------------------------
async def _serve_until_done(ops: Operations) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(_after_init, ops)
        await pyfuse3.main(max_tasks=ops.max_tasks)
        nursery.cancel_scope.cancel()


async def _after_init(ops: Operations) -> None:
    import trio

    while not ops.initialized:
        await trio.sleep(0.01)
    warmup.warm_up(ops)


async def _terminate_on_signal() -> None:
    import trio

    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        # held since the mount was made (serve): one sent meanwhile arrives now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def import_serving_modules() -> None:
    """Import what serving loads after the mount is made (trio): for a fork server, so that
    each mount it forks starts with them."""
    import trio  # noqa: F401


def serve(cfg: MountConfig, images: list[Image], on_mounted: Callable[[], None] | None) -> int:
    """Mount, call ``on_mounted``, serve until unmounted or signalled, unmount. A CliError:
    nothing was mounted."""
    objects = None
    if cfg.data_dirs or cfg.require_object_verity:
        from ..objects import ObjectStore

        try:
            objects = ObjectStore(cfg.data_dirs, require_verity=cfg.require_object_verity,
                                  worker=os.environ.get("EROFS_FUSE_OBJECT_WORKER", "1") != "0")
        except OSError as exc:
            raise CliError(f"data dir {exc.filename}: {exc.strerror}") from exc
        raise_open_files_limit()
    tree = MergedTree(images, objects=objects)
    ops = Operations(tree, timeout=cfg.timeout, read_threads=cfg.read_threads,
                     idmap=cfg.idmap, blocking_reads=cfg.blocking_reads, noxattr=cfg.noxattr,
                     spin_us=cfg.spin_us)
    _init(ops, cfg)
    # the kernel sets a FUSE mount's read-ahead when it takes the INIT reply (it can only lower
    # it there): raised by the first request served after that reply, which the kernel held
    # until INIT was answered (a poll of the loop every 10 ms left the start of a workload,
    # the mmaps of its executables, at 128 KiB: 80 more READs of the python imports)
    ops.after_init = functools.partial(_raise_readahead, cfg.mountpoint)
    # until trio's handler is installed, a SIGTERM would kill the daemon and leave the mount
    # dead ("Transport endpoint is not connected"): held until then, also by the threads that
    # on_serve starts (they inherit the mask)
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    log.info("mounted %s on %s", ",".join(cfg.layers), cfg.mountpoint)
    try:
        for start in cfg.on_serve:
            start()
        if on_mounted is not None:
            on_mounted()
        if plainloop.eligible(ops):
            plainloop.serve(ops, _STOP_SIGNALS, functools.partial(warmup.warm_up, ops))
        else:
            import trio  # after the mount is made: see the module's docstring

            trio.run(_serve_until_done, ops)
    finally:
        pyfuse3.close(unmount=True)
        for image in images:
            image.close()
    log.info("unmounted %s", cfg.mountpoint)
    return 0


def _init(ops: Operations, cfg: MountConfig) -> None:
    """pyfuse3.init, with what libfuse and fusermount3 print (to stderr, which they share with
    us) turned into the one line of the CliError: an unknown option is bad input (exit 2)."""
    said = os.memfd_create("libfuse-stderr", os.MFD_CLOEXEC)
    saved = os.dup(2)
    os.dup2(said, 2)
    try:
        pyfuse3.init(ops, cfg.mountpoint, fuse_options(cfg))
        return
    except RuntimeError as exc:
        failure = exc
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        text = os.pread(said, 4096, 0)
        os.close(said)
    lines = text.decode(errors="replace").splitlines()
    why = "; ".join(line.strip() for line in lines if line.strip()) or str(failure)
    code = EXIT_USAGE if "unknown option" in why else EXIT_MOUNT_FAILED
    raise CliError(f"{cfg.mountpoint}: cannot mount: {why}", code) from failure


# Read-ahead of the mount, KiB. The kernel gives a FUSE mount 128 KiB, so a large file costs a
# request per 128 KiB, while one request may carry 1 MiB (libfuse asks for 256 pages). Raised
# where we may (root: the bdi's sysfs file); scripts/bench read-all, 4 interleaved runs: daemon
# CPU 3.97 -> 3.64 s with 1024 (3.79 s with 512).
READ_AHEAD_KB = 1024


def _raise_readahead(mountpoint: str) -> None:
    """Raise the mount's read-ahead to READ_AHEAD_KB (never lower it); a hint: errors ignored.
    The device comes from mountinfo: a stat() of the mountpoint would wait for us to serve."""
    dev = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.partition(" - ")[0].split()
                if len(fields) >= 5 and unescape_mount_path(fields[4]) == mountpoint:
                    dev = fields[2]  # the last one: ours is the newest mount on that path
        if dev is None:
            return
        path = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(path, encoding="ascii") as f:
            if int(f.read()) >= READ_AHEAD_KB:
                return
        with open(path, "w", encoding="ascii") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except (OSError, ValueError) as exc:
        log.debug("read-ahead left as it is: %s", exc)


def run_foreground(cfg: MountConfig, images: list[Image]) -> int:
    configure_logging(cfg, daemon=False)
    return serve(cfg, images, on_mounted=None)


def run_daemon(cfg: MountConfig, images: list[Image]) -> int:
    """Fork; the parent returns 0 once the daemon reports the mount made, or raises its error.

    Forked twice, the daemon is nobody's child but init's (no zombie in a long-lived caller)
    and, no session leader, can never acquire a controlling terminal.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os._exit(_daemon_main(cfg, images, write_end))
    os.close(write_end)
    os.waitpid(pid, 0)
    for image in images:
        image.close()  # the daemon has its own descriptors now
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    if report == _READY:
        return 0
    code, _, message = report.decode(errors="replace").strip().partition(" ")
    if not message or not code.isdigit():
        raise CliError("the mount daemon exited before the mount was ready", EXIT_MOUNT_FAILED)
    raise CliError(message, int(code))


def _daemon_main(cfg: MountConfig, images: list[Image], report_fd: int) -> int:
    """The daemon: no terminal; stderr stays until ready so libfuse's own errors are seen."""
    os.chdir("/")
    _redirect(0, os.O_RDONLY)
    _redirect(1, os.O_WRONLY)

    def ready() -> None:
        nonlocal report_fd
        if report_fd >= 0:
            os.write(report_fd, _READY)
            os.close(report_fd)
            report_fd = -1
            _redirect(2, os.O_WRONLY)

    try:
        configure_logging(cfg, daemon=True)
        return serve(cfg, images, on_mounted=ready)
    except CliError as exc:
        _report(report_fd, str(exc), exc.code)
        return exc.code
    except BaseException as exc:  # the parent must hear something, whatever happened
        log.exception("mount daemon failed")
        _report(report_fd, f"mount daemon failed: {exc}", EXIT_MOUNT_FAILED)
        return EXIT_MOUNT_FAILED


def _report(fd: int, message: str, code: int) -> None:
    """Tell the waiting parent why there is no mount: ``CODE MESSAGE``, its exit status and
    its one line."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.write(fd, f"{code} {message}".encode(errors="replace") + b"\n")
            os.close(fd)


def _redirect(fd: int, flags: int) -> None:
    devnull = os.open(os.devnull, flags)
    os.dup2(devnull, fd)
    os.close(devnull)


def mount(cfg: MountConfig, open_images: Callable[[], list[Image]] | None = None) -> int:
    """Open the layers (``cfg.layers``, or what ``open_images`` opens), check the mountpoint
    and the log, then serve: in the foreground until unmounted, else from a forked daemon,
    returning once the mount is ready. A CliError: nothing was mounted."""
    images = open_layers(cfg) if open_images is None else open_images()
    try:
        check_mountpoint(cfg.mountpoint)
        if cfg.foreground:
            check_log_file(cfg.log_file)
        else:
            choose_daemon_log(cfg)
    except BaseException:
        for image in images:
            image.close()
        raise
    if cfg.foreground:
        return run_foreground(cfg, images)
    return run_daemon(cfg, images)


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one, as containerd and other daemons do:
    an object store may hold about 800-1,000 descriptors (256 objects open, 128 opened ahead
    with their trees, 256 to 512 directories), against a soft limit of 1024 in many login
    shells, past which a read would fail with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # an infinite hard limit is above the kernel's nr_open
        pass


def check_mountpoint(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise CliError(f"{path}: mountpoint is not a directory")
    try:
        with os.scandir(path) as it:
            if any(True for _ in it):
                raise CliError(f"{path}: mountpoint is not empty")
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from exc

