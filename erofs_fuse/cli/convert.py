"""``erofs-fuse convert SOURCE OUT``: one layer tar (plain, gzip, zstd; a file or ``-``) or one
directory into one EROFS image, with the writer of ``erofs_fuse/mkfs``.

Errors are one line and exit status 2; the output is then not created. Warnings (what the image
cannot hold and was dropped) are one line each on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import stat
import sys
import time
import uuid as uuidlib
from types import FrameType
from typing import NoReturn

from ..console import PROG, CliError, OneLineParser, print_error
from .writer_options import add_writer_options, block_size_warning, options_from_args


class Terminated(BaseException):
    """SIGTERM while converting. A BaseException, as KeyboardInterrupt is for SIGINT: it runs
    the writer's clean-up on its way out and no ``except Exception`` stops it."""


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up must not be interrupted
    raise Terminated()



def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"{PROG} convert",
                description="Convert an OCI layer tar (plain, gzip or zstd; '-' for stdin) or a "
                            "directory into an EROFS image.")
    p.add_argument("source", help="layer tar file, '-' for standard input, or a directory")
    p.add_argument("out", help="the EROFS image to write (replaced atomically)")
    add_writer_options(
        p, seal_help="also write OUT.verity and print the fs-verity digest (as 'seal' does)",
        objects_help="metadata-only image: each regular file's bytes go to DIR/ab/cdef... "
                     "(its fs-verity digest, composefs's layout), once per content; mount "
                     "with --data-dir DIR")
    p.add_argument("--mtime", type=int, metavar="SECONDS",
                   help="build time (default: $SOURCE_DATE_EPOCH, else 0)")
    p.add_argument("--uuid", default="clear",
                   help="filesystem UUID: a UUID, 'clear' (zero, the default) or 'random'")
    p.add_argument("--sync", action="store_true", help="fsync the image before renaming it")
    p.add_argument("-v", "--verbose", action="store_true", help="print a summary to stderr")
    return p


def parse_uuid(value: str) -> bytes:
    if value == "clear":
        return bytes(16)
    if value == "random":
        return uuidlib.uuid4().bytes
    try:
        return uuidlib.UUID(value).bytes
    except ValueError:
        raise CliError(f"convert: bad UUID {value!r}") from None


def build_time(value: int | None) -> int:
    if value is not None:
        return value
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env is None or env == "":
        return 0
    try:
        return int(env)
    except ValueError:
        raise CliError(f"convert: SOURCE_DATE_EPOCH={env!r} is not a number") from None


def check_output(source: str, out: str) -> None:
    """Refuse an OUT that is SOURCE (or standard input's file: the image would replace its
    input) or a directory (the rename would fail naming our temporary file)."""
    try:
        out_st = os.stat(out)
    except OSError:
        return  # no OUT yet, or none we can see: the conversion says what is wrong
    try:
        src_st = os.fstat(sys.stdin.fileno()) if source == "-" else os.stat(source)
    except (OSError, ValueError):
        src_st = None
    if src_st is not None and (out_st.st_dev, out_st.st_ino) == (src_st.st_dev, src_st.st_ino):
        what = "standard input" if source == "-" else source
        raise CliError(f"convert: {out}: is the input ({what}); refusing to overwrite it")
    if stat.S_ISDIR(out_st.st_mode):
        raise CliError(f"convert: {out}: is a directory")


def convert_main(argv: list[str]) -> int:
    from ..mkfs import MkfsError, convert_dir, convert_tar

    args = build_parser().parse_args(argv)
    options = dataclasses.replace(options_from_args(args, "convert"),
                                  build_time=build_time(args.mtime), uuid=parse_uuid(args.uuid),
                                  sync=args.sync)
    check_output(args.source, args.out)
    start = time.monotonic()
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.source == "-":
            result = convert_tar(sys.stdin.buffer, args.out, options)
        elif os.path.isdir(args.source):
            result = convert_dir(args.source, args.out, options)
        else:
            result = convert_tar(args.source, args.out, options)
    except (Terminated, KeyboardInterrupt) as exc:  # the writer removed its temporary file
        sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        print_error(f"convert: interrupted ({sig.name}); no partial image is left")
        return 128 + sig
    except MkfsError as exc:
        raise CliError(f"{args.source}: {exc}") from exc
    except OSError as exc:
        where = exc.filename or args.out
        raise CliError(f"{where}: {exc.strerror or exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    too_big = block_size_warning(options)
    for warning in (*result.warnings, *([too_big] if too_big else [])):
        print_error(f"warning: {warning}")
    if result.verity_digest:
        print(f"{result.verity_digest} {args.out}", flush=True)
    if args.verbose and args.objects:
        print(f"{args.objects}: {result.objects_stored} objects stored "
              f"({result.object_bytes} bytes), {result.objects_shared} already there",
              file=sys.stderr)
    if args.verbose:
        took = time.monotonic() - start
        rate = result.data_bytes / took / 1e6 if took else 0.0
        print(f"{args.out}: {result.inodes} inodes ({result.shown_xattr_inodes} showing "
              f"xattrs), {result.image_size} bytes, "
              f"{result.data_bytes} bytes of file data in {took:.2f} s ({rate:.0f} MB/s)"
              + (f", diff_id {result.diff_id}" if result.diff_id else ""), file=sys.stderr)
    return 0
