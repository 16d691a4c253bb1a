"""LZ4 file data: fixed-size-output physical clusters that the kernel decompresses.

Layout COMPRESSED_FULL with one 8-byte index entry per logical cluster (= block), single-block
pclusters, LZ4_0PADDING (``erofs-writer.md`` 7.1; ``erofs-format.md`` 4.6). From each extent
start ``p``, liblz4's ``destSize`` compressor fills one block's worth of output and says how much
input that took (``n``). The extent is kept compressed only when ``n`` exceeds a block (it saves
space), stored right-aligned behind zero padding; otherwise ``min(bs, left)`` raw bytes become a
PLAIN ("shifted") extent. Either way the next extent starts in a later logical cluster, so each
cluster holds at most one head, and every pcluster decodes to exactly its extent.

Files up to ``WHOLE_FILE_LIMIT`` are compressed in memory first and stored uncompressed (with an
inline tail) when compression would not save a block, as mkfs.erofs does; larger files stream
through a bounded window.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from typing import Any, Iterable

from ..erofs import ondisk as d
from .data import ImageFile
from .tree import FileData
from .errors import BadInputError, UnsupportedInputError

WHOLE_FILE_LIMIT = 1 << 20
LOOKAHEAD = (1 << 20) + (64 << 10)   # more than destSize can consume for one 4 KiB block
LZ4_MAX_DISTANCE = 0xFFFF
LZ4HC_DEFAULT_LEVEL = 9


@dataclass(slots=True)
class CompressedData(FileData):
    """COMPRESSED_FULL: the packed index (map header, 8 spare bytes, one entry per cluster)
    and the number of blocks its pclusters take."""

    index: bytes
    blocks: int

    def pack_plan(self, plan: Any, writer: Any) -> None:
        plan.layout = d.LAYOUT_COMPRESSED_FULL
        plan.i_u = self.blocks
        plan.after = self.index
        plan.align = 8


class _Lz4:
    """liblz4's destSize compressors through ctypes (python-lz4 has no destSize)."""

    def __init__(self, algorithm: str, level: int | None) -> None:
        try:
            lib = ctypes.CDLL("liblz4.so.1")
        except OSError:
            name = ctypes.util.find_library("lz4")
            if name is None:
                raise UnsupportedInputError("compression needs liblz4 (package liblz4-1)") from None
            lib = ctypes.CDLL(name)
        self.hc = algorithm == "lz4hc"
        self.level = level if level is not None else LZ4HC_DEFAULT_LEVEL
        if self.hc:
            fn = lib.LZ4_compress_HC_destSize
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
            lib.LZ4_sizeofStateHC.restype = ctypes.c_int
            self.state = ctypes.create_string_buffer(lib.LZ4_sizeofStateHC())
        else:
            fn = lib.LZ4_compress_destSize
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                           ctypes.c_int]
        fn.restype = ctypes.c_int
        self.fn = fn
        self.consumed = ctypes.c_int(0)

    def compress(self, src_addr: int, src_len: int, dst: Any, dst_len: int) -> tuple[int, int]:
        """(compressed size, input consumed) for at most ``dst_len`` bytes of output."""
        self.consumed.value = src_len
        if self.hc:
            c = self.fn(self.state, src_addr, dst, ctypes.byref(self.consumed), dst_len, self.level)
        else:
            c = self.fn(src_addr, dst, ctypes.byref(self.consumed), dst_len)
        return c, self.consumed.value


