"""The ``erofs-fuse`` command: inspect, read and extract images, mount layer stacks.

Subcommands that need no mount (info, ls, cat, extract) live here; ``mount``/``umount`` belong to
``mount.py`` and ``seal`` to ``verity.py``, which parse their own arguments. Every failure is one
line on stderr and a non-zero exit: 2 for bad input (usage, unreadable or corrupt images).

``erofs-fuse SOURCE MOUNTPOINT [-o OPTS]`` (no subcommand) is the call of a mount helper:
``mount -t fuse.erofs-fuse L1,L2 DIR`` and fstab lines of type ``fuse.erofs-fuse`` run
``mount.fuse3``, which runs ``erofs-fuse L1,L2 DIR -o OPTS`` through ``/bin/sh`` with mount(8)'s
PATH; see ``mount_helper_args``.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from typing import Callable, Sequence

from .console import PROG, CliError, print_error
from .erofs import ondisk as d
from .erofs.errors import ErofsError
from .erofs.image import Image, Inode

DISPATCHED = {
    "mount": ("erofs_fuse.mount", "main", "mount a stack of layers (bottom to top) as one tree"),
    "umount": ("erofs_fuse.mount", "umount_main", "unmount an erofs-fuse mount"),
    "seal": ("erofs_fuse.verity", "seal_main", "write .verity sidecars and print digests"),
}
_COMMANDS = ("info", "ls", "cat", "extract")  # parsed here (build_parser)


def _open(args: argparse.Namespace) -> Image:
    try:
        return Image.open(args.image, devices=args.device or ())
    except OSError as exc:
        raise CliError(f"{args.image}: {exc.strerror}") from exc


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args) as image:
        sb = image.superblock
        rows = [
            ("image", args.image),
            ("block size", str(sb.block_size)),
            ("uuid", sb.uuid),
            ("volume name", sb.volume_name or "-"),
            ("build time", _utc(sb.build_time, "%Y-%m-%d %H:%M:%S UTC")),
            ("inodes", str(sb.raw.inos)),
            ("blocks", str(sb.primary_blocks)),
            ("root nid", str(sb.root_nid)),
            ("features", " ".join(sb.feature_names()) or "-"),
            ("compression", " ".join(d.ALG_NAMES[a] for a in sorted(sb.available_algorithms))
             if sb.feature_incompat & (d.INCOMPAT_COMPR_CFGS | d.INCOMPAT_ZERO_PADDING) else "-"),
            ("extra devices", str(len(sb.devices))),
        ]
        for k, dev in enumerate(sb.devices):
            rows.append((f"device {k + 1}", f"{dev.blocks} blocks at {dev.uniaddr} "
                         f"tag={dev.tag.decode(errors='replace') or '-'}"))
        if sb.packed_nid is not None:
            rows.append(("packed nid", str(sb.packed_nid)))
        if sb.metabox_nid is not None:
            rows.append(("metabox nid", str(sb.metabox_nid)))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _utc(seconds: int, fmt: str) -> str:
    """A UTC time, or the raw number for one the platform cannot show (images hold any 64-bit
    number of seconds)."""
    try:
        return time.strftime(fmt, time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"@{seconds}"


def _ls_line(name: str, node: Inode) -> str:
    mtime = _utc(node.mtime, "%Y-%m-%d %H:%M")
    size = (f"{os.major(node.rdev)}, {os.minor(node.rdev)}"
            if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode) else str(node.size))
    line = f"{stat.filemode(node.mode)} {node.nlink:>3} {node.uid:>5} {node.gid:>5} {size:>9} {mtime} {name}"
    if node.is_symlink:
        line += " -> " + os.fsdecode(node.readlink())
    return line


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args) as image:
        node = image.lookup(args.path)
        if not node.is_dir:
            print(_ls_line(args.path, node) if args.long else args.path)
            return 0
        todo = [(args.path.rstrip("/") or "/", node)]
        first = True
        seen = {node.nid}
        while todo:
            path, dnode = todo.pop(0)
            if args.recursive:
                print(("" if first else "\n") + f"{path}:")
            first = False
            subdirs = []
            for entry in dnode.readdir():
                child = image.inode(entry.nid)
                name = os.fsdecode(entry.name)
                print(_ls_line(name, child) if args.long else name)
                if args.recursive and child.is_dir and child.nid not in seen:
                    seen.add(child.nid)
                    subdirs.append((path.rstrip("/") + "/" + name, child))
            todo[0:0] = subdirs
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    with _open(args) as image:
        node = image.lookup(args.path)
        if node.is_dir:
            raise CliError(f"{args.path}: is a directory")
        if node.is_symlink:
            sys.stdout.buffer.write(node.readlink())
            return 0
        out = sys.stdout.buffer
        pos = 0
        while pos < node.size:
            chunk = node.read(pos, 1 << 20)
            if not chunk:
                break
            out.write(chunk)
            pos += len(chunk)
        out.flush()
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract

    with _open(args) as image:
        start = time.monotonic()
        stats = extract(image, args.dest, owners=None if args.owners is None else args.owners)
        if args.verbose:
            took = time.monotonic() - start
            print(f"extracted {stats.files} files, {stats.dirs} directories, {stats.symlinks} "
                  f"symlinks, {stats.specials} special files, {stats.hardlinks} hardlinks, "
                  f"{stats.bytes} bytes in {took:.2f} s", file=sys.stderr)
    return 0


def _image_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                  help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--device", action="append", metavar="PATH",
                   help="extra device (blob) file of the image, in device-table order; repeatable")
    p.add_argument("image", help="EROFS image file")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read EROFS images and mount stacks of EROFS layers through FUSE.",
        epilog=f"{PROG} L1,L2,... MOUNTPOINT [-o OPTIONS] is the mount helper form, which "
        "'mount -t fuse.erofs-fuse' and fstab lines of that type use (see README.md).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, help_) in DISPATCHED.items():
        sub.add_parser(name, help=help_, add_help=False)
    p = _image_parser(sub, "info", "show the superblock: block size, features, counts")
    p.set_defaults(func=cmd_info)
    p = _image_parser(sub, "ls", "list a directory of an image")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("-R", dest="recursive", action="store_true", help="recurse into directories")
    p.add_argument("path", nargs="?", default="/", help="path inside the image (default /)")
    p.set_defaults(func=cmd_ls)
    p = _image_parser(sub, "cat", "write a file of an image to stdout")
    p.add_argument("path", help="path inside the image")
    p.set_defaults(func=cmd_cat)
    p = _image_parser(sub, "extract", "extract the whole tree into a directory")
    p.add_argument("dest", help="destination directory (created if missing)")
    owners = p.add_mutually_exclusive_group()
    owners.add_argument("--owners", dest="owners", action="store_true", default=None,
                        help="restore owners (default when run as root)")
    owners.add_argument("--no-owners", dest="owners", action="store_false")
    p.add_argument("-v", "--verbose", action="store_true", help="print a summary to stderr")
    p.set_defaults(func=cmd_extract)
    return parser


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


def mount_helper_args(argv: Sequence[str]) -> list[str] | None:
    """The ``mount`` arguments of a mount-helper call ``SOURCE MOUNTPOINT [-o OPTS]...``.

    None when ``argv`` has another shape or names a subcommand. SOURCE is the ``--layers`` list
    (bottom to top) and also the name shown in /proc/mounts, as for any mounted device.
    """
    positional: list[str] = []
    option_lists: list[str] = []
    k = 0
    while k < len(argv):
        arg = argv[k]
        if arg == "-o" and k + 1 < len(argv):
            option_lists.append(argv[k + 1])
            k += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            option_lists.append(arg[2:])
        elif arg.startswith("-"):
            return None
        else:
            positional.append(arg)
        k += 1
    if len(positional) != 2 or positional[0] in DISPATCHED or positional[0] in _COMMANDS:
        return None
    source, mountpoint = positional
    if mountpoint.startswith("/dev/fd/"):  # mount.fuse3 -o drop_privileges mounted by itself
        raise CliError("mount: drop_privileges is not supported: mount.fuse3 then mounts "
                       "without the ro and default_permissions that erofs-fuse relies on")
    kept = [opt for value in option_lists for opt in value.split(",") if _helper_option_kept(opt)]
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
            return _dispatch("mount", helper_args)
        args = build_parser().parse_args(args_list)
        result: int = args.func(args)
        return result
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


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
