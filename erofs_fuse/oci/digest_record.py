"""``LAYER.digest``: what ``convert-image --seal`` knew of a layer file when it wrote it.

A layer file in OUTDIR is named for the content it was made from (its diff_id), but the name
proves nothing: the file may have been changed since. So a sealed conversion records, beside
``sha256-<diff_id>.erofs``, the fs-verity digest it computed of the file it wrote::

    {"diff_id": "sha256:...", "verity": "sha256:..."}

and a later ``--seal`` run reuses an existing file only when its fs-verity digest, computed
again, is the recorded one (and the record is for that diff_id); otherwise the layer is
converted again. The record is no trust root of its own (whoever can write OUTDIR can write it,
and the ``.layers`` file too): it catches a layer file changed, truncated or replaced since it
was made, so that a digest is never recorded for bytes nobody converted.
"""

from __future__ import annotations

import contextlib
import json
import os

from ..blob import write_atomic

SUFFIX = ".digest"


def record_path(layer: str) -> str:
    return layer + SUFFIX


def recorded_digest(layer: str, diff_id: str) -> str | None:
    """The fs-verity digest recorded for ``layer`` made from ``diff_id``; None when there is
    no record, it is unreadable, or it is about another diff_id."""
    try:
        with open(record_path(layer), "rb") as f:
            doc = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("diff_id") != diff_id:
        return None
    verity = doc.get("verity")
    return verity if isinstance(verity, str) else None


def record_bytes(diff_id: str, verity: str) -> bytes:
    return json.dumps({"diff_id": diff_id, "verity": verity}).encode() + b"\n"


def write_record(layer: str, diff_id: str, verity: str) -> None:
    write_atomic(record_path(layer), record_bytes(diff_id, verity))


def remove_record(layer: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(layer))
