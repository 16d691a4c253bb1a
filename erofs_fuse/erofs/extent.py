"""Map a file position to an extent: the one question every data layout answers (spec §4).

This module holds the extent record shared by all layouts and the mappers of the uncompressed
layouts: FLAT_PLAIN (§4.1), FLAT_INLINE (§4.2) and CHUNK_BASED (§4.4). Compressed layouts are
mapped by ``zmap``. The read loop in ``reader`` consumes extents without knowing the layout;
``FlatMapper`` also says where its blocks and tail are, for ``reader``'s short path.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Iterator, NamedTuple, Protocol

from . import ondisk as d
from .errors import CorruptImageError, UnsupportedFeatureError
from .inode import InodeInfo
from .space import Space
from .superblock import SuperBlock


class Source(IntEnum):
    """Where the physical bytes of an extent are."""

    HOLE = 0  # no bytes: reads as zeros
    DEVICE = 1  # a device address (device id 0 = primary / unified address space)
    META = 2  # the inode's own space (inline tails, inline pclusters)
    PACKED = 3  # the packed inode's data (fragments)


class Codec(IntEnum):
    """How physical bytes become logical ones; values 0..3 are the on-disk algorithm ids."""

    LZ4 = d.ALG_LZ4
    LZMA = d.ALG_LZMA
    DEFLATE = d.ALG_DEFLATE
    ZSTD = d.ALG_ZSTD
    RAW = 4  # uncompressed, "shifted": logical byte la+k is physical byte pa+k
    INTERLACED = 5  # uncompressed, rotated inside its pcluster (spec §5.6)


# The enum metaclass defines __getattr__, which makes every ``Source.X``/``Codec.X`` a slow lookup
# (0.2 µs on 3.11). The per-extent paths of reader and zmap compare a few per extent: they use
# these plain module attributes instead.
S_HOLE, S_DEVICE, S_META, S_PACKED = Source.HOLE, Source.DEVICE, Source.META, Source.PACKED
C_RAW, C_INTERLACED, C_LZ4 = Codec.RAW, Codec.INTERLACED, Codec.LZ4


class Extent(NamedTuple):
    """Logical bytes ``[la, la + llen)`` of a file and where they come from.

    A NamedTuple rather than a dataclass: tens of thousands are made per second on a cold read.
    """

    la: int
    llen: int
    source: Source
    pa: int = 0
    plen: int = 0
    codec: Codec = Codec.RAW
    device: int = 0
    partial: bool = False  # the stream may decode to more than llen bytes

    @property
    def end(self) -> int:
        return self.la + self.llen


class Mapper(Protocol):
    def map(self, pos: int) -> Extent:
        """The extent holding byte ``pos`` (``0 <= pos < size``)."""
        ...

    def extents(self, pos: int, end: int) -> Iterator[Extent]:
        """The extents over ``[pos, end)`` in order: ``map(pos)``, then ``map(ext.end)`` of
        each one until one reaches ``end`` or EOF; a mapper may find them faster than by
        mapping, never differently. Consumers check each one before asking for the next."""
        ...


def extents_by_map(mapper: Mapper, pos: int, end: int) -> Iterator[Extent]:
    """``Mapper.extents`` by calling ``map``."""
    while True:
        ext = mapper.map(pos)
        yield ext
        if ext.la + ext.llen <= pos:  # a consumer that did not check: never loop on it
            raise CorruptImageError(f"extent [{ext.la}, {ext.la + ext.llen}) does not hold "
                                    f"position {pos}", offset=pos)
        pos = ext.la + ext.llen
        if pos >= end:
            return


def nblocks(size: int, blkszbits: int) -> int:
    return (size + (1 << blkszbits) - 1) >> blkszbits


class FlatMapper:
    """FLAT_PLAIN and FLAT_INLINE: consecutive blocks, optionally with an inline tail."""

    def __init__(self, sb: SuperBlock, info: InodeInfo, space: Space) -> None:
        bs = sb.block_size
        size = info.size
        self._size = size
        self._blocks_end = size
        self._tail_pos = 0
        if info.layout == d.LAYOUT_FLAT_INLINE and size > 0:
            self._blocks_end = (nblocks(size, sb.blkszbits) - 1) * bs
            tail_len = size - self._blocks_end
            self._tail_pos = info.after
            if (info.after % bs) + tail_len > bs:
                raise CorruptImageError(
                    f"inline tail of {tail_len} bytes crosses a block boundary",
                    nid=info.nid,
                    offset=info.after,
                )
            if info.after + tail_len > space.size:
                raise CorruptImageError(
                    "inline tail past the end of its space", nid=info.nid, offset=info.after
                )
        # A null block address (all ones) is no hole here: the kernel maps the blocks there all
        # the same, and the read past the device fails with EIO (tests/test_hostile.py).
        if self._blocks_end == 0:
            self._blocks = Extent(0, 0, Source.HOLE)
        else:
            pa = info.startblk << sb.blkszbits
            self._blocks = Extent(0, self._blocks_end, Source.DEVICE, pa=pa, plen=self._blocks_end)

    @property
    def blocks_end(self) -> int:
        """Where the file's run of blocks ends (its size, without an inline tail)."""
        return self._blocks_end

    @property
    def blocks_address(self) -> int:
        """The device address of the file's first block."""
        return self._blocks.pa

    @property
    def tail_position(self) -> int:
        """Where the inline tail (bytes ``blocks_end`` to the size) starts in the inode's
        space."""
        return self._tail_pos

    def extents(self, pos: int, end: int) -> Iterator[Extent]:
        return extents_by_map(self, pos, end)

    def map(self, pos: int) -> Extent:
        if pos < self._blocks_end:
            return self._blocks
        return Extent(
            self._blocks_end,
            self._size - self._blocks_end,
            Source.META,
            pa=self._tail_pos,
            plen=self._size - self._blocks_end,
        )


