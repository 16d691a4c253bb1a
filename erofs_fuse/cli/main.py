"""The ``erofs-fuse`` command: inspect, read and extract images, mount layer stacks.

Subcommands that need no mount (info, ls, cat, extract, seal) live here; ``mount``/``umount``
belong to ``mount.py`` beside this module, which parses its own arguments. Each module is
imported only by the subcommand that uses it (a mount imports neither ``extract`` nor the
integrity code it is not asked for). Every failure is one line on stderr and a non-zero exit: 2 for bad input (usage,
unreadable or corrupt images).

``erofs-fuse SOURCE MOUNTPOINT [-o OPTS]`` (no subcommand) is the call of a mount helper:
``mount -t fuse.erofs-fuse L1,L2 DIR`` and fstab lines of type ``fuse.erofs-fuse`` run
``/sbin/mount.fuse.erofs-fuse L1,L2 DIR -o OPTS``, a link to erofs-fuse (scripts/install-deps);
without that link mount(8) runs ``mount.fuse3``, which runs ``erofs-fuse L1,L2 DIR -o OPTS``
through ``/bin/sh`` with mount(8)'s PATH. See ``mount_helper_args``.

One module past the house's ~450 lines on purpose: the dispatcher, the mount(8) helper form and
the small read-only commands (info, ls, cat, extract, seal) share one parser and one error
boundary; each of them is a few lines over the library, and the larger commands have modules
of their own beside this one.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import stat
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ..console import PROG, CliError, OneLineParser, print_error
from ..erofs.errors import ErofsError
from ..erofs.image import Image, Inode
from .info import print_listing, utc

if TYPE_CHECKING:
    from ..objects import ObjectStore
    from ..verity.formats import HashParams

DISPATCHED = {
    "mount": ("erofs_fuse.cli.mount", "main", "mount a stack of layers (bottom to top) as one tree"),
    "umount": ("erofs_fuse.cli.mount", "umount_main", "unmount an erofs-fuse mount"),
    "convert-image": ("erofs_fuse.cli.convert_image", "main",
                      "convert an OCI image's layers to EROFS files and a .layers list"),
    "convert": ("erofs_fuse.cli.convert", "convert_main",
                "convert a layer tar or a directory into an EROFS image"),
    "image": ("erofs_fuse.cli.image", "main",
              "pull or import an OCI image into containerd, every layer converted at once"),
    "push": ("erofs_fuse.cli.push", "main",
             "push an image to a registry as native EROFS layers with their Merkle trees"),
    "snapshotter": ("erofs_fuse.cli.snapshotter", "main",
                    "serve containerd's snapshots API (a proxy snapshotter) on a unix socket"),
}
_COMMANDS = ("info", "ls", "cat", "extract", "seal")  # parsed here (build_parser)


def _open(args: argparse.Namespace) -> Image:
    try:
        return Image.open(args.image, devices=args.device or ())
    except OSError as exc:
        raise CliError(f"{args.image}: {exc.strerror}") from exc


def _remote_args(args: argparse.Namespace, positionals: int) -> bool:
    """With --image, the positionals shift by one (no image file): True if it was given.
    ``positionals``: how many positionals the command takes after its image."""
    if args.remote is None:
        if args.image is None:
            raise CliError(f"{args.command}: the following arguments are required: image")
        if positionals and args.path is None:
            raise CliError(f"{args.command}: the following arguments are required: path")
        return False
    if positionals:
        if args.image is not None and args.path not in (None, "/"):
            raise CliError(f"{args.command}: --image and an image file exclude each other")
        args.path = args.image if args.image is not None else args.path
    elif args.image is not None:
        raise CliError(f"{args.command}: --image and an image file exclude each other")
    return True


def cmd_info(args: argparse.Namespace) -> int:
    """The superblock and device table (``info.describe``); a short file is reported after."""
    from .info import describe

    if _remote_args(args, 0):
        from .remote_image import info

        return info(args)

    try:
        rows, short = describe(args.image, args.device or [])
    except OSError as exc:
        raise CliError(f"{exc.filename or args.image}: {exc.strerror}") from exc
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}} {value}")
    sys.stdout.flush()
    if short:
        raise CliError(short)
    return 0


def _ls_line(name: str, node: Inode) -> str:
    mtime = utc(node.mtime, "%Y-%m-%d %H:%M")
    size = (f"{os.major(node.rdev)}, {os.minor(node.rdev)}"
            if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode) else str(node.size))
    line = f"{stat.filemode(node.mode)} {node.nlink:>3} {node.uid:>5} {node.gid:>5} {size:>9} {mtime} {name}"
    if node.is_symlink:
        line += " -> " + os.fsdecode(node.readlink())
    return line


def cmd_ls(args: argparse.Namespace) -> int:
    if _remote_args(args, 1):
        from .remote_image import ls

        return ls(args, lambda name, node: _ls_line(name, node.inode))
    with _open(args) as image:
        seen: set[int] = set()

        def enters(node: Inode) -> bool:
            # a directory met again (a corrupt image's loop) is listed but not entered again
            if not node.is_dir or node.nid in seen:
                return False
            seen.add(node.nid)
            return True

        def children(dnode: Inode) -> Iterator[tuple[str, Inode]]:
            return ((os.fsdecode(e.name), image.inode(e.nid)) for e in dnode.readdir())

        print_listing(args.path, image.lookup(args.path), children=children, is_dir=enters,
                      line=_ls_line, long=args.long,
                      recursive=args.recursive)
    return 0


def _objects(args: argparse.Namespace) -> ObjectStore | None:
    """The object stores of --data-dir (objects.py), or None without one."""
    if not args.data_dir and not args.require_object_verity:
        return None
    from ..objects import ObjectStore

    try:
        return ObjectStore(args.data_dir or [], require_verity=args.require_object_verity)
    except OSError as exc:
        raise CliError(f"{args.command}: data dir {exc.filename}: {exc.strerror}") from exc


def cmd_cat(args: argparse.Namespace) -> int:
    if _remote_args(args, 1):
        from .remote_image import cat

        return cat(args, _write_out)
    objects = _objects(args)
    with _open(args) as image:
        node = image.lookup(args.path)
        if node.is_dir:
            raise CliError(f"{args.path}: is a directory")
        if node.is_symlink:
            _write_out(node.readlink())
            return 0
        read = node.read  # a metadata-only file without data dirs: MetacopyError, exit 2
        if objects is not None and node.is_metacopy:
            read = functools.partial(objects.read, node)
        pos = 0
        while pos < node.size:
            chunk = read(pos, 1 << 20)
            if not chunk:
                break
            _write_out(chunk)
            pos += len(chunk)
        sys.stdout.buffer.flush()
    return 0


def _write_out(data: bytes) -> None:
    """All of ``data`` to stdout. Under PYTHONUNBUFFERED stdout is a raw file whose write may
    take part of it (a pipe whose reader left): without the loop the rest would be lost."""
    view = memoryview(data)
    while view:
        done = sys.stdout.buffer.write(view)
        view = view[done:]


def cmd_extract(args: argparse.Namespace) -> int:
    """Extract; one warning line per entry skipped or metadata not set, as tar prints them,
    and exit 1 when entries were skipped (the tree is incomplete)."""
    from .extract import extract

    with _open(args) as image:
        start = time.monotonic()
        stats = extract(image, args.dest, owners=args.owners, merge=args.merge,
                        objects=_objects(args))
    for warning in stats.warnings:
        print_error(f"warning: {warning}")
    if args.verbose:
        took = time.monotonic() - start
        print(f"extracted {stats.files} files, {stats.dirs} directories, {stats.symlinks} "
              f"symlinks, {stats.specials} special files, {stats.hardlinks} hardlinks, "
              f"{stats.bytes} bytes in {took:.2f} s", file=sys.stderr)
    if stats.skipped:
        raise CliError(f"extract: {stats.skipped} entries of {args.image} could not be "
                       f"created in {args.dest} (warnings above)", 1)
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    """Seal each layer and print its digest lines; the first layer that fails ends the run."""
    from ..verity.formats import FormatError, HashParams

    if args.output is not None and len(args.layers) > 1:
        raise CliError("seal: --output takes exactly one LAYER")
    try:
        salt = bytes.fromhex(args.salt)
    except ValueError:
        raise CliError(f"seal: --salt {args.salt!r} is not hex") from None
    try:
        params = HashParams.fsverity(args.hash_alg, args.block_size, salt)
    except FormatError as exc:
        raise CliError(f"seal: {exc}") from None
    for layer in args.layers:
        for line in _seal_one(layer, args.output, params):
            print(line)
        sys.stdout.flush()
    return 0


def _seal_one(layer: str, output: str | None, params: HashParams) -> list[str]:
    """The digest lines of one sealed layer. A layer that cannot be read is bad input (exit 2);
    a sidecar that cannot be written is an OSError (exit 1, from ``main``)."""
    from ..verity.sealing import PROGRESS_MIN_BYTES, ProgressBar, SealError, seal

    bar = ProgressBar(layer, sys.stderr)
    try:
        show = sys.stderr.isatty() and os.path.getsize(layer) >= PROGRESS_MIN_BYTES
    except OSError:
        show = False  # seal() says why
    try:
        result = seal(layer, output, progress=bar if show else None, params=params)
    except SealError as exc:
        raise CliError(str(exc)) from None
    finally:
        bar.clear()
    dm_line = result.dm_line()
    return [result.digest_line(), *([dm_line] if dm_line is not None else [])]


def _image_parser(sub: argparse._SubParsersAction[OneLineParser], name: str,
                  help_: str, remote: bool = False) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--device", action="append", metavar="PATH",
                   help="extra device (blob) file of the image, in device-table order; repeatable")
    if remote:  # --image REF instead of the file: the positional is then optional
        g = p.add_argument_group("registry images", "instead of an image file: an image that "
                                 "push put in a registry, read lazily through the block cache "
                                 "(every block verified), all its layers merged")
        g.add_argument("--image", dest="remote", metavar="REF@sha256:DIGEST",
                       help="the image, pinned by its manifest digest (as push prints it)")
        g.add_argument("--plain-http", action="store_true",
                       help="HTTP, not HTTPS, to the registry (default: only to loopback)")
        g.add_argument("--cache", dest="cache_dir", metavar="DIR",
                       help="the block cache (default /var/cache/erofs-fuse/blobs)")
        p.add_argument("image", nargs="?", help="EROFS image file (or --image REF)")
    else:
        p.add_argument("image", help="EROFS image file")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Read EROFS images and mount stacks of EROFS layers through FUSE.",
        epilog=f"{PROG} L1,L2,... MOUNTPOINT [-o OPTIONS] is the mount helper form, which "
        "'mount -t fuse.erofs-fuse' and fstab lines of that type use (see docs/rootless.md).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, help_) in DISPATCHED.items():
        sub.add_parser(name, help=help_, add_help=False)
    p = _image_parser(sub, "info", "show the superblock: block size, features, counts", True)
    p.set_defaults(func=cmd_info)
    p = _image_parser(sub, "ls", "list a directory of an image", True)
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("-R", dest="recursive", action="store_true", help="recurse into directories")
    p.add_argument("path", nargs="?", default="/", help="path inside the image (default /)")
    p.set_defaults(func=cmd_ls)
    p = _image_parser(sub, "cat", "write a file of an image to stdout", True)
    p.add_argument("path", nargs="?", help="path inside the image")
    _data_dir_options(p)
    p.set_defaults(func=cmd_cat)
    p = _image_parser(sub, "extract", "extract the whole tree into a directory")
    p.add_argument("dest", help="destination directory (created if missing; must be empty "
                   "unless --merge)")
    p.add_argument("--merge", action="store_true",
                   help="extract over what DEST holds, as a layer over the one below: "
                   "directories in both are merged, other existing entries are replaced")
    owners = p.add_mutually_exclusive_group()
    owners.add_argument("--owners", dest="owners", action="store_true", default=None,
                        help="restore owners (default when run as root)")
    owners.add_argument("--no-owners", dest="owners", action="store_false")
    p.add_argument("-v", "--verbose", action="store_true", help="print a summary to stderr")
    _data_dir_options(p)
    p.set_defaults(func=cmd_extract)
    _seal_parser(sub)
    return parser


def _data_dir_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", action="append", metavar="DIR",
                   help="object store of metadata-only files (trusted.overlay.metacopy); "
                   "repeatable, searched in order")
    p.add_argument("--require-object-verity", action="store_true",
                   help="refuse objects whose metacopy xattr carries no fs-verity digest")


def _seal_parser(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    help_ = "write .verity sidecars and print digests"
    p = sub.add_parser(
        "seal", help=help_,
        description="Write LAYER.verity (the Merkle tree) and print the fs-verity digest of "
        "each layer, as `fsverity digest` does. With non-default parameters the sidecar is a "
        "raw fs-verity tree, plus SIDECAR.desc for a salt or another block size.")
    p.add_argument("layers", nargs="+", metavar="LAYER")
    p.add_argument("-o", "--output", metavar="FILE", help="sidecar path (one layer only)")
    p.add_argument("--hash-alg", choices=("sha256", "sha512"), default="sha256",
                   help="as `fsverity digest --hash-alg` (default sha256)")
    p.add_argument("--block-size", type=int, default=4096, metavar="BYTES",
                   help="Merkle tree block size (default 4096)")
    p.add_argument("--salt", default="", metavar="HEX", help="fs-verity salt (default none)")
    p.set_defaults(func=cmd_seal)


# mount(8) -------------------------------------------------------------------------------------
# Options of mount(8) and fstab that mean nothing to the mount itself (mount.fuse3 drops most of
# them already); "rw" is mount(8)'s default, which a read-only tree ignores rather than refuses.
HELPER_IGNORED = frozenset({"rw", "defaults", "auto", "noauto", "user", "users", "nouser",
                            "owner", "group", "_netdev", "nofail"})
HELPER_IGNORED_PREFIXES = ("x-", "comment=")
# mount.fuse3 appends "dev" and "suid" to every command unless nodev/nosuid were written, and
# mount(8) drops a written "suid" or "dev" as being its defaults: neither says what the user
# wants, so they are ignored and the mount stays nosuid,nodev (allow_suid/allow_dev ask for them).
HELPER_DEFAULTS = frozenset({"dev", "suid"})


def _helper_option_kept(opt: str) -> bool:
    return bool(opt) and opt not in HELPER_IGNORED and opt not in HELPER_DEFAULTS and \
        not opt.startswith(HELPER_IGNORED_PREFIXES)


# The flags libmount gives a mount helper (sloppy, fake, no mtab, verbose); only fake matters.
HELPER_FLAGS = frozenset({"-s", "-f", "-n", "-v"})
_DROP_PRIVILEGES = ("mount: drop_privileges is not supported: with it mount.fuse3 mounts by "
                    "itself, without the ro and default_permissions erofs-fuse relies on")


def mount_helper_args(argv: Sequence[str]) -> list[str] | None:
    """The ``mount`` arguments of a mount-helper call ``SOURCE MOUNTPOINT [FLAGS] [-o OPTS]``,
    as mount(8) runs ``/sbin/mount.fuse.erofs-fuse`` (or mount.fuse3 runs ``erofs-fuse``).

    None when ``argv`` has another shape or names a subcommand; an empty list for mount(8)'s
    fake mount (``-f``: everything but the mount). SOURCE is the ``--layers`` list (bottom to
    top) and also the name shown in /proc/mounts, as for any mounted device.
    """
    positional: list[str] = []
    option_lists: list[str] = []
    flags: set[str] = set()
    k = 0
    while k < len(argv):
        arg = argv[k]
        if arg == "-o" and k + 1 < len(argv):
            option_lists.append(argv[k + 1])
            k += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            option_lists.append(arg[2:])
        elif arg in HELPER_FLAGS:
            flags.add(arg)
        elif arg.startswith("-"):
            return None
        else:
            positional.append(arg)
        k += 1
    if len(positional) != 2 or positional[0] in DISPATCHED or positional[0] in _COMMANDS:
        return None
    source, mountpoint = positional
    options = [opt for value in option_lists for opt in value.split(",")]
    # Refused before anything is mounted when mount(8) runs us as its helper. Through
    # mount.fuse3, which has mounted already (the mountpoint is then its /dev/fd/N) and dropped
    # every capability, the refusal leaves that mount behind: docs/rootless.md, mount(8) and fstab.
    if "drop_privileges" in options or mountpoint.startswith("/dev/fd/"):
        raise CliError(_DROP_PRIVILEGES)
    if "-f" in flags:
        return []
    kept = [opt for opt in options if _helper_option_kept(opt)]
    return ["--layers", source, "--fsname", source, *(["-o", ",".join(kept)] if kept else []),
            "--", mountpoint]


def _dispatch(command: str, argv: list[str]) -> int:
    module_name, func_name, _ = DISPATCHED[command]
    import importlib

    module = importlib.import_module(module_name)
    func: Callable[[list[str]], int] = getattr(module, func_name)
    return func(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] in DISPATCHED:
            return _dispatch(args_list[0], args_list[1:])
        helper_args = mount_helper_args(args_list)
        if helper_args is not None:
            return _dispatch("mount", helper_args) if helper_args else 0
        args = build_parser().parse_args(args_list)
        result: int = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return result
    except BrokenPipeError:
        return _reader_gone()
    except CliError as exc:
        print_error(str(exc))
        return exc.code
    except ErofsError as exc:
        print_error(str(exc))
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print_error(f"{where}{exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """``... | head``: the reader closed the pipe. Not an error: end quietly with the status of
    a process SIGPIPE ends, as coreutils do (Python ignores the signal and raises instead)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the final flush has nowhere to fail now
    os.close(devnull)
    return 128 + signal.SIGPIPE


def entry() -> None:
    """The ``erofs-fuse`` program. It ends with ``os._exit`` once its output is flushed: the
    interpreter's own shutdown, which tears down every module a mount imported (trio,
    pyfuse3), took 30-40 ms of CPU after ``erofs-fuse mount`` already had its answer, and
    nothing in it is ours to run (no atexit work; the kernel closes files and frees memory)."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or _reader_gone()
    os._exit(code)


if __name__ == "__main__":
    entry()
