"""Verifying an object of an object store (``erofs_fuse/objects.py`` finds and opens it)
against the fs-verity digest its metacopy xattr carries: the tree stored beside it when it is
good (read whole, 1/128 of the object, every byte checked against the digest), else one pass
over the object; reads then go through a ``VerifiedBlob``, made at the first of them.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Callable

from ..blob import Blob, BytesBlob
from ..erofs.errors import ErofsError
from .blob import MerkleTree, VerifiedBlob
from .build import build_tree, hash_blocks, tree_from_leaves, tree_from_stored
from .formats import VERITY_MAGIC, HashParams, data_blocks_of, geometry, hash_area_offset
from .trust import FsVerityDigest, IntegrityError

log = logging.getLogger(__name__)


def verified_object(blob: Blob, alg: str, digest: bytes, tree_file: Blob | None,
                    whole_limit: int, pass_limit: int = 0) -> tuple[Blob, bytes | None]:
    """``blob`` (an object of fs-verity digest ``alg:digest``) behind a ``VerifiedBlob`` whose
    tree, stored beside it (``tree_file``, which this closes) or built now, gives the digest
    (``IntegrityError`` when the object does not give it); and the object's bytes when, with
    no stored tree and at most ``whole_limit`` bytes, it was read whole for that; or, with no
    usable stored tree, at most ``pass_limit`` bytes: the pass over it is then one read whose
    bytes, hashed once, can serve its reads too."""
    params = _params(alg)
    tree = None
    whole: bytes | None = None
    if tree_file is not None:
        try:
            tree = _stored_tree(tree_file, blob.size, params, digest)
        finally:
            tree_file.close()
    elif blob.size <= whole_limit:
        whole = blob.read(0, blob.size)  # one pread; served only once it gives the digest
    if tree is None:
        if whole is None and blob.size <= pass_limit:
            whole = blob.read(0, blob.size)  # one pread; served only once it gives the digest
        if whole is not None:  # most objects: hashed straight from the bytes just read
            leaves = hash_blocks(params, whole, params.data_block_size, params.slot_size)
            built = tree_from_leaves(leaves, blob.size, params)
        else:
            built = build_tree(blob.read, blob.size, params)
        if built.fsverity_digest != digest:
            # checked here, not by the tree's anchor, whose words are a layer's and its sidecar's
            want = FsVerityDigest(alg, digest)
            raise IntegrityError(
                f"fs-verity digest mismatch: object {want} ({blob.size} bytes) gives "
                f"{alg}:{built.fsverity_digest.hex()} (object changed?)", image=blob.name)
        tree = built.tree
    checked = tree

    def verifier() -> Blob:
        want = FsVerityDigest(alg, digest)
        merkle = MerkleTree(params, blob.size, BytesBlob(checked, blob.name + " (tree)"), 0,
                            want)
        return VerifiedBlob(blob, merkle, name=blob.name, kind=f"object {want}",
                            cache_bytes=16 * params.hash_block_size)
    return _Deferred(blob, verifier, len(tree) + 16 * params.hash_block_size), whole


class _Deferred:
    """A verified object whose ``VerifiedBlob`` is made at its first read through it: most
    objects are read whole at open and then served by the kernel's page cache, never again by
    us, and making one costs a re-read of a one-block object (its root is its block's hash)."""

    def __init__(self, inner: Blob, make: Callable[[], Blob], cost: int) -> None:
        self._inner = inner
        self._make = make
        self._blob: Blob | None = None
        self._lock = threading.Lock()
        self.name = inner.name
        self.cost = cost  # what it weighs in the cache of open objects: its tree

    @property
    def size(self) -> int:
        return self._inner.size

    def read(self, offset: int, length: int) -> bytes:
        blob = self._blob
        if blob is None:
            with self._lock:
                if self._blob is None:
                    self._blob = self._make()
                blob = self._blob
        return blob.read(offset, length)

    def close(self) -> None:
        with self._lock:
            if self._blob is not None:
                self._blob.close()
            else:
                self._inner.close()


@functools.lru_cache(maxsize=None)
def _params(alg: str) -> HashParams:
    return HashParams.fsverity(alg)  # validated once per algorithm, not once per object


def _stored_tree(tree_file: Blob, data_size: int, params: HashParams,
                 digest: bytes) -> bytes | None:
    """The tree stored beside an object when all of it is good and it gives ``digest``; None
    (and a log line) when it cannot be used."""
    geo = geometry(data_blocks_of(data_size, params.data_block_size), params.hashes_per_block)
    hbs = params.hash_block_size
    need = geo.total_blocks * hbs
    # seal's veritysetup form has a superblock block first; its fields need no check, since
    # every byte of the tree after it is checked against the digest
    head = hash_area_offset(0, hbs, True)
    why = "of the wrong size"
    built = None
    try:
        offset = 0
        if need and tree_file.size == head + need and (
                tree_file.read(0, len(VERITY_MAGIC)) == VERITY_MAGIC):
            offset = head
        if need and tree_file.size == offset + need:
            built = tree_from_stored(tree_file.read(offset, need), data_size, params)
            why = "not self-consistent" if built is None else "of other contents"
    except ErofsError as exc:  # unreadable: the object may still be good
        why = f"unreadable ({exc.message})"
    if built is not None and built.fsverity_digest == digest:
        return built.tree
    log.warning("%s: a Merkle tree %s (changed, or not this object's), not used: hashing the "
                "object whole", tree_file.name, why)
    return None
