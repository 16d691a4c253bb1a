"""``erofs-fuse mount`` and ``erofs-fuse umount``: the one owner of the mount lifecycle.

Order of events: parse the arguments, open and validate every layer, check the mountpoint (any
failure so far is one line ``erofs-fuse: ...`` and exit 2), then, unless ``--foreground``, fork:
the parent waits on a pipe until the daemon says the kernel's INIT request has been served (the
mount answers) or why it could not mount, and exits 0, or with the daemon's one line (2 for
bad input, 1 otherwise). The daemon configures logging (to ``--log FILE`` or ``-o log=FILE``,
else syslog, else a file under /run or the user's state directory: never nowhere), serves until
unmounted or signalled (SIGTERM, SIGINT and SIGHUP end the main loop with ``pyfuse3.terminate``)
and always finishes with ``pyfuse3.close(unmount=True)``. Logging is configured here and
nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import pyfuse3
import trio

from .console import EXIT_USAGE, PROG, CliError, print_error
from .erofs.errors import ErofsError
from .blob import Blob, FileBlob
from .erofs.image import Image
from .fs import DEFAULT_READ_THREADS, DEFAULT_TIMEOUT, Operations
from .idmap import IDENTITY, IdMap, IdMapError, kernel_overflow_ids, parse_id
from .layers_file import LayersFileError, expand_layers, with_listed_digests
from .overlay import MAX_LAYERS, MergedTree

if TYPE_CHECKING:
    from .verity import TrustSpec

log = logging.getLogger("erofs_fuse")

EXIT_MOUNT_FAILED = 1
SUBTYPE = "erofs-fuse"
DEFAULT_OPTIONS = ("ro", "default_permissions", "nosuid", "nodev")
# -o options that undo a default, and the default each one removes
_NEGATIONS = {"suid": "nosuid", "dev": "nodev"}
# other names of them, which mount(8) passes on (it drops a written suid or dev: the defaults)
_ALIASES = {"allow_suid": "suid", "allow_dev": "dev"}
# -o options of erofs-fuse itself (fuse-overlayfs's names, see idmap.py), never given to FUSE;
# all but the last take a value
OWN_OPTIONS = ("uidmapping", "gidmapping", "squash_to_uid", "squash_to_gid", "squash_to_root")
LOG_OPTION = "log"  # -o log=FILE: --log for mount(8) and fstab lines
DATADIR_OPTION = "datadir"  # -o datadir=DIR: --data-dir for mount(8) and fstab lines
# The syslog socket; EROFS_FUSE_SYSLOG names another one, or none when set empty.
SYSLOG_SOCKET = os.environ.get("EROFS_FUSE_SYSLOG", "/dev/log")
FUSE_CONF = "/etc/fuse.conf"  # fusermount3's: user_allow_other, mount_max
_REFUSED_OPTIONS = {
    "rw": "the tree is read-only",
    # libfuse takes it, then ends the session at INIT (pyfuse3 asks for another read size):
    # the mount command would succeed and leave nothing mounted
    "max_read": "the read size is pyfuse3's",
}
_READY = b"ready\n"


# arguments ------------------------------------------------------------------------------------
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


class _Parser(argparse.ArgumentParser):
    """argparse that raises CliError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{self.prog.removeprefix(PROG + ' ')}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} mount",
        description="Mount a stack of EROFS layer images as one read-only tree, merged as "
        "overlayfs merges layers (whiteouts and opaque directories in overlayfs or OCI form).",
    )
    p.add_argument("--layers", required=True, metavar="L1,L2,...,LN",
                   help="layer images, comma-separated, BOTTOM TO TOP (the order of an OCI "
                   "manifest's layers: the last one wins); @FILE stands for the layers of a "
                   ".layers file written by convert-image, trusting its fs-verity digests")
    p.add_argument("--device", action="append", default=[], metavar="INDEX:PATH",
                   help="an extra device (blob) file of layer INDEX (0 = the first, bottom "
                   "layer); repeat in device-table order for several devices")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr (default: return once the "
                   "mount is ready and serve it from a background daemon)")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="FUSE mount options, e.g. allow_other; 'ro,default_permissions,nosuid,"
                   "nodev' are always on unless undone ('suid', 'dev')")
    p.add_argument("--fsname", default=SUBTYPE,
                   help="the source shown in /proc/mounts (default %(default)s)")
    p.add_argument("--log", dest="log_file", metavar="FILE",
                   help="log file of the background daemon, = -o log=FILE (default: syslog, "
                   "or without /dev/log " + default_log_file() + ")")
    p.add_argument("--threads", dest="read_threads", type=int, default=DEFAULT_READ_THREADS,
                   metavar="N", help="worker threads for large reads of compressed files "
                   "(0: none; default %(default)s)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long the kernel may cache entries and attributes "
                   "(default %(default)s)")
    a = p.add_argument_group(
        "access and ownership", "Ids are mapped as by fuse-overlayfs's options of the same names "
        "(each also accepted as -o uidmapping=LIST, gidmapping=LIST, squash_to_root, "
        "squash_to_uid=UID, squash_to_gid=GID): a LIST is CONTAINER:HOST:COUNT triples joined by "
        "':', as the container's uid_map on one line; a file stored with a CONTAINER id is "
        "reported with the HOST id, one in no triple with the overflow id (65534).")
    a.add_argument("--uidmap", action="append", default=[], metavar="LIST",
                   help="report owner HOST+(ID-CONTAINER) for owner ID stored in a layer")
    a.add_argument("--gidmap", action="append", default=[], metavar="LIST",
                   help="the same for groups")
    a.add_argument("--squash-to-root", action="store_true",
                   help="report every file as owned by 0:0")
    a.add_argument("--squash-to-uid", metavar="UID",
                   help="report every file as owned by UID (over --squash-to-root)")
    a.add_argument("--squash-to-gid", metavar="GID",
                   help="report every file's group as GID (over --squash-to-root)")
    a.add_argument("--allow-other", dest="options", action="append_const", const="allow_other",
                   help="let other users (root too) use the mount, = -o allow_other; for a "
                   "non-root user, /etc/fuse.conf must have the line user_allow_other")
    a.add_argument("--suid", dest="options", action="append_const", const="suid",
                   help="honour setuid/setgid bits (= -o suid; root only)")
    a.add_argument("--dev", dest="options", action="append_const", const="dev",
                   help="allow device files to be opened (= -o dev; root only)")
    v = p.add_argument_group(
        "integrity", "Every block read from a layer with a trusted root is hashed and checked "
        "against its Merkle tree (LAYER.verity by default, as written by 'erofs-fuse seal'); a "
        "mismatch fails that read with EIO. LAYER is a 0-based index (bottom first) or the "
        "layer's path as given in --layers.")
    v.add_argument("--verity", action="append", default=[], metavar="LAYER=sha256:HEX",
                   help="trusted fs-verity digest of a layer (as 'fsverity digest' prints it)")
    v.add_argument("--verity-roots", action="append", default=[], metavar="FILE",
                   help="file of 'sha256:HEX PATH' lines (the output of 'fsverity digest' or "
                   "'erofs-fuse seal'), matched to layers by path")
    v.add_argument("--dm-verity", action="append", default=[], metavar="LAYER=ROOT:BLOCKS",
                   help="trusted dm-verity root hash with the layer's data block count")
    v.add_argument("--verity-sidecar", action="append", default=[], metavar="LAYER=PATH",
                   help="where the layer's hash tree is (default: LAYER.verity, LAYER.dmverity)")
    v.add_argument("--trust-dmverity-sidecar", action="store_true",
                   help="trust the root hash in containerd's LAYER.dmverity files")
    v.add_argument("--require-verity", action="store_true",
                   help="refuse to mount any layer without a trusted root")
    o = p.add_argument_group(
        "object stores", "Metadata-only files (trusted.overlay.metacopy, as mkcomposefs writes "
        "them) take their bytes from the object their trusted.overlay.redirect names in a data "
        "dir, as overlayfs data-only layers (lowerdir=...::DIR); without one their reads fail "
        "with EIO. An object whose metacopy carries an fs-verity digest is verified per block.")
    o.add_argument("--data-dir", dest="data_dirs", action="append", default=[], metavar="DIR",
                   help="an object store (= -o datadir=DIR); repeatable, searched in order")
    o.add_argument("--require-object-verity", action="store_true",
                   help="refuse objects whose metacopy xattr carries no fs-verity digest")
    p.add_argument("mountpoint", help="an empty directory")
    return p


