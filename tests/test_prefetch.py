"""Prefetch: what the kernel is asked to read from a layer file before we read it.

``Image.prefetch_inodes`` hints the blocks of many inodes to the blob (``Blob.prefetch``, a
page-cache hint for files) in coalesced ranges, before they are parsed one by one, so that cold
blocks are read in parallel instead of one disk round trip each. ``Image.prefetch_data`` hints
where a range of a file's bytes is stored (blocks, chunks on extra devices, compressed
pclusters), as the FUSE operations do when a file is looked up or first read. These tests watch
the hints a real layer file gets (read-around windows off, so that only these hints show).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.errors import CorruptImageError
from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse.overlay import MergedTree
from helpers import WatchedBlob, corpus, mkfs_erofs

FILES = 300


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


def _nids_in_d(image: Image) -> list[int]:
    """The nids of directory ``d``'s entries (the layers' ``FILES`` files)."""
    d_entry = image.root.lookup(b"d")
    assert d_entry is not None
    return [e.nid for e in image.inode(d_entry.nid).readdir()]


def test_a_metadata_block_is_read_before_its_window_is_hinted(layers: list[str]) -> None:
    # hinted first, the block would be read as part of the whole window and wait for all of it
    blob = WatchedBlob(layers[0])
    image = Image(blob)
    try:
        far = max(_nids_in_d(image))  # in a window not read
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


def test_each_read_around_window_is_asked_for_once(layers: list[str]) -> None:
    # reads moving back and forth between windows (python's imports) asked again for a window
    # each time they came back to it: only the last window was remembered
    blob = WatchedBlob(layers[0])
    image = Image(blob)
    try:
        nids = sorted(_nids_in_d(image))
        alternating = [n for pair in zip(nids, reversed(nids)) for n in pair]
        for nid in alternating:
            image.inode(nid)
        hints = blob.hints()
        windows = {offset for offset, _ in hints}
        assert len(windows) >= 2, "the inodes lie in one window: nothing to come back to"
        assert len(hints) == len(windows), sorted(hints)
    finally:
        image.close()


# file data ----------------------------------------------------------------------------------

def _covered(hints: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(start <= offset and offset + length <= start + count for start, count in hints)


# one image per way of storing bytes: blocks (with and without inline tails, 512-byte blocks),
# chunks, and compressed pclusters of each codec (big ones too)
DATA_LAYOUTS = ["plain.erofs", "noinline.erofs", "b512.erofs", "chunked.erofs", "lz4hc.erofs",
                "lz4-bigpcluster.erofs", "deflate.erofs", "zstd.erofs", "lzma.erofs"]


@pytest.mark.parametrize("name", DATA_LAYOUTS)
@pytest.mark.parametrize("offset", [0, 5000])
def test_the_bytes_a_read_takes_from_the_layer_were_hinted_first(name: str, offset: int) -> None:
    blob = WatchedBlob(corpus(name))
    image = Image(blob, readaround_bytes=0)
    try:
        files = [inode for _, inode in image.walk() if inode.is_reg and inode.size > offset]
        data_reads = 0
        for inode in files:
            blob.events.clear()
            image.prefetch_data(inode, offset, 16 << 10)
            hints, mark = blob.hints(), len(blob.events)
            assert all(0 <= start and start + count <= blob.size for start, count in hints)
            inode.read(offset, 16 << 10)
            # what the read took from the blob after the hint: file bytes only (the mapping
            # read its metadata while hinting), each of them hinted
            for kind, start, count in blob.events[mark:]:
                assert kind == "read"
                assert _covered(hints, start, count), (inode, start, count, hints)
                data_reads += 1
        assert data_reads >= 5  # most files are inline: these had blocks or pclusters
    finally:
        image.close()


def test_a_files_blocks_are_hinted_as_one_range_from_where_the_read_starts() -> None:
    blob = WatchedBlob(corpus("noinline.erofs"))
    image = Image(blob, readaround_bytes=0)
    try:
        inode = image.lookup("big/mixed.bin")
        start = inode.info.startblk * image.superblock.block_size
        blob.events.clear()
        image.prefetch_data(inode, 0, 1 << 20)  # more than the file: cut at its end
        image.prefetch_data(inode, 4096, 8192)
        image.prefetch_data(inode, inode.size, 4096)  # at the end: nothing
        assert blob.hints() == [(start, inode.size), (start + 4096, 8192)]
        assert not any(kind == "read" for kind, _, _ in blob.events)  # flat: nothing to map
    finally:
        image.close()


def test_chunks_on_an_extra_device_are_hinted_to_that_device() -> None:
    primary, device = WatchedBlob(corpus("blobdev.erofs")), WatchedBlob(corpus("blobdev.blob"))
    image = Image(primary, [device], readaround_bytes=0)
    try:
        inode = image.lookup("big/mixed.bin")
        primary.events.clear()
        image.prefetch_data(inode, 0, 32768)
        assert primary.hints() == []
        hints = device.hints()
        assert hints and sum(count for _, count in hints) >= 32768
        mark = len(device.events)
        assert inode.read(0, 32768)
        assert all(_covered(hints, start, count) for _, start, count in device.events[mark:])
    finally:
        image.close()


def test_a_hint_maps_a_bounded_number_of_extents(monkeypatch: pytest.MonkeyPatch) -> None:
    import erofs_fuse.erofs.image as image_module

    monkeypatch.setattr(image_module, "PREFETCH_MAX_EXTENTS", 2)
    blob = WatchedBlob(corpus("lz4hc.erofs"))
    image = Image(blob, readaround_bytes=0)
    try:
        inode = image.lookup("big/mixed.bin")
        extents = list(image._mapper(inode).extents(0, inode.size))
        assert len(extents) > 2
        blob.events.clear()
        image.prefetch_data(inode, 0, inode.size)
        allowed = {pa for e in extents[:2] for pa in range(e.pa, e.pa + e.plen)}
        hinted = {pa for start, count in blob.hints() for pa in range(start, start + count)}
        assert hinted and hinted <= allowed
    finally:
        image.close()


def test_a_hint_for_bytes_past_the_layers_end_is_not_sent(tmp_path: Path) -> None:
    # the image cut where its last file's blocks begin: that file fails to read, and its hint
    # neither raises nor asks for what is not there
    with Image.open(corpus("noinline.erofs")) as whole:
        path, last = max(((p, i) for p, i in whole.walk() if i.is_reg and i.size),
                         key=lambda found: found[1].info.startblk)
        end = last.info.startblk * whole.superblock.block_size
    cut = tmp_path / "cut.erofs"
    cut.write_bytes(Path(corpus("noinline.erofs")).read_bytes()[:end])
    blob = WatchedBlob(str(cut))
    image = Image(blob, readaround_bytes=0)
    try:
        inode = image.lookup(path)
        blob.events.clear()
        image.prefetch_data(inode, 0, inode.size)
        assert blob.hints() == []
        with pytest.raises(CorruptImageError):
            inode.read(0, 4096)
    finally:
        image.close()
