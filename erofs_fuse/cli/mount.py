"""``erofs-fuse mount`` and ``erofs-fuse umount``: their arguments and options.

Order of events: parse the arguments into a ``MountConfig`` (``erofs_fuse.fuse.daemon``), which
then opens and validates every layer and checks the mountpoint (any failure so far is one line
``erofs-fuse: ...`` and exit 2) and serves the mount, from a forked daemon unless
``--foreground``.

One module of about 460 lines: the argument parser, the -o form of each option (for mount(8)
and fstab lines) and the ``MountConfig`` they build are one translation, read together whenever
an option is added; the mounting itself lives in ``fuse/daemon``.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Container, Iterator

from ..console import PROG, CliError, OneLineParser, print_error
from ..fuse.daemon import SUBTYPE, MountConfig, default_log_file, mount
from ..fuse.idmap import IdMap, IdMapError, kernel_overflow_ids, parse_id
from ..fuse.mountinfo import is_stale, mounted_fuse, mountpoint_path
from ..fuse.operations import DEFAULT_READ_THREADS, DEFAULT_SPIN_US, DEFAULT_TIMEOUT
from ..fuse.overlay import MAX_LAYERS
from ..oci.layers_file import LayersFileError, expand_layers, with_listed_digests
from .lazy_mount import (RemoteImage, lazy_indexes, lazy_settings, open_mixed, open_remote,
                         parse_remote)

if TYPE_CHECKING:
    from ..verity import TrustSpec

DEFAULT_OPTIONS = ("ro", "default_permissions", "nosuid", "nodev")
# -o options that undo a default, and the default each one removes
_NEGATIONS = {"suid": "nosuid", "dev": "nodev"}
# other names of them, which mount(8) passes on (it drops a written suid or dev: the defaults)
_ALIASES = {"allow_suid": "suid", "allow_dev": "dev"}
# -o options of erofs-fuse itself (fuse-overlayfs's names, see fuse/idmap.py), never given to FUSE;
# all but the last take a value
OWN_OPTIONS = ("uidmapping", "gidmapping", "squash_to_uid", "squash_to_gid", "squash_to_root")
LOG_OPTION = "log"  # -o log=FILE: --log for mount(8) and fstab lines
DATADIR_OPTION = "datadir"  # -o datadir=DIR: --data-dir for mount(8) and fstab lines
NOXATTR_OPTION = "noxattr"  # -o noxattr: --no-xattr for mount(8) and fstab lines
SPIN_OPTION = "spin"  # -o spin=USEC: --spin for mount(8) and fstab lines
MAX_SPIN_US = 1_000_000  # a second of polling between requests is already past any use
# -o forms of the integrity options (for mount(8) and fstab lines): -o NAME is --NAME with
# dashes, the same attribute of the parsed arguments; flags take no value, the others one each
INTEGRITY_FLAGS = ("require_verity", "require_object_verity", "trust_dmverity_sidecar")
INTEGRITY_VALUES = {"verity": "LAYER=sha256:HEX", "verity_roots": "FILE",
                    "dm_verity": "LAYER=ROOT:BLOCKS", "verity_sidecar": "LAYER=PATH"}
# every -o name erofs-fuse takes itself: parsed by ``own_options``, never handed to FUSE
NOT_FOR_FUSE = frozenset((*OWN_OPTIONS, LOG_OPTION, DATADIR_OPTION, NOXATTR_OPTION, SPIN_OPTION,
                          *INTEGRITY_FLAGS, *INTEGRITY_VALUES))
FUSE_CONF = "/etc/fuse.conf"  # fusermount3's: user_allow_other, mount_max
_REFUSED_OPTIONS = {
    "rw": "the tree is read-only",
    # libfuse takes it, then ends the session at INIT (pyfuse3 asks for another read size):
    # the mount command would succeed and leave nothing mounted
    "max_read": "the read size is pyfuse3's",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=f"{PROG} mount",
        description="Mount a stack of EROFS layer images as one read-only tree, merged as "
        "overlayfs merges layers (whiteouts and opaque directories in overlayfs or OCI form).",
    )
    p.add_argument("--layers", metavar="L1,L2,...,LN",
                   help="layer images, comma-separated, BOTTOM TO TOP (the order of an OCI "
                   "manifest's layers: the last one wins); @FILE stands for the layers of a "
                   ".layers file written by convert-image, trusting its fs-verity digests; "
                   "lazy:REF@sha256:DIGEST#N (lazy+http: for plain HTTP) is layer N (from 0) "
                   "of a pushed image, read lazily as --image reads it")
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
    p.add_argument("--spin", dest="spin_us", type=int, metavar="USEC",
                   help="how long the daemon polls for the next request before it sleeps, "
                   "= -o spin=USEC (0: never; default %d): a request that comes sooner is "
                   "served without waking a sleeping thread, which costs tens of microseconds "
                   "on virtual machines; costs CPU while requests come" % DEFAULT_SPIN_US)
    p.add_argument("--no-xattr", dest="noxattr", action="store_true",
                   help="show no extended attributes (= -o noxattr): getxattr fails with "
                   "EOPNOTSUPP and listxattr lists none; for layers known to show none (the "
                   "writer counts them), it spares the kernel a request per file, e.g. "
                   "overlayfs's probes of every lower file")
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
        "layer's path as given in --layers. Each option is also accepted as -o with "
        "underscores, for mount(8) and fstab lines: -o verity=LAYER=sha256:HEX, "
        "verity_roots=FILE, dm_verity=..., verity_sidecar=..., trust_dmverity_sidecar, "
        "require_verity (and require_object_verity).")
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
    r = p.add_argument_group(
        "lazy images", "--image mounts an image that 'erofs-fuse push' put in a registry, "
        "instead of --layers: ready once its superblocks are read, each block fetched by HTTP "
        "range on first read, verified against its layer's Merkle tree (trusted through the "
        "pinned manifest digest) before it is served or cached; a block that cannot be "
        "fetched or verified fails that read with EIO. The options below also apply to "
        "the lazy: layers of --layers.")
    r.add_argument("--image", metavar="REF@sha256:DIGEST",
                   help="the image, pinned by its manifest digest (as push prints it)")
    r.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS, to the registry (default: HTTP only to loopback)")
    r.add_argument("--cache", dest="cache_dir", default=None, metavar="DIR",
                   help="the block cache, shared by mounts (default "
                   "/var/cache/erofs-fuse/blobs)")
    r.add_argument("--cache-size", default="10G", metavar="SIZE",
                   help="bytes the cache may hold (K, M, G, T suffixes; default %(default)s); "
                   "whole layers not in use are evicted, least recently used first")
    r.add_argument("--fill", dest="fill", action="store_const", const="all", default="",
                   help="fetch the rest of every layer in the background once the mount "
                   "serves, its metadata first")
    r.add_argument("--fill-metadata", dest="fill", action="store_const", const="metadata",
                   help="fetch each layer's metadata (inodes, directories, xattrs) in the "
                   "background once the mount serves: a first walk then fetches nothing")
    r.add_argument("--fetch-unit", default="256K", metavar="SIZE",
                   help="the smallest range fetched, a multiple of 4K (default %(default)s); "
                   "adjacent missing units are fetched in one request")
    r.add_argument("--fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="socket timeout of each registry request (default %(default)s); a "
                   "read fails after a few tries")
    p.add_argument("mountpoint", help="an empty directory")
    return p


def parse_args(argv: list[str]) -> MountConfig:
    return parse_mount(argv)[0]


def parse_mount(argv: list[str]) -> tuple[MountConfig, RemoteImage | None]:
    """The mount's configuration, and the lazy reading settings: of the registry image it
    mounts (--image), or of the lazy: layers in --layers (then with an empty ``ref``)."""
    ns = apply_integrity_options(build_parser().parse_args(argv))
    if ns.image is not None:
        remote = parse_remote(ns)
        return _config(ns, [], [], require_verity=True), remote
    if ns.layers is None:
        raise CliError("mount: the following arguments are required: --layers (or --image "
                       "REF@sha256:DIGEST)")
    try:
        layers, listed_digests = expand_layers(ns.layers)  # @FILE items: .layers files
    except LayersFileError as exc:
        raise CliError(f"mount: --layers {exc}") from exc
    if not layers:
        raise CliError("mount: --layers names no layer")
    if len(layers) > MAX_LAYERS:
        raise CliError(f"mount: {len(layers)} layers; at most {MAX_LAYERS} are supported")
    trust = parse_trust(layers, ns, listed=bool(listed_digests))
    trust = with_listed_digests(trust, listed_digests)
    cfg = _config(ns, layers, trust, require_verity=ns.require_verity)
    lazy = lazy_indexes(layers)
    if not lazy:
        return cfg, None
    for index in lazy:
        spec = trust[index] if trust else None
        if index in cfg.devices or (spec is not None and (spec.fsverity or spec.dmverity)):
            raise CliError(f"mount: {layers[index]}: a lazy layer takes its digest from the "
                           "pinned manifest and has no devices: no --verity, --dm-verity or "
                           "--device for it")
    return cfg, lazy_settings(ns, "")


def _config(ns: argparse.Namespace, layers: list[str], trust: list[TrustSpec], *,
            require_verity: bool) -> MountConfig:
    if ns.read_threads < 0:
        raise CliError("mount: --threads must be 0 or more")
    return MountConfig(
        trust=trust,
        require_verity=require_verity,
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
        noxattr=parse_noxattr(ns),
        spin_us=parse_spin(ns),
    )


def own_options(ns: argparse.Namespace,
                names: Container[str]) -> Iterator[tuple[str, str, str | None]]:
    """(the -o item, its name, its value or None without '=') of each -o item named in
    ``names``, in the order written: erofs-fuse's own -o options, never handed to FUSE."""
    for value in ns.options:
        for opt in filter(None, value.split(",")):
            name, eq, arg = opt.partition("=")
            if name in names:
                yield opt, name, arg if eq else None


