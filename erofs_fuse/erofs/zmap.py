"""Map a position of a compressed file to its extent (spec §4.6).

Three mappers answer ``map(pos)`` for the compressed layouts:

* ``FragmentMapper``: the whole file is a fragment of the packed inode (§4.6.1 bit 7, §4.6.9);
* ``LclusterMapper``: full or compact lcluster indexes (§4.6.2-§4.6.10), with big pclusters,
  ztailpacking, tail fragments and PARTIAL_REF dedupe;
* ``EncodedExtentMapper``: the 48-bit era's encoded extent records (§4.6.11).

Every extent returned is the whole logical extent (its exact length, §4.6.7, clipped to EOF), so
that the reader's cache of decoded extents is hit by every read inside it. The map header is parsed
and checked (§11.5) once, when the mapper is built.

Sequential reads ask ``extents(pos, end)``: ``LclusterMapper`` walks its index forward from where
the last extent's end was found, the same answers as ``map`` at each extent's end, without
locating every position again.

One module past the house's ~450 lines on purpose: the three mappers share the map header's
parse and the extent type, and each is the spec's rules for one index format, kept together.
"""

from __future__ import annotations

from typing import Iterator

from . import ondisk as d
from .errors import CorruptImageError, UnsupportedFeatureError
from .extent import C_INTERLACED, C_RAW, S_DEVICE, Codec, Extent, Mapper, Source, extents_by_map
from .inode import InodeInfo
from .space import Space
from .superblock import SuperBlock
from .zindex import NONHEAD, CompactIndex, FullIndex, IndexWindows, Lcluster


class _Header:
    """The 8-byte map header at ``hpos``, decoded (§4.6.1)."""

    def __init__(self, raw: bytes, hpos: int) -> None:
        self.hpos = hpos
        self.u64 = int.from_bytes(raw, "little")
        self.fragmentoff = int.from_bytes(raw[0:4], "little")
        self.idata_size = int.from_bytes(raw[2:4], "little")
        self.extents = self.fragmentoff | int.from_bytes(raw[6:8], "little") << 32
        self.advise = int.from_bytes(raw[4:6], "little")
        self.algorithmtype = raw[6]
        self.clusterbits = raw[7]

    @property
    def whole_fragment(self) -> bool:
        return bool(self.clusterbits >> d.Z_FRAGMENT_INODE_BIT)


def compressed_mapper(sb: SuperBlock, info: InodeInfo, space: Space) -> Mapper:
    """The mapper of compressed inode ``info`` whose metadata lives in ``space``."""
    if not sb.available_algorithms:
        raise CorruptImageError("compressed inode in an image without compression",
                                nid=info.nid, offset=info.pos)
    hpos = (info.after + 7) & ~7
    if hpos + 8 > space.size:
        raise CorruptImageError("map header past the end of its space", nid=info.nid, offset=hpos)
    head = _Header(space.read(hpos, 8), hpos)
    if head.whole_fragment:
        return FragmentMapper(sb, info, head.u64 & ~(1 << 63))
    if info.layout == d.LAYOUT_COMPRESSED_FULL and head.advise & d.Z_ADVISE_EXTENTS:
        return EncodedExtentMapper(sb, info, space, head)
    return LclusterMapper(sb, info, space, head)


# NamedTuple's generated __new__ is a Python-level call: building the tuple directly is three
# times cheaper, and a sequential read makes one extent per 4 to 64 KiB.
_new_extent = tuple.__new__


def _check_packed(sb: SuperBlock, info: InodeInfo) -> None:
    if sb.packed_nid is None:
        raise CorruptImageError("fragment without a packed inode", nid=info.nid, offset=info.pos)


class FragmentMapper:
    """The whole file is stored, uncompressed, at ``fragoff`` in the packed stream."""

    def __init__(self, sb: SuperBlock, info: InodeInfo, fragoff: int) -> None:
        _check_packed(sb, info)
        self._extent = Extent(0, info.size, Source.PACKED, pa=fragoff, plen=info.size)

    def map(self, pos: int) -> Extent:
        return self._extent

    def extents(self, pos: int, end: int) -> Iterator[Extent]:
        return extents_by_map(self, pos, end)


