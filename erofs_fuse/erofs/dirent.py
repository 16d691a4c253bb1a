"""Directory blocks (spec §6): 12-byte dirents followed by their names, sorted byte-wise.

A directory's data is read through the generic data path in blocks of the image's block size;
this module parses one block and searches a directory by name in O(log n) block reads.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

from mypy_extensions import mypyc_attr

from . import ondisk as d
from .errors import CorruptImageError


class DirEntry(NamedTuple):
    name: bytes
    nid: int
    file_type: int


def _corrupt(msg: str, nid: int | None, offset: int) -> CorruptImageError:
    return CorruptImageError(f"directory block: {msg}", nid=nid, offset=offset)


def _entry_count(block: bytes, nid: int | None, offset: int) -> int:
    """How many entries ``block`` holds (from the first name offset), checked."""
    maxsize = len(block)
    if maxsize < d.DIRENT.size:
        raise _corrupt(f"block of {maxsize} bytes holds no entry", nid, offset)
    _, nameoff0, _, _ = d.DIRENT.unpack_from(block, 0)
    if nameoff0 < d.DIRENT.size or nameoff0 >= maxsize or nameoff0 % d.DIRENT.size:
        raise _corrupt(f"first name offset {nameoff0} invalid", nid, offset)
    count: int = nameoff0 // d.DIRENT.size
    return count


def _entry(block: bytes, i: int, child: int, nameoff: int, ftype: int, end: int | None,
           nid: int | None, offset: int) -> DirEntry:
    """Entry ``i``, its name ending at ``end`` (the next entry's name offset) or, for the last
    entry (``end`` None), at the first NUL or the end of the block; checked."""
    maxsize = len(block)
    if end is None:
        nul = block.find(b"\0", nameoff)
        end = maxsize if nul < 0 else nul
    if nameoff >= maxsize or end > maxsize or end <= nameoff:
        raise _corrupt(f"entry {i}: name at {nameoff}..{end} outside the block", nid, offset)
    if end - nameoff > d.MAX_NAME_LEN:
        raise _corrupt(f"entry {i}: name of {end - nameoff} bytes", nid, offset)
    if ftype >= d.FT_MAX:
        raise _corrupt(f"entry {i}: file type {ftype}", nid, offset)
    return DirEntry(block[nameoff:end], child, ftype)


def parse_dir_block(block: bytes, nid: int | None = None, offset: int = 0) -> list[DirEntry]:
    """All entries of one directory block (``block`` is its valid bytes, at most a block)."""
    count = _entry_count(block, nid, offset)
    raw = list(d.DIRENT.iter_unpack(block[: count * d.DIRENT.size]))
    last = count - 1
    return [_entry(block, i, child, nameoff, ftype, raw[i + 1][1] if i < last else None, nid,
                   offset)
            for i, (child, nameoff, ftype, _) in enumerate(raw)]


@mypyc_attr(allow_interpreted_subclasses=True)  # tests count decodes in a subclass
class DirBlock:
    """One directory block whose entries are decoded when asked for (``len``, ``[i]``), each
    once: the image keeps its hot blocks (``Image``'s directory block cache), so python's
    imports, probing dozens of names in one ``__pycache__``, decode a block's middle entries
    once rather than on every search.

    A name lookup looks at the first entry of about log2(blocks) blocks and at about log2(n)
    entries of one: decoding whole blocks for it cost ~100 us per lookup in a large directory
    (python's imports probe many names), most of it building entries never compared."""

    __slots__ = ("_block", "_count", "_nid", "_offset", "_entries")

    def __init__(self, block: bytes, nid: int | None = None, offset: int = 0) -> None:
        self._block = block
        self._count = _entry_count(block, nid, offset)
        self._nid = nid
        self._offset = offset
        self._entries: list[DirEntry | None] = [None] * self._count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> DirEntry:
        if not 0 <= i < self._count:
            raise IndexError(i)
        entry = self._entries[i]
        if entry is None:
            entry = self._entries[i] = self._decode(i)
        return entry

    def _decode(self, i: int) -> DirEntry:
        size = d.DIRENT.size
        child, nameoff, ftype, _ = d.DIRENT.unpack_from(self._block, i * size)
        end = d.DIRENT.unpack_from(self._block, (i + 1) * size)[1] if i + 1 < self._count else None
        return _entry(self._block, i, child, nameoff, ftype, end, self._nid, self._offset)


class Entries(Protocol):
    """The entries of one block by index: a list of them, or a ``DirBlock``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> DirEntry: ...


BlockReader = Callable[[int], Entries]


def lookup_in_blocks(nblocks: int, read_block: BlockReader, name: bytes) -> DirEntry | None:
    """The entry called ``name`` of sorted directory blocks, or None: ``first_not_below``,
    then one comparison."""
    entry = first_not_below(nblocks, read_block, name)
    return entry if entry is not None and entry.name == name else None


def first_not_below(nblocks: int, read_block: BlockReader, key: bytes) -> DirEntry | None:
    """The first entry, in the directory's sorted order, whose name is ``key`` or sorts after
    it; None if every name sorts before ``key``. With a prefix as ``key``: whether any name has
    that prefix, in one search (the overlay asks whether a layer's directory holds whiteouts)."""
    lo, hi = 0, nblocks - 1
    start = 0  # the last block whose first name sorts before key (or block 0)
    while lo <= hi:
        mid = (lo + hi) // 2
        entries = read_block(mid)
        first = entries[0]
        if first.name == key:
            return first
        if first.name < key:
            start = mid
            lo = mid + 1
        else:
            hi = mid - 1
    # in block ``start``, or the first entry of the block after it (whose first name sorts
    # after key: the search above found no later block starting below it)
    for index in range(start, min(start + 2, nblocks)):
        entries = read_block(index)
        lo, hi = 0, len(entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if entries[mid].name < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(entries):
            return entries[lo]
    return None
