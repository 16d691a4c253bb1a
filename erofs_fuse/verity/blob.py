"""Lazy verification of a layer blob against a trusted Merkle tree (kernel
``fs/verity/verify.c`` is the model): ``VerifiedBlob`` implements the ``Blob`` protocol.

Never serve unverified bytes: each read pulls whole data blocks into a private buffer, hashes
them, compares with the leaf hashes and returns bytes from that same buffer (no mmap, so the
file cannot change between hashing and copying). Cache verified *bytes* of tree blocks, never
a "verified" flag: the file can change underneath us, the cached copy cannot.
"""

from __future__ import annotations

import threading

from cachetools import LRUCache

from ..blob import Blob
from ..erofs.errors import CorruptImageError
from .build import hash_blocks
from .formats import Geometry, HashParams, data_blocks_of, geometry
from .trust import Anchor, IntegrityError

DEFAULT_TREE_CACHE_BYTES = 64 << 20
DIGEST_PREFIX_HEX = 16  # hex digits of a hash shown in error messages


class MerkleTree:
    """Where a tree lives (``source`` at byte ``offset``, root-first levels), how it hashes,
    the authenticated data size, and the anchor that checks its root."""

    def __init__(self, params: HashParams, data_size: int, source: Blob | None, offset: int,
                 anchor: Anchor) -> None:
        self.params = params
        self.data_size = data_size
        self.source = source
        self.offset = offset
        self.anchor = anchor
        self.geometry: Geometry = geometry(
            data_blocks_of(data_size, params.data_block_size), params.hashes_per_block)

    @property
    def tree_bytes(self) -> int:
        return self.geometry.total_blocks * self.params.hash_block_size