def _codec_of(sb: SuperBlock, alg: int, nid: int, offset: int) -> Codec:
    if alg not in sb.available_algorithms:
        name = d.ALG_NAMES.get(alg, str(alg))
        raise CorruptImageError(f"extent compressed with {name}, which the image does not declare",
                                nid=nid, offset=offset)
    return Codec(alg)


def _check_encoded(ext: Extent, nid: int) -> Extent:
    """Refuse pclusters the format does not allow (§4.6.5 step 5), and oversized raw extents."""
    if ext.plen > d.Z_PCLUSTER_MAX_SIZE or ext.llen > d.Z_PCLUSTER_MAX_DSIZE:
        raise UnsupportedFeatureError(
            f"pcluster of {ext.plen} bytes for an extent of {ext.llen} bytes", nid=nid,
            offset=ext.pa,
        )
    if (ext.codec == C_RAW or ext.codec == C_INTERLACED) and ext.llen > ext.plen:
        raise CorruptImageError(
            f"uncompressed extent of {ext.llen} bytes in a {ext.plen}-byte pcluster", nid=nid,
            offset=ext.pa,
        )
    return ext


class _RememberingMapper:
    """``map`` for the indexed mappers: the last extent found answers every position inside it
    (a read asks for many); any other position in the file is found by ``_lookup``."""

    _nid: int
    _size: int
    _last: Extent | None

    def map(self, pos: int) -> Extent:
        last = self._last
        if last is not None and last.la <= pos < last.la + last.llen:
            return last
        if not 0 <= pos < self._size:
            raise CorruptImageError(f"position {pos} outside the file", nid=self._nid)
        ext = self._lookup(pos)
        self._last = ext
        return ext

    def _lookup(self, pos: int) -> Extent:
        raise NotImplementedError


