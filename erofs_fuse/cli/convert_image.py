"""``erofs-fuse convert-image IMAGE OUTDIR``: every layer of an OCI image as an EROFS file.

IMAGE is an OCI image layout directory or an OCI archive (``oci/image.py`` resolves it to one
platform's manifest). Each layer becomes ``OUTDIR/sha256-<diff_id hex>.erofs`` in a worker
process of its own (``oci/workers.py``, ``-j N`` at a time), checked against its diff_id
while it is converted; a layer whose file exists is not converted again, so images sharing
layers share their files (the name says the content, not the options it was made with). Then
``OUTDIR/NAME.layers`` lists the stack (``oci/layers_file.py``), for ``mount --layers @FILE``.

A failure in one layer, Ctrl-C or SIGTERM cancels the other workers and leaves no partial file;
the command then prints one line and exits 2 (bad input: the image, a layer), 1 (anything else)
or 128+N (signal N).
"""

from __future__ import annotations

import argparse
import os
import signal
from types import FrameType
from typing import NoReturn

from ..console import PROG, CliError, Interrupted, OneLineParser, print_error
from ..mkfs import MkfsError
from ..oci.convert import Request, convert_image
from ..oci.image import OciError, Platform, sanitize_name
from ..oci.workers import EXIT_BAD_INPUT, EXIT_FAILURE, JobFailed
from .writer_options import add_writer_options, block_size_warning, options_from_args




def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=f"{PROG} convert-image",
        description="Convert every layer of an OCI image (a layout directory or an OCI "
        "archive) into OUTDIR/sha256-<diff_id>.erofs, and list the stack in "
        "OUTDIR/NAME.layers for 'erofs-fuse mount --layers @OUTDIR/NAME.layers'. Layers whose "
        "file exists are not converted again (the name says the content, not the options).")
    p.add_argument("image", help="OCI image layout directory or OCI archive (.tar)")
    p.add_argument("outdir", help="directory of the layer files (created if missing)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="layers converted at once, each in a process (default: %(default)s)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the manifest to take from a multi-platform image (default: this "
                   "machine's, linux/<GOARCH>)")
    p.add_argument("--ref", metavar="NAME",
                   help="the image in index.json with this full name (io.containerd.image.name, as "
                   "docker save writes it; debian:12 = docker.io/library/debian:12) or this "
                   "org.opencontainers.image.ref.name; a name that picks several images is "
                   "refused")
    p.add_argument("--name", help="NAME of NAME.layers (default: from the image's reference "
                   "name, else the layout's base name)")
    add_writer_options(
        p, seal_help="write LAYER.verity and record each layer's fs-verity digest, which "
                     "mount --layers @FILE then trusts",
        objects_help="one object store for every layer: metadata-only layer files, file "
                     "bytes in DIR by fs-verity digest (see convert --objects)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def parse_args(argv: list[str]) -> Request:
    ns = build_parser().parse_args(argv)
    if ns.jobs < 1:
        raise CliError("convert-image: -j must be 1 or more")
    options = options_from_args(ns, "convert-image")
    try:
        platform = Platform.parse(ns.platform) if ns.platform is not None else None
    except OciError as exc:
        raise CliError(f"convert-image: {exc}") from exc
    return Request(ns.image, ns.outdir, ns.jobs, platform, ns.ref,
                   sanitize_name(ns.name) if ns.name is not None else None, options, ns.quiet)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise Interrupted(signum)


def main(argv: list[str]) -> int:
    """``erofs-fuse convert-image ...``: 0, or one line on stderr and 2 (bad input), 1 (other
    failures), 128+N (signal N)."""
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        request = parse_args(argv)
        path = convert_image(request)
        too_big = block_size_warning(request.options)
        if too_big:
            print_error(f"warning: {too_big}")
        print(path)
        return 0
    except CliError as exc:
        print_error(str(exc))
        return exc.code
    except (OciError, MkfsError) as exc:
        print_error(f"convert-image: {exc}")
        return EXIT_BAD_INPUT
    except JobFailed as exc:
        print_error(f"convert-image: {exc}")
        return exc.code
    except Interrupted as exc:
        print_error(f"convert-image: interrupted ({exc}); no partial layer is left")
        return exc.code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print_error(f"convert-image: {where}{exc.strerror or exc}")
        return EXIT_FAILURE
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
