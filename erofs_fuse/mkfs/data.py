"""File data, written into the image as it streams in: block allocation, inline tails, holes.

The image is laid out ``[superblock block(s)] [file data, in stream order] [directory and
symlink blocks] [metadata]``. File data goes straight to its final place while the source is
read, so a layer is read once and its bytes are written once; metadata, which needs the whole
tree, is placed after it (``meta_blkaddr``). A file's last partial block (its tail) is kept in a
spool file when it will be stored inline after the inode, else written as a zero-padded block
right after the file's full blocks, as FLAT_PLAIN needs.

Sparse files are CHUNK_BASED with a block map: only the chunks their data touches are
written, holes are NULL chunks that read as zeros. Zero runs inside written chunks are left
unwritten in the image file too (the image is itself sparse where it can be).
"""

from __future__ import annotations

import array
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..erofs import ondisk as d
from .errors import BadInputError, UnsupportedInputError
from .tree import FileData

MAX_CHUNK_EXTRA_BITS = 31
SPARSE_SLACK = 1 << 30  # what a sparse file may cost beyond twice its data (index, zero fill)


@dataclass(slots=True)
class FlatData(FileData):
    """FLAT_PLAIN / FLAT_INLINE data: ``blocks`` contiguous blocks from ``start`` (the tail's
    block included when not inline), and the inline tail's place in the spool."""

    start: int              # first block, or -1 when the file has no block
    blocks: int
    tail_pos: int = -1      # offset in the tail spool; -1 = no inline tail
    tail_len: int = 0


@dataclass(slots=True)
class ChunkMapData(FileData):
    """CHUNK_BASED with 4-byte block-map entries; NULL_ADDR_32 entries are holes."""

    chunkbits: int          # log2 of the chunk size in bytes
    entries: array.array[int]


@dataclass(slots=True)
class TarIndexData(FileData):
    """CHUNK_BASED with one 8-byte chunk index into extra device 1 (the tar)."""

    chunkbits: int
    device_block: int


@dataclass(slots=True)
class WriteStats:
    data_bytes: int = 0
    files: int = 0