class ChunkMapper:
    """CHUNK_BASED: a table of 4-byte block map entries or 8-byte chunk indexes."""

    def __init__(self, sb: SuperBlock, info: InodeInfo, space: Space) -> None:
        fmt = info.i_u & 0xFFFF
        if fmt & ~d.CHUNK_FORMAT_ALL:
            raise UnsupportedFeatureError(
                f"unknown chunk format bits {fmt:#x}", nid=info.nid, offset=info.pos
            )
        self._chunkbits = sb.blkszbits + (fmt & d.CHUNK_FORMAT_BLKBITS_MASK)
        if self._chunkbits > 48:
            raise CorruptImageError(f"chunk size 2^{self._chunkbits}", nid=info.nid, offset=info.pos)
        self._indexes = bool(fmt & d.CHUNK_FORMAT_INDEXES)
        self._unit = 8 if self._indexes else 4
        self._mask = d.NULL_ADDR_48 if self._indexes and fmt & d.CHUNK_FORMAT_48BIT else d.NULL_ADDR_32
        self._start = (info.after + self._unit - 1) & ~(self._unit - 1)
        count = (info.size + (1 << self._chunkbits) - 1) >> self._chunkbits
        if self._start + count * self._unit > space.size:
            raise CorruptImageError(
                f"{count} chunk records run past the end of their space",
                nid=info.nid,
                offset=self._start,
            )
        self._sb = sb
        self._info = info
        self._space = space

    def extents(self, pos: int, end: int) -> Iterator[Extent]:
        return extents_by_map(self, pos, end)

    def map(self, pos: int) -> Extent:
        n = pos >> self._chunkbits
        cs = 1 << self._chunkbits
        la = n * cs
        llen = min(cs, self._info.size - la)
        rec = self._space.read(self._start + n * self._unit, self._unit)
        if self._indexes:
            hi, device_id, lo = d.CHUNK_INDEX.unpack(rec)
            addr = ((hi << 32) | lo) & self._mask
            device_id &= self._sb.device_id_mask
        else:
            (addr,) = d.BLOCK_MAP_ENTRY.unpack(rec)
            device_id = 0
        if addr == self._mask:
            return Extent(la, llen, Source.HOLE)
        return Extent(
            la, llen, Source.DEVICE, pa=addr << self._sb.blkszbits, plen=llen, device=device_id
        )