class Compressor:
    incompat = d.INCOMPAT_ZERO_PADDING
    max_distance = LZ4_MAX_DISTANCE

    def __init__(self, image: ImageFile, algorithm: str, level: int | None) -> None:
        if algorithm not in ("lz4", "lz4hc"):
            raise UnsupportedInputError(f"unknown compression {algorithm!r}")
        self.image = image
        self.lz4 = _Lz4(algorithm, level)
        self.out = ctypes.create_string_buffer(image.bs)

    def write(self, pieces: Iterable[memoryview | bytes], size: int, inline_room: int, *,
              entry: bytes, offset: int) -> FileData:
        if size <= WHOLE_FILE_LIMIT:
            data = b"".join(bytes(p) for p in pieces)
            if len(data) != size:
                raise BadInputError(f"tar truncated: {size} bytes of data declared, "
                                    f"{len(data)} found", entry=entry, offset=offset)
            if not self._saves_a_block(data):
                return self.image.write_flat([data], size, inline_room, entry=entry,
                                             offset=offset)
            pieces = [data]
        return self._stream(pieces, size, entry=entry, offset=offset)

    def _saves_a_block(self, data: bytes) -> bool:
        bs = self.image.bs
        plain_blocks = len(data) // bs  # the tail may go inline
        if plain_blocks == 0:
            return False
        src = ctypes.create_string_buffer(data, len(data))
        base = ctypes.addressof(src)
        pos = blocks = 0
        while pos < len(data):
            _, n = self.lz4.compress(base + pos, len(data) - pos, self.out, bs)
            pos += n if n > bs else min(bs, len(data) - pos)
            blocks += 1
            if blocks >= plain_blocks:
                return False
        index = 16 + 8 * -(-len(data) // bs)
        return blocks * bs + index < len(data)

    def _stream(self, pieces: Iterable[memoryview | bytes], size: int, *, entry: bytes,
                offset: int) -> CompressedData:
        bs = self.image.bs
        buf = bytearray()
        base_pos = 0              # file position of buf[0]
        pos = 0                   # next extent start
        received = 0
        heads: list[tuple[int, int, int]] = []   # (file position, type, block)
        it = iter(pieces)
        while pos < size:
            while len(buf) - (pos - base_pos) < LOOKAHEAD and received < size:
                piece = next(it, None)
                if piece is None:
                    break
                buf += piece
                received += len(piece)
            avail = len(buf) - (pos - base_pos)
            if avail <= 0 or (avail < min(LOOKAHEAD, size - pos)):
                raise BadInputError(f"tar truncated: {size} bytes of data declared, "
                                    f"{received} found", entry=entry, offset=offset)
            length, kind, block = self._extent(buf, pos - base_pos, min(avail, size - pos))
            heads.append((pos, kind, block))
            pos += length
            if pos - base_pos > (1 << 20):
                del buf[:pos - base_pos]
                base_pos = pos
        if received != size or next(it, None) is not None:
            raise BadInputError("data longer than declared", entry=entry, offset=offset)
        self.image.stats.data_bytes += size
        self.image.stats.files += 1
        return CompressedData(_pack_index(heads, size, bs), len(heads))

    def _extent(self, buf: bytearray, at: int, left: int) -> tuple[int, int, int]:
        """Write the extent whose bytes start at ``buf[at:]`` (``left`` of them in the file);
        returns (its length, lcluster type, block)."""
        bs = self.image.bs
        holder = (ctypes.c_char * len(buf)).from_buffer(buf)
        try:
            c, n = self.lz4.compress(ctypes.addressof(holder) + at, left, self.out, bs)
        finally:
            del holder
        block = self.image.reserve(1)
        if n > bs and c > 0:
            os.pwrite(self.image.fd, bytes(bs - c) + self.out.raw[:c], block * bs)
            return n, d.Z_LCLUSTER_TYPE_HEAD1, block
        n = min(bs, left)
        os.pwrite(self.image.fd, bytes(buf[at:at + n]), block * bs)
        return n, d.Z_LCLUSTER_TYPE_PLAIN, block


def _pack_index(heads: list[tuple[int, int, int]], size: int, bs: int) -> bytes:
    """Map header, 8 spare bytes, then one entry per logical cluster (``erofs-format.md``
    4.6.3). The cluster holding EOF gets a closing PLAIN head when no extent starts there."""
    nclusters = -(-size // bs)
    by_lcn: dict[int, tuple[int, int, int]] = {}
    for hpos, kind, block in heads:
        by_lcn[hpos // bs] = (kind, hpos % bs, block)
    if size % bs and (size - 1) // bs not in by_lcn:
        by_lcn[(size - 1) // bs] = (d.Z_LCLUSTER_TYPE_PLAIN, size % bs, 0)
    head_lcns = sorted(by_lcn)
    header = d.MapHeaderRaw(h_reserved1=0, h_idata_size=0, h_advise=0,
                            h_algorithmtype=d.ALG_LZ4 << 4 | d.ALG_LZ4, h_clusterbits=0)
    out = [d.MAP_HEADER.pack(*header), bytes(8)]
    after = 0  # index in head_lcns of the first head past lcn
    for lcn in range(nclusters):
        while after < len(head_lcns) and head_lcns[after] <= lcn:
            after += 1
        if lcn in by_lcn:
            kind, clusterofs, block = by_lcn[lcn]
            out.append(d.LCLUSTER_INDEX.pack(*d.LclusterIndexRaw(
                di_advise=kind, di_clusterofs=clusterofs, di_u=block)))
            continue
        prev = head_lcns[after - 1]
        nxt = head_lcns[after] if after < len(head_lcns) else nclusters
        delta0 = min(lcn - prev, d.Z_LI_D0_CBLKCNT - 1)
        out.append(d.LCLUSTER_INDEX.pack(*d.LclusterIndexRaw(
            di_advise=d.Z_LCLUSTER_TYPE_NONHEAD, di_clusterofs=0,
            di_u=delta0 | min(nxt - lcn, 0xFFFF) << 16)))
    return b"".join(out)
