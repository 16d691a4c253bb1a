"""Compressed files (spec §4.6): every compressed fixture, real mkfs.erofs trees, hand-made indexes
and extent records, the extent contract the reader relies on, and bit-flipped images."""

from __future__ import annotations

import dataclasses
import lzma
import os
import random
import signal
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs import reader as reader_mod
from erofs_fuse.erofs.errors import CorruptImageError, ErofsError, UnsupportedFeatureError
from erofs_fuse.erofs.extent import Codec, Extent, Mapper, Source
from erofs_fuse.erofs.image import Image, Inode
from erofs_fuse.erofs.inode import InodeInfo
from erofs_fuse.erofs.superblock import SuperBlock
from erofs_fuse.erofs.zindex import CompactIndex, IndexWindows
from erofs_fuse.erofs.zmap import compressed_mapper
from helpers import (CORPUS, EXPECTED, corpus, mkfs_erofs, on_python_sources, read_through,
                     require_tool, reseal)
from treeview import TreeView, parse_manifest, view_of_dir, view_of_image

BS = 4096

# fixtures -------------------------------------------------------------------------------------
TREE_IMAGES = ["lz4", "lz4hc", "lzma", "lzma-mixed", "deflate", "zstd", "zstd-extents",
               "lz4-legacy", "lz4-bigpcluster", "lz4-ztailpacking", "lz4-fragments",
               "lz4-allfragments", "lz4-dedupe", "metabox", "b1024-lz4"]
OLD_IMAGES = ["old-lz4hc", "old-ztail"]
LAYER_TWINS = [("layer-lower-aufs-lz4", "layer-lower-aufs"),
               ("layer-upper-aufs-lz4", "layer-upper-aufs")]


def made_with_t0(name: str) -> bool:
    """Whether MANIFEST.tsv says the image was built with fixed timestamps (-T0)."""
    for line in (CORPUS / "MANIFEST.tsv").read_text().splitlines():
        image, _, command = line.partition("\t")
        if image == f"{name}.erofs":
            return "-T0" in command.split()
    raise AssertionError(f"{name}.erofs is not in MANIFEST.tsv")


def without_mtime(view: TreeView) -> TreeView:
    out = TreeView(hardlinks=set(view.hardlinks))
    for path, line in view.entries.items():
        out.entries[path] = "\t".join(c for c in line.split("\t") if not c.startswith("mtime="))
    return out


def expected_view(manifest: str, with_mtime: bool) -> TreeView:
    view = parse_manifest(str(EXPECTED / manifest))
    return view if with_mtime else without_mtime(view)


@pytest.mark.parametrize("name", TREE_IMAGES + OLD_IMAGES)
def test_fixture_reads_as_its_source_tree(name: str) -> None:
    manifest = "old-plain.manifest" if name.startswith("old-") else "plain.manifest"
    with_mtime = made_with_t0(name)
    with Image.open(corpus(f"{name}.erofs")) as image:
        assert any(node.info.is_compressed for _, node in image.walk()), "nothing compressed?"
        got = view_of_image(image, with_mtime=with_mtime)
    assert expected_view(manifest, with_mtime).diff(got) == []


@pytest.mark.parametrize("name, twin", LAYER_TWINS)
def test_compressed_layer_reads_as_its_plain_twin(name: str, twin: str) -> None:
    with_mtime = made_with_t0(name) and made_with_t0(twin)
    with Image.open(corpus(f"{name}.erofs")) as image:
        got = view_of_image(image, with_mtime=with_mtime)
    with Image.open(corpus(f"{twin}.erofs")) as image:
        want = view_of_image(image, with_mtime=with_mtime)
    assert want.diff(got) == []


def compressed_inodes(image: Image) -> Iterator[Inode]:
    for _, node in image.walk():
        if node.info.is_compressed and node.size:
            yield node


def extents_of(mapper: Mapper, size: int) -> list[Extent]:
    out, pos = [], 0
    while pos < size:
        ext = mapper.map(pos)
        assert ext.la <= pos < ext.end
        out.append(ext)
        pos = ext.end
    return out


