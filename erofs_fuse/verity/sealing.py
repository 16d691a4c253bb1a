"""Sealing a layer (``erofs-fuse seal``, worded by ``cli``): hash it once and write its Merkle
tree next to it.

For the default parameters (SHA-256, 4096-byte blocks, no salt) and a block-aligned, non-empty
layer, ``LAYER.verity`` is byte-identical to ``veritysetup format --salt=-
--uuid=00000000-0000-0000-0000-000000000000 LAYER LAYER.verity``: a superblock block, then the
tree, which itself equals ``fsverity digest --out-merkle-tree``. So the one file is checked by
the fs-verity digest and by the dm-verity root, and both standard tools can check it.

Otherwise (a partial last block, an empty layer, other parameters) the sidecar is the raw
fs-verity tree, plus ``LAYER.verity.desc`` (the ``--out-descriptor`` bytes) when the block size
or salt is not the default; there is no dm-verity root then.

Output, per layer, on stdout::

    sha256:HEX LAYER                  # exactly what `fsverity digest LAYER` prints
    # dm-verity ROOT:BLOCKS LAYER     # only for veritysetup-compatible sidecars

The second line is a comment, so the output is itself a valid ``--verity-roots`` file, and
``ROOT:BLOCKS`` is the value ``--dm-verity LAYER=`` takes.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from typing import TextIO

from ..blob import FileBlob, write_atomic
from ..erofs.errors import ErofsError
from .build import BuiltTree, Progress, build_tree
from .formats import (
    ZERO_UUID,
    HashParams,
    SaltMode,
    VeritySuperblock,
    fsverity_descriptor,
    hash_area_offset,
    pack_verity_superblock,
)

PROGRESS_MIN_BYTES = 32 << 20  # smaller layers are sealed too fast for a progress bar to help


class SealError(ValueError):
    """A layer cannot be sealed: missing, unreadable, not a regular file, or of parameters
    fs-verity does not have. One line naming the layer; failing to write the sidecar is an
    ``OSError`` instead (the input was fine)."""


@dataclass(frozen=True, slots=True)
class SealResult:
    layer: str
    sidecar: str
    descriptor: str | None  # path of the written descriptor, if one was needed
    params: HashParams
    data_size: int
    data_blocks: int
    root: bytes
    fsverity_digest: bytes
    dm_root: bytes | None  # set when the sidecar is a veritysetup hash device

    @property
    def digest(self) -> str:
        return f"{self.params.alg}:{self.fsverity_digest.hex()}"

    def digest_line(self) -> str:
        return f"{self.digest} {self.layer}"

    def dm_line(self) -> str | None:
        if self.dm_root is None:
            return None
        return f"# dm-verity {self.dm_root.hex()}:{self.data_blocks} {self.layer}"


def seal(path: str, out: str | None = None, *, progress: Progress | None = None,
         params: HashParams | None = None) -> SealResult:
    """Build the tree of the file at ``path`` and write the sidecar ``out`` (default
    ``path + ".verity"``) atomically. ``params`` are fs-verity parameters (default SHA-256,
    4096-byte blocks, no salt)."""
    params = params if params is not None else HashParams.fsverity()
    if params.mode is not SaltMode.FSVERITY:
        raise SealError("seal builds fs-verity trees")
    out = out if out is not None else path + ".verity"
    built = _build(path, params, progress)
    bs = params.data_block_size
    dm = params.is_dm_compatible_default and built.data_size > 0 and built.data_size % bs == 0
    if dm:
        sb = VeritySuperblock(1, ZERO_UUID, params.alg, bs, bs, built.data_blocks, b"")
        head = pack_verity_superblock(sb)
        head += bytes(hash_area_offset(0, bs, True) - len(head))
        write_atomic(out, head + built.tree)
    else:
        write_atomic(out, built.tree)
    desc_path = out + ".desc"
    descriptor: str | None = None
    if params != HashParams.fsverity(params.alg):
        write_atomic(desc_path, fsverity_descriptor(params, built.data_size, built.root))
        descriptor = desc_path
    elif os.path.exists(desc_path):
        os.unlink(desc_path)  # stale: it would only be ignored (no longer hashes to the digest)
    return SealResult(path, out, descriptor, params, built.data_size, built.data_blocks,
                      built.root, built.fsverity_digest, built.root if dm else None)


def _build(path: str, params: HashParams, progress: Progress | None) -> BuiltTree:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SealError(f"{path}: not a regular file")
        blob = FileBlob(path)
    except OSError as exc:
        raise SealError(f"{exc.filename or path}: {exc.strerror or exc}") from None
    try:
        return build_tree(blob.read, blob.size, params, progress=progress)
    except ErofsError as exc:  # the file shrank or could not be read while hashing
        raise SealError(f"{path}: {exc.message}") from None
    finally:
        blob.close()


# progress on a terminal ----------------------------------------------------------------------

class ProgressBar:
    """``\\rsealing NAME  42% 120/286 MiB 850 MB/s`` on a terminal, at most 10 updates/s."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self._label = label
        self._stream = stream
        self._start = time.monotonic()
        self._last = 0.0
        self._width = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-6) / 1e6
        text = (f"\rsealing {self._label} {100 * done // max(total, 1):3d}% "
                f"{done >> 20}/{total >> 20} MiB {rate:.0f} MB/s")
        self._width = max(self._width, len(text))
        self._stream.write(text)
        self._stream.flush()

    def clear(self) -> None:
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
