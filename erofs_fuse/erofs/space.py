"""Byte spaces metadata is read from (spec §1): the primary device or the metabox stream.

An inode, its inline xattrs, inline tail, compression indexes and chunk indexes all live in the
same space, selected by bit 63 of its nid.
"""

from __future__ import annotations

import threading
from typing import Iterable, Protocol

from .errors import CorruptImageError, ErofsError
from .lru import Lru

# A metadata block missing from the cache is read with the rest of its aligned cluster of this
# many bytes, in one read (one verification, on a verified layer): mkfs puts a directory's
# inodes, inline data and entries next to each other, so the blocks read next are mostly
# there. In-process, a walk of the verified layers our writer made of bench-snapshotter's image
# missed 2,998 blocks, which fall in 199 clusters of 64 KiB (the python imports: 376 in 55), for
# about the same bytes hashed (13 MB against 12 MB) in 15 times fewer calls.
CLUSTER_BYTES = 64 << 10
# Cluster reads pay only where metadata is packed: erofs-utils 1.5 interleaves it with file data,
# and there a walk of scripts/bench's stack used 3.0 of each cluster's 16 blocks, churned the
# block cache and took 11-18% longer (our writer's layers: 15.1). So a space's first
# SAMPLE_CLUSTERS cluster reads are watched: unless later reads asked for MIN_USED_PER_CLUSTER
# of each one's other blocks on average, the space goes back to a block at a time for good.
# (Judged on fewer reads, the start of a walk looked sparse even in our layers: the base
# layer's first 16 clusters gave 3.4 blocks each, its first 32 gave 9.0; scripts/bench's
# stack 1.1 and 0.8.)
SAMPLE_CLUSTERS = 32
MIN_USED_PER_CLUSTER = 4
# Clusters that failed, remembered at most: past this many (a layer damaged all over, or a
# hostile one) the space reads a block at a time for good, and remembers no more.
MAX_FAILED_CLUSTERS = 64


class Space(Protocol):
    """Positional read access to a byte space; reads past ``size`` raise CorruptImageError."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class BlockCachedSpace:
    """A space whose reads are served from whole cached blocks of an underlying one.

    Metadata (inodes, xattrs, inline tails, indexes) is read in many small pieces clustered in
    few blocks; reading and caching whole blocks turns those into one read per block, and when
    the underlying blob verifies hashes, into one verification per block. A missing block is
    read with its cluster (``CLUSTER_BYTES``); a cluster that cannot be read whole (a bad block
    in it) is read a block at a time from then on (past ``MAX_FAILED_CLUSTERS`` of them, the
    whole space is), so a bad block fails only its own reads.
    The cache holds only bytes the underlying space returned, so it never holds unverified
    bytes.
    """

    def __init__(self, inner: Space, block_size: int = 4096, max_bytes: int = 16 << 20) -> None:
        self._inner = inner
        # an attribute, not a property: parse_inode asks for it three times per inode (a
        # space's size is fixed: the layer file never changes while open)
        self.size = inner.size
        self._bits = max(block_size, 4096).bit_length() - 1
        self._cluster_bits = max(self._bits, CLUSTER_BYTES.bit_length() - 1)
        self._cache: Lru[int, bytes] = Lru(max(max_bytes >> self._bits, 4))
        self._lock = threading.Lock()
        self._single: set[int] = set()  # clusters read a block at a time (see the docstring)
        self.clustering = True  # missing blocks come with their cluster: until judged not to pay
        self._clusters = 0  # cluster reads sampled so far
        self._used = 0  # blocks they read ahead that were asked for later
        self._ahead: set[int] | None = set()  # those not asked for yet; None: sample judged

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImageError(
                f"metadata read of {length} bytes past the end ({self.size} bytes)",
                offset=offset,
            )
        if length == 0:  # no block to read (nor to fail on)
            return b""
        bits = self._bits
        first = offset >> bits
        last = (offset + length - 1) >> bits
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
            ahead = self._ahead
            if hit is not None and ahead is not None and index in ahead:
                ahead.discard(index)
                self._used += 1
        if hit is not None:
            return hit
        cluster = (index << self._bits) >> self._cluster_bits
        if self.clustering and cluster not in self._single and self._clustering_now():
            block = self._read_cluster(cluster, index)
            if block is not None:
                return block
        pos = index << self._bits
        block = self._inner.read(pos, min(1 << self._bits, self.size - pos))
        with self._lock:
            self._cache.put(index, block)
        return block

    def _read_cluster(self, cluster: int, index: int) -> bytes | None:
        """Read cluster ``cluster`` whole into the cache and return its block ``index``; None
        (remembered) if it cannot be read whole. A remote layer's fetch unit (256 KiB by default,
        aligned) holds whole clusters, so a cluster waits for a fetch only when its block would
        too (with units under 64 KiB, it fetches its neighbours' units as well)."""
        start = cluster << self._cluster_bits
        try:
            data = self._inner.read(start, min(1 << self._cluster_bits, self.size - start))
        except ErofsError:
            with self._lock:
                if len(self._single) < MAX_FAILED_CLUSTERS:
                    self._single.add(cluster)
                else:
                    self.clustering = False
            return None
        bits, size = self._bits, 1 << self._bits
        first = start >> bits
        wanted = None
        with self._lock:
            ahead = self._ahead
            for k, pos in enumerate(range(0, len(data), size)):
                block = data[pos:pos + size]
                if first + k == index:
                    wanted = block
                elif first + k not in self._cache:
                    self._cache.put(first + k, block)
                    if ahead is not None:
                        ahead.add(first + k)
            if wanted is not None:
                self._cache.put(index, wanted)
            if ahead is not None:
                self._clusters += 1
        return wanted

    def _clustering_now(self) -> bool:
        """Whether a missing block comes with its cluster. The sample is judged here, at the
        first miss after it, so that its last cluster's blocks had their chance too."""
        with self._lock:
            if self._ahead is not None and self._clusters >= SAMPLE_CLUSTERS:
                self.clustering = self._used >= MIN_USED_PER_CLUSTER * self._clusters
                self._ahead = None
            return self.clustering
