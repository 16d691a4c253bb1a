"""Xattrs: entries from bytes, name indexes, long prefixes, shared entries, hostile regions."""

from __future__ import annotations

import struct

import pytest

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.errors import CorruptImageError
from erofs_fuse.erofs.image import Image
from erofs_fuse.erofs.xattr import LongPrefix, XattrReader, parse_prefix_table
from helpers import corpus


def entry(index: int, name: bytes, value: bytes) -> bytes:
    raw = struct.pack("<BBH", len(name), index, len(value)) + name + value
    return raw.ljust((len(raw) + 3) & ~3, b"\0")


def region(entries: bytes, shared: list[int] = []) -> bytes:
    head = struct.pack("<IB7s", 0, len(shared), bytes(7)) + b"".join(struct.pack("<I", x) for x in shared)
    return head + entries


def reader(prefixes: list[LongPrefix] = [], shared: bytes = b"") -> XattrReader:
    return XattrReader(prefixes, lambda off, n: shared[off : off + n], 0, len(shared))


def items(data: bytes, xr: XattrReader | None = None) -> list[tuple[bytes, bytes]]:
    return (xr or reader()).items(lambda off, n: data[off : off + n], 0, len(data))


def test_short_indexes_and_hidden_entries() -> None:
    data = region(
        entry(d.XATTR_INDEX_USER, b"a", b"1")
        + entry(d.XATTR_INDEX_TRUSTED, b"overlay.opaque", b"y")
        + entry(d.XATTR_INDEX_POSIX_ACL_ACCESS, b"", b"\x02\0\0\0")
        + entry(0, b"hidden", b"x")  # index 0: never listed
        + entry(d.XATTR_INDEX_LUSTRE, b"lov", b"x")  # not exposed by Linux
        + entry(d.XATTR_INDEX_SECURITY, b"selinux", b"ctx")
    )
    assert items(data) == [
        (b"user.a", b"1"),
        (b"trusted.overlay.opaque", b"y"),
        (b"system.posix_acl_access", b"\x02\0\0\0"),
        (b"security.selinux", b"ctx"),
    ]


def test_long_prefixes_and_shared_entries() -> None:
    shared = entry(d.XATTR_INDEX_USER, b"common", b"v") + entry(0x80 | 1, b"opaque", b"y")
    xr = reader([LongPrefix(d.XATTR_INDEX_USER, b"long-"), LongPrefix(d.XATTR_INDEX_TRUSTED, b"overlay.")], shared)
    data = region(entry(0x80, b"x", b"1") + entry(0x80 | 5, b"gone", b"1"), shared=[0, len(entry(1, b"common", b"v")) // 4])
    assert items(data, xr) == [(b"user.long-x", b"1"), (b"user.common", b"v"), (b"trusted.overlay.opaque", b"y")]


def test_prefix_table() -> None:
    table = struct.pack("<H", 6) + bytes([4]) + b"over." + struct.pack("<H", 1) + bytes([1])
    prefixes = parse_prefix_table(lambda off, n: table[off : off + n], len(table), 0, 2)
    assert prefixes == [LongPrefix(4, b"over."), LongPrefix(1, b"")]
    with pytest.raises(CorruptImageError):
        parse_prefix_table(lambda off, n: table[off : off + n], len(table), 0, 3)


@pytest.mark.parametrize(
    "data",
    [
        region(b"", shared=[1, 2])[:16],  # shared ids overrun the region
        region(struct.pack("<BBH", 10, 1, 100) + b"abc"),  # entry overruns the region
    ],
)
def test_hostile_regions(data: bytes) -> None:
    with pytest.raises(CorruptImageError):
        items(data)


def test_fixture_with_long_prefixes_and_digests() -> None:
    with Image.open(corpus("xattr-prefix.erofs")) as image:
        assert image.lookup("/xattrs/long").getxattr(b"user.long-value") is not None
    with Image.open(corpus("xattr-digest.erofs")) as image:
        # the content fingerprint is a hidden (index 0) long-prefix entry: never listed
        for _, node in image.walk():
            assert all(not name.startswith(b"erofs.") for name in node.listxattr())


def test_inline_region_is_read_once() -> None:
    """An inode's inline xattr region is read with one call (one pass through the block cache,
    once per metadata-only file opened), its entries cut from those bytes; only shared entries
    are read apart, from the shared area."""
    data = region(entry(d.XATTR_INDEX_TRUSTED, b"overlay.metacopy", b"")
                  + entry(d.XATTR_INDEX_TRUSTED, b"overlay.redirect", b"/ab/cdef")
                  + entry(d.XATTR_INDEX_USER, b"x", b"1"), shared=[0])
    shared = entry(d.XATTR_INDEX_USER, b"common", b"v")
    base = 4096
    calls: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        calls.append((off, n))
        return data[off - base:off - base + n]

    got = reader(shared=shared).items(read, base, len(data))
    assert got == [(b"trusted.overlay.metacopy", b""), (b"trusted.overlay.redirect", b"/ab/cdef"),
                   (b"user.x", b"1"), (b"user.common", b"v")]
    assert calls == [(base, len(data))]