@pytest.mark.parametrize("name", TREE_IMAGES + OLD_IMAGES)
def test_extents_are_whole_and_stable(name: str) -> None:
    """map(pos) returns the same whole extent for every position inside it (what the cache of
    decoded extents is keyed on), and extents tile the file."""
    rnd = random.Random(name)
    with Image.open(corpus(f"{name}.erofs")) as image:
        for node in compressed_inodes(image):
            mapper = image._mapper(node)
            exts = extents_of(mapper, node.size)
            assert exts[0].la == 0 and exts[-1].end == node.size
            for a, b in zip(exts, exts[1:]):
                assert a.end == b.la
            # a fresh mapper, probed in random order, must agree
            fresh = compressed_mapper(image.superblock, node.info, node.space)
            for ext in rnd.sample(exts, min(len(exts), 20)):
                for pos in {ext.la, ext.end - 1, (ext.la + ext.end) // 2}:
                    assert fresh.map(pos) == ext
                if ext.source == Source.DEVICE and ext.codec not in (Codec.RAW,
                                                                     Codec.INTERLACED):
                    assert ext.plen <= d.Z_PCLUSTER_MAX_SIZE
                    assert ext.llen <= d.Z_PCLUSTER_MAX_DSIZE


def walk_by_map(mapper: Mapper, start: int, end: int) -> list[Extent | str]:
    """What the read loop got by calling ``map`` at ``start`` and then at each extent's end,
    with the error that stopped it, if any."""
    out: list[Extent | str] = []
    pos = start
    try:
        while pos < end:
            ext = mapper.map(pos)
            out.append(ext)
            assert ext.end > pos and len(out) < 100_000
            pos = ext.end
    except ErofsError as exc:
        out.append(f"{type(exc).__name__}: {exc}")
    return out


def walk_by_extents(mapper: Mapper, start: int, end: int) -> list[Extent | str]:
    out: list[Extent | str] = []
    try:
        for ext in mapper.extents(start, end):
            out.append(ext)
            assert len(out) < 100_000
    except ErofsError as exc:
        out.append(f"{type(exc).__name__}: {exc}")
    return out


@pytest.mark.parametrize("name", TREE_IMAGES + OLD_IMAGES)
def test_extents_walk_as_map_does(name: str) -> None:
    """``extents(start, end)`` yields what ``map`` gives at ``start`` and at each extent's end,
    for reads starting and ending anywhere (fresh mappers: ``map`` remembers its last extent)."""
    rnd = random.Random(name)
    with Image.open(corpus(f"{name}.erofs")) as image:
        for node in compressed_inodes(image):
            ranges = [(0, node.size)] + [tuple(sorted(rnd.sample(range(node.size + 1), 2)))
                                         for _ in range(3) if node.size > 1]
            for start, end in ranges:
                def fresh() -> Mapper:
                    return compressed_mapper(image.superblock, node.info, node.space)
                assert walk_by_extents(fresh(), start, end) == walk_by_map(fresh(), start, end)


@on_python_sources
def test_sequential_reads_decode_each_extent_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    real = reader_mod.decompress  # type: ignore[attr-defined]

    def counting(codec: int, src: bytes, llen: int, partial: bool, config: Any) -> bytes:
        calls.append((codec, len(src), llen))
        return real(codec, src, llen, partial, config)

    monkeypatch.setattr(reader_mod, "decompress", counting)
    with Image.open(corpus("lz4hc.erofs")) as image:
        keys = set()
        for node in compressed_inodes(image):
            for ext in extents_of(image._mapper(node), node.size):
                if ext.source != Source.HOLE and ext.codec not in (Codec.RAW, Codec.INTERLACED):
                    keys.add((ext.source, ext.pa, ext.plen, ext.codec, ext.llen))
            for pos in range(0, node.size, 4096):
                node.read(pos, 4096)
    assert keys and len(calls) == len(keys)


def test_image_without_zero_padding_decodes_partially() -> None:
    """Pre-1.0 images keep LZ4 streams at the start of their pcluster, with junk after it: such
    extents are decoded with "stop after llen bytes" semantics (§5.1)."""
    data = bytearray(Path(corpus("lz4-legacy.erofs")).read_bytes())
    (incompat,) = struct.unpack_from("<I", data, 1024 + 0x50)
    struct.pack_into("<I", data, 1024 + 0x50, incompat & ~d.INCOMPAT_ZERO_PADDING)
    with tempfile.NamedTemporaryFile(suffix=".erofs") as f:
        f.write(reseal(data))
        f.flush()
        with Image.open(f.name) as image:
            assert not image.superblock.has_incompat(d.INCOMPAT_ZERO_PADDING)
            lz4_extents = [ext for node in compressed_inodes(image)
                           for ext in extents_of(image._mapper(node), node.size)
                           if ext.codec == Codec.LZ4]
            assert lz4_extents and all(ext.partial for ext in lz4_extents)
            got = view_of_image(image, with_mtime=False)
    assert expected_view("plain.manifest", False).diff(got) == []


# hand-made indexes ----------------------------------------------------------------------------
class BytesSpace:
    """A byte space held in memory (stands for the image or the metabox stream)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > len(self._data):
            raise CorruptImageError(f"read {offset}+{length} past the end")
        return self._data[offset:offset + length]


@pytest.fixture(scope="module")
def base_sb() -> SuperBlock:
    """A real superblock with 4 KiB blocks, zero padding and big pclusters (COMPR_CFGS)."""
    with Image.open(corpus("lz4-bigpcluster.erofs")) as image:
        sb = image.superblock
    assert sb.blkszbits == 12 and sb.has_incompat(d.INCOMPAT_COMPR_CFGS)
    return sb


def sb_with(sb: SuperBlock, *, algs: tuple[int, ...] = (0,), clear: int = 0,
            packed: int | None = None) -> SuperBlock:
    raw = sb.raw._replace(feature_incompat=sb.raw.feature_incompat & ~clear)
    return dataclasses.replace(sb, raw=raw, available_algorithms=frozenset(algs),
                               packed_nid=packed)


def fake_inode(layout: int, size: int, after_inode: bytes) -> tuple[InodeInfo, BytesSpace]:
    """A compact inode at byte 0 without xattrs: its map header sits at byte 32."""
    info = InodeInfo(nid=0, pos=0, in_metabox=False, extended=False, layout=layout,
                     format_bit4=False, xattr_icount=0, mode=stat.S_IFREG | 0o644, size=size,
                     uid=0, gid=0, mtime=0, mtime_nsec=0, nlink=1, ino32=0, i_u=0, startblk=0,
                     addr_mask=d.NULL_ADDR_32, blocks=0)
    return info, BytesSpace(bytes(32) + after_inode + bytes(BS))


def header(*, advise: int = 0, algs: int = 0, clusterbits: int = 0, word0: int = 0) -> bytes:
    return struct.pack("<IHBB", word0, advise, algs, clusterbits)


def head(kind: int, clusterofs: int, blkaddr: int, partial: bool = False) -> bytes:
    return struct.pack("<HHI", kind | (d.Z_LI_PARTIAL_REF if partial else 0), clusterofs, blkaddr)


def nonhead(delta0: int, delta1: int) -> bytes:
    return struct.pack("<HHHH", d.Z_LCLUSTER_TYPE_NONHEAD, 0, delta0, delta1)


H1, H2, PLAIN = d.Z_LCLUSTER_TYPE_HEAD1, d.Z_LCLUSTER_TYPE_HEAD2, d.Z_LCLUSTER_TYPE_PLAIN


def full_mapper(sb: SuperBlock, size: int, entries: list[bytes], **hdr: int) -> Mapper:
    body = header(**hdr) + bytes(8) + b"".join(entries)
    info, space = fake_inode(d.LAYOUT_COMPRESSED_FULL, size, body)
    return compressed_mapper(sb, info, space)


def test_full_index_extents(base_sb: SuperBlock) -> None:
    size = 3 * BS + 100
    mapper = full_mapper(base_sb, size, [head(H1, 0, 100), nonhead(1, 1), head(H1, 200, 101),
                                         nonhead(1, 0)])  # delta1 0: pre-1.0 mkfs, means 1
    first = Extent(0, 2 * BS + 200, Source.DEVICE, pa=100 * BS, plen=BS, codec=Codec.LZ4)
    second = Extent(2 * BS + 200, size - 2 * BS - 200, Source.DEVICE, pa=101 * BS, plen=BS,
                    codec=Codec.LZ4)
    for pos in (0, BS, 2 * BS, 2 * BS + 199):
        assert mapper.map(pos) == first
    for pos in (2 * BS + 200, 3 * BS, size - 1):
        assert mapper.map(pos) == second


def test_full_index_partial_ref_plain_and_head2(base_sb: SuperBlock) -> None:
    sb = sb_with(base_sb, algs=(0, 1))
    mapper = full_mapper(sb, 3 * BS, [head(H1, 0, 7, partial=True), head(PLAIN, 0, 8),
                                      head(H2, 0, 9)], algs=0x10)
    assert mapper.map(0) == Extent(0, BS, Source.DEVICE, pa=7 * BS, plen=BS, codec=Codec.LZ4,
                                   partial=True)
    assert mapper.map(BS).codec == Codec.RAW and mapper.map(BS).pa == 8 * BS
    assert mapper.map(2 * BS).codec == Codec.LZMA


def test_big_pcluster_block_count(base_sb: SuperBlock) -> None:
    cblk = d.Z_LI_D0_CBLKCNT | 3
    mapper = full_mapper(base_sb, 5 * BS, [head(H1, 0, 50), nonhead(cblk, 2), nonhead(2, 1),
                                           head(H1, 0, 53), nonhead(1, 1)],
                         advise=d.Z_ADVISE_BIG_PCLUSTER_1 | d.Z_ADVISE_BIG_PCLUSTER_2)
    assert mapper.map(2 * BS + 5) == Extent(0, 3 * BS, Source.DEVICE, pa=50 * BS, plen=3 * BS,
                                            codec=Codec.LZ4)
    assert mapper.map(4 * BS).plen == BS  # no CBLKCNT after the head: one block


@pytest.mark.parametrize("entries, pos", [
    ([head(H1, 0, 1), nonhead(0, 1)], BS),  # delta0 0
    ([nonhead(1, 1), nonhead(1, 1)], BS),  # lookback below lcluster 0
    ([head(H1, 10, 1), nonhead(1, 1)], 5),  # before the first head
    ([head(H1, 0, 1), nonhead(5, 1)], BS),  # lookback past the start
])
def test_bogus_lookback_is_corrupt(base_sb: SuperBlock, entries: list[bytes], pos: int) -> None:
    with pytest.raises(CorruptImageError):
        full_mapper(base_sb, 2 * BS, entries).map(pos)


def test_clusterofs_outside_lcluster_is_corrupt(base_sb: SuperBlock) -> None:
    with pytest.raises(CorruptImageError):
        full_mapper(base_sb, 2 * BS, [head(H1, 0, 1), head(H1, BS, 2)]).map(BS)


def test_cblkcnt_without_big_pcluster_is_corrupt(base_sb: SuperBlock) -> None:
    with pytest.raises(CorruptImageError):
        full_mapper(base_sb, 2 * BS, [head(H1, 0, 1), nonhead(d.Z_LI_D0_CBLKCNT | 2, 1)]).map(BS)


def test_unknown_algorithm_nibble_is_unsupported(base_sb: SuperBlock) -> None:
    with pytest.raises(UnsupportedFeatureError):
        full_mapper(base_sb, BS, [head(H1, 0, 1)], algs=0x05)


def test_undeclared_algorithm_is_corrupt(base_sb: SuperBlock) -> None:
    with pytest.raises(CorruptImageError):
        full_mapper(base_sb, BS, [head(H1, 0, 1)], algs=0x03).map(0)


def test_big_pcluster_advice_needs_the_feature(base_sb: SuperBlock) -> None:
    sb = sb_with(base_sb, clear=d.INCOMPAT_COMPR_CFGS)
    with pytest.raises(CorruptImageError):
        full_mapper(sb, BS, [head(H1, 0, 1)], advise=d.Z_ADVISE_BIG_PCLUSTER_1)


def test_compact_inconsistent_big_pcluster_is_corrupt(base_sb: SuperBlock) -> None:
    info, space = fake_inode(d.LAYOUT_COMPRESSED_COMPACT, BS,
                             header(advise=d.Z_ADVISE_BIG_PCLUSTER_1) + bytes(64))
    with pytest.raises(CorruptImageError):
        compressed_mapper(base_sb, info, space)


def test_compact_2b_with_large_lclusters_is_unsupported(base_sb: SuperBlock) -> None:
    info, space = fake_inode(d.LAYOUT_COMPRESSED_COMPACT, 64 * BS,
                             header(advise=d.Z_ADVISE_COMPACTED_2B, clusterbits=1) + bytes(512))
    with pytest.raises(UnsupportedFeatureError):
        compressed_mapper(base_sb, info, space)


def test_index_past_the_space_is_corrupt(base_sb: SuperBlock) -> None:
    info, _ = fake_inode(d.LAYOUT_COMPRESSED_FULL, 1 << 30, b"")
    with pytest.raises(CorruptImageError):
        compressed_mapper(base_sb, info, BytesSpace(bytes(32) + header() + bytes(64)))


def test_extent_over_12_mib_is_unsupported(base_sb: SuperBlock) -> None:
    n = (d.Z_PCLUSTER_MAX_DSIZE >> 12) + 10
    mapper = full_mapper(base_sb, n * BS, [head(H1, 0, 1)] + [nonhead(1, 1)] * (n - 1))
    with pytest.raises(UnsupportedFeatureError):
        mapper.map(0)


def test_inline_pcluster_crossing_a_block_is_corrupt(base_sb: SuperBlock) -> None:
    mapper_args = dict(advise=d.Z_ADVISE_INLINE_PCLUSTER, word0=(BS - 10) << 16)
    with pytest.raises(CorruptImageError):
        full_mapper(base_sb, 100, [head(H1, 0, 0)], **mapper_args)


def test_inline_pcluster_is_meta(base_sb: SuperBlock) -> None:
    mapper = full_mapper(base_sb, BS + 100, [head(H1, 0, 5), head(H1, 50, 0)],
                         advise=d.Z_ADVISE_INLINE_PCLUSTER, word0=30 << 16)
    inline_pos = 32 + 16 + 2 * 8  # right after the last index entry
    assert mapper.map(BS + 60) == Extent(BS + 50, 50, Source.META, pa=inline_pos, plen=30,
                                         codec=Codec.LZ4)
    assert mapper.map(0).source == Source.DEVICE


def test_tail_fragment_offset_is_64_bit_in_full_indexes(base_sb: SuperBlock) -> None:
    sb = sb_with(base_sb, packed=99)
    mapper = full_mapper(sb, BS + 100, [head(H1, 0, 5), head(H1, 50, 2)],
                         advise=d.Z_ADVISE_FRAGMENT_PCLUSTER, word0=1234)
    assert mapper.map(BS + 99) == Extent(BS + 50, 50, Source.PACKED, pa=(2 << 32) | 1234, plen=50)


def test_whole_file_fragment(base_sb: SuperBlock) -> None:
    word = (1 << 63) | 777
    body = struct.pack("<Q", word)
    info, space = fake_inode(d.LAYOUT_COMPRESSED_FULL, 5000, body)
    with pytest.raises(CorruptImageError):
        compressed_mapper(base_sb, info, space)  # no packed inode
    mapper = compressed_mapper(sb_with(base_sb, packed=99), info, space)
    assert mapper.map(4999) == Extent(0, 5000, Source.PACKED, pa=777, plen=5000)


def test_forward_walk_meets_a_corrupt_entry_as_map_does(base_sb: SuperBlock) -> None:
    """A bad entry in the middle of a file fails the read that reaches it, with the error a
    lookup there gives, and the extents before it are still read."""
    entries = [head(PLAIN, 0, 10), head(PLAIN, 0, 11), nonhead(1, 1), head(H1, BS, 12),
               head(PLAIN, 0, 13)]  # clusterofs BS: outside its lcluster
    mapper = full_mapper(base_sb, 5 * BS, entries)
    got = walk_by_extents(mapper, 0, 5 * BS)
    assert got[0] == Extent(0, BS, Source.DEVICE, pa=10 * BS, plen=BS, codec=Codec.RAW)
    assert len(got) == 2 and isinstance(got[1], str) and got[1].startswith("CorruptImageError")
    assert got == walk_by_map(full_mapper(base_sb, 5 * BS, entries), 0, 5 * BS)
    with pytest.raises(CorruptImageError):
        full_mapper(base_sb, 5 * BS, entries).map(3 * BS)


def test_forward_walk_follows_delta1_past_a_head(base_sb: SuperBlock) -> None:
    """A delta1 that jumps over a head (corrupt, but nothing to notice) gives the extent map
    gives: the walk does not second-guess the index where a lookup would not."""
    entries = [head(H1, 0, 10), nonhead(1, 2), head(H1, 0, 11), head(H1, 0, 12)]
    mapper = full_mapper(base_sb, 4 * BS, entries)
    want = walk_by_map(full_mapper(base_sb, 4 * BS, entries), 0, 4 * BS)
    assert want[0] == Extent(0, 3 * BS, Source.DEVICE, pa=10 * BS, plen=BS, codec=Codec.LZ4)
    assert walk_by_extents(mapper, 0, 4 * BS) == want


@st.composite
def lcluster_runs(draw: st.DrawFn, big: bool) -> list[tuple[int, int, int]]:
    """(type, clusterofs or delta0, delta1) per lcluster: extents of 1 to 5 lclusters as mkfs
    writes them (CBLKCNT after a big pcluster's head), some values garbled."""
    out: list[tuple[int, int, int]] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from([PLAIN, PLAIN, H1, H2]))
        out.append((kind, draw(st.sampled_from([0, 0, 0, 1, 100, BS - 1])) if out else 0, 0))
        n = draw(st.integers(0, 4))
        for k in range(1, n + 1):
            delta0 = d.Z_LI_D0_CBLKCNT | (n + 1) if big and k == 1 else k
            out.append((NONHEAD_T, delta0, n + 1 - k))
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(0, len(out) - 1))
        kind = draw(st.sampled_from([PLAIN, H1, NONHEAD_T]))
        out[k] = (kind, draw(st.integers(0, 5)) if kind == NONHEAD_T else draw(
            st.integers(0, BS)), draw(st.integers(0, 5)))
    return out


