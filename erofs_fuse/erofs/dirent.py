"""Directory blocks (spec §6): 12-byte dirents followed by their names, sorted byte-wise.

A directory's data is read through the generic data path in blocks of the image's block size;
this module parses one block and searches a directory by name in O(log n) block reads.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from . import ondisk as d
from .errors import CorruptImageError


class DirEntry(NamedTuple):
    name: bytes
    nid: int
    file_type: int


def parse_dir_block(block: bytes, nid: int | None = None, offset: int = 0) -> list[DirEntry]:
    """All entries of one directory block (``block`` is its valid bytes, at most a block)."""
    maxsize = len(block)

    def corrupt(msg: str) -> CorruptImageError:
        return CorruptImageError(f"directory block: {msg}", nid=nid, offset=offset)

    if maxsize < d.DIRENT.size:
        raise corrupt(f"block of {maxsize} bytes holds no entry")
    _, nameoff0, _, _ = d.DIRENT.unpack_from(block, 0)
    if nameoff0 < d.DIRENT.size or nameoff0 >= maxsize or nameoff0 % d.DIRENT.size:
        raise corrupt(f"first name offset {nameoff0} invalid")
    count = nameoff0 // d.DIRENT.size
    raw = list(d.DIRENT.iter_unpack(block[:nameoff0]))
    entries = []
    for i, (child, nameoff, ftype, _) in enumerate(raw):
        if i + 1 < count:
            end = raw[i + 1][1]
        else:
            nul = block.find(b"\0", nameoff)
            end = maxsize if nul < 0 else nul
        if nameoff >= maxsize or end > maxsize or end <= nameoff:
            raise corrupt(f"entry {i}: name at {nameoff}..{end} outside the block")
        if end - nameoff > d.MAX_NAME_LEN:
            raise corrupt(f"entry {i}: name of {end - nameoff} bytes")
        if ftype >= d.FT_MAX:
            raise corrupt(f"entry {i}: file type {ftype}")
        entries.append(DirEntry(block[nameoff:end], child, ftype))
    return entries


BlockReader = Callable[[int], list[DirEntry]]


def lookup_in_blocks(nblocks: int, read_block: BlockReader, name: bytes) -> DirEntry | None:
    """Binary search over sorted directory blocks, then inside the candidate block."""
    lo, hi = 0, nblocks - 1
    candidate: list[DirEntry] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        entries = read_block(mid)
        first = entries[0].name
        if name == first:
            return entries[0]
        if name > first:
            candidate = entries
            lo = mid + 1
        else:
            hi = mid - 1
    if candidate is None:
        return None
    lo, hi = 1, len(candidate) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        entry = candidate[mid]
        if name == entry.name:
            return entry
        if name > entry.name:
            lo = mid + 1
        else:
            hi = mid - 1
    return None
