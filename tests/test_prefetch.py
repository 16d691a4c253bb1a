"""Metadata prefetch: the inodes of a listed directory are asked for at once.

``Image.prefetch_inodes`` hints the blocks of many inodes to the blob (``Blob.prefetch``, a
page-cache hint for files) in coalesced ranges, before they are parsed one by one, so that cold
blocks are read in parallel instead of one disk round trip each. These tests watch the hints a
real layer file gets (read-around windows off, so that only these hints show).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from erofs_fuse.blob import FileBlob
from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse.overlay import MergedTree
from helpers import mkfs_erofs

FILES = 300


class WatchedBlob(FileBlob):
    """A layer file that notes each read and each prefetch hint, in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.events: list[tuple[str, int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.events.append(("read", offset, length))
        return super().read(offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        self.events.append(("prefetch", offset, length))
        super().prefetch(offset, length)


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two layers sharing directory ``d``: ``FILES`` files with data in each (so that their
    inodes fill several blocks), the upper one adding its own."""
    out = []
    for k in range(2):
        src = tmp_path_factory.mktemp(f"layer{k}")
        (src / "d").mkdir()
        for i in range(FILES):
            (src / "d" / f"f{k}-{i:03d}").write_bytes(bytes([i % 251]) * (5000 + i))
        image = str(src.parent / f"layer{k}.erofs")
        mkfs_erofs(str(src), image)
        out.append(image)
    return out


def _inode_blocks(image: Image, nids: list[int]) -> set[int]:
    return {(image.superblock.meta_base + (nid << d.ISLOTBITS)) >> 12 for nid in nids}


def _hinted_before_read(events: list[tuple[str, int, int]], blocks: set[int]) -> None:
    """Every block of ``blocks`` read from the blob was hinted before that read."""
    hinted: set[int] = set()
    read = 0
    for kind, offset, length in events:
        span = set(range(offset >> 12, (offset + length - 1 >> 12) + 1))
        if kind == "prefetch":
            hinted |= span
        elif span & blocks:
            read += 1
            assert span & blocks <= hinted, f"inode block read before it was hinted: {offset}"
    assert read, "the listing read no inode block: nothing was cold"


@pytest.mark.parametrize("merged", [False, True], ids=["one layer", "two layers"])
def test_listing_a_directory_hints_its_entries_inodes_first(layers: list[str],
                                                             merged: bool) -> None:
    blobs = [WatchedBlob(path) for path in (layers if merged else layers[:1])]
    images = [Image(blob, readaround_bytes=0) for blob in blobs]
    try:
        tree = MergedTree(images)
        node = tree.lookup(tree.root, b"d")
        assert node is not None and len(node.dirs) == len(images)
        for blob in blobs:
            blob.events.clear()
        listing = tree.listdir(node).entries
        assert len(listing) == FILES * len(images)
        for k, (image, blob) in enumerate(zip(images, blobs)):
            nids = [child.inode.nid for _, child in listing if child.layer == k]
            blocks = _inode_blocks(image, nids)
            assert len(blocks) > 1
            _hinted_before_read(blob.events, blocks)
            hints = [e for e in blob.events if e[0] == "prefetch"]
            assert len(hints) < len(blocks)  # neighbouring blocks asked for as one range
    finally:
        for image in images:
            image.close()


def test_cached_inodes_are_not_hinted_again(layers: list[str]) -> None:
    blob = WatchedBlob(layers[0])
    image = Image(blob, readaround_bytes=0)
    try:
        d_entry = image.root.lookup(b"d")
        assert d_entry is not None
        nids = [e.nid for e in image.inode(d_entry.nid).readdir()]
        image.prefetch_inodes(nids)
        assert any(kind == "prefetch" for kind, _, _ in blob.events)
        for nid in nids:
            image.inode(nid)
        blob.events.clear()
        image.prefetch_inodes(nids)
        assert blob.events == []
    finally:
        image.close()


def test_a_metadata_block_is_read_before_its_window_is_hinted(layers: list[str]) -> None:
    # hinted first, the block would be read as part of the whole window and wait for all of it
    blob = WatchedBlob(layers[0])
    image = Image(blob)
    try:
        d_entry = image.root.lookup(b"d")
        assert d_entry is not None
        far = max(e.nid for e in image.inode(d_entry.nid).readdir())  # in a window not read
        blob.events.clear()
        image.inode(far)
        kinds = [kind for kind, _, _ in blob.events]
        assert kinds and kinds[0] == "read", blob.events
        window = 256 << 10
        for k, (kind, offset, length) in enumerate(blob.events):
            if kind == "prefetch":
                assert length == window and offset % window == 0
                before = blob.events[k - 1]
                assert before[0] == "read" and offset <= before[1] < offset + window
    finally:
        image.close()