def full_entries(runs: list[tuple[int, int, int]]) -> list[bytes]:
    return [nonhead(a, b) if kind == NONHEAD_T else head(kind, a, 10 + k)
            for k, (kind, a, b) in enumerate(runs)]


def compact_index(runs: list[tuple[int, int, int]], ebase: int) -> bytes:
    """``runs`` as COMPACTED_2B packs for 4 KiB lclusters (§4.6.4), each pack based at block
    10 times its number; a pack's last NONHEAD stores its delta1, as mkfs does."""
    init4 = ((32 - ebase % 32) // 4) & 7
    n2 = (len(runs) - init4) // 16 * 16 if init4 < len(runs) else 0
    groups = [(runs[:init4], 2), (runs[init4:init4 + n2], 16), (runs[init4 + n2:], 2)]
    out = b""
    for part, vcnt in groups:
        part = part + [(NONHEAD_T, 1, 1)] * (-len(part) % vcnt)
        for p in range(0, len(part), vcnt):
            bits = 0
            for j, (kind, a, b) in enumerate(part[p:p + vcnt]):
                lo = b if kind == NONHEAD_T and j == vcnt - 1 else a
                bits |= ((lo & 0xFFF) | kind << 12) << ((16 if vcnt == 2 else 14) * j)
            body = bits.to_bytes(4 if vcnt == 2 else 28, "little")
            out += body + struct.pack("<I", 10 * (len(out) // 8 + 1))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), big=st.booleans(), cut=st.integers(0, BS - 1),
       starts=st.lists(st.integers(0, 1 << 20), min_size=1, max_size=3))
def test_forward_walk_equals_lookups_on_any_full_index(base_sb: SuperBlock, data: st.DataObject,
                                                       big: bool, cut: int,
                                                       starts: list[int]) -> None:
    runs = data.draw(lcluster_runs(big))
    entries, size = full_entries(runs), max(len(runs) * BS - cut, 1)
    advise = d.Z_ADVISE_BIG_PCLUSTER_1 | d.Z_ADVISE_BIG_PCLUSTER_2 if big else 0
    try:
        full_mapper(base_sb, size, entries, advise=advise)
    except ErofsError:
        return
    for start in starts:
        start %= size
        got = walk_by_extents(full_mapper(base_sb, size, entries, advise=advise), start, size)
        assert got == walk_by_map(full_mapper(base_sb, size, entries, advise=advise), start, size)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), big=st.booleans(), cut=st.integers(0, BS - 1),
       starts=st.lists(st.integers(0, 1 << 20), min_size=1, max_size=3))
