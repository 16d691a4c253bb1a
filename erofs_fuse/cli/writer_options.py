"""The writer's options on the command line, shared by ``convert`` and ``convert-image``.

One spelling (``--compress lz4`` / ``--compress lz4hc[,LEVEL]``, ``--block-size``,
``--tar-index``, ``--whiteouts``, ``--seal``, ``--objects``) and one validation:
``ConvertOptions.check``, whose refusal is one line and exit 2 here.
"""

from __future__ import annotations

import argparse
import os

from ..console import CliError
from ..mkfs import ConvertOptions, MkfsError

COMPRESSORS = ("lz4", "lz4hc")


def add_writer_options(parser: argparse.ArgumentParser, *, seal_help: str,
                       objects_help: str) -> None:
    """Add the options that say how an image is written (the command words its sealing and
    object store in its own terms)."""
    parser.add_argument("--whiteouts", choices=("overlay", "oci"), default="overlay",
                        help="overlay: OCI .wh.NAME become char 0:0 devices and .wh..wh..opq "
                             "the trusted.overlay.opaque xattr (default; what the kernel's "
                             "overlayfs reads); oci: keep them as files")
    parser.add_argument("--tar-index", action="store_true",
                        help="metadata only, file data pointing into the uncompressed tar, "
                             "which is appended to the image (512-byte blocks)")
    parser.add_argument("--compress", metavar="ALG[,LEVEL]",
                        help="compress file data: lz4, or lz4hc with an optional level 1-12 "
                             "(default 9)")
    parser.add_argument("--block-size", type=int, metavar="BYTES",
                        help="block size, a power of two from 512 to 65536 (default 4096; "
                             "512 with --tar-index). Kernels mount blocks up to their page "
                             "size (4096 on x86); erofs-fuse mounts them all")
    parser.add_argument("--seal", action="store_true", help=seal_help)
    parser.add_argument("--objects", metavar="DIR", help=objects_help)


def parse_compress(value: str | None) -> tuple[str | None, int | None]:
    """``ALG[,LEVEL]`` as (algorithm, level); the level's range is checked with the others."""
    if not value:
        return None, None
    alg, comma, level = value.partition(",")
    if alg not in COMPRESSORS:
        raise MkfsError(f"unknown compression {alg!r} (choose from lz4, lz4hc)")
    if not comma:
        return alg, None
    try:
        return alg, int(level)
    except ValueError:
        raise MkfsError(f"bad compression level {level!r} (lz4hc takes 1-12)") from None


def options_from_args(ns: argparse.Namespace, command: str) -> ConvertOptions:
    """The ``ConvertOptions`` of the arguments ``add_writer_options`` added, checked; a refusal
    is a ``CliError`` (``command: ...``, exit 2)."""
    try:
        alg, level = parse_compress(ns.compress)
        options = ConvertOptions(block_size=ns.block_size, whiteouts=ns.whiteouts,
                                 tar_index=ns.tar_index, compress=alg, compress_level=level,
                                 seal=ns.seal,
                                 objects=os.path.abspath(ns.objects) if ns.objects else None)
        options.check()
    except MkfsError as exc:
        raise CliError(f"{command}: {exc}") from exc
    return options


def block_size_warning(options: ConvertOptions) -> str | None:
    """A warning when this machine's kernel will not mount the image: its erofs takes blocks of
    at most the page size (the block size of an image is fixed when it is written)."""
    bs = options.image_block_size
    page = os.sysconf("SC_PAGE_SIZE")
    if bs <= page:
        return None
    return (f"{bs}-byte blocks are larger than this machine's {page}-byte pages: its "
            "kernel will not mount the image (nor fsck.erofs 1.5 read it); erofs-fuse will")
