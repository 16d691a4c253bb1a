"""The one read loop over extents (spec §4.6.6, §5.6): hole, raw, inline, fragment, compressed.

Mappers say where logical bytes are; this module fetches them. Decoded compressed extents are
kept in a cache bounded by bytes, so sequential reads decode each pcluster once.
"""

from __future__ import annotations

import threading
from typing import Callable

from cachetools import LRUCache

from . import ondisk as d
from .decompress import decompress
from .errors import CorruptImageError, UnsupportedFeatureError
from .extent import C_INTERLACED, C_RAW, S_DEVICE, S_HOLE, S_META, S_PACKED, Extent, Mapper
from .space import Space
from .superblock import SuperBlock

DeviceRead = Callable[[int, int, int], bytes]  # (device id, byte address, length)
PackedRead = Callable[[int, int], bytes]  # (offset in the packed stream, length)

DEFAULT_EXTENT_CACHE_BYTES = 64 << 20


def _sizeof(value: bytes) -> int:
    return len(value) + 64


class DataReader:
    """Reads file data of one image through extent mappers."""

    def __init__(
        self,
        sb: SuperBlock,
        read_device: DeviceRead,
        read_packed: PackedRead,
        cache_bytes: int = DEFAULT_EXTENT_CACHE_BYTES,
    ) -> None:
        self._sb = sb
        self._read_device = read_device
        self._read_packed = read_packed
        self._cache: LRUCache[tuple[int, ...], bytes] = LRUCache(
            maxsize=max(cache_bytes, 1), getsizeof=_sizeof
        )
        self._lock = threading.Lock()

    def read(
        self, mapper: Mapper, size: int, space: Space, off: int, length: int, *, packed: bool = False
    ) -> bytes:
        """Bytes ``[off, off + length)`` of a file of ``size`` bytes, cut at EOF."""
        end = min(off + length, size)
        if off >= end:
            return b""
        parts: list[bytes] = []
        pos = off
        # contiguous raw device extents are gathered into one read: (device, start pa, length)
        run: tuple[int, int, int] | None = None
        for ext in mapper.extents(off, end):
            if not ext.la <= pos < ext.la + ext.llen or ext.llen <= 0:
                raise CorruptImageError(
                    f"extent [{ext.la}, {ext.la + ext.llen}) does not hold position {pos}",
                    offset=pos,
                )
            stop = min(end, ext.la + ext.llen)
            skip = pos - ext.la
            if ext.source == S_DEVICE and ext.codec == C_RAW:
                if ext.plen and skip + stop - pos > ext.plen:
                    raise CorruptImageError(
                        f"uncompressed extent of {ext.llen} bytes exceeds its "
                        f"{ext.plen}-byte pcluster",
                        offset=ext.pa,
                    )
                pa = ext.pa + skip
                if run is not None and run[0] == ext.device and run[1] + run[2] == pa:
                    run = (run[0], run[1], run[2] + stop - pos)
                else:
                    if run is not None:
                        parts.append(self._read_device(*run))
                    run = (ext.device, pa, stop - pos)
            else:
                if run is not None:
                    parts.append(self._read_device(*run))
                    run = None
                parts.append(self._extent_bytes(ext, space, skip, stop - pos, packed))
            pos = stop
            if pos >= end:
                break
        if pos < end:  # a mapper must cover the range up to EOF
            raise CorruptImageError(f"no extent holds position {pos}", offset=pos)
        if run is not None:
            parts.append(self._read_device(*run))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _extent_bytes(
        self, ext: Extent, space: Space, skip: int, count: int, packed: bool
    ) -> bytes:
        """``count`` logical bytes of ``ext`` starting ``skip`` bytes into it."""
        if ext.source == S_HOLE:
            return bytes(count)
        if ext.source == S_PACKED and packed:
            raise CorruptImageError("the packed inode refers to a fragment of itself")
        if ext.codec == C_RAW:
            if ext.plen and skip + count > ext.plen:
                raise CorruptImageError(
                    f"uncompressed extent of {ext.llen} bytes exceeds its {ext.plen}-byte pcluster",
                    offset=ext.pa,
                )
            return self._physical(ext, ext.pa + skip, count, space)
        # an extent wanted whole is not cached: nothing will ask for it again that the kernel's
        # page cache would not serve; a part is, since the rest is usually the next request
        whole = skip == 0 and count == ext.llen
        data = self._decoded(ext, space, store=not whole)
        return data if whole else data[skip : skip + count]

    def _physical(self, ext: Extent, pa: int, count: int, space: Space) -> bytes:
        if ext.source == S_DEVICE:
            return self._read_device(ext.device, pa, count)
        if ext.source == S_META:
            return space.read(pa, count)
        return self._read_packed(pa, count)

    def _decoded(self, ext: Extent, space: Space, *, store: bool = True) -> bytes:
        """The whole extent ``[la, la + llen)`` decoded, through the cache."""
        if ext.plen > d.Z_PCLUSTER_MAX_SIZE or ext.llen > d.Z_PCLUSTER_MAX_DSIZE:
            raise UnsupportedFeatureError(
                f"pcluster of {ext.plen} bytes decoding to {ext.llen} exceeds the format's limits",
                offset=ext.pa,
            )
        key = (int(ext.source), id(space) if ext.source == S_META else 0, ext.device,
               ext.pa, ext.plen, int(ext.codec), ext.llen)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        src = self._physical(ext, ext.pa, ext.plen, space)
        if ext.codec == C_INTERLACED:
            out = _deinterlace(src, ext.la, ext.llen, self._sb.block_size)
        else:
            out = decompress(ext.codec, src, ext.llen, ext.partial, self._sb.compression)
        if store:
            with self._lock:
                self._cache[key] = out
        return out


def _deinterlace(src: bytes, la: int, llen: int, bs: int) -> bytes:
    """Undo the rotation of an interlaced plain pcluster (spec §5.6)."""
    plen = len(src)
    if llen > plen or plen % bs:
        raise CorruptImageError(f"interlaced extent of {llen} bytes in a {plen}-byte pcluster")
    s = la % bs
    c = min(bs - s, llen)
    first = src[plen - bs + s : plen - bs + s + c]
    return first + src[0 : llen - c]
