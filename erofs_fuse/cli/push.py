"""``erofs-fuse push SOURCE REF``: an image's layers as native EROFS blobs in a registry.

SOURCE is an OCI image (layout directory or archive; its layers are converted, ``-j N`` at a
time, and sealed) or a ``.layers`` file of ``convert-image`` (layers already converted). The
work is ``erofs_fuse.registry.push``; this is the command line: options, one-line errors, exit
codes (2 bad input: the source, the reference, the registry's refusals; 1 other failures;
128+N signal N). Only ``REF@sha256:<manifest digest>`` goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
from types import FrameType
from typing import NoReturn

from ..console import PROG, CliError, Interrupted, OneLineParser, print_error
from ..mkfs import ConvertOptions, MkfsError
from ..oci.image import OciError, Platform
from ..oci.layers_file import LayersFileError
from ..oci.workers import EXIT_BAD_INPUT, EXIT_FAILURE, JobFailed
from ..verity.sealing import SealError
from .writer_options import parse_compress




def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=f"{PROG} push",
        description="Push an image to a registry with every layer as a native EROFS blob "
        "(application/vnd.erofs.layer.v1) and its fs-verity Merkle tree, so that it can be "
        "mounted before it is downloaded, every block verified. Prints REF@sha256:DIGEST.")
    p.add_argument("source", help="OCI image layout directory, OCI archive (.tar), or a "
                   ".layers file written by convert-image")
    p.add_argument("ref", help="where to push: [HOST[:PORT]/]REPOSITORY[:TAG]")
    p.add_argument("--plain-http", action="store_true",
                   help="speak HTTP, not HTTPS, to the registry (default: HTTP only to "
                   "localhost and 127.0.0.0/8)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="layers converted (and blobs sent) at once (default: %(default)s)")
    p.add_argument("--compress", metavar="ALG[,LEVEL]",
                   help="compress file data: lz4, or lz4hc with an optional level 1-12")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the manifest to take from a multi-platform image")
    p.add_argument("--ref-name", metavar="NAME",
                   help="the image of the layout to push, by its name in index.json")
    p.add_argument("--mount-from", action="append", default=[], metavar="REPOSITORY",
                   help="a repository of the same registry that may hold some of the blobs: "
                   "they are linked from there rather than sent (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise Interrupted(signum)


def main(argv: list[str]) -> int:
    """``erofs-fuse push ...``: 0, or one line on stderr and 2 (bad input), 1, 128+N."""
    from ..registry.errors import RegistryError
    from ..registry.push import PushRequest, push

    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ns = build_parser().parse_args(argv)
        if ns.jobs < 1:
            raise CliError("push: -j must be 1 or more")
        try:
            alg, level = parse_compress(ns.compress)
            options = ConvertOptions(compress=alg, compress_level=level, seal=True)
            options.check()
            platform = Platform.parse(ns.platform) if ns.platform is not None else None
        except (MkfsError, OciError) as exc:
            raise CliError(f"push: {exc}") from exc
        print(push(PushRequest(ns.source, ns.ref, ns.plain_http, ns.jobs, options, ns.quiet,
                               platform, ns.ref_name, tuple(ns.mount_from))))
        return 0
    except CliError as exc:
        print_error(str(exc))
        return exc.code
    except (RegistryError, OciError, MkfsError, LayersFileError, SealError) as exc:
        print_error(f"push: {exc}")
        return EXIT_BAD_INPUT
    except JobFailed as exc:
        print_error(f"push: {exc}")
        return exc.code
    except Interrupted as exc:
        print_error(f"push: interrupted ({exc}); no manifest was pushed")
        return exc.code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print_error(f"push: {where}{exc.strerror or exc}")
        return EXIT_FAILURE
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
