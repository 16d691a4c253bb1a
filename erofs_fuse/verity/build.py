"""Building a Merkle tree over a whole file (what ``seal`` writes, and what tests compare with
``fsverity digest --out-merkle-tree`` and ``veritysetup format``); the formats are in
``formats``. Levels are built leaves first and written root-first, as both tools lay them out.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

from .formats import HashParams, data_blocks_of, fsverity_digest, geometry


Digests = Callable[[str, bytes, bytes, "bytes | memoryview", int, int, int], bytes]


def _accelerator() -> Digests | None:
    """The compiled block hasher (``_blockhash.c``, built by ``pip install``), unless it is
    missing or EROFS_FUSE_HASH=python asks for hashlib (to compare the two)."""
    if os.environ.get("EROFS_FUSE_HASH") == "python":
        return None
    try:
        from . import _blockhash
    except ImportError:
        return None
    return _blockhash.digests


_digests = _accelerator()
# threads per hash_blocks call on a large buffer: a second one only where there is a second CPU
HASH_THREADS = min(2, os.cpu_count() or 1)


ReadFn = Callable[[int, int], bytes]
Progress = Callable[[int, int], None]
BUILD_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class BuiltTree:
    params: HashParams
    data_size: int
    data_blocks: int
    root: bytes
    tree: bytes  # root-first levels, exactly what ``--out-merkle-tree`` writes

    @property
    def fsverity_digest(self) -> bytes:
        return fsverity_digest(self.params, self.data_size, self.root)


def hash_blocks(params: HashParams, data: bytes | memoryview, block_size: int,
                slot_size: int) -> bytes:
    """The concatenated slot-padded hashes of the blocks of ``data`` (a partial last block is
    zero-padded, as fs-verity does), hashed as ``params`` say: in C outside the GIL, on two
    threads for large buffers and two blocks at a time per thread on the SHA extensions for
    SHA-256 (``_blockhash``, ``sha256ni.c``), where that module was built; else in Python."""
    if _digests is not None:
        prefix, suffix = params.salt_affixes
        return _digests(params.alg, prefix, suffix, data, block_size, slot_size, HASH_THREADS)
    return hash_blocks_python(_hasher(params), data, block_size, slot_size)


def hash_blocks_python(hasher: Callable[[bytes | memoryview], bytes], data: bytes | memoryview,
                       block_size: int, slot_size: int) -> bytes:
    """``hash_blocks`` with hashlib, one call per block (the GIL is dropped inside each)."""
    mv = memoryview(data)
    whole = len(data) - len(data) % block_size
    digests = [hasher(mv[k:k + block_size]) for k in range(0, whole, block_size)]
    if whole < len(data):  # only the partial last block is copied to be padded, not all data
        digests.append(hasher(bytes(mv[whole:]) + bytes(whole + block_size - len(data))))
    pad = slot_size - len(digests[0]) if digests else 0
    if pad:
        digests = [d + bytes(pad) for d in digests]
    return b"".join(digests)


@functools.lru_cache(maxsize=16)
def _hasher(params: HashParams) -> Callable[[bytes | memoryview], bytes]:
    return params.hasher()  # made once per set of parameters, not once per call


def pack_level(hashes: bytes, params: HashParams) -> bytes:
    """Lay slot-padded hashes out in hash blocks of ``hashes_per_block`` slots each, the rest
    of every block zero (only dm-verity format 0 with sha1/224/384 leaves a gap per block)."""
    hbs = params.hash_block_size
    per_block = params.hashes_per_block * params.slot_size
    if per_block == hbs:
        return hashes + bytes(-len(hashes) % hbs)
    blocks = []
    for k in range(0, len(hashes), per_block):
        part = hashes[k:k + per_block]
        blocks.append(part + bytes(hbs - len(part)))
    return b"".join(blocks)


def build_tree(read: ReadFn, data_size: int, params: HashParams, *,
               progress: Progress | None = None, chunk: int = BUILD_CHUNK) -> BuiltTree:
    """Hash ``data_size`` bytes from ``read`` into a tree. Data is read in large chunks and
    hashed block by block (``hash_blocks``)."""
    dbs, slot = params.data_block_size, params.slot_size
    chunk = max(dbs, chunk - chunk % dbs)
    parts: list[bytes] = []
    for pos in range(0, data_size, chunk):
        parts.append(hash_blocks(params, read(pos, min(chunk, data_size - pos)), dbs, slot))
        if progress is not None:
            progress(min(pos + chunk, data_size), data_size)
    return tree_from_leaves(b"".join(parts), data_size, params)


def tree_from_leaves(level: bytes, data_size: int, params: HashParams) -> BuiltTree:
    """The tree over data whose block hashes (slot-padded, in order) are ``level``: for a
    caller that hashed the blocks as they streamed past."""
    hbs, slot = params.hash_block_size, params.slot_size
    nblocks = data_blocks_of(data_size, params.data_block_size)
    if nblocks == 0:
        return BuiltTree(params, data_size, 0, bytes(params.digest_size), b"")
    if nblocks == 1:
        return BuiltTree(params, data_size, 1, level[: params.digest_size], b"")
    levels: list[bytes] = []
    while True:
        level = pack_level(level, params)
        levels.append(level)
        if len(level) == hbs:
            break
        level = hash_blocks(params, level, hbs, slot)
    root = _hasher(params)(levels[-1])
    return BuiltTree(params, data_size, nblocks, root, b"".join(reversed(levels)))


def tree_from_stored(stored: bytes, data_size: int, params: HashParams) -> BuiltTree | None:
    """The tree a stored copy (root-first levels, ``--out-merkle-tree``'s form) holds, when
    every byte of it is what its own leaf level gives: upper levels and padding are rebuilt
    from the leaves and compared, so the result's root (and digest) vouches for the whole copy.
    None for a copy of the wrong size or with any byte off. Costs about 1/128 of hashing the
    data (fs-verity parameters: the leaves are read, not recomputed)."""
    geo = geometry(data_blocks_of(data_size, params.data_block_size), params.hashes_per_block)
    hbs, slot = params.hash_block_size, params.slot_size
    if (not geo.levels or len(stored) != geo.total_blocks * hbs
            or params.hashes_per_block * slot != hbs):  # dm-verity's gapped leaves: not here
        return None
    leaf_start = geo.starts[0] * hbs
    leaves = stored[leaf_start:leaf_start + geo.data_blocks * slot]
    built = tree_from_leaves(leaves, data_size, params)
    return built if built.tree == stored else None
