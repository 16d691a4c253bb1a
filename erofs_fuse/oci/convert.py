"""Converting an OCI image: every layer of one platform's manifest to an EROFS file, in worker
processes, then the ``.layers`` file that lists the stack (the front end is
``erofs_fuse.cli.convert_image``)."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import TextIO

from ..mkfs import ConvertOptions
from .image import OciError, Platform, resolve_image
from .layers_file import SUFFIX, LayersFile, ListedLayer, write_layers_file
from .progress import ProgressView
from .workers import output_name, plan, run_jobs


@dataclass(frozen=True)
class Request:
    image: str
    outdir: str
    jobs: int
    platform: Platform | None
    ref: str | None
    name: str | None
    options: ConvertOptions
    quiet: bool



class OutdirError(OciError):
    """OUTDIR cannot be made or written: bad input as much as the image (exit 2), and said of
    OUTDIR itself rather than of a layer's temporary file."""


def make_outdir(path: str) -> None:
    """Create OUTDIR if missing and prove it writable (a file made and removed) before any
    worker starts."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutdirError(f"{path}: not a directory") from None
    except OSError as exc:
        raise OutdirError(f"{path}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
    except OSError as exc:
        raise OutdirError(f"{path}: cannot write there: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def convert_image(req: Request, stderr: TextIO | None = None) -> str:
    """Convert and write the ``.layers`` file; its path. Progress goes to ``stderr``
    (default: sys.stderr)."""
    image = resolve_image(req.image, req.platform, req.ref)
    make_outdir(req.outdir)
    jobs = plan(image, req.outdir, req.options)
    view = ProgressView(stderr or sys.stderr, len(image.layers), jobs, quiet=req.quiet)
    present = len({layer.diff_id for layer in image.layers}) - sum(j.convert for j in jobs)
    view.note(f"{image.source}: {image.platform or 'no platform'}, {len(image.layers)} "
              f"layers: {sum(j.convert for j in jobs)} to convert, {present} present")
    try:
        results = run_jobs(jobs, min(req.jobs, max(len(jobs), 1)), view)
    finally:
        view.close()
    verity = {job.layer.diff_id: results[job.key].verity for job in jobs}
    listed = tuple(
        ListedLayer(output_name(layer.diff_id), layer.diff_id, layer.chain_id, layer.digest,
                    os.path.getsize(os.path.join(req.outdir, output_name(layer.diff_id))),
                    verity.get(layer.diff_id))
        for layer in image.layers)
    name = req.name or image.name
    path = os.path.join(req.outdir, name + SUFFIX)
    write_layers_file(path, LayersFile(
        os.path.abspath(image.source), name, image.ref_name, image.manifest_digest,
        image.config_digest, str(image.platform) if image.platform else None, listed))
    view.note(f"wrote {path}")
    return path