def parse_args(argv: list[str]) -> MountConfig:
    ns = build_parser().parse_args(argv)
    try:
        layers, listed_digests = expand_layers(ns.layers)  # @FILE items: .layers files
    except LayersFileError as exc:
        raise CliError(f"mount: --layers {exc}") from exc
    if not layers:
        raise CliError("mount: --layers names no layer")
    if len(layers) > MAX_LAYERS:
        raise CliError(f"mount: {len(layers)} layers; at most {MAX_LAYERS} are supported")
    if ns.read_threads < 0:
        raise CliError("mount: --threads must be 0 or more")
    trust = parse_trust(layers, ns, listed=bool(listed_digests))
    trust = with_listed_digests(trust, listed_digests)
    return MountConfig(
        trust=trust,
        require_verity=ns.require_verity,
        data_dirs=parse_data_dirs(ns),
        require_object_verity=ns.require_object_verity,
        layers=layers,
        mountpoint=os.path.abspath(ns.mountpoint),
        devices=parse_devices(ns.device, len(layers)),
        foreground=ns.foreground,
        debug=ns.debug,
        options=check_privileged_options(parse_options(ns.options)),
        fsname=ns.fsname,
        log_file=parse_log_file(ns),
        read_threads=ns.read_threads,
        timeout=ns.timeout,
        idmap=parse_idmap(ns),
    )