def apply_integrity_options(ns: argparse.Namespace) -> argparse.Namespace:
    """Fold the -o forms of the integrity options into their long forms (after them, in the
    order written): an fstab line must be able to require verity as the command line can."""
    for opt, name, arg in own_options(ns, (*INTEGRITY_FLAGS, *INTEGRITY_VALUES)):
        if name in INTEGRITY_FLAGS:
            if arg is not None:
                raise CliError(f"mount: -o {opt}: {name} takes no value")
            setattr(ns, name, True)
        else:
            if not arg:
                raise CliError(f"mount: -o {opt}: expected -o {name}={INTEGRITY_VALUES[name]}")
            getattr(ns, name).append(arg)
    return ns


def parse_trust(layers: list[str], ns: argparse.Namespace, listed: bool) -> list[TrustSpec]:
    """The trusted roots of the integrity options, one spec per layer; none (and no import of
    the integrity code) without such options or digests ``listed`` in a .layers file."""
    if not (listed or ns.verity or ns.verity_roots or ns.dm_verity or ns.verity_sidecar
            or ns.trust_dmverity_sidecar):
        return []
    from ..verity.trust import TrustError, parse_trust_args

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
    for opt, _, arg in own_options(ns, (LOG_OPTION,)):
        if not arg:
            raise CliError(f"mount: -o {opt}: expected -o log=FILE")
        path = path if ns.log_file else arg
    return os.path.abspath(path) if path else None


