"""Directory blocks from bytes: parsing, limits, and the O(log n) lookup."""

from __future__ import annotations

import struct

import bisect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs_fuse.erofs.dirent import DirBlock, DirEntry, first_not_below, lookup_in_blocks, \
    parse_dir_block
from erofs_fuse.erofs.errors import CorruptImageError


def block(entries: list[tuple[bytes, int, int]], size: int = 4096) -> bytes:
    head = b""
    names = b""
    base = 12 * len(entries)
    for name, nid, ftype in entries:
        head += struct.pack("<QHBB", nid, base + len(names), ftype, 0)
        names += name
    return (head + names).ljust(size, b"\0")


def test_parse_block_with_trailing_padding() -> None:
    raw = block([(b".", 1, 2), (b"..", 1, 2), (b"abc", 7, 1)])
    assert parse_dir_block(raw) == [DirEntry(b".", 1, 2), DirEntry(b"..", 1, 2), DirEntry(b"abc", 7, 1)]


def test_last_name_may_fill_the_block_exactly() -> None:
    raw = block([(b"a", 1, 1), (b"x" * 200, 2, 1)], size=12 * 2 + 1 + 200)
    assert parse_dir_block(raw)[1].name == b"x" * 200


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        struct.pack("<QHBB", 1, 4, 1, 0).ljust(64, b"a"),  # nameoff0 < 12
        struct.pack("<QHBB", 1, 5000, 1, 0).ljust(4096, b"a"),  # nameoff0 beyond the block
        struct.pack("<QHBB", 1, 13, 1, 0).ljust(64, b"a"),  # nameoff0 not a multiple of 12
        struct.pack("<QHBBQHBB", 1, 24, 1, 0, 2, 20, 1, 0).ljust(64, b"a"),  # names overlap
        struct.pack("<QHBB", 1, 12, 9, 0).ljust(64, b"a"),  # file type 9
        struct.pack("<QHBB", 1, 12, 1, 0).ljust(12 + 300, b"a"),  # name of 300 bytes
    ],
)
def test_malformed_blocks_are_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptImageError):
        parse_dir_block(raw)


def test_lookup_binary_search_over_blocks() -> None:
    names = sorted(b"n%04d" % i for i in range(0, 1000, 3))
    blocks = [
        [DirEntry(name, i, 1) for i, name in enumerate(names[k : k + 50], start=k)]
        for k in range(0, len(names), 50)
    ]
    reads: list[int] = []

    def read_block(i: int) -> list[DirEntry]:
        reads.append(i)
        return blocks[i]

    for idx, name in enumerate(names):
        reads.clear()
        found = lookup_in_blocks(len(blocks), read_block, name)
        assert found is not None and found.nid == idx
        assert len(reads) <= 4  # log2(7 blocks) + 1
    assert lookup_in_blocks(len(blocks), read_block, b"n0001") is None
    assert lookup_in_blocks(len(blocks), read_block, b"a") is None
    assert lookup_in_blocks(len(blocks), read_block, b"z") is None


def test_lazy_block_decodes_the_same_entries() -> None:
    for raw in (block([(b".", 1, 2), (b"..", 1, 2), (b"abc", 7, 1)]),
                block([(b"a", 1, 1), (b"x" * 200, 2, 1)], size=12 * 2 + 1 + 200)):
        lazy = DirBlock(raw)
        assert [lazy[i] for i in range(len(lazy))] == parse_dir_block(raw)
        with pytest.raises(IndexError):
            lazy[len(lazy)]


@pytest.mark.parametrize("raw", [
    struct.pack("<QHBBQHBB", 1, 24, 1, 0, 2, 20, 1, 0).ljust(64, b"a"),  # names overlap
    struct.pack("<QHBB", 1, 12, 9, 0).ljust(64, b"a"),  # file type 9
    struct.pack("<QHBB", 1, 12, 1, 0).ljust(12 + 300, b"a"),  # name of 300 bytes
])
def test_lazy_block_checks_the_entries_it_decodes(raw: bytes) -> None:
    lazy = DirBlock(raw)
    with pytest.raises(CorruptImageError):
        [lazy[i] for i in range(len(lazy))]


def test_lookup_over_lazy_blocks_decodes_few_entries() -> None:
    names = sorted(b"n%04d" % i for i in range(0, 1000, 3))
    raws = [block([(name, i, 1) for i, name in enumerate(names[k : k + 50], start=k)])
            for k in range(0, len(names), 50)]
    decoded = 0

    class Counting(DirBlock):
        def __getitem__(self, i: int) -> DirEntry:
            nonlocal decoded
            decoded += 1
            return super().__getitem__(i)

    for idx, name in enumerate(names):
        decoded = 0
        found = lookup_in_blocks(len(raws), lambda i: Counting(raws[i]), name)
        assert found is not None and found.nid == idx
        assert decoded <= 3 + 7  # first entries of <= 3 blocks, <= log2(50) + 1 inside one
    assert lookup_in_blocks(len(raws), lambda i: Counting(raws[i]), b"n0001") is None


def test_lazy_block_decodes_each_entry_once() -> None:
    """A cached block serves later searches from the entries it decoded before."""
    raw = block([(b"n%03d" % i, i, 1) for i in range(40)])
    decoded: list[int] = []

    class Counting(DirBlock):
        def _decode(self, i: int) -> DirEntry:
            decoded.append(i)
            return super()._decode(i)

    lazy = Counting(raw)
    first = [lazy[i] for i in range(len(lazy))]
    assert [lazy[i] for i in range(len(lazy))] == first == parse_dir_block(raw)
    assert sorted(decoded) == list(range(40))


def names_of(alphabet: bytes, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


NAMES = st.lists(names_of(b".whab", 1, 6), min_size=1, max_size=60, unique=True).map(sorted)


@given(NAMES, st.lists(st.integers(1, 9), min_size=1, max_size=60),
       names_of(b".whabc", 0, 7))
def test_first_not_below_is_the_first_name_not_sorting_before_the_key(
        names: list[bytes], sizes: list[int], key: bytes) -> None:
    entries = [DirEntry(name, i, 1) for i, name in enumerate(names)]
    blocks: list[list[DirEntry]] = []
    start = 0
    for size in sizes * len(entries):  # cut the sorted names into blocks of these sizes
        if start >= len(entries):
            break
        blocks.append(entries[start:start + size])
        start += size
    at = bisect.bisect_left(names, key)
    expected = entries[at] if at < len(entries) else None
    assert first_not_below(len(blocks), lambda i: blocks[i], key) == expected