def parse_trust(layers: list[str], ns: argparse.Namespace, listed: bool) -> list[TrustSpec]:
    """The trusted roots of the integrity options, one spec per layer; none (and no import of
    the integrity code) without such options or digests ``listed`` in a .layers file."""
    if not (listed or ns.verity or ns.verity_roots or ns.dm_verity or ns.verity_sidecar
            or ns.trust_dmverity_sidecar):
        return []
    from .verity.trust import TrustError, parse_trust_args

    try:
        return parse_trust_args(
            layers, verity=ns.verity, verity_roots=ns.verity_roots, dm_verity=ns.dm_verity,
            verity_sidecar=ns.verity_sidecar, trust_dmverity_sidecar=ns.trust_dmverity_sidecar)
    except TrustError as exc:
        raise CliError(str(exc)) from exc


def parse_devices(specs: list[str], nlayers: int) -> dict[int, list[str]]:
    devices: dict[int, list[str]] = {}
    for spec in specs:
        index, sep, path = spec.partition(":")
        if not sep or not index.isdigit() or not path:
            raise CliError(f"mount: --device {spec}: expected LAYER_INDEX:PATH")
        if int(index) >= nlayers:
            raise CliError(f"mount: --device {spec}: there are only {nlayers} layers "
                           f"(indexes 0..{nlayers - 1}, bottom first)")
        devices.setdefault(int(index), []).append(path)
    return devices


def parse_log_file(ns: argparse.Namespace) -> str | None:
    """--log FILE, else the last -o log=FILE; absolute, as the daemon runs in /."""
    path: str | None = ns.log_file
    for value in ns.options:
        for opt in value.split(","):
            name, eq, arg = opt.partition("=")
            if name == LOG_OPTION:
                if not eq or not arg:
                    raise CliError(f"mount: -o {opt}: expected -o log=FILE")
                path = path if ns.log_file else arg
    return os.path.abspath(path) if path else None


def parse_data_dirs(ns: argparse.Namespace) -> list[str]:
    """--data-dir DIRs then -o datadir=DIR ones, absolute (the daemon runs in /); each must be
    a directory."""
    dirs: list[str] = list(ns.data_dirs)
    for value in ns.options:
        for opt in value.split(","):
            name, eq, arg = opt.partition("=")
            if name == DATADIR_OPTION:
                if not eq or not arg:
                    raise CliError(f"mount: -o {opt}: expected -o datadir=DIR")
                dirs.append(arg)
    for path in dirs:
        if not os.path.isdir(path):
            raise CliError(f"mount: data dir {path}: not a directory")
    return [os.path.abspath(path) for path in dirs]


