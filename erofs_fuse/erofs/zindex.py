"""Logical-cluster indexes of compressed inodes (spec §4.6.2-§4.6.4).

Turns "lcluster number" into one decoded ``Lcluster`` record, for both on-disk forms: the full
8-byte records of COMPRESSED_FULL and the bit-packed 2- and 4-byte packs of COMPRESSED_COMPACT.
What the records mean for a file position (lookback, extent lengths) is ``zmap``'s business.

Index bytes are read through a small cache of aligned windows: sequential reads of a large file
load each index block once instead of issuing one tiny read per lcluster.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from . import ondisk as d
from .errors import CorruptImageError, UnsupportedFeatureError
from .space import Space

NONHEAD = d.Z_LCLUSTER_TYPE_NONHEAD
CBLKCNT = d.Z_LI_D0_CBLKCNT

_WINDOW = 4096  # a multiple of every pack size (8, 32) and of the full record size (8)
_MAX_WINDOWS = 16
_MAX_ENTRIES = 4096


class Lcluster(NamedTuple):
    """One decoded lcluster index entry; fields that do not apply to its type are 0."""

    lcn: int
    type: int
    clusterofs: int  # HEAD/PLAIN: where the extent starts inside the lcluster
    blkaddr: int  # HEAD/PLAIN: first block of its pcluster
    delta0: int  # NONHEAD: lclusters back to the head
    delta1: int  # NONHEAD: lclusters forward to the next head (0 = unknown / pre-1.0 mkfs)
    cblkcnt: int  # NONHEAD with D0_CBLKCNT: blocks of the pcluster, else 0
    partial: bool  # HEAD/PLAIN of full indexes: PARTIAL_REF
    nextpackoff: int  # byte right after this entry's pack (where an inline pcluster starts)

    @property
    def is_head(self) -> bool:
        return self.type != NONHEAD


class IndexWindows:
    """Aligned windows of a space, cached; every returned range is bounds-checked."""

    def __init__(self, space: Space, nid: int) -> None:
        self._space = space
        self._nid = nid
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def get(self, pos: int, length: int) -> tuple[bytes, int]:
        """(window, offset of ``pos`` in it) such that ``length`` bytes follow ``pos``."""
        base = pos - pos % _WINDOW
        with self._lock:
            win = self._cache.get(base)
        if win is None:
            end = min(base + _WINDOW, self._space.size)
            if pos < 0 or pos + length > end:
                raise CorruptImageError(
                    "compression index past the end of its space", nid=self._nid, offset=pos
                )
            win = self._space.read(base, end - base)
            with self._lock:
                if len(self._cache) >= _MAX_WINDOWS:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[base] = win
        off = pos - base
        if off + length > len(win):
            raise CorruptImageError(
                "compression index past the end of its space", nid=self._nid, offset=pos
            )
        return win, off


class FullIndex:
    """COMPRESSED_FULL: one 8-byte record per lcluster at ``hpos + 16 + 8 * lcn`` (§4.6.3)."""

    def __init__(self, windows: IndexWindows, nid: int, hpos: int, lclusterbits: int,
                 totalidx: int, big_pcluster: bool) -> None:
        self._windows = windows
        self._nid = nid
        self._start = hpos + 16
        self._lcsize = 1 << lclusterbits
        self._totalidx = totalidx
        self._big = big_pcluster
        self._entries: dict[int, Lcluster] = {}

    def load(self, lcn: int) -> Lcluster:
        entry = self._entries.get(lcn)
        if entry is None:
            entry = self._decode(lcn)
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[lcn] = entry
        return entry

    def _decode(self, lcn: int) -> Lcluster:
        if not 0 <= lcn < self._totalidx:
            raise CorruptImageError(f"lcluster {lcn} beyond the index", nid=self._nid)
        pos = self._start + 8 * lcn
        win, off = self._windows.get(pos, 8)
        advise, clusterofs, blkaddr = d.LCLUSTER_INDEX.unpack_from(win, off)
        kind = advise & 3
        if kind == NONHEAD:
            delta0 = blkaddr & 0xFFFF
            cblkcnt = 0
            if delta0 & CBLKCNT:
                if not self._big:
                    raise CorruptImageError("CBLKCNT without big pclusters", nid=self._nid,
                                            offset=pos)
                cblkcnt = max(delta0 & ~CBLKCNT, 1)
                delta0 = 1
            return Lcluster(lcn, kind, 0, 0, delta0, blkaddr >> 16, cblkcnt, False, pos + 8)
        if clusterofs >= self._lcsize:
            raise CorruptImageError(f"clusterofs {clusterofs} outside its lcluster",
                                    nid=self._nid, offset=pos)
        partial = bool(advise & d.Z_LI_PARTIAL_REF)
        return Lcluster(lcn, kind, clusterofs, blkaddr, 0, 0, 0, partial, pos + 8)


class _Pack(NamedTuple):
    lo: list[int]
    types: list[int]
    base: int


class CompactIndex:
    """COMPRESSED_COMPACT: 4-byte-class and 2-byte-class packs of bit-packed entries (§4.6.4)."""

    def __init__(self, windows: IndexWindows, nid: int, hpos: int, lclusterbits: int,
                 totalidx: int, compacted_2b: bool, big_pcluster: bool) -> None:
        self._windows = windows
        self._nid = nid
        self._ebase = hpos + 8
        self._totalidx = totalidx
        self._big = big_pcluster
        self._lobits = max(lclusterbits, 12)
        self._init4 = ((32 - self._ebase % 32) // 4) & 7
        self._n2 = 0
        if compacted_2b and self._init4 < totalidx:
            self._n2 = (totalidx - self._init4) // 16 * 16
        if lclusterbits > 14 or (self._n2 and lclusterbits > 12):
            raise UnsupportedFeatureError(
                f"compact indexes with {1 << lclusterbits}-byte lclusters", nid=nid, offset=hpos
            )
        self._entries: dict[int, Lcluster | CorruptImageError] = {}  # whole packs at a time

    def end(self) -> int:
        """Byte position right after the last pack."""
        if not self._totalidx:
            return self._ebase
        start, _, vcnt = self._locate(self._totalidx - 1)
        return start + (8 if vcnt == 2 else 32)

    def _locate(self, lcn: int) -> tuple[int, int, int]:
        """(pack start, entry index in the pack, entries per pack) of ``lcn``."""
        if lcn < self._init4:
            pos, unit = self._ebase + 4 * lcn, 4
        else:
            rel = lcn - self._init4
            start2 = self._ebase + 4 * self._init4
            if rel < self._n2:
                pos, unit = start2 + 2 * rel, 2
            else:
                pos, unit = start2 + 2 * self._n2 + 4 * (rel - self._n2), 4
        packsize = 8 if unit == 4 else 32
        start = pos - pos % packsize
        return start, (pos - start) // unit, packsize // unit

    def load(self, lcn: int) -> Lcluster:
        entry = self._entries.get(lcn)
        if entry is None:
            if not 0 <= lcn < self._totalidx:
                raise CorruptImageError(f"lcluster {lcn} beyond the index", nid=self._nid)
            start, i, vcnt = self._locate(lcn)
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            pack = self._decode_pack(start, vcnt, lcn - i)
            self._entries.update(zip(range(lcn - i, lcn - i + vcnt), pack))
            entry = pack[i]
        if isinstance(entry, CorruptImageError):
            # a fresh exception each time: re-raising one instance would grow its traceback
            raise CorruptImageError(entry.message, nid=entry.nid, offset=entry.offset)
        return entry

    def _decode_pack(self, start: int, vcnt: int, lcn0: int) -> list[Lcluster | CorruptImageError]:
        """Every entry of the pack at ``start`` (first lcluster ``lcn0``), decoded at once:
        packs are read in order, so the entries after the one asked for are needed next."""
        packsize = 8 if vcnt == 2 else 32
        win, off = self._windows.get(start, packsize)
        bits = int.from_bytes(win[off:off + packsize - 4], "little")
        base = int.from_bytes(win[off + packsize - 4:off + packsize], "little")
        encbits = (packsize - 4) * 8 // vcnt
        lobits = self._lobits
        lomask = (1 << lobits) - 1
        los: list[int] = []
        types: list[int] = []
        for _ in range(vcnt):
            los.append(bits & lomask)
            types.append((bits >> lobits) & 3)
            bits >>= encbits
        pack = _Pack(los, types, base)
        delta1 = _lookahead(pack)
        blocks = _blocks_before_big(pack) if self._big else _blocks_before(pack)
        nextpack = start + packsize
        # a pack per 16 lclusters of a sequential read: the common entries are made inline
        entries: list[Lcluster | CorruptImageError] = []
        append = entries.append
        last = vcnt - 1
        for j, kind in enumerate(types):
            if kind != NONHEAD:
                if blocks[j] < 0:
                    append(CorruptImageError("plain delta0 of 1 in a big-pcluster pack",
                                             nid=self._nid, offset=start))
                else:
                    append(_new_lcluster(Lcluster, (lcn0 + j, kind, los[j], base + blocks[j],
                                                    0, 0, 0, False, nextpack)))
            elif j != last and not los[j] & CBLKCNT:  # the common case (as _nonhead does)
                append(_new_lcluster(Lcluster, (lcn0 + j, NONHEAD, 0, 0, los[j], delta1[j], 0,
                                                False, nextpack)))
            else:
                try:
                    append(self._nonhead(lcn0 + j, pack, j, delta1[j], nextpack, start))
                except CorruptImageError as exc:  # raised when (and if) that entry is loaded
                    append(exc)
        return entries

    def _nonhead(self, lcn: int, pack: _Pack, i: int, delta1: int, nextpack: int,
                 start: int) -> Lcluster:
        lo = pack.lo[i]
        if lo & CBLKCNT:
            if not self._big:
                raise CorruptImageError("CBLKCNT without big pclusters", nid=self._nid,
                                        offset=start)
            return Lcluster(lcn, NONHEAD, 0, 0, 1, delta1, max(lo & ~CBLKCNT, 1), False, nextpack)
        if i + 1 != len(pack.lo):
            return Lcluster(lcn, NONHEAD, 0, 0, lo, delta1, 0, False, nextpack)
        # The last entry of a pack stores delta1; delta0 follows from the entry before it.
        prev_lo, prev_type = pack.lo[i - 1], pack.types[i - 1]
        if prev_type != NONHEAD:
            delta0 = 1
        elif prev_lo & CBLKCNT:
            delta0 = 2
        else:
            delta0 = prev_lo + 1
        return Lcluster(lcn, NONHEAD, 0, 0, delta0, delta1, 0, False, nextpack)


# NamedTuple's generated __new__ is a Python-level call: building the tuple directly is three
# times cheaper, and tens of thousands of entries are decoded per second of sequential reading.
_new_lcluster = tuple.__new__


def _blocks_before(pack: _Pack) -> list[int]:
    """Per entry i, what a head there adds to the pack base (spec §4.6.4 step 9, 1-block
    pclusters): one plus the heads met walking back through the pack.

    The walk from i steps to i - 1, jumps back over a NONHEAD's delta0 and goes on from where it
    lands: the count at i is the count where it lands plus one, so one pass in order fills them
    all, where a walk per head costs quadratic time."""
    los, types = pack.lo, pack.types
    blocks = [1] * len(los)
    for i in range(1, len(los)):
        j = i - 1
        if types[j] == NONHEAD:
            j -= los[j]
        if j >= 0:
            blocks[i] = blocks[j] + 1
    return blocks


def _blocks_before_big(pack: _Pack) -> list[int]:
    """As ``_blocks_before`` with big pclusters: the walk counts 1 block per head without a
    CBLKCNT after it, and a CBLKCNT's count for the head before it; -1 where it meets a plain
    delta0 of 0 or 1 (corrupt)."""
    los, types = pack.lo, pack.types
    counts = [0] * len(los)
    for i in range(1, len(los)):
        j = i - 1
        lo = los[j]
        if types[j] != NONHEAD:
            add = 1
        elif lo & CBLKCNT:
            add, j = lo & ~CBLKCNT, j - 1
        elif lo <= 1:
            counts[i] = -1
            continue
        else:
            add, j = 0, j - (lo - 2)
        if j < 0:
            counts[i] = add
        else:
            counts[i] = -1 if counts[j] < 0 else counts[j] + add
    return counts


def _lookahead(pack: _Pack) -> list[int]:
    """delta1 of each NONHEAD entry: NONHEADs up to the pack end, plus the stored tail delta."""
    vcnt = len(pack.lo)
    out = [0] * vcnt
    for j in range(vcnt - 1, -1, -1):
        if pack.types[j] != NONHEAD:
            continue
        if j == vcnt - 1:
            last = pack.lo[j]
            out[j] = 1 if last & CBLKCNT else last
        elif pack.types[j + 1] != NONHEAD:
            out[j] = 1
        else:
            out[j] = 1 + out[j + 1]
    return out
