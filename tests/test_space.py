"""``erofs/space.py``: metadata read through a cache of whole blocks, a missing block with the
rest of its aligned cluster (``CLUSTER_BYTES``) while the first clusters read show that their
other blocks get used, and a cluster with a bad block in it a block at a time, so that a bad
block fails only the reads that cover it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from erofs_fuse.erofs.errors import CorruptImageError
from erofs_fuse.erofs.space import CLUSTER_BYTES, MAX_FAILED_CLUSTERS, MIN_USED_PER_CLUSTER, \
    SAMPLE_CLUSTERS, BlockCachedSpace

BLOCK = 4096
CLUSTER = CLUSTER_BYTES // BLOCK  # blocks per cluster


class Inner:
    """A space over ``data`` that notes each read; a read covering a block in ``bad`` fails,
    as a verified layer's does for a block whose hash does not match."""

    def __init__(self, size: int, bad: set[int] | None = None) -> None:
        self.data = bytes(i * 7 % 251 for i in range(size))
        self.size = size
        self.bad = bad or set()
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        assert 0 <= offset and offset + length <= self.size
        for block in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1):
            if block in self.bad:
                raise CorruptImageError(f"block {block}: hash mismatch", offset=block * BLOCK)
        return self.data[offset:offset + length]


def test_a_missing_block_comes_with_its_cluster() -> None:
    inner = Inner(16 * CLUSTER_BYTES)
    space = BlockCachedSpace(inner, BLOCK)
    at = CLUSTER_BYTES + 3 * BLOCK + 100
    assert space.read(at, 100) == inner.data[at:at + 100]
    assert inner.reads == [(CLUSTER_BYTES, CLUSTER_BYTES)]
    for block in range(CLUSTER, 2 * CLUSTER):  # the rest of the cluster is cached
        assert space.read(block * BLOCK, BLOCK) == inner.data[block * BLOCK:(block + 1) * BLOCK]
    assert len(inner.reads) == 1
    assert space.read(5 * CLUSTER_BYTES, 8) == inner.data[5 * CLUSTER_BYTES:][:8]
    assert inner.reads[1:] == [(5 * CLUSTER_BYTES, CLUSTER_BYTES)]


def test_the_last_cluster_ends_with_the_space() -> None:
    size = CLUSTER_BYTES + 5 * BLOCK + 1000  # a partial last block
    inner = Inner(size)
    space = BlockCachedSpace(inner, BLOCK)
    assert space.read(size - 10, 10) == inner.data[-10:]
    assert inner.reads == [(CLUSTER_BYTES, size - CLUSTER_BYTES)]


def test_a_bad_block_fails_only_its_own_reads() -> None:
    bad = CLUSTER + 1
    inner = Inner(4 * CLUSTER_BYTES, {bad})
    space = BlockCachedSpace(inner, BLOCK)
    assert space.read((bad + 1) * BLOCK, 10) == inner.data[(bad + 1) * BLOCK:][:10]
    # the cluster read failed, then the block alone was read
    assert inner.reads == [(CLUSTER_BYTES, CLUSTER_BYTES), ((bad + 1) * BLOCK, BLOCK)]
    with pytest.raises(CorruptImageError, match=f"block {bad}:"):
        space.read(bad * BLOCK + 5, 1)
    inner.reads.clear()
    assert space.read((bad + 3) * BLOCK, 10) == inner.data[(bad + 3) * BLOCK:][:10]
    assert inner.reads == [((bad + 3) * BLOCK, BLOCK)]  # that cluster goes a block at a time
    inner.reads.clear()
    assert space.read(2 * BLOCK, 10) == inner.data[2 * BLOCK:][:10]
    assert inner.reads == [(0, CLUSTER_BYTES)]  # other clusters as before


def test_a_layer_bad_all_over_is_read_a_block_at_a_time() -> None:
    # failed clusters are remembered up to MAX_FAILED_CLUSTERS (memory stays bounded on a
    # hostile layer); past that, no cluster is tried again
    clusters = MAX_FAILED_CLUSTERS + 3
    inner = Inner(clusters * CLUSTER_BYTES, {c * CLUSTER for c in range(clusters)})
    space = BlockCachedSpace(inner, BLOCK)
    for c in range(clusters):
        block = c * CLUSTER + 1
        assert space.read(block * BLOCK, 1) == inner.data[block * BLOCK:][:1]
    assert not space.clustering
    # one cluster try per cluster until the limit, then single blocks only
    assert sum(1 for _, length in inner.reads if length == CLUSTER_BYTES) == MAX_FAILED_CLUSTERS + 1
    with pytest.raises(CorruptImageError):
        space.read(0, 1)


@pytest.mark.parametrize("used", [MIN_USED_PER_CLUSTER - 1, MIN_USED_PER_CLUSTER])
def test_clusters_go_on_only_while_their_blocks_get_used(used: int) -> None:
    # metadata interleaved with file data (erofs-utils 1.5): the first SAMPLE_CLUSTERS cluster
    # reads, of which the reads after use ``used`` blocks each besides the one that missed,
    # decide whether later misses come with their cluster or alone
    inner = Inner((SAMPLE_CLUSTERS + 2) * CLUSTER_BYTES)
    space = BlockCachedSpace(inner, BLOCK)
    for cluster in range(SAMPLE_CLUSTERS):
        for block in range(cluster * CLUSTER, cluster * CLUSTER + 1 + used):
            assert space.read(block * BLOCK, 1) == inner.data[block * BLOCK:][:1]
    assert len(inner.reads) == SAMPLE_CLUSTERS
    inner.reads.clear()
    block = SAMPLE_CLUSTERS * CLUSTER + 2  # the next miss is read as judged
    assert space.read(block * BLOCK, 1) == inner.data[block * BLOCK:][:1]
    if used >= MIN_USED_PER_CLUSTER:
        assert space.clustering and inner.reads == [(SAMPLE_CLUSTERS * CLUSTER_BYTES,
                                                     CLUSTER_BYTES)]
    else:
        assert not space.clustering and inner.reads == [(block * BLOCK, BLOCK)]


@settings(max_examples=300, deadline=None)
@given(clusters=st.integers(1, 4), tail=st.integers(0, CLUSTER_BYTES - 1),
       bad=st.sets(st.integers(0, 4 * CLUSTER - 1), max_size=4),
       reads=st.lists(st.tuples(st.integers(0, 5 * CLUSTER_BYTES), st.integers(0, 20 * BLOCK)),
                      min_size=1, max_size=30))
def test_reads_agree_with_the_inner_space(clusters: int, tail: int, bad: set[int],
                                          reads: list[tuple[int, int]]) -> None:
    # any reads, in any order: the bytes of the inner space, or its error exactly when the
    # range covers a bad block
    size = clusters * CLUSTER_BYTES + tail
    inner = Inner(size, {b for b in bad if b * BLOCK < size})
    space = BlockCachedSpace(inner, BLOCK)
    for offset, length in reads:
        if offset + length > size:
            with pytest.raises(CorruptImageError):
                space.read(offset, length)
            continue
        covered = range(offset // BLOCK, (offset + length - 1) // BLOCK + 1) if length else ()
        if any(b in inner.bad for b in covered):
            with pytest.raises(CorruptImageError):
                space.read(offset, length)
        else:
            assert space.read(offset, length) == inner.data[offset:offset + length]