def parse_options(values: list[str]) -> set[str]:
    """The FUSE mount options: the defaults, changed by the -o lists (our own ones left out)."""
    options = set(DEFAULT_OPTIONS)
    for value in values:
        for opt in filter(None, value.split(",")):
            if opt.partition("=")[0] in (*OWN_OPTIONS, LOG_OPTION, DATADIR_OPTION):
                continue
            opt = _ALIASES.get(opt, opt)
            refused = _REFUSED_OPTIONS.get(opt.partition("=")[0])
            if refused:
                raise CliError(f"mount: -o {opt}: {refused}")
            if opt in _NEGATIONS:
                options.discard(_NEGATIONS[opt])
            options.add(opt)
    return options


def check_privileged_options(options: set[str]) -> set[str]:
    """Refuse what fusermount3 would silently drop, or refuse only once forked, for a caller
    that is not root."""
    if os.geteuid() != 0:
        for opt in ("suid", "dev"):
            if opt in options:
                raise CliError(f"mount: {opt}: only root can mount with {opt} (fusermount3 "
                               "mounts nosuid,nodev for every other user)")
        if "allow_other" in options and not user_allow_other():
            raise CliError(f"mount: allow_other: only root may use it unless {FUSE_CONF} has "
                           "the line user_allow_other")
    return options


def user_allow_other(path: str = FUSE_CONF) -> bool:
    """Whether fusermount3 lets users mount with allow_other: a line ``user_allow_other`` in
    /etc/fuse.conf (comments after ``#``, surrounding blanks ignored, as fusermount3 reads it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(line.partition("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def parse_idmap(ns: argparse.Namespace) -> IdMap:
    """The id mapping asked for by --uidmap, --gidmap, --squash-* and their -o forms."""
    uidmap: list[str] = list(ns.uidmap)
    gidmap: list[str] = list(ns.gidmap)
    squash_root: bool = ns.squash_to_root
    squash: dict[str, str | None] = {"uid": ns.squash_to_uid, "gid": ns.squash_to_gid}
    for value in ns.options:
        for opt in filter(None, value.split(",")):
            name, eq, arg = opt.partition("=")
            if name not in OWN_OPTIONS:
                continue
            if (name == "squash_to_root") == bool(eq) or (eq and not arg):
                form = name if name == "squash_to_root" else f"{name}=VALUE"
                raise CliError(f"mount: -o {opt}: expected -o {form}")
            if name == "uidmapping":
                uidmap.append(arg)
            elif name == "gidmapping":
                gidmap.append(arg)
            elif name == "squash_to_root":
                squash_root = True
            else:
                squash[name.removeprefix("squash_to_")] = arg
    try:
        return IdMap.from_options(
            uidmap, gidmap, squash_to_root=squash_root,
            squash_to_uid=None if squash["uid"] is None else parse_id(squash["uid"], "uid"),
            squash_to_gid=None if squash["gid"] is None else parse_id(squash["gid"], "gid"),
            overflow=kernel_overflow_ids())
    except IdMapError as exc:
        raise CliError(f"mount: {exc}") from exc


# checks before mounting -----------------------------------------------------------------------
def open_layers(cfg: MountConfig) -> list[Image]:
    """Open and validate every layer; one CliError naming the first layer that fails."""
    images: list[Image] = []
    try:
        for index, path in enumerate(cfg.layers):
            trust = cfg.trust[index] if cfg.trust else None
            images.append(_open_layer(index, path, cfg.devices.get(index, []), trust,
                                      cfg.require_verity))
    except BaseException:
        for image in images:
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
    from .verity.layer import open_layer_blob

    return open_layer_blob(path, trust, require=require_verity)


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
async def _serve_until_done(ops: Operations, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(_readahead_after_init, ops, mountpoint)
        await pyfuse3.main(max_tasks=ops.max_tasks)
        nursery.cancel_scope.cancel()


async def _readahead_after_init(ops: Operations, mountpoint: str) -> None:
    # the kernel sets a FUSE mount's read-ahead when it takes the INIT reply (it can only lower
    # it there): raise it once that reply is sent, i.e. once the loop has served INIT
    while not ops.initialized:
        await trio.sleep(0.01)
    _raise_readahead(mountpoint)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def serve(cfg: MountConfig, images: list[Image], on_ready: Callable[[], None] | None) -> int:
    """Mount, serve until unmounted or signalled, unmount. A CliError: nothing was mounted."""
    objects = None
    if cfg.data_dirs or cfg.require_object_verity:
        from .objects import ObjectStore

        try:
            objects = ObjectStore(cfg.data_dirs, require_verity=cfg.require_object_verity)
        except OSError as exc:
            raise CliError(f"data dir {exc.filename}: {exc.strerror}") from exc
    tree = MergedTree(images, objects=objects)
    ops = Operations(tree, timeout=cfg.timeout, read_threads=cfg.read_threads,
                     on_ready=on_ready, idmap=cfg.idmap)
    _init(ops, cfg)
    log.info("mounted %s on %s", ",".join(cfg.layers), cfg.mountpoint)
    try:
        trio.run(_serve_until_done, ops, cfg.mountpoint)
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
                if len(fields) >= 5 and _unescape_mount_path(fields[4]) == mountpoint:
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
    return serve(cfg, images, on_ready=None)


def run_daemon(cfg: MountConfig, images: list[Image]) -> int:
    """Fork; the parent returns 0 once the daemon reports the mount ready, or raises its error.

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
        return serve(cfg, images, on_ready=ready)
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