class VerifiedBlob:
    """A ``Blob`` whose every byte is checked against a trusted Merkle tree before it is served.

    A read fetches the covering data blocks into a private buffer, hashes each, compares with
    its leaf hash (walking up to the first verified cached tree block, then down, as Linux
    ``fs/verity/verify.c`` does) and serves bytes only from that buffer. Verified tree blocks
    are cached (LRU, top block pinned); data blocks are re-hashed on every read, so a layer
    changed underneath is caught. Takes ownership of ``inner`` and ``tree.source``.
    """

    def __init__(self, inner: Blob, tree: MerkleTree, *, name: str | None = None,
                 cache_bytes: int = DEFAULT_TREE_CACHE_BYTES, kind: str = "layer") -> None:
        self.name = name if name is not None else inner.name
        self.kind = kind  # what the blob is, in messages: "layer", "object sha256:HEX"
        self.failures = 0
        self._inner = inner
        self._tree = tree
        self._params = tree.params
        self._geo = tree.geometry
        self._hasher = tree.params.hasher()
        self._lock = threading.Lock()
        self._cache: LRUCache[tuple[int, int], bytes] = LRUCache(
            maxsize=max(cache_bytes // tree.params.hash_block_size, 16))
        self._top = b""
        self._check_sizes()
        self._root = self._open_root()

    @property
    def size(self) -> int:
        return self._tree.data_size

    @property
    def root(self) -> bytes:
        return self._root

    def prefetch(self, offset: int, length: int) -> None:
        """Pass a read-ahead hint down (see ``FileBlob.prefetch``): it moves no bytes to us.
        The Merkle leaves that will check those bytes are asked for too, unless all are cached
        (verified) here already."""
        prefetch = getattr(self._inner, "prefetch", None)
        if prefetch is not None:
            prefetch(offset, length)
        source = self._tree.source
        tree_prefetch = getattr(source, "prefetch", None)
        if (tree_prefetch is None or self._geo.levels < 2 or length <= 0
                or not 0 <= offset < self._tree.data_size):
            return  # with one level, the one tree block is the top, kept from the start
        per_leaf = self._params.data_block_size * self._geo.hashes_per_block
        first = offset // per_leaf
        last = min((offset + length - 1) // per_leaf, self._geo.counts[0] - 1)
        if first > last:
            return
        with self._lock:
            if all((0, index) in self._cache for index in range(first, last + 1)):
                return
        start = self._tree_block_pos(0, first)
        tree_prefetch(start, self._tree_block_pos(0, last + 1) - start)

    def load_tree(self, max_bytes: int = DEFAULT_TREE_CACHE_BYTES // 4) -> bool:
        """Read the whole tree, one read per level, verify it from the top down and cache it,
        so that no read of this blob waits for a tree block again; whether it was loaded (not
        for a tree over ``max_bytes`` or over what the cache holds, nor when a block does not
        verify: the lazy path finds and reports that on the read that needs it)."""
        geo, params = self._geo, self._params
        hbs, ds, hpb = params.hash_block_size, params.digest_size, geo.hashes_per_block
        source = self._tree.source
        if (source is None or geo.levels < 2 or self._tree.tree_bytes > max_bytes
                or geo.total_blocks > self._cache.maxsize):
            return False
        parents = [self._top]
        for level in range(geo.levels - 2, -1, -1):
            count = geo.counts[level]
            data = source.read(self._tree_block_pos(level, 0), count * hbs)
            got = hash_blocks(params, data, hbs, ds)
            blocks = [data[k * hbs:(k + 1) * hbs] for k in range(count)]
            for index in range(count):
                if got[index * ds:(index + 1) * ds] != self._slot(parents[index // hpb],
                                                                  index % hpb):
                    return False
            with self._lock:
                for index, block in enumerate(blocks):
                    self._cache[(level, index)] = block
            parents = blocks
        return True

    def close(self) -> None:
        self._inner.close()
        if self._tree.source is not None and self._tree.source is not self._inner:
            self._tree.source.close()

    # opening ----------------------------------------------------------------------------------
    def _check_sizes(self) -> None:
        tree, size = self._tree, self._inner.size
        appended = tree.source is self._inner
        if appended and (size < tree.data_size or tree.offset < tree.data_size):
            raise IntegrityError(
                f"layer of {size} bytes cannot hold {tree.data_size} data bytes before a hash "
                f"tree at {tree.offset}", image=self.name)
        if not appended and size != tree.data_size:
            raise IntegrityError(
                f"layer has {size} bytes, the trusted digest covers {tree.data_size}",
                image=self.name)
        need = tree.offset + tree.tree_bytes
        if tree.tree_bytes and (tree.source is None or tree.source.size < need):
            have = tree.source.size if tree.source is not None else 0
            raise IntegrityError(
                f"hash tree truncated: {have} bytes, need {need}", image=self.name)

    def _open_root(self) -> bytes:
        """Hash the top block (or the lone data block) and check it against the anchor."""
        geo, params = self._geo, self._params
        if geo.levels:
            self._top = self._read_tree_block(geo.levels - 1, 0)
            root = self._hasher(self._top)
        elif geo.data_blocks == 1:
            data = self._inner.read(0, self._tree.data_size)
            root = hash_blocks(params, data, params.data_block_size,
                               params.digest_size)
        else:
            root = bytes(params.digest_size)
        self._tree.anchor.check_root(root, params, self._tree.data_size, self.name)
        return root

    # tree blocks ------------------------------------------------------------------------------
    def _tree_block_pos(self, level: int, index: int) -> int:
        return self._tree.offset + (self._geo.starts[level] + index) * self._params.hash_block_size

    def _read_tree_block(self, level: int, index: int) -> bytes:
        assert self._tree.source is not None  # _check_sizes: a tree with blocks has a source
        return self._tree.source.read(self._tree_block_pos(level, index),
                                      self._params.hash_block_size)

    def _cached(self, level: int, index: int) -> bytes | None:
        if level == self._geo.levels - 1:
            return self._top
        with self._lock:
            return self._cache.get((level, index))

    def _slot(self, block: bytes, index: int) -> bytes:
        pos = index * self._params.slot_size
        return block[pos:pos + self._params.digest_size]

    def _tree_block(self, level: int, index: int) -> bytes:
        """Verified bytes of tree block ``index`` of ``level``: walk up to the first cached
        (hence verified) ancestor, then check each level on the way down."""
        hpb = self._geo.hashes_per_block
        path: list[tuple[int, int]] = []
        parent = self._cached(level, index)
        while parent is None:
            path.append((level, index))
            level, index = level + 1, index // hpb
            parent = self._cached(level, index)
        for lvl, idx in reversed(path):
            block = self._read_tree_block(lvl, idx)
            expected = self._slot(parent, idx % hpb)
            actual = self._hasher(block)
            if actual != expected:
                source = self._tree.source.name if self._tree.source is not None else "?"
                self._fail(f"Merkle tree block {idx} of level {lvl} ({source} at "
                           f"{self._tree_block_pos(lvl, idx)})", expected, actual, None)
            with self._lock:
                self._cache[(lvl, idx)] = block
            parent = block
        return parent

    def _fail(self, what: str, expected: bytes, actual: bytes, offset: int | None) -> None:
        with self._lock:
            self.failures += 1
            count = self.failures
        raise IntegrityError(
            f"{what}: hash mismatch, expected {expected[:DIGEST_PREFIX_HEX // 2].hex()}..., "
            f"got {actual[:DIGEST_PREFIX_HEX // 2].hex()}... (verification failure {count} "
            f"of this {self.kind})", image=self.name, offset=offset)

    # data -------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        size = self._tree.data_size
        if offset < 0 or length < 0 or offset + length > size:
            raise CorruptImageError(
                f"read of {length} bytes past the end of the verified data ({size} bytes)",
                image=self.name, offset=offset)
        if length == 0:
            return b""
        dbs = self._params.data_block_size
        first = offset // dbs
        start = first * dbs
        stop = min(-(-(offset + length) // dbs) * dbs, size)
        buf = self._inner.read(start, stop - start)
        self._verify(first, buf)
        skip = offset - start
        if skip == 0 and length == len(buf):
            return buf
        return buf[skip:skip + length]

    def check(self, offset: int, data: bytes) -> None:
        """Verify ``data``, whole data blocks of this blob starting at block-aligned ``offset``
        (the last one may end at the data size), without reading them from the inner blob:
        for bytes that came from elsewhere (a range fetched from a registry) and must be
        checked before they are kept. ``IntegrityError`` names the first bad block."""
        dbs = self._params.data_block_size
        end = offset + len(data)
        if offset % dbs or offset < 0 or end > self._tree.data_size or not data or (
                end % dbs and end != self._tree.data_size):
            raise CorruptImageError(
                f"check of {len(data)} bytes at {offset}: not whole blocks of the data",
                image=self.name, offset=offset)
        self._verify(offset // dbs, data)

    def _verify(self, first: int, buf: bytes) -> None:
        """Check the blocks of ``buf`` (data blocks ``first``, ...) against their leaf hashes,
        one leaf tree block at a time (one leaf covers 512 KiB with SHA-256 and 4 KiB)."""
        ds, hpb = self._params.digest_size, self._geo.hashes_per_block
        got = hash_blocks(self._params, buf, self._params.data_block_size, ds)
        end = first + len(got) // ds
        if not self._geo.levels:  # a one-block layer: the block's hash is the root
            if got != self._root:
                self._fail("data block 0", self._root, got, 0)
            return
        block = first
        while block < end:
            leaf = block // hpb
            stop = min(end, (leaf + 1) * hpb)
            expected = self._leaf_hashes(self._tree_block(0, leaf), block % hpb, stop - block)
            actual = got[(block - first) * ds:(stop - first) * ds]
            if actual != expected:
                self._report_mismatch(block, expected, actual)
            block = stop

    def _leaf_hashes(self, leaf: bytes, slot: int, count: int) -> bytes:
        """``count`` digests from ``slot`` on, without dm-verity's per-slot padding."""
        ds = self._params.digest_size
        if self._params.slot_size == ds:
            return leaf[slot * ds:(slot + count) * ds]
        return b"".join(self._slot(leaf, slot + k) for k in range(count))

    def _report_mismatch(self, block: int, expected: bytes, actual: bytes) -> None:
        ds = self._params.digest_size
        for k in range(0, len(actual), ds):
            if expected[k:k + ds] != actual[k:k + ds]:
                index = block + k // ds
                self._fail(f"data block {index}", expected[k:k + ds], actual[k:k + ds],
                           index * self._params.data_block_size)
