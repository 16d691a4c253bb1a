"""Inodes from bytes: both forms, unions, devices, validation."""

from __future__ import annotations

import stat

import pytest

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.errors import CorruptImageError, UnsupportedFeatureError
from erofs_fuse.erofs.image import Image
from erofs_fuse.erofs.inode import InodeInfo, parse_inode
from erofs_fuse.erofs.superblock import SuperBlock
from helpers import corpus


class BytesSpace:
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        assert offset + length <= len(self.data)
        return self.data[offset : offset + length]


def superblock() -> SuperBlock:
    with Image.open(corpus("plain.erofs")) as image:
        return image.superblock


def space_with(inode: bytes, nid: int = 200) -> BytesSpace:
    sb = superblock()
    pos = sb.meta_base + 32 * nid
    return BytesSpace(bytes(pos) + inode + bytes(4096))


def compact(fmt: int, mode: int, nb: int = 1, size: int = 0, i_u: int = 0, icount: int = 0) -> bytes:
    return d.INODE_COMPACT.pack(fmt, icount, mode, nb, size, 0, i_u, 5, 1000, 100, 0)


def extended(fmt: int, mode: int, size: int = 0, i_u: int = 0, nlink: int = 1) -> bytes:
    return d.INODE_EXTENDED.pack(fmt | 1, 0, mode, 0, size, i_u, 5, 70000, 80000, -5, 999, nlink, bytes(16))


def parse(raw: bytes) -> InodeInfo:
    return parse_inode(superblock(), space_with(raw), 200)


def test_compact_regular_file() -> None:
    info = parse(compact(d.LAYOUT_FLAT_INLINE << 1, stat.S_IFREG | 0o644, nb=2, size=5000, i_u=9))
    assert (info.size, info.nlink, info.uid, info.gid, info.startblk) == (5000, 2, 1000, 100, 9)
    assert info.layout == d.LAYOUT_FLAT_INLINE and not info.extended
    assert info.after == info.pos + 32


def test_extended_inode_fields() -> None:
    info = parse(extended(0, stat.S_IFREG | 0o600, size=1 << 40, nlink=7))
    assert info.extended and info.size == 1 << 40 and info.nlink == 7
    assert (info.uid, info.gid, info.mtime, info.mtime_nsec) == (70000, 80000, -5, 999)


def test_device_numbers_use_the_new_encoding() -> None:
    major, minor = 300, 70000
    raw_dev = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    info = parse(compact(0, stat.S_IFCHR | 0o600, i_u=raw_dev))
    assert (info.rdev_major, info.rdev_minor) == (major, minor)
    import os

    assert (os.major(info.rdev), os.minor(info.rdev)) == (major, minor)


def test_xattr_region_size() -> None:
    info = parse(compact(0, stat.S_IFREG | 0o644, icount=3))
    assert info.xattr_isize == 12 + 4 * 2


@pytest.mark.parametrize(
    "raw,error",
    [
        (compact(0, 0o170644), CorruptImageError),  # no such file type
        (compact(0x20, stat.S_IFREG), UnsupportedFeatureError),  # unknown i_format bit
        (compact(5 << 1, stat.S_IFREG), UnsupportedFeatureError),  # layout 5
        (compact(0, stat.S_IFREG, icount=1), UnsupportedFeatureError),  # 12-byte xattr region
        (extended(0, stat.S_IFREG, size=1 << 63), CorruptImageError),  # negative size
    ],
)
def test_invalid_inodes(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse(raw)


def test_inode_past_the_end_is_corrupt() -> None:
    with pytest.raises(CorruptImageError):
        parse_inode(superblock(), BytesSpace(bytes(100)), 10**6)


def test_inode_at_the_end_of_its_space() -> None:
    # parse_inode reads 64 bytes at once where they exist: a compact inode in the last 32 bytes
    # is still read, an extended one cut there is corrupt
    sb = superblock()
    pos = sb.meta_base + 32 * 200
    raw = compact(0, stat.S_IFREG, size=7)
    info = parse_inode(sb, BytesSpace(bytes(pos) + raw), 200)
    assert (info.size, info.extended) == (7, False)
    cut = extended(0, stat.S_IFREG)[:32] + bytes(16)
    with pytest.raises(CorruptImageError):
        parse_inode(sb, BytesSpace(bytes(pos) + cut), 200)


class GuardedSpace(BytesSpace):
    """A space whose bytes from ``bad`` on fail to read, as a block failing verification."""

    def __init__(self, data: bytes, bad: int) -> None:
        super().__init__(data)
        self.bad = bad

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > self.bad:
            raise CorruptImageError("verification failed", offset=self.bad)
        return super().read(offset, length)


def test_compact_inode_ending_a_block_reads_nothing_of_the_next() -> None:
    sb = superblock()
    bs = sb.block_size
    nid = (bs - 32 - sb.meta_base % bs) % bs // 32 + bs // 32  # the last slot of a block
    pos = sb.meta_base + 32 * nid
    assert (pos + 32) % bs == 0
    data = bytes(pos) + compact(0, stat.S_IFREG, size=9) + bytes(bs)
    info = parse_inode(sb, GuardedSpace(data, pos + 32), nid)
    assert info.size == 9
    # an extended inode there spans both blocks and needs the second
    data = bytes(pos) + extended(0, stat.S_IFREG, size=9) + bytes(bs)
    assert parse_inode(sb, BytesSpace(data), nid).size == 9
    with pytest.raises(CorruptImageError):
        parse_inode(sb, GuardedSpace(data, pos + 32), nid)