class ImageFile:
    """The output file, its next free block, and the spool of inline tails."""

    def __init__(self, fd: int, spool_fd: int, block_size: int, first_block: int) -> None:
        self.fd = fd
        self.spool_fd = spool_fd
        self.bs = block_size
        self.blkbits = block_size.bit_length() - 1
        self.cursor = first_block
        self.spool_pos = 0
        self.stats = WriteStats()

    # plain files ---------------------------------------------------------------------------
    def write_flat(self, pieces: Iterable[memoryview | bytes], size: int, inline_room: int,
                   *, entry: bytes, offset: int) -> FlatData:
        """Write ``size`` bytes from ``pieces``. The tail goes to the spool when it is at most
        ``inline_room`` bytes (what fits after the inode and its xattrs), else to its own block."""
        bs = self.bs
        start = self.cursor
        pos = start * bs
        full = size - size % bs
        written = 0
        tail = bytearray()
        for piece in pieces:
            n = len(piece)
            if written + n <= full:
                os.pwrite(self.fd, piece, pos + written)
            else:
                head = max(0, full - written)
                if head:
                    os.pwrite(self.fd, piece[:head], pos + written)
                tail += piece[head:]
            written += n
        if written != size:
            raise BadInputError(f"tar truncated: {size} bytes of data declared, {written} found",
                                entry=entry, offset=offset)
        self.stats.data_bytes += size
        self.stats.files += 1
        blocks = full // bs
        if tail and len(tail) <= inline_room:
            data = FlatData(start if blocks else -1, blocks, self.spool_pos, len(tail))
            os.pwrite(self.spool_fd, tail, self.spool_pos)
            self.spool_pos += len(tail)
        else:
            if tail:
                os.pwrite(self.fd, tail, pos + full)
                blocks += 1
            data = FlatData(start if blocks else -1, blocks)
        self.cursor += blocks
        return data

    def tail(self, data: FlatData) -> bytes:
        return os.pread(self.spool_fd, data.tail_len, data.tail_pos) if data.tail_len else b""

    def reserve(self, blocks: int) -> int:
        """``blocks`` contiguous blocks for data written later (directories, symlinks)."""
        start = self.cursor
        self.cursor += blocks
        return start

    # sparse files --------------------------------------------------------------------------
    def write_sparse(self, pieces: Iterable[memoryview | bytes], size: int,
                     regions: list[tuple[int, int]], *, entry: bytes, offset: int) -> ChunkMapData:
        """Write the data regions of a sparse file (``pieces`` = their bytes, concatenated)."""
        bs = self.bs
        file_blocks = -(-size // bs)
        cost, chunk_blocks, ranges = _chunking(_touched_block_ranges(regions, bs), file_blocks, bs)
        stored = sum(n for _, n in regions)
        if cost > 2 * stored + SPARSE_SLACK:
            raise UnsupportedInputError(
                f"a sparse file of {size} bytes would take {cost} bytes of chunk index and "
                f"zero-filled chunks for {stored} bytes of data", entry=entry, offset=offset)
        chunkbits = self.blkbits + chunk_blocks.bit_length() - 1
        entries = array.array("I", [d.NULL_ADDR_32]) * -(-size // (1 << chunkbits))
        placed: list[tuple[int, int, int]] = []  # (first file block, end, image block)
        for first, end in ranges:
            placed.append((first, end, self.cursor))
            for c in range(first // chunk_blocks, -(-end // chunk_blocks)):
                entries[c] = self.cursor + c * chunk_blocks - first
            self.cursor += end - first
        self._write_regions(pieces, regions, placed, entry=entry, offset=offset)
        self.stats.data_bytes += sum(n for _, n in regions)
        self.stats.files += 1
        if self.cursor >= d.NULL_ADDR_32:
            raise BadInputError("image too large for 32-bit block addresses", entry=entry,
                                offset=offset)
        return ChunkMapData(chunkbits, entries)

    def _write_regions(self, pieces: Iterable[memoryview | bytes], regions: list[tuple[int, int]],
                       placed: list[tuple[int, int, int]], *, entry: bytes, offset: int) -> None:
        bs = self.bs
        stream = _Bytes(iter(pieces))
        k = 0
        for off, length in regions:
            while not placed[k][0] * bs <= off < placed[k][1] * bs:
                k += 1
            first, _, image_block = placed[k]
            dest = image_block * bs + (off - first * bs)
            left = length
            while left:
                piece = stream.take(left)
                if not piece:
                    raise BadInputError("tar truncated in sparse file data", entry=entry,
                                        offset=offset)
                os.pwrite(self.fd, piece, dest)
                dest += len(piece)
                left -= len(piece)
        if stream.take(1):
            raise AssertionError("sparse data longer than its map")


class _Bytes:
    """Take byte runs of at most a given length from an iterator of pieces."""

    def __init__(self, pieces: Iterator[memoryview | bytes]) -> None:
        self._pieces = pieces
        self._cur: memoryview | bytes = b""

    def take(self, n: int) -> memoryview | bytes:
        if not self._cur:
            self._cur = next(self._pieces, b"")
        out, self._cur = self._cur[:n], self._cur[n:]
        return out


def _touched_block_ranges(regions: list[tuple[int, int]], bs: int) -> list[tuple[int, int]]:
    """Merged [first, end) block ranges that hold data."""
    ranges: list[tuple[int, int]] = []
    for off, length in regions:
        first, end = off // bs, -(-(off + length) // bs)
        if ranges and first <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
        else:
            ranges.append((first, end))
    return ranges


def _chunking(ranges: list[tuple[int, int]], file_blocks: int,
              bs: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(cost, chunk size in blocks, ranges): the chunk size that costs least in index entries
    plus the blocks of every chunk that holds data, and the data ranges widened to whole chunks
    (merged where they meet). A chunk holding data is written whole: its zero runs stay holes in the image file."""
    best: tuple[int, int, list[tuple[int, int]]] | None = None
    for bits in range(MAX_CHUNK_EXTRA_BITS + 1):
        chunk = 1 << bits
        if chunk >= 2 * max(file_blocks, 1) and best is not None:
            break
        widened: list[tuple[int, int]] = []
        for first, end in ranges:
            first = first // chunk * chunk
            end = min(-(-end // chunk) * chunk, file_blocks)
            if widened and first <= widened[-1][1]:
                widened[-1] = (widened[-1][0], max(end, widened[-1][1]))
            else:
                widened.append((first, end))
        cost = 4 * -(-file_blocks // chunk) + bs * sum(e - f for f, e in widened)
        if best is None or cost <= best[0]:
            best = (cost, chunk, widened)
    assert best is not None
    return best


def hole_data(size: int, blkbits: int) -> ChunkMapData:
    """A file that is one hole (its bytes live elsewhere): one NULL chunk covering it all."""
    chunkbits = min(max(blkbits, (size - 1).bit_length()), blkbits + MAX_CHUNK_EXTRA_BITS)
    return ChunkMapData(chunkbits, array.array("I", [d.NULL_ADDR_32]) * -(-size >> chunkbits))


def tar_index_data(size: int, tar_offset: int, block_size: int) -> TarIndexData:
    """One chunk covering the whole file, at its offset in the tar (device 1)."""
    blkbits = block_size.bit_length() - 1
    chunkbits = max(blkbits, (size - 1).bit_length())
    return TarIndexData(min(chunkbits, blkbits + MAX_CHUNK_EXTRA_BITS), tar_offset >> blkbits)


def zero_pieces(n: int) -> Iterator[bytes]:
    """``n`` zero bytes in pieces (for tests and synthetic sources)."""
    while n > 0:
        take = min(n, 1 << 20)
        yield bytes(take)
        n -= take
