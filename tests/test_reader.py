"""The read loop's short path for uncompressed flat files (``DataReader._read_flat``).

A FLAT_PLAIN or FLAT_INLINE file is read without making its extents: its run of blocks, then
its inline tail. Whatever range is asked for, the bytes (and the errors) must be those the
extent loop gives, which is what every other layout goes through and what the kernel mount
tests check against the kernel.
"""

from __future__ import annotations

from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.errors import CorruptImageError
from erofs_fuse.erofs.extent import Extent, FlatMapper
from erofs_fuse.erofs.image import Image
from helpers import corpus

# blocks of 4 KiB with inline tails, without (FLAT_PLAIN only), 512-byte blocks, 48-bit addresses
IMAGES = ["plain.erofs", "noinline.erofs", "b512.erofs", "plain-48bit.erofs"]
SIZES = ["0", "1", "4095", "4096", "4097", "8191", "65543"]


class ExtentLoopOnly:
    """The same mapper, not of type FlatMapper: the read goes through the extent loop."""

    def __init__(self, inner: FlatMapper) -> None:
        self._inner = inner

    def map(self, pos: int) -> Extent:
        return self._inner.map(pos)

    def extents(self, pos: int, end: int) -> Iterator[Extent]:
        return self._inner.extents(pos, end)


def both_ways(image: Image, path: str, offset: int, length: int) -> tuple[bytes, bytes]:
    """(short path, extent loop) bytes of ``[offset, offset + length)`` of file ``path``."""
    node = image.lookup(path)
    mapper = image._mapper(node)
    assert type(mapper) is FlatMapper
    reader = image._reader
    short = reader.read(mapper, node.size, node.space, offset, length)
    loop = reader.read(ExtentLoopOnly(mapper), node.size, node.space, offset, length)
    return short, loop


@pytest.mark.parametrize("name", IMAGES)
def test_flat_files_read_alike_both_ways_at_every_boundary(name: str) -> None:
    with Image.open(corpus(name)) as image:
        layouts = set()
        for kind in ("rand", "text"):
            for size in SIZES:
                path = f"/sizes/{kind}-{size}"
                layouts.add(image.lookup(path).info.layout)
                n = int(size)
                edges = sorted({0, 1, 511, 512, 4095, 4096, 4097, n - 1, n, n + 1} - {-1})
                for offset in edges:
                    for length in (1, 511, 4096, 4097, 1 << 20):
                        short, loop = both_ways(image, path, offset, length)
                        assert short == loop, (path, offset, length)
                        assert len(short) == max(0, min(n, offset + length) - offset)
        assert layouts <= {d.LAYOUT_FLAT_PLAIN, d.LAYOUT_FLAT_INLINE}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(IMAGES), st.sampled_from(SIZES), st.integers(0, 70_000),
       st.integers(0, 70_000))
def test_any_range_reads_alike_both_ways(name: str, size: str, offset: int, length: int) -> None:
    with Image.open(corpus(name)) as image:
        short, loop = both_ways(image, f"/sizes/rand-{size}", offset, length)
        assert short == loop


def test_blocks_past_the_image_fail_both_ways() -> None:
    # a hostile inode whose blocks lie past the end of the image: the same error both ways
    # (never zeros, never a short read)
    with Image.open(corpus("noinline.erofs")) as image:
        node = image.lookup("/sizes/rand-65543")
        mapper = FlatMapper(image.superblock, node.info._replace(startblk=(1 << 32) - 2),
                            node.space)
        for m in (mapper, ExtentLoopOnly(mapper)):
            with pytest.raises(CorruptImageError):
                image._reader.read(m, node.size, node.space, 0, 4096)
