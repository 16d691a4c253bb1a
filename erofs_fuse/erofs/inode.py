"""Inodes (spec §3): compact and extended forms, i_format, the i_u / i_nb unions.

``parse_inode`` turns the bytes at a nid into a frozen ``InodeInfo`` of decoded integers; it
validates everything that later indexes or sizes something (layout, mode, size, xattr region).
"""

from __future__ import annotations

import stat
from typing import NamedTuple

from . import ondisk as d
from .errors import CorruptImageError, UnsupportedFeatureError
from .space import Space
from .superblock import SuperBlock

VALID_TYPES = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)
# No image holds a file larger than this (48-bit block numbers of 64 KiB blocks).
MAX_FILE_SIZE = 1 << 63


class InodeInfo(NamedTuple):
    """A NamedTuple, not a frozen dataclass: one is made for every inode looked at, and a
    frozen dataclass took 7 us to build (its __init__ sets each field through
    object.__setattr__), a third of parsing an inode; a NamedTuple takes under 1 us."""

    nid: int
    pos: int  # byte position of the inode in its space
    in_metabox: bool
    extended: bool
    layout: int
    format_bit4: bool  # NLINK_1 for compact non-dirs, DOT_OMITTED for dirs
    xattr_icount: int
    mode: int
    size: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    nlink: int
    ino32: int
    i_u: int
    startblk: int  # FLAT layouts: first data block (48 bits where the inode allows)
    addr_mask: int  # NULL address marker for startblk: 32 or 48 bits of ones
    blocks: int  # COMPRESSED layouts: blocks used by compressed data

    @property
    def isize(self) -> int:
        return 64 if self.extended else 32

    @property
    def xattr_isize(self) -> int:
        return 0 if self.xattr_icount == 0 else 12 + 4 * (self.xattr_icount - 1)

    @property
    def after(self) -> int:
        """Position in the inode's space right after the inode body and inline xattrs."""
        return self.pos + self.isize + self.xattr_isize

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)

    @property
    def is_compressed(self) -> bool:
        return self.layout in (d.LAYOUT_COMPRESSED_FULL, d.LAYOUT_COMPRESSED_COMPACT)

    @property
    def dot_omitted(self) -> bool:
        return self.is_dir and self.format_bit4

    @property
    def has_data(self) -> bool:
        return stat.S_IFMT(self.mode) in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)

    @property
    def rdev(self) -> int:
        """Device number in the Linux "new" encoding, 0 for non-devices."""
        if not self.is_device:
            return 0
        v = self.i_u
        major = (v >> 8) & 0xFFF
        minor = (v & 0xFF) | ((v >> 12) & 0xFFF00)
        return (major << 8) | (minor & 0xFF) | ((minor & ~0xFF) << 12)

    @property
    def rdev_major(self) -> int:
        return (self.i_u >> 8) & 0xFFF if self.is_device else 0

    @property
    def rdev_minor(self) -> int:
        v = self.i_u
        return ((v & 0xFF) | ((v >> 12) & 0xFFF00)) if self.is_device else 0

    def st_blocks(self, blkszbits: int) -> int:
        """512-byte blocks, as the kernel reports them."""
        if self.is_compressed:
            return (self.blocks & 0xFFFFFFFF) << (blkszbits - 9)  # the kernel uses blocks_lo only
        bs = 1 << blkszbits
        return ((self.size + bs - 1) & ~(bs - 1)) >> 9


def inode_position(sb: SuperBlock, nid: int) -> tuple[bool, int]:
    """(in_metabox, byte position) of inode ``nid``."""
    if nid & d.NID_METABOX_BIT:
        return True, (nid & ~d.NID_METABOX_BIT) << d.ISLOTBITS
    return False, sb.meta_base + (nid << d.ISLOTBITS)


