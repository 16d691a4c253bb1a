"""Uncompressed layouts: flat, inline tail, chunk-based (block map and indexes), holes."""

from __future__ import annotations

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.extent import Source
from erofs_fuse.erofs.image import Image
from helpers import corpus


def extents(image: Image, path: str) -> list[tuple[int, int, Source]]:
    node = image.lookup(path)
    mapper = image._mapper(node)
    out = []
    pos = 0
    while pos < node.size:
        ext = mapper.map(pos)
        assert ext.la <= pos < ext.end
        out.append((ext.la, ext.llen, ext.source))
        pos = ext.end
    return out


def test_flat_inline_has_blocks_then_a_tail() -> None:
    with Image.open(corpus("plain.erofs")) as image:
        assert image.lookup("/sizes/text-4097").info.layout == d.LAYOUT_FLAT_INLINE
        assert extents(image, "/sizes/text-4097") == [(0, 4096, Source.DEVICE), (4096, 1, Source.META)]
        assert extents(image, "/sizes/text-1") == [(0, 1, Source.META)]


def test_flat_plain_is_one_extent() -> None:
    with Image.open(corpus("noinline.erofs")) as image:
        node = image.lookup("/sizes/rand-65543")
        assert node.info.layout == d.LAYOUT_FLAT_PLAIN
        assert extents(image, "/sizes/rand-65543") == [(0, 65543, Source.DEVICE)]


def test_chunks_and_holes() -> None:
    with Image.open(corpus("chunked.erofs")) as image:
        node = image.lookup("/big/zeros-with-tail.bin")
        assert node.info.layout == d.LAYOUT_CHUNK_BASED
        kinds = {src for _, _, src in extents(image, "/big/zeros-with-tail.bin")}
        assert Source.HOLE in kinds and Source.DEVICE in kinds
        data = node.read(0, node.size)
        assert data[:4096] == bytes(4096) and data[-4:] != bytes(4)


def test_blob_device_chunks_carry_the_device_id() -> None:
    with Image.open(corpus("blobdev.erofs"), devices=[corpus("blobdev.blob")]) as image:
        node = image.lookup("/big/mixed.bin")
        ext = image._mapper(node).map(0)
        assert ext.source == Source.DEVICE and ext.device == 1
