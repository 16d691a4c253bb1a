"""``erofs-fuse image pull REF`` and ``erofs-fuse image import ARCHIVE|LAYOUT``: register an
OCI image with containerd, every layer converted at once straight from its blob and handed to
the erofs-fuse snapshotter, so ``ctr run --snapshotter erofs-fuse`` unpacks nothing
(``erofs_fuse/images``).

Bad input (an unknown image or tag, a blob or diff_id that does not match, a registry error,
containerd or the snapshotter not answering, a snapshotter that is not erofs-fuse) is one line
and exit 2; other failures 1; Ctrl-C or SIGTERM cancel the workers and exit 128+N. Nothing is
left behind then: no image record, no snapshot, no lease, no staging directory.
"""

from __future__ import annotations

import argparse
import os
import signal
from types import FrameType
from typing import NoReturn

from ..console import PROG, CliError, Interrupted, OneLineParser, print_error
from ..containerd import DEFAULT_ADDRESS, ContainerdError
from ..images import (DEFAULT_STAGING, NotOurSnapshotter, Registered, Settings, Target,
                      import_image, pull_image)
from ..mkfs import MkfsError
from ..oci.image import OciError, Platform
from ..oci.workers import EXIT_BAD_INPUT, EXIT_FAILURE, JobFailed



def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"{PROG} image", description="Register OCI images with containerd, "
                      "every layer converted at once into the erofs-fuse snapshotter.")
    sub = p.add_subparsers(dest="action", required=True, metavar="pull|import")
    pull = sub.add_parser("pull", help="pull an image from a registry",
                          description="Pull REF from its registry: every layer converted at "
                          "once, straight from the registry's stream.")
    pull.add_argument("reference", metavar="REF",
                      help="[HOST[:PORT]/]REPO[:TAG][@DIGEST]; the image record's name")
    pull.add_argument("--plain-http", action="store_true",
                      help="HTTP for every registry (default: HTTP only on this machine)")
    pull.add_argument("--lazy", action="store_true",
                      help="convert and download nothing: an image 'erofs-fuse push' made "
                      "is registered as it is, its layers read from the registry by the "
                      "snapshotter's mounts on first use, every block verified against the "
                      "pinned manifest")
    imp = sub.add_parser("import", help="import an OCI archive or layout",
                         description="Import the image of an OCI archive (.tar) or layout "
                         "directory: every layer converted at once, read in place.")
    imp.add_argument("source", metavar="ARCHIVE|LAYOUT")
    imp.add_argument("--name", help="the image record's name (default: the index entry's "
                     "io.containerd.image.name, else its org.opencontainers.image.ref.name "
                     "when that is a full reference)")
    for s in (pull, imp):
        s.add_argument("-a", "--address", default=DEFAULT_ADDRESS, metavar="SOCK",
                       help="containerd's socket (default: %(default)s)")
        s.add_argument("-n", "--namespace", default="default", metavar="NS",
                       help="containerd namespace (default: %(default)s)")
        s.add_argument("--snapshotter", default="erofs-fuse", metavar="NAME",
                       help="our snapshotter's proxy plugin name in containerd's config "
                       "(default: %(default)s)")
        s.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="the manifest to take from a multi-platform image (default: this "
                       "machine's)")
        s.add_argument("-j", "--jobs", type=int, default=max(2, os.cpu_count() or 1),
                       metavar="N", help="layers converted at once, each in a process "
                       "(default: %(default)s)")
        s.add_argument("--staging", default=DEFAULT_STAGING, metavar="DIR",
                       help="where converted layers wait for the snapshotter, in a fresh "
                       "directory removed at the end; best on the snapshotter root's file "
                       "system, so that it links rather than copies (default: %(default)s)")
        s.add_argument("-q", "--quiet", action="store_true",
                       help="no progress (shown only on a terminal anyway)")
    return p


def run(ns: argparse.Namespace) -> Registered:
    if ns.jobs < 1:
        raise CliError(f"image {ns.action}: -j must be 1 or more")
    try:
        platform = Platform.parse(ns.platform) if ns.platform is not None else None
    except OciError as exc:
        raise CliError(f"image {ns.action}: {exc}") from exc
    target = Target(ns.address, ns.namespace, ns.snapshotter)
    settings = Settings(ns.jobs, os.path.abspath(ns.staging), ns.quiet)
    if ns.action == "pull":
        return pull_image(ns.reference, target, settings, platform=platform,
                          plain_http=True if ns.plain_http else None, lazy=ns.lazy)
    return import_image(ns.source, target, settings, platform=platform, name=ns.name)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise Interrupted(signum)


def main(argv: list[str]) -> int:
    """``erofs-fuse image pull|import ...``: prints ``NAME: DIGEST``; or one line on stderr and
    2 (bad input), 1 (other failures), 128+N (signal N)."""
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    what = "image " + (argv[0] if argv and argv[0] in ("pull", "import") else "")
    try:
        done = run(build_parser().parse_args(argv))
        print(f"{done.name}: {done.manifest_digest}", flush=True)
        return 0
    except CliError as exc:
        print_error(str(exc))
        return exc.code
    except (OciError, MkfsError, ContainerdError, NotOurSnapshotter) as exc:
        print_error(f"{what}: {exc}")
        return EXIT_BAD_INPUT
    except JobFailed as exc:
        print_error(f"{what}: {exc}")
        return exc.code
    except Interrupted as exc:
        print_error(f"{what}: interrupted ({exc}); nothing registered, nothing left behind")
        return exc.code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print_error(f"{what}: {where}{exc.strerror or exc}")
        return EXIT_FAILURE
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
