"""Extended attributes (spec §7): inline entries, shared entries, name indexes, long prefixes.

Names are returned as full ``bytes`` (``user.foo``); entries with the hidden index 0, Lustre or
unknown indexes are not listed, as Linux does not list them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import ondisk as d
from .errors import CorruptImageError

SHORT_PREFIXES: dict[int, bytes] = {
    d.XATTR_INDEX_USER: b"user.",
    d.XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    d.XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    d.XATTR_INDEX_TRUSTED: b"trusted.",
    d.XATTR_INDEX_SECURITY: b"security.",
}
MAX_XATTR_NAME = 255

ReadFn = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class LongPrefix:
    base_index: int
    infix: bytes


def parse_prefix_table(read: ReadFn, space_size: int, start: int, count: int) -> list[LongPrefix]:
    """The long xattr name prefix table (§7.5)."""
    prefixes = []
    pos = start
    for _ in range(count):
        pos = (pos + 3) & ~3
        if pos + 2 > space_size:
            raise CorruptImageError("xattr prefix table past the end", offset=pos)
        (length,) = d.U16.unpack(read(pos, 2))
        if not 1 <= length <= 256 or pos + 2 + length > space_size:
            raise CorruptImageError(f"xattr prefix record of {length} bytes", offset=pos)
        rec = read(pos + 2, length)
        prefixes.append(LongPrefix(rec[0], rec[1:]))
        pos += 2 + length
    return prefixes


def _entry_at(read: ReadFn, pos: int, limit: int) -> tuple[int, int, int, int]:
    """(name_index, name_len, value_size, entry size) of the entry at ``pos``."""
    if pos + d.XATTR_ENTRY.size > limit:
        raise CorruptImageError("xattr entry header past its region", offset=pos)
    name_len, index, value_size = d.XATTR_ENTRY.unpack(read(pos, d.XATTR_ENTRY.size))
    size = (d.XATTR_ENTRY.size + name_len + value_size + 3) & ~3
    if pos + size > limit:
        raise CorruptImageError("xattr entry overruns its region", offset=pos)
    return index, name_len, value_size, size


class XattrReader:
    """Reads the xattrs of inodes of one image."""

    def __init__(
        self,
        prefixes: list[LongPrefix],
        read_shared: ReadFn,
        shared_base: int,
        shared_size: int,
    ) -> None:
        self._prefixes = prefixes
        self._read_shared = read_shared
        self._shared_base = shared_base
        self._shared_size = shared_size

    def full_name(self, index: int, suffix: bytes) -> bytes | None:
        """The full attribute name, or None for entries Linux does not expose."""
        if index & d.XATTR_LONG_PREFIX:
            k = index & d.XATTR_LONG_PREFIX_MASK
            if k >= len(self._prefixes):
                return None
            p = self._prefixes[k]
            base = SHORT_PREFIXES.get(p.base_index)
            if base is None:
                return None
            name = base + p.infix + suffix
        else:
            base = SHORT_PREFIXES.get(index)
            if base is None:
                return None
            name = base + suffix
        if len(name) > MAX_XATTR_NAME:
            return None
        return name

    def items(self, read: ReadFn, region_pos: int, region_size: int) -> list[tuple[bytes, bytes]]:
        """All visible (name, value) pairs of an inode: inline first, then shared."""
        if region_size == 0:
            return []
        limit = region_pos + region_size
        # the region (at most 256 KiB: the count is 16 bits) read once, its entries cut from
        # it: one read through the block cache instead of two per entry and two for the header
        region = read(region_pos, region_size)

        def inline(pos: int, length: int) -> bytes:
            start = pos - region_pos
            return region[start:start + length]
        _, shared_count, _ = d.XATTR_IBODY_HEADER.unpack_from(region, 0)
        ids_end = region_pos + d.XATTR_IBODY_HEADER.size + 4 * shared_count
        if ids_end > limit:
            raise CorruptImageError(f"{shared_count} shared xattr ids overrun the region", offset=region_pos)
        shared_ids = inline(region_pos + d.XATTR_IBODY_HEADER.size, 4 * shared_count)
        out: list[tuple[bytes, bytes]] = []
        pos = ids_end
        while pos + d.XATTR_ENTRY.size <= limit:
            index, name_len, value_size, size = _entry_at(inline, pos, limit)
            self._collect(inline, pos, index, name_len, value_size, out)
            pos += size
        for k in range(shared_count):
            (xid,) = d.U32.unpack_from(shared_ids, 4 * k)
            spos = self._shared_base + 4 * xid
            index, name_len, value_size, _ = _entry_at(self._read_shared, spos, self._shared_size)
            self._collect(self._read_shared, spos, index, name_len, value_size, out)
        return out

    def _collect(
        self,
        read: ReadFn,
        pos: int,
        index: int,
        name_len: int,
        value_size: int,
        out: list[tuple[bytes, bytes]],
    ) -> None:
        if index == 0 and name_len == 0 and value_size == 0:
            return  # padding
        body = read(pos + d.XATTR_ENTRY.size, name_len + value_size)
        name = self.full_name(index, body[:name_len])
        if name is not None:
            out.append((name, body[name_len:]))