def parse_data_dirs(ns: argparse.Namespace) -> list[str]:
    """--data-dir DIRs then -o datadir=DIR ones, absolute (the daemon runs in /); each must be
    a directory."""
    dirs: list[str] = list(ns.data_dirs)
    for opt, _, arg in own_options(ns, (DATADIR_OPTION,)):
        if not arg:
            raise CliError(f"mount: -o {opt}: expected -o datadir=DIR")
        dirs.append(arg)
    for path in dirs:
        if not os.path.isdir(path):
            raise CliError(f"mount: data dir {path}: not a directory")
    return [os.path.abspath(path) for path in dirs]


def parse_noxattr(ns: argparse.Namespace) -> bool:
    """--no-xattr, or -o noxattr (which takes no value)."""
    noxattr: bool = ns.noxattr
    for opt, _, arg in own_options(ns, (NOXATTR_OPTION,)):
        if arg is not None:
            raise CliError(f"mount: -o {opt}: noxattr takes no value")
        noxattr = True
    return noxattr


def parse_spin(ns: argparse.Namespace) -> int:
    """--spin USEC, else the last -o spin=USEC, else DEFAULT_SPIN_US; 0 up to 1 s."""
    spin: int | None = ns.spin_us
    for opt, _, arg in own_options(ns, (SPIN_OPTION,)):
        if arg is None or not arg.isdigit():
            raise CliError(f"mount: -o {opt}: expected -o spin=USEC (0 or more)")
        spin = spin if ns.spin_us is not None else int(arg)
    return DEFAULT_SPIN_US if spin is None else checked_spin(spin, "mount: --spin")


def checked_spin(spin: int, given_as: str) -> int:
    """``spin`` µs, refused (naming it ``given_as``) outside 0 up to MAX_SPIN_US."""
    if not 0 <= spin <= MAX_SPIN_US:
        raise CliError(f"{given_as} {spin}: expected 0 to {MAX_SPIN_US} microseconds")
    return spin


def parse_options(values: list[str]) -> set[str]:
    """The FUSE mount options: the defaults, changed by the -o lists (our own ones left out)."""
    options = set(DEFAULT_OPTIONS)
    for value in values:
        for opt in filter(None, value.split(",")):
            if opt.partition("=")[0] in NOT_FOR_FUSE:
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
    for opt, name, arg in own_options(ns, OWN_OPTIONS):
        if name == "squash_to_root":
            if arg is not None:
                raise CliError(f"mount: -o {opt}: expected -o {name}")
            squash_root = True
        elif not arg:
            raise CliError(f"mount: -o {opt}: expected -o {name}=VALUE")
        elif name == "uidmapping":
            uidmap.append(arg)
        elif name == "gidmapping":
            gidmap.append(arg)
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


def main(argv: list[str]) -> int:
    """``erofs-fuse mount ...``: 0 once mounted (or, in the foreground, once unmounted)."""
    try:
        cfg, remote = parse_mount(argv)
        if remote is not None and not remote.ref:
            return mount(cfg, open_images=lambda: open_mixed(remote, cfg))
        if remote is not None:
            return mount(cfg, open_images=lambda: open_remote(remote, cfg))
        return mount(cfg)
    except CliError as exc:
        print_error(str(exc))
        return exc.code


def umount_main(argv: list[str]) -> int:
    """``erofs-fuse umount MOUNTPOINT``: fusermount3 -u; a lazy unmount if the daemon is dead."""
    import subprocess  # here: the mount command does not need it

    parser = OneLineParser(prog=f"{PROG} umount", description="Unmount an erofs-fuse mount.")
    parser.add_argument("mountpoint")
    try:
        ns = parser.parse_args(argv)
        path = mountpoint_path(ns.mountpoint)
        if not mounted_fuse(path):
            raise CliError(f"{ns.mountpoint}: not a FUSE mount", 1)
        first = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
        if first.returncode == 0:
            return 0
        if is_stale(path):
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
