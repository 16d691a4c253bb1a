"""Byte spaces metadata is read from (spec §1): the primary device or the metabox stream.

An inode, its inline xattrs, inline tail, compression indexes and chunk indexes all live in the
same space, selected by bit 63 of its nid.
"""

from __future__ import annotations

import threading
from typing import Iterable, Protocol

from .errors import CorruptImageError
from .lru import Lru


class Space(Protocol):
    """Positional read access to a byte space; reads past ``size`` raise CorruptImageError."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class BlockCachedSpace:
    """A space whose reads are served from whole cached blocks of an underlying one.

    Metadata (inodes, xattrs, inline tails, indexes) is read in many small pieces clustered in
    few blocks; reading and caching whole blocks turns those into one read per block, and when
    the underlying blob verifies hashes, into one verification per block. The cache holds only
    bytes the underlying space returned, so it never holds unverified bytes.
    """

    def __init__(self, inner: Space, block_size: int = 4096, max_bytes: int = 16 << 20) -> None:
        self._inner = inner
        # an attribute, not a property: parse_inode asks for it three times per inode (a
        # space's size is fixed: the layer file never changes while open)
        self.size = inner.size
        self._bits = max(block_size, 4096).bit_length() - 1
        self._cache: Lru[int, bytes] = Lru(max(max_bytes >> self._bits, 4))
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImageError(
                f"metadata read of {length} bytes past the end ({self.size} bytes)",
                offset=offset,
            )
        bits = self._bits
        first = offset >> bits
        last = (offset + length - 1) >> bits if length else first
        if first == last:
            start = offset - (first << bits)
            return self._block(first)[start : start + length]
        if last - first > 16:
            return self._inner.read(offset, length)  # large reads would only churn the cache
        data = b"".join(self._block(i) for i in range(first, last + 1))
        start = offset - (first << bits)
        return data[start : start + length]

    def missing(self, offsets: Iterable[int]) -> list[int]:
        """The block indexes of ``offsets`` not in the cache, sorted, each once (for a
        prefetch: a block we hold needs no read)."""
        bits = self._bits
        with self._lock:
            cache = self._cache
            return sorted({o >> bits for o in offsets if (o >> bits) not in cache})

    @property
    def block_bits(self) -> int:
        return self._bits

    def _block(self, index: int) -> bytes:
        with self._lock:
            hit = self._cache.get(index)
        if hit is not None:
            return hit
        pos = index << self._bits
        block = self._inner.read(pos, min(1 << self._bits, self.size - pos))
        with self._lock:
            self._cache.put(index, block)
        return block