def main(argv: list[str]) -> int:
    """``erofs-fuse mount ...``: 0 once mounted (or, in the foreground, once unmounted)."""
    try:
        cfg = parse_args(argv)
        images = open_layers(cfg)
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
    except CliError as exc:
        print_error(str(exc))
        return exc.code


# umount ---------------------------------------------------------------------------------------
def _unescape_mount_path(field_: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit() and i + 4 <= len(field_):
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mounted_fuse(path: str) -> bool:
    """Whether ``path`` is a FUSE mountpoint (read from mountinfo: touching a dead one hangs)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape_mount_path(fields[4]) == path:
                if right.split(" ", 1)[0].startswith("fuse"):
                    return True
    return False


def _mountpoint_path(arg: str) -> str:
    # resolve symlinks of the parent only: stat of a dead FUSE mountpoint fails
    parent, base = os.path.split(os.path.abspath(arg))
    return os.path.join(os.path.realpath(parent), base)


def _is_stale(path: str, wait: float = 5.0) -> bool:
    """Whether the daemon of the FUSE mount at ``path`` is gone.

    Asked with statfs, which always reaches the daemon (a stat may be answered from the kernel's
    attribute cache, kept a day here, and would pass on a dead mount). A live daemon answers at
    once; one that does not answer within ``wait`` seconds is not taken for dead, and the
    probe is left blocked in a daemon thread rather than hanging the command.
    """
    outcome: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or 0)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(wait)
    # ENOTCONN once the connection is gone; ECONNABORTED while it is being torn down
    return bool(outcome) and outcome[0] in (errno.ENOTCONN, errno.ECONNABORTED)


def umount_main(argv: list[str]) -> int:
    """``erofs-fuse umount MOUNTPOINT``: fusermount3 -u; a lazy unmount if the daemon is dead."""
    parser = _Parser(prog=f"{PROG} umount", description="Unmount an erofs-fuse mount.")
    parser.add_argument("mountpoint")
    try:
        ns = parser.parse_args(argv)
        path = _mountpoint_path(ns.mountpoint)
        if not mounted_fuse(path):
            raise CliError(f"{ns.mountpoint}: not a FUSE mount", 1)
        first = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
        if first.returncode == 0:
            return 0
        if _is_stale(path):
            # the daemon died ("Transport endpoint is not connected"): detach the dead mount
            lazy = ["umount", "-l", path] if os.geteuid() == 0 else ["fusermount3", "-u", "-z", path]
            if subprocess.run(lazy, capture_output=True, text=True).returncode == 0:
                return 0
        why = first.stderr.strip().splitlines()
        raise CliError(f"{ns.mountpoint}: {why[-1] if why else 'cannot unmount'}", 1)
    except CliError as exc:
        print_error(str(exc))
        return exc.code
    except OSError as exc:
        print_error(f"umount: {exc.strerror or exc}")
        return 1