class LclusterMapper(_RememberingMapper):
    """COMPRESSED_FULL / COMPRESSED_COMPACT inodes indexed by logical clusters."""

    def __init__(self, sb: SuperBlock, info: InodeInfo, space: Space, head: _Header) -> None:
        self._sb = sb
        self._nid = info.nid
        self._size = info.size
        self._advise = head.advise
        self._algs = (head.algorithmtype & 15, head.algorithmtype >> 4)
        self._bits = sb.blkszbits + (head.clusterbits & 15)
        self._lcmask = (1 << self._bits) - 1
        # Without 0padding an LZ4 stream sits at the start of its pcluster, followed by junk:
        # only "stop after llen bytes" decoding can read it (§5.1).
        self._lz4_partial = not sb.has_incompat(d.INCOMPAT_ZERO_PADDING)
        self._interlaced = bool(head.advise & d.Z_ADVISE_INTERLACED_PCLUSTER)
        self._check_header(info, head)
        self._codecs = {t: Codec(alg) for t, alg in ((d.Z_LCLUSTER_TYPE_HEAD1, self._algs[0]),
                                                     (d.Z_LCLUSTER_TYPE_HEAD2, self._algs[1]))
                        if alg in sb.available_algorithms}
        self._index = self._make_index(info, space, head)
        self._blkbits = sb.blkszbits
        self._kinds = self._kinds_of_heads()
        self._fragment = bool(self._advise & d.Z_ADVISE_FRAGMENT_PCLUSTER)
        # not "_inline": mypyc would name the C struct member "__inline", a GCC keyword
        self._tail_inline = (not self._fragment
                             and bool(self._advise & d.Z_ADVISE_INLINE_PCLUSTER)
                             and head.idata_size > 0)
        self._fragoff = head.fragmentoff
        self._idata_size = head.idata_size
        self._inline_pos = 0
        self._tail_lcn = -1
        self._last: Extent | None = None
        if self._size and (self._fragment or self._tail_inline):
            self._find_tail(info, space)

    # construction ---------------------------------------------------------------------------
    def _check_header(self, info: InodeInfo, head: _Header) -> None:
        for k, alg in enumerate(self._algs):
            if alg >= 4:
                raise UnsupportedFeatureError(f"unknown HEAD{k + 1} algorithm {alg}",
                                              nid=info.nid, offset=head.hpos)
        big1 = bool(self._advise & d.Z_ADVISE_BIG_PCLUSTER_1)
        big2 = bool(self._advise & d.Z_ADVISE_BIG_PCLUSTER_2)
        if (big1 or big2) and not self._sb.has_incompat(d.INCOMPAT_COMPR_CFGS):
            raise CorruptImageError("big pcluster advice without the superblock feature",
                                    nid=info.nid, offset=head.hpos)
        if info.layout == d.LAYOUT_COMPRESSED_COMPACT and big1 != big2:
            raise CorruptImageError("compact indexes with inconsistent big pcluster advice",
                                    nid=info.nid, offset=head.hpos)
        if self._bits > 30:
            raise UnsupportedFeatureError(f"lclusters of 2^{self._bits} bytes", nid=info.nid,
                                          offset=head.hpos)

    def _kinds_of_heads(self) -> dict[int, tuple[Codec | None, bool, bool]]:
        """Per head type, for extents in the device: (codec, or None if not available; partial
        whatever the entry says; big pcluster advice)."""
        big1 = bool(self._advise & d.Z_ADVISE_BIG_PCLUSTER_1)
        big2 = bool(self._advise & d.Z_ADVISE_BIG_PCLUSTER_2)
        # device pclusters are whole blocks, so interlacing applies to every PLAIN one
        plain = Codec.INTERLACED if self._interlaced else Codec.RAW
        kinds: dict[int, tuple[Codec | None, bool, bool]] = {
            d.Z_LCLUSTER_TYPE_PLAIN: (plain, False, big2)}
        for kind, big in ((d.Z_LCLUSTER_TYPE_HEAD1, big1), (d.Z_LCLUSTER_TYPE_HEAD2, big2)):
            codec = self._codecs.get(kind)
            kinds[kind] = (codec, codec == Codec.LZ4 and self._lz4_partial, big)
        return kinds

    def _make_index(self, info: InodeInfo, space: Space, head: _Header) -> FullIndex | CompactIndex:
        windows = IndexWindows(space, info.nid)
        if info.layout == d.LAYOUT_COMPRESSED_FULL:
            # one record per lcluster (lclusters are blocks in every image mkfs makes)
            totalidx = (self._size + self._lcmask) >> self._bits
            big = bool(self._advise & (d.Z_ADVISE_BIG_PCLUSTER_1 | d.Z_ADVISE_BIG_PCLUSTER_2))
            end = head.hpos + 16 + 8 * totalidx
            index: FullIndex | CompactIndex = FullIndex(
                windows, info.nid, head.hpos, self._bits, totalidx, big)
        else:
            # the kernel sizes the compact areas by blocks, whatever the lcluster size
            totalidx = (self._size + self._sb.block_size - 1) >> self._sb.blkszbits
            compact = CompactIndex(
                windows, info.nid, head.hpos, self._bits, totalidx,
                bool(self._advise & d.Z_ADVISE_COMPACTED_2B),
                bool(self._advise & d.Z_ADVISE_BIG_PCLUSTER_1),
            )
            end, index = compact.end(), compact
        if end > space.size:
            raise CorruptImageError(f"compression index of {totalidx} lclusters runs past the "
                                    "end of its space", nid=info.nid, offset=head.hpos)
        return index

    def _find_tail(self, info: InodeInfo, space: Space) -> None:
        """Locate the tail extent's head: the inline pcluster or fragment belongs to it."""
        lcn = (self._size - 1) >> self._bits
        first = self._index.load(lcn)
        head, _ = self._locate(self._size - 1, first)
        self._tail_lcn = head.lcn
        if self._fragment:
            _check_packed(self._sb, info)
            if info.layout == d.LAYOUT_COMPRESSED_FULL:
                self._fragoff |= head.blkaddr << 32
            return
        self._inline_pos = first.nextpackoff
        bs = self._sb.block_size
        if (self._inline_pos % bs) + self._idata_size > bs:
            raise CorruptImageError(
                f"inline pcluster of {self._idata_size} bytes crosses a block boundary",
                nid=info.nid, offset=self._inline_pos)
        if self._inline_pos + self._idata_size > space.size:
            raise CorruptImageError("inline pcluster past the end of its space", nid=info.nid,
                                    offset=self._inline_pos)

    # mapping --------------------------------------------------------------------------------
    def _lookup(self, pos: int) -> Extent:
        if self._fragment and self._tail_lcn == 0:
            return Extent(0, self._size, Source.PACKED, pa=self._fragoff, plen=self._size)
        return self._map(pos)[0]

    def extents(self, pos: int, end: int) -> Iterator[Extent]:
        """The extents over ``[pos, end)``: ``map(pos)``, then for each next one what
        ``map(ext.end)`` returns, found from the head entry where the scan for ``ext``'s end
        stopped, without loading and locating that position again."""
        ext = self.map(pos)
        nxt: Lcluster | None = None
        bits = self._bits
        while True:
            yield ext
            pos = ext.la + ext.llen
            if pos >= end or pos >= self._size:
                return
            if nxt is not None and nxt.lcn == pos >> bits:
                # map(pos) would load this very entry and find pos at its head
                ext, nxt = self._extent_at(nxt, nxt, None, pos)
            else:
                ext, nxt = self._map(pos)
            self._last = ext

    def _map(self, pos: int) -> tuple[Extent, Lcluster | None]:
        """(extent holding ``pos``, head entry of the next one if the scan met it)."""
        first = self._index.load(pos >> self._bits)
        head, end = self._locate(pos, first)
        return self._extent_at(head, first, end, pos)

    def _extent_at(self, head: Lcluster, first: Lcluster, end: int | None,
                   pos: int) -> tuple[Extent, Lcluster | None]:
        """``_map`` once ``head`` is found (and ``end``, if known; ``first`` is the entry of
        ``pos``'s lcluster): the extent, and the head entry of the next one if met."""
        bits = self._bits
        la = (head.lcn << bits) + head.clusterofs
        if head.lcn == self._tail_lcn:
            return self._tail_extent(head, la), None
        nxt = None
        if end is None:
            end, nxt = self._scan_end(head, first, la)
        if end > self._size:
            end = self._size
        if not la <= pos < end:
            raise CorruptImageError(f"extent [{la}, {end}) does not hold position {pos}",
                                    nid=self._nid, offset=pos)
        # what _codec says, looked up once per head type: an extent per 4 to 64 KiB is mapped
        codec, partial, big = self._kinds[head.type]
        blkbits = self._blkbits
        pa = head.blkaddr << blkbits
        plen = (self._pcluster_blocks(head, first) if big else 1) << blkbits
        if codec is None:
            codec, partial = self._codec(head, plen, pa)  # raises: algorithm not available
        ext = _new_extent(Extent, (la, end - la, S_DEVICE, pa, plen, codec, 0,
                                   partial or head.partial))
        return _check_encoded(ext, self._nid), nxt

    def _locate(self, pos: int, first: Lcluster) -> tuple[Lcluster, int | None]:
        """(head entry of the extent holding ``pos``, its end if already known)."""
        if first.type != NONHEAD:
            if pos & self._lcmask >= first.clusterofs:
                return first, None
            # pos lies before this head: it belongs to the previous extent, which ends here
            end = (first.lcn << self._bits) + first.clusterofs
            return self._lookback(first.lcn, 1), end
        return self._lookback(first.lcn, first.delta0), None

    def _lookback(self, lcn: int, dist: int) -> Lcluster:
        # lcn strictly decreases, so this terminates within lcn steps
        while True:
            if dist == 0 or dist > lcn:
                raise CorruptImageError(f"bogus lookback distance {dist} at lcluster {lcn}",
                                        nid=self._nid)
            lcn -= dist
            m = self._index.load(lcn)
            if m.type != NONHEAD:
                return m
            dist = m.delta0

    def _scan_end(self, head: Lcluster, first: Lcluster, la: int) -> tuple[int, Lcluster | None]:
        """(exact end of the extent starting at ``head`` (§4.6.7), the head entry there unless
        the extent ends at EOF)."""
        lcn = head.lcn + 1 if first.type != NONHEAD else first.lcn + (first.delta1 or 1)
        limit = la + d.Z_PCLUSTER_MAX_DSIZE
        load = self._index.load
        while True:
            pos = lcn << self._bits
            if pos >= self._size:
                return self._size, None
            if pos > limit:
                raise UnsupportedFeatureError(
                    f"extent at {la} decodes to more than {d.Z_PCLUSTER_MAX_DSIZE} bytes",
                    nid=self._nid, offset=la)
            m = load(lcn)
            if m.type != NONHEAD:
                return pos + m.clusterofs, m
            lcn += m.delta1 or 1

    def _pcluster_blocks(self, head: Lcluster, first: Lcluster) -> int:
        """Blocks of the pcluster of ``head``, whose type has big pcluster advice (§4.6.5
        step 3)."""
        nxt = head.lcn + 1
        if (nxt << self._bits) >= self._size:
            return 1
        m = first if first.lcn == nxt else self._index.load(nxt)
        if m.type != NONHEAD:
            return 1
        if m.delta0 != 1:
            raise CorruptImageError(f"bogus CBLKCNT at lcluster {nxt}", nid=self._nid)
        return m.cblkcnt or 1

    def _codec(self, head: Lcluster, plen: int, pa: int) -> tuple[Codec, bool]:
        """(codec, partial) of the extent of ``head`` over a ``plen``-byte pcluster."""
        if head.type == d.Z_LCLUSTER_TYPE_PLAIN:
            # a rotation is only defined over whole blocks: a shorter (inline) one is shifted
            aligned = plen % self._sb.block_size == 0
            return (Codec.INTERLACED if self._interlaced and aligned else Codec.RAW), head.partial
        codec = self._codecs.get(head.type)
        if codec is None:
            alg = self._algs[1] if head.type == d.Z_LCLUSTER_TYPE_HEAD2 else self._algs[0]
            codec = _codec_of(self._sb, alg, self._nid, pa)  # raises: not available
        return codec, head.partial or (codec == Codec.LZ4 and self._lz4_partial)

    def _tail_extent(self, head: Lcluster, la: int) -> Extent:
        """The last extent, whose pcluster is inline or a fragment; it always ends at EOF."""
        llen = self._size - la
        if self._fragment:
            return Extent(la, llen, Source.PACKED, pa=self._fragoff, plen=llen)
        plen = self._idata_size
        codec, partial = self._codec(head, plen, self._inline_pos)
        ext = Extent(la, llen, Source.META, self._inline_pos, plen, codec, 0, partial)
        return _check_encoded(ext, self._nid)