def parse_inode(sb: SuperBlock, space: Space, nid: int) -> InodeInfo:
    """Decode the inode ``nid`` from ``space`` (which must be the space its nid selects)."""
    in_metabox, pos = inode_position(sb, nid)

    def corrupt(msg: str) -> CorruptImageError:
        return CorruptImageError(msg, nid=nid, offset=pos)

    if pos + 32 > space.size:
        raise corrupt("inode position past the end of its space")
    # one read for either form (most inodes of real images are extended: 64 bytes), unless the
    # 64 bytes would reach into the next block: a compact inode ending a block must not depend
    # on that block (with verity, reading it means verifying it)
    in_block = (pos & (sb.block_size - 1)) + 64 <= sb.block_size
    head = space.read(pos, 64 if in_block and pos + 64 <= space.size else 32)
    (i_format,) = d.U16.unpack_from(head)
    if i_format & ~d.I_FORMAT_SUPPORTED:
        raise UnsupportedFeatureError(f"unknown i_format bits {i_format:#x}", nid=nid, offset=pos)
    layout = (i_format >> d.I_DATALAYOUT_SHIFT) & d.I_DATALAYOUT_MASK
    if layout not in d.LAYOUT_NAMES:
        raise UnsupportedFeatureError(f"unknown data layout {layout}", nid=nid, offset=pos)
    extended = bool(i_format & d.I_VERSION_MASK)
    bit4 = bool(i_format & d.I_NLINK_1_OR_DOT_OMITTED)
    is_48bit = sb.is_48bit

    if extended:
        if len(head) < 64:
            if pos + 64 > space.size:
                raise corrupt("extended inode runs past the end of its space")
            head += space.read(pos + 32, 32)
        e = d.InodeExtendedRaw._make(d.INODE_EXTENDED.unpack_from(head))
        if e.i_size & (1 << 63):
            raise corrupt("negative file size")
        mode, size, uid, gid = e.i_mode, e.i_size, e.i_uid, e.i_gid
        mtime, nsec, nlink, ino32, i_u = e.i_mtime, e.i_mtime_nsec, e.i_nlink, e.i_ino, e.i_u
        hi = e.i_nb if is_48bit else 0
        xattr_icount = e.i_xattr_icount
    else:
        c = d.InodeCompactRaw._make(d.INODE_COMPACT.unpack_from(head))
        mode, size, uid, gid, ino32, i_u = c.i_mode, c.i_size, c.i_uid, c.i_gid, c.i_ino, c.i_u
        # u64 arithmetic into a signed 64-bit time, as the kernel's timespec64 holds it: a
        # hostile epoch must not make a time no stat() can carry (and no FUSE reply)
        mtime = ((sb.raw.epoch + c.i_mtime + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)
        nsec = sb.raw.fixed_nsec
        if bit4 and not stat.S_ISDIR(mode):
            nlink = 1
            hi = c.i_nb if is_48bit else 0
        else:
            nlink = c.i_nb
            hi = 0
        xattr_icount = c.i_xattr_icount

    ftype = stat.S_IFMT(mode)
    if ftype not in VALID_TYPES:
        raise corrupt(f"bad file type in mode {mode:#o}")
    if xattr_icount == 1:
        raise UnsupportedFeatureError("xattr region of 12 bytes (reserved)", nid=nid, offset=pos)
    if nsec >= 1_000_000_000:
        nsec = nsec % 1_000_000_000  # keep stat() sane; the kernel does not check this
    wide = is_48bit and (extended or (bit4 and ftype != stat.S_IFDIR))
    addr_mask = d.NULL_ADDR_48 if wide else d.NULL_ADDR_32
    startblk = (i_u | (hi << 32)) & addr_mask
    if ftype not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        layout = d.LAYOUT_FLAT_PLAIN  # devices, fifos and sockets have no data to lay out
    # positional: a NamedTuple built from keywords costs twice as much
    info = InodeInfo(nid, pos, in_metabox, extended, layout, bit4, xattr_icount, mode, size, uid,
                     gid, mtime, nsec, nlink, ino32, i_u, startblk, addr_mask, i_u | (hi << 32))
    after = pos + (64 if extended else 32) + (12 + 4 * (xattr_icount - 1) if xattr_icount else 0)
    if after > space.size:  # info.after, without two property calls
        raise corrupt("inline xattr region runs past the end of its space")
    return info