def test_forward_walk_equals_lookups_on_any_compact_index(base_sb: SuperBlock,
                                                          data: st.DataObject, big: bool,
                                                          cut: int, starts: list[int]) -> None:
    runs = data.draw(lcluster_runs(big))
    advise = d.Z_ADVISE_COMPACTED_2B | (
        d.Z_ADVISE_BIG_PCLUSTER_1 | d.Z_ADVISE_BIG_PCLUSTER_2 if big else 0)
    size = max(len(runs) * BS - cut, 1)
    info, space = fake_inode(d.LAYOUT_COMPRESSED_COMPACT, size,
                             header(advise=advise) + compact_index(runs, 40))
    try:
        compressed_mapper(base_sb, info, space)
    except ErofsError:
        return
    for start in starts:
        start %= size
        got = walk_by_extents(compressed_mapper(base_sb, info, space), start, size)
        assert got == walk_by_map(compressed_mapper(base_sb, info, space), start, size)


# compact packs against a literal reading of spec §4.6.4 -----------------------------------------
def spec_compact_entry(data: bytes, ebase: int, totalidx: int, lcn: int, big: bool
                       ) -> tuple[int, ...] | str:
    """Entry ``lcn`` decoded step by step as §4.6.4 words it (12-bit lclusters, COMPACTED_2B)."""
    init4 = ((32 - ebase % 32) // 4) & 7
    n2 = (totalidx - init4) // 16 * 16 if init4 < totalidx else 0
    if lcn < init4:
        pos, unit = ebase + 4 * lcn, 4
    elif lcn - init4 < n2:
        pos, unit = ebase + 4 * init4 + 2 * (lcn - init4), 2
    else:
        pos, unit = ebase + 4 * init4 + 2 * n2 + 4 * (lcn - init4 - n2), 4
    vcnt = 2 if unit == 4 else 16
    packsize = vcnt * unit
    packstart = pos - pos % packsize
    pack = data[packstart:packstart + packsize]
    encbits = (packsize - 4) * 8 // vcnt

    def entry(j: int) -> tuple[int, int]:
        bit = encbits * j
        v = int.from_bytes(pack[bit // 8:bit // 8 + 4], "little") >> (bit % 8)
        return v & 0xFFF, (v >> 12) & 3

    i = (pos - packstart) // unit
    lo, kind = entry(i)
    if kind == NONHEAD_T:
        j, d1 = i, 0  # step 10: look-ahead
        while j < vcnt and entry(j)[1] == NONHEAD_T:
            d1, j = d1 + 1, j + 1
        if j == vcnt and not entry(vcnt - 1)[0] & 0x800:
            d1 += entry(vcnt - 1)[0] - 1
        if lo & 0x800:
            # (a count of 0 blocks reads as 1, as in the kernel)
            return "corrupt" if not big else (kind, 1, d1, max(lo & ~0x800, 1))
        if i != vcnt - 1:
            return (kind, lo, d1, 0)
        plo, pkind = entry(i - 1)
        delta0 = 1 if pkind != NONHEAD_T else 2 if plo & 0x800 else plo + 1
        return (kind, delta0, d1, 0)
    base = int.from_bytes(pack[-4:], "little")
    if not big:
        n = 1
        while i > 0:
            i -= 1
            elo, et = entry(i)
            if et == NONHEAD_T:
                i -= elo
            if i >= 0:
                n += 1
    else:
        n = 0
        while i > 0:
            i -= 1
            elo, et = entry(i)
            if et == NONHEAD_T:
                if elo & 0x800:
                    i -= 1
                    n += elo & ~0x800
                    continue
                if elo <= 1:
                    return "corrupt"
                i -= elo - 2
                continue
            n += 1
    return (kind, lo, base + n)


NONHEAD_T = d.Z_LCLUSTER_TYPE_NONHEAD


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(min_size=512, max_size=512), big=st.booleans(),
       totalidx=st.integers(1, 60), small=st.booleans())
def test_compact_packs_match_the_spec(raw: bytes, big: bool, totalidx: int, small: bool) -> None:
    if small:  # mostly small deltas and few CBLKCNTs, as real packs have
        raw = bytes(b & 0x83 if k % 2 else b for k, b in enumerate(raw))
    data = bytes(40) + raw
    windows = IndexWindows(BytesSpace(data), 1)
    index = CompactIndex(windows, 1, 32, 12, totalidx, True, big)
    for lcn in range(totalidx):
        want = spec_compact_entry(data, 40, totalidx, lcn, big)
        try:
            m = index.load(lcn)
        except CorruptImageError:
            assert want == "corrupt", lcn
            continue
        if m.type == NONHEAD_T:
            got: tuple[int, ...] = (m.type, m.delta0, m.delta1, m.cblkcnt)
        else:
            got = (m.type, m.clusterofs, m.blkaddr)
        assert got == want, lcn


# hand-made encoded extents (§4.6.11) ----------------------------------------------------------
def ext_mapper(sb: SuperBlock, size: int, recsz: int, records: bytes, *, count: int = 0,
               advise: int = 0, clusterbits: int = 0, prefix: bytes = b"") -> Mapper:
    code = {4: 0, 8: 1, 16: 2, 32: 3}[recsz]
    hdr = struct.pack("<IHH", count & 0xFFFFFFFF, d.Z_ADVISE_EXTENTS | code << 1 | advise,
                      (count >> 32) | clusterbits << 8)
    pad = (-(40) % recsz)
    info, space = fake_inode(d.LAYOUT_COMPRESSED_FULL, size, hdr + bytes(pad) + prefix + records)
    return compressed_mapper(sb, info, space)


def rec16(plen: int, pstart: int, lstart: int, recsz: int = 16) -> bytes:
    body = struct.pack("<IIII", plen, pstart & 0xFFFFFFFF, pstart >> 32, lstart & 0xFFFFFFFF)
    if recsz == 32:
        body += struct.pack("<I", lstart >> 32) + bytes(12)
    return body


LZ4_FMT = (d.ALG_LZ4 + 1) << d.Z_EXTENT_PLEN_FMT_BIT
ZSTD_FMT = (d.ALG_ZSTD + 1) << d.Z_EXTENT_PLEN_FMT_BIT


@pytest.mark.parametrize("recsz", [16, 32])
def test_sorted_extent_records(base_sb: SuperBlock, recsz: int) -> None:
    sb = sb_with(base_sb, algs=(0, 3))
    recs = (rec16(LZ4_FMT | 3000, 1 << 33, 0, recsz) + rec16(0, 0, 10000, recsz)
            + rec16(ZSTD_FMT | d.Z_EXTENT_PLEN_PARTIAL | 500, 12345, 20000, recsz)
            + rec16(12288, 40960, 30000, recsz))
    mapper = ext_mapper(sb, 40000, recsz, recs, count=4)
    assert mapper.map(9999) == Extent(0, 10000, Source.DEVICE, pa=1 << 33, plen=3000,
                                      codec=Codec.LZ4)
    assert mapper.map(10000) == Extent(10000, 10000, Source.HOLE)
    assert mapper.map(25000) == Extent(20000, 10000, Source.DEVICE, pa=12345, plen=500,
                                       codec=Codec.ZSTD, partial=True)
    assert mapper.map(39999) == Extent(30000, 10000, Source.DEVICE, pa=40960, plen=12288,
                                       codec=Codec.RAW)


def test_interlaced_needs_block_aligned_pcluster(base_sb: SuperBlock) -> None:
    recs = rec16(8192, 40960, 0) + rec16(5000, 40960 + 8192, 8192)
    mapper = ext_mapper(base_sb, 13192, 16, recs, count=2,
                        advise=d.Z_ADVISE_INTERLACED_PCLUSTER)
    assert mapper.map(0).codec == Codec.INTERLACED
    assert mapper.map(9000).codec == Codec.RAW


def test_last_record_is_the_fragment(base_sb: SuperBlock) -> None:
    sb = sb_with(base_sb, packed=99)
    recs = rec16(LZ4_FMT | 100, 8192, 0) + rec16(0x1234, 5, 4096)
    mapper = ext_mapper(sb, 5000, 16, recs, count=2, advise=d.Z_ADVISE_FRAGMENT_PCLUSTER)
    assert mapper.map(4096) == Extent(4096, 904, Source.PACKED, pa=(5 << 32) | 0x1234, plen=904)
    assert mapper.map(0).codec == Codec.LZ4


def test_records_before_the_first_extent_are_a_hole(base_sb: SuperBlock) -> None:
    mapper = ext_mapper(base_sb, 9000, 16, rec16(LZ4_FMT | 100, 0, 4096), count=1)
    assert mapper.map(100) == Extent(0, 4096, Source.HOLE)


def test_unsorted_records_are_corrupt(base_sb: SuperBlock) -> None:
    recs = rec16(LZ4_FMT | 10, 0, 0) + rec16(LZ4_FMT | 10, 0, 8000) + rec16(LZ4_FMT | 10, 0, 4000)
    mapper = ext_mapper(base_sb, 9000, 16, recs + rec16(LZ4_FMT | 10, 0, 9500), count=4)
    with pytest.raises(CorruptImageError):
        for pos in range(0, 9000, 500):
            mapper.map(pos)


def test_extent_count_past_the_space_is_corrupt(base_sb: SuperBlock) -> None:
    with pytest.raises(CorruptImageError):
        ext_mapper(base_sb, 9000, 16, rec16(0, 0, 0), count=1 << 40)


def test_per_lcluster_records_of_8_bytes(base_sb: SuperBlock) -> None:
    lc = 1 << 14  # clusterbits 2 on 4 KiB blocks
    recs = struct.pack("<II", LZ4_FMT | 700, 9000) + struct.pack("<II", 0, 0) + struct.pack(
        "<II", 300, 20000)
    mapper = ext_mapper(base_sb, 2 * lc + 10, 8, recs, clusterbits=2)
    assert mapper.map(5) == Extent(0, lc, Source.DEVICE, pa=9000, plen=700, codec=Codec.LZ4)
    assert mapper.map(lc) == Extent(lc, lc, Source.HOLE)
    assert mapper.map(2 * lc + 9) == Extent(2 * lc, 10, Source.DEVICE, pa=20000, plen=300,
                                            codec=Codec.RAW, partial=False)


def test_per_lcluster_records_of_4_bytes_accumulate_pa(base_sb: SuperBlock) -> None:
    lc = 1 << 13
    plens = [LZ4_FMT | 700, LZ4_FMT | 1500, 0, LZ4_FMT | 20]
    recs = b"".join(struct.pack("<I", p) for p in plens)
    mapper = ext_mapper(base_sb, 4 * lc, 4, recs, clusterbits=1,
                        prefix=struct.pack("<Q", 1 << 20))
    assert mapper.map(3 * lc).pa == (1 << 20) + 2200
    assert mapper.map(0).pa == 1 << 20  # backwards: the walk restarts
    assert mapper.map(lc + 1).pa == (1 << 20) + 700
    assert mapper.map(2 * lc).source == Source.HOLE


# real mkfs.erofs trees ------------------------------------------------------------------------
MKFS_OPTIONS = [
    ("-zlz4",),
    ("-zlz4hc",),
    ("-zlz4hc", "-C65536"),
    ("-zlz4hc", "-Eztailpacking"),
    ("-zlz4hc", "-Efragments"),  # mkfs.erofs 1.5 silently ignores -E options it lacks
    ("-zlz4hc", "-Ededupe"),  # (fragments and dedupe arrived in 1.6): still a valid build
    ("-zlz4hc", "-Elegacy-compress"),
    ("-zlz4hc", "-C16384", "-Eztailpacking"),
]
WORDS = [b"erofs", b"block", b"cluster", b"lz4", b"the", b"of", b"\n", b"data", b"0123456789"]
POOL = random.Random(7).randbytes(10000)

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1,
                max_size=24).filter(lambda s: s not in (".", "..", "sub"))
sizes = st.one_of(st.integers(0, 300 << 10),
                  st.sampled_from([0, 1, 4095, 4096, 4097, 8191, 65536, 65537, 300 << 10]))
files = st.tuples(st.sampled_from(["zeros", "text", "random", "mixed", "dup"]), sizes,
                  st.integers(0, 1 << 30), st.booleans())
trees = st.dictionaries(names, files, min_size=1, max_size=8)


def content(kind: str, size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    if kind == "zeros":
        return bytes(size)
    if kind == "random":
        return rnd.randbytes(size)
    if kind == "dup":  # shared blocks across files: food for dedupe
        return (POOL * (size // len(POOL) + 1))[:size]
    text = b" ".join(rnd.choices(WORDS, k=size // 4 + 1))[:size]
    if kind == "text":
        return text
    return b"".join(text[i:i + 4096] if (i // 4096) % 2 else rnd.randbytes(4096)
                    for i in range(0, size, 4096))[:size]


def write_tree(root: str, tree: dict[str, tuple[str, int, int, bool]]) -> None:
    os.makedirs(os.path.join(root, "sub"))
    for name, (kind, size, seed, nested) in tree.items():
        path = os.path.join(root, "sub", name) if nested else os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(content(kind, size, seed))


@pytest.mark.parametrize("options", MKFS_OPTIONS, ids=" ".join)
def test_mkfs_trees_read_back(options: tuple[str, ...]) -> None:
    require_tool("mkfs.erofs")

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(tree=trees)
    def check(tree: dict[str, tuple[str, int, int, bool]]) -> None:
        with tempfile.TemporaryDirectory(prefix="zmap-") as tmp:
            src, img = os.path.join(tmp, "src"), os.path.join(tmp, "img.erofs")
            write_tree(src, tree)
            mkfs_erofs(src, img, "--quiet", *options)
            with Image.open(img) as image:
                got = view_of_image(image, with_mtime=False)
            assert view_of_dir(src, with_mtime=False).diff(got) == []

    check()


# bit flips ------------------------------------------------------------------------------------
class BytesBlob:
    def __init__(self, data: bytes, name: str = "mutant") -> None:
        self.name = name
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise CorruptImageError("read past the end", image=self.name, offset=offset)
        return self._data[offset:offset + length]

    def close(self) -> None:
        pass


# exceptions that would mean a code path forgot to check something (image.py turns them into
# CorruptImageError at its boundary; the cause shows they happened)
STRAY = (struct.error, IndexError, KeyError, ValueError, OverflowError, RecursionError,
         MemoryError, TypeError, AttributeError, ZeroDivisionError)
DECODER_ERRORS = (lzma.LZMAError, zlib.error, zstandard.ZstdError, lz4.block.LZ4BlockError)


def check_error(exc: ErofsError) -> None:
    cause = exc.__cause__
    assert cause is None or isinstance(cause, (ErofsError,) + DECODER_ERRORS), repr(cause)
    assert not isinstance(cause, STRAY), f"stray {cause!r} behind {exc}"


class Timeout(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[None]:
    def ring(signum: int, frame: object) -> None:
        raise Timeout("a mutant took too long: a loop without a bound?")

    old = signal.signal(signal.SIGALRM, ring)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def targets(name: str) -> list[tuple[int, int, int, list[tuple[int, int]]]]:
    """(nid, size, index region start, pclusters) of every compressed file of a fixture."""
    out = []
    with Image.open(corpus(name)) as image:
        for node in compressed_inodes(image):
            hpos = (node.info.after + 7) & ~7
            pclusters = [(e.pa, e.plen) for e in extents_of(image._mapper(node), node.size)
                         if e.source == Source.DEVICE]
            out.append((node.nid, node.size, hpos, pclusters))
    return out


def read_file_fully(image: Image, nid: int) -> None:
    try:
        read_through(image.inode(nid), 64 << 10)
    except ErofsError as exc:
        check_error(exc)


@pytest.mark.parametrize("name", ["lz4.erofs", "lz4-legacy.erofs", "lz4-bigpcluster.erofs",
                                  "lz4-ztailpacking.erofs", "zstd-extents.erofs",
                                  "lzma-mixed.erofs", "deflate.erofs"])
def test_bit_flips_raise_only_our_errors(name: str, alarm: None) -> None:
    pristine = Path(corpus(name)).read_bytes()
    files = targets(name)
    rnd = random.Random(f"zmap-{name}")
    for round_ in range(120):
        nid, size, hpos, pclusters = rnd.choice(files)
        data = bytearray(pristine)
        if round_ % 2 == 0 or not pclusters:  # the map header and the indexes after it
            span = min(16 + 8 * (size // BS + 2), len(data) - hpos)
            spots = [hpos + rnd.randrange(span) for _ in range(rnd.randint(1, 4))]
        else:  # the compressed bytes
            pa, plen = rnd.choice(pclusters)
            spots = [pa + rnd.randrange(plen) for _ in range(rnd.randint(1, 8))]
        for spot in spots:
            data[spot] ^= 1 << rnd.randrange(8)
        signal.alarm(20)
        try:
            image = Image(BytesBlob(bytes(data)))
        except ErofsError as exc:
            check_error(exc)
            continue
        read_file_fully(image, nid)
        if round_ % 20 == 0:
            try:
                for _, node in image.walk():
                    if node.is_reg:
                        read_file_fully(image, node.nid)
            except ErofsError as exc:  # the flips may reach past the index, into directories
                check_error(exc)
        signal.alarm(0)


# runs of whole LZ4 extents, decoded in one call (reader.DataReader._flush_lz4) ----------------
LZ4_IMAGES = [name for name in TREE_IMAGES + OLD_IMAGES if "lz4" in name]


def _contents(name: str, chunk: int) -> dict[bytes, bytes]:
    with Image.open(corpus(f"{name}.erofs")) as image:
        return {path: b"".join(node.read(pos, chunk) for pos in range(0, node.size, chunk))
                for path, node in image.walk() if node.info.is_reg}


@pytest.mark.parametrize("name", LZ4_IMAGES)
@on_python_sources
def test_lz4_runs_read_as_pcluster_by_pcluster(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from erofs_fuse.erofs import decompress as dc

    runs: list[int] = []
    real = reader_mod.lz4_run  # type: ignore[attr-defined]

    def counting(src: bytes, jobs: list[dc.LZ4Job]) -> bytes | None:
        runs.append(len(jobs))
        return real(src, jobs)

    monkeypatch.setattr(reader_mod, "lz4_run", counting)
    with_runs = {chunk: _contents(name, chunk) for chunk in (4096, 1 << 20)}
    monkeypatch.setattr(dc, "_lz4run", None)  # no compiled module: one pcluster at a time
    for chunk, contents in with_runs.items():
        assert _contents(name, chunk) == contents
    assert with_runs[4096] == with_runs[1 << 20]
    if name in ("lz4hc", "old-lz4hc"):  # 4 KiB pclusters: a 1 MiB read is runs of them
        assert max(runs) > 8


def test_a_bad_pcluster_in_a_run_is_named(tmp_path: Path) -> None:
    with Image.open(corpus("lz4hc.erofs")) as image:
        for path, node in image.walk():
            exts = [e for e in extents_of(image._mapper(node), node.size)
                    if node.info.is_compressed] if node.info.is_reg else []
            if (len(exts) >= 3 and all(e.codec == Codec.LZ4 for e in exts[:3])
                    and exts[0].pa + exts[0].plen == exts[1].pa):
                break
        else:
            raise AssertionError("no file with a run of three LZ4 extents")
    bad = exts[1]
    data = bytearray(Path(corpus("lz4hc.erofs")).read_bytes())
    data[bad.pa:bad.pa + bad.plen] = bytes(bad.plen)  # a pcluster of zeros holds no stream
    broken = tmp_path / "broken.erofs"
    broken.write_bytes(data)
    with Image.open(str(broken)) as image:
        node = dict(image.walk())[path]
        with pytest.raises(CorruptImageError, match="only zeros") as caught:
            node.read(0, exts[2].end)
    assert caught.value.offset == bad.pa