class EncodedExtentMapper(_RememberingMapper):
    """COMPRESSED_FULL with the EXTENTS advice: 4/8/16/32-byte extent records (§4.6.11)."""

    def __init__(self, sb: SuperBlock, info: InodeInfo, space: Space, head: _Header) -> None:
        self._sb = sb
        self._nid = info.nid
        self._size = info.size
        self._space = space
        self._advise = head.advise
        self._recsz = 4 << ((head.advise >> 1) & 3)
        self._bits = sb.blkszbits + (head.clusterbits & 15)
        self._pos0 = (head.hpos + 8 + self._recsz - 1) & ~(self._recsz - 1)
        self._fragment = bool(head.advise & d.Z_ADVISE_FRAGMENT_PCLUSTER)
        self._windows = IndexWindows(space, info.nid)
        self._last: Extent | None = None
        self._walk = (0, 0)  # (record k, its pa) for 4-byte records, to continue forward
        if self._fragment:
            _check_packed(sb, info)
        if self._recsz <= 8:
            if self._bits > 40:
                raise UnsupportedFeatureError(f"lclusters of 2^{self._bits} bytes",
                                              nid=info.nid, offset=head.hpos)
            self._count = (self._size + (1 << self._bits) - 1) >> self._bits
            self._start = self._pos0 + (8 if self._recsz == 4 else 0)
        else:
            self._count = head.extents
            self._start = self._pos0
        if self._start + self._count * self._recsz > space.size:
            raise CorruptImageError(f"{self._count} extent records run past the end of their "
                                    "space", nid=info.nid, offset=self._pos0)
        if self._recsz == 4:
            self._walk = (0, int.from_bytes(space.read(self._pos0, 8), "little"))

    def _lookup(self, pos: int) -> Extent:
        if self._recsz <= 8:
            return self._map_lcluster(pos)
        return self._map_search(pos)

    def extents(self, pos: int, end: int) -> Iterator[Extent]:
        # each map() does the checks of a lookup (records in order), so walking is mapping
        return extents_by_map(self, pos, end)

    def _record(self, k: int) -> tuple[bytes, int]:
        return self._windows.get(self._start + k * self._recsz, self._recsz)

    def _map_lcluster(self, pos: int) -> Extent:
        k = pos >> self._bits
        lstart = k << self._bits
        lend = min(lstart + (1 << self._bits), self._size)
        win, off = self._record(k)
        (plen,) = d.U32.unpack_from(win, off)
        if self._recsz == 8:
            pa = d.U32.unpack_from(win, off + 4)[0]
        else:
            pa = self._pa_of(k)
        return self._classify(lstart, lend, plen, pa, k == self._count - 1)

    def _pa_of(self, k: int) -> int:
        """pa of 4-byte record ``k``: the first pstart plus the lengths of the records before."""
        k0, pa = self._walk
        if k0 > k:
            k0, pa = 0, int.from_bytes(self._space.read(self._pos0, 8), "little")
        for j in range(k0, k):
            win, off = self._record(j)
            pa += d.U32.unpack_from(win, off)[0] & d.Z_EXTENT_PLEN_MASK
        self._walk = (k, pa)
        return pa

    def _map_search(self, pos: int) -> Extent:
        """Binary search of the last record starting at or before ``pos`` (sorted by lstart)."""
        lo, hi = 0, self._count
        lend = self._size
        found: tuple[int, int, int] | None = None  # (lstart, plen, pa)
        floor = 0
        while lo < hi:
            mid = (lo + hi) // 2
            lstart, plen, pa = self._search_record(mid)
            if lstart > pos:
                if lstart > lend:
                    raise CorruptImageError(f"extent record {mid} out of order", nid=self._nid)
                hi, lend = mid, lstart
            else:
                if lstart < floor:
                    raise CorruptImageError(f"extent record {mid} out of order", nid=self._nid)
                lo, floor, found = mid + 1, lstart, (lstart, plen, pa)
        if found is None:
            return Extent(0, lend, Source.HOLE)
        lstart, plen, pa = found
        if not lstart <= pos < lend:
            raise CorruptImageError(f"extent [{lstart}, {lend}) does not hold position {pos}",
                                    nid=self._nid, offset=pos)
        return self._classify(lstart, lend, plen, pa, lo >= self._count)

    def _search_record(self, k: int) -> tuple[int, int, int]:
        win, off = self._record(k)
        plen, pstart_lo, pstart_hi, lstart = d.EXTENT_RECORD.unpack_from(win, off)
        if self._recsz == 32:
            lstart |= d.U32.unpack_from(win, off + 16)[0] << 32
        return lstart, plen, pstart_lo | pstart_hi << 32

    def _classify(self, la: int, lend: int, plen: int, pa: int, last: bool) -> Extent:
        llen = lend - la
        if last and self._fragment:
            fragoff = plen | (pa << 32 if self._recsz >= 8 else 0)
            return Extent(la, llen, Source.PACKED, pa=fragoff, plen=llen)
        size = plen & d.Z_EXTENT_PLEN_MASK
        if size == 0:
            return Extent(la, llen, Source.HOLE)
        fmt = plen >> d.Z_EXTENT_PLEN_FMT_BIT
        bs = self._sb.block_size
        if fmt:
            codec = _codec_of(self._sb, fmt - 1, self._nid, pa)
        elif self._advise & d.Z_ADVISE_INTERLACED_PCLUSTER and (pa | size) % bs == 0:
            codec = Codec.INTERLACED
        else:
            codec = Codec.RAW
        partial = bool(plen & d.Z_EXTENT_PLEN_PARTIAL)
        if codec == Codec.LZ4 and not self._sb.has_incompat(d.INCOMPAT_ZERO_PADDING):
            partial = True
        ext = Extent(la, llen, Source.DEVICE, pa=pa, plen=size, codec=codec, partial=partial)
        return _check_encoded(ext, self._nid)
