"""On-disk structures of EROFS, declared once (spec: erofs-format.md, Appendix A).

This module is our ``erofs_fs.h``: constants and one ``struct.Struct`` per structure, using the
kernel's field names. All integers are little-endian.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

SUPERBLOCK_OFFSET = 1024
MAGIC = 0xE0F5E1E2
MIN_BLKSZBITS = 9
MAX_BLKSZBITS = 16
NID_METABOX_BIT = 1 << 63
ISLOTBITS = 5  # inode slots are 32 bytes
MAX_NAME_LEN = 255
NULL_ADDR_32 = 0xFFFFFFFF
NULL_ADDR_48 = 0xFFFFFFFFFFFF

# feature_compat
COMPAT_SB_CHKSUM = 0x01
COMPAT_MTIME = 0x02
COMPAT_XATTR_FILTER = 0x04
COMPAT_SHARED_EA_IN_METABOX = 0x08
COMPAT_PLAIN_XATTR_PFX = 0x10
COMPAT_ISHARE_XATTRS = 0x20

# feature_incompat
INCOMPAT_ZERO_PADDING = 0x001
INCOMPAT_COMPR_CFGS = 0x002  # also BIG_PCLUSTER
INCOMPAT_CHUNKED_FILE = 0x004
INCOMPAT_DEVICE_TABLE = 0x008  # also COMPR_HEAD2
INCOMPAT_ZTAILPACKING = 0x010
INCOMPAT_FRAGMENTS = 0x020  # also DEDUPE
INCOMPAT_XATTR_PREFIXES = 0x040
INCOMPAT_48BIT = 0x080
INCOMPAT_METABOX = 0x100
INCOMPAT_SUPPORTED = 0x1FF

INCOMPAT_NAMES = {
    INCOMPAT_ZERO_PADDING: "zero_padding",
    INCOMPAT_COMPR_CFGS: "compr_cfgs/big_pcluster",
    INCOMPAT_CHUNKED_FILE: "chunked_file",
    INCOMPAT_DEVICE_TABLE: "device_table/compr_head2",
    INCOMPAT_ZTAILPACKING: "ztailpacking",
    INCOMPAT_FRAGMENTS: "fragments/dedupe",
    INCOMPAT_XATTR_PREFIXES: "xattr_prefixes",
    INCOMPAT_48BIT: "48bit",
    INCOMPAT_METABOX: "metabox",
}
COMPAT_NAMES = {
    COMPAT_SB_CHKSUM: "sb_chksum",
    COMPAT_MTIME: "mtime",
    COMPAT_XATTR_FILTER: "xattr_filter",
    COMPAT_SHARED_EA_IN_METABOX: "shared_ea_in_metabox",
    COMPAT_PLAIN_XATTR_PFX: "plain_xattr_pfx",
    COMPAT_ISHARE_XATTRS: "ishare_xattrs",
}

# compression algorithms (h_algorithmtype nibbles, available_compr_algs bits)
ALG_LZ4 = 0
ALG_LZMA = 1
ALG_DEFLATE = 2
ALG_ZSTD = 3
ALG_NAMES = {ALG_LZ4: "lz4", ALG_LZMA: "lzma", ALG_DEFLATE: "deflate", ALG_ZSTD: "zstd"}

# i_format
I_VERSION_MASK = 0x1
I_DATALAYOUT_SHIFT = 1
I_DATALAYOUT_MASK = 0x7
I_NLINK_1_OR_DOT_OMITTED = 0x10
I_FORMAT_SUPPORTED = 0x1F

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4
LAYOUT_NAMES = {
    LAYOUT_FLAT_PLAIN: "flat_plain",
    LAYOUT_COMPRESSED_FULL: "compressed_full",
    LAYOUT_FLAT_INLINE: "flat_inline",
    LAYOUT_COMPRESSED_COMPACT: "compressed_compact",
    LAYOUT_CHUNK_BASED: "chunk_based",
}

# chunk format (low 16 bits of i_u for CHUNK_BASED)
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_48BIT = 0x40
CHUNK_FORMAT_ALL = 0x7F

# directory entry file types
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7
FT_MAX = 8

# xattr name indexes
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
XATTR_LONG_PREFIX = 0x80
XATTR_LONG_PREFIX_MASK = 0x7F

# z_erofs map header advise bits
Z_ADVISE_COMPACTED_2B = 0x0001
Z_ADVISE_EXTENTS = 0x0001
Z_ADVISE_BIG_PCLUSTER_1 = 0x0002
Z_ADVISE_BIG_PCLUSTER_2 = 0x0004
Z_ADVISE_INLINE_PCLUSTER = 0x0008
Z_ADVISE_INTERLACED_PCLUSTER = 0x0010
Z_ADVISE_FRAGMENT_PCLUSTER = 0x0020
Z_FRAGMENT_INODE_BIT = 7

Z_LCLUSTER_TYPE_PLAIN = 0
Z_LCLUSTER_TYPE_HEAD1 = 1
Z_LCLUSTER_TYPE_NONHEAD = 2
Z_LCLUSTER_TYPE_HEAD2 = 3
Z_LI_D0_CBLKCNT = 0x0800
Z_LI_PARTIAL_REF = 0x8000
Z_PCLUSTER_MAX_SIZE = 1 << 20
Z_PCLUSTER_MAX_DSIZE = 12 << 20
Z_EXTENT_PLEN_MASK = 0x1FFFFF
Z_EXTENT_PLEN_PARTIAL = 1 << 27
Z_EXTENT_PLEN_FMT_BIT = 28


def _struct(fmt: str, size: int) -> struct.Struct:
    layout = struct.Struct(fmt)
    assert layout.size == size, (fmt, layout.size, size)
    return layout


SUPER_BLOCK = _struct("<IIIBBHQqIIII16s16sIHHHBBIQBB2sIQQ", 128)
SUPER_BLOCK_EXT = _struct("<QQ", 16)  # metabox_nid, reserved3


class SuperBlockRaw(NamedTuple):
    magic: int
    checksum: int
    feature_compat: int
    blkszbits: int
    sb_extslots: int
    rootnid_2b: int
    inos: int
    epoch: int
    fixed_nsec: int
    blocks_lo: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: bytes
    feature_incompat: int
    available_compr_algs: int
    extra_devices: int
    devt_slotoff: int
    dirblkbits: int
    xattr_prefix_count: int
    xattr_prefix_start: int
    packed_nid: int
    xattr_filter_reserved: int
    ishare_xattr_prefix_id: int
    reserved: bytes
    build_time: int
    rootnid_8b: int
    reserved2: int


INODE_COMPACT = _struct("<HHHHIIIIHHI", 32)


class InodeCompactRaw(NamedTuple):
    i_format: int
    i_xattr_icount: int
    i_mode: int
    i_nb: int
    i_size: int
    i_mtime: int
    i_u: int
    i_ino: int
    i_uid: int
    i_gid: int
    i_reserved: int


INODE_EXTENDED = _struct("<HHHHQIIIIqII16s", 64)


class InodeExtendedRaw(NamedTuple):
    i_format: int
    i_xattr_icount: int
    i_mode: int
    i_nb: int
    i_size: int
    i_u: int
    i_ino: int
    i_uid: int
    i_gid: int
    i_mtime: int
    i_mtime_nsec: int
    i_nlink: int
    i_reserved2: bytes


DIRENT = _struct("<QHBB", 12)


class DirentRaw(NamedTuple):
    nid: int
    nameoff: int
    file_type: int
    reserved: int = 0


XATTR_IBODY_HEADER = _struct("<IB7s", 12)


class XattrIbodyHeaderRaw(NamedTuple):
    h_name_filter: int
    h_shared_count: int
    h_reserved2: bytes = bytes(7)


XATTR_ENTRY = _struct("<BBH", 4)


class XattrEntryRaw(NamedTuple):
    e_name_len: int
    e_name_index: int
    e_value_size: int


DEVICE_SLOT = _struct("<64sIIHH52s", 128)


class DeviceSlotRaw(NamedTuple):
    tag: bytes
    blocks_lo: int
    uniaddr_lo: int
    blocks_hi: int = 0
    uniaddr_hi: int = 0
    reserved: bytes = bytes(52)


CHUNK_INDEX = _struct("<HHI", 8)


class ChunkIndexRaw(NamedTuple):
    startblk_hi: int
    device_id: int
    startblk_lo: int
BLOCK_MAP_ENTRY = _struct("<I", 4)
U16 = _struct("<H", 2)
U32 = _struct("<I", 4)
U64 = _struct("<Q", 8)
MAP_HEADER = _struct("<HHHBB", 8)


class MapHeaderRaw(NamedTuple):
    h_reserved1: int  # low half of h_fragmentoff
    h_idata_size: int
    h_advise: int
    h_algorithmtype: int
    h_clusterbits: int


LCLUSTER_INDEX = _struct("<HHI", 8)


class LclusterIndexRaw(NamedTuple):
    di_advise: int
    di_clusterofs: int
    di_u: int  # di_blkaddr, or delta0 | delta1 << 16 for NONHEAD
EXTENT_RECORD = _struct("<IIII", 16)  # plen, pstart_lo, pstart_hi, lstart_lo
LZ4_CFG = _struct("<HH", 4)  # max_distance, max_pclusterblks
LZMA_CFG = _struct("<IH", 6)  # dict_size, format
DEFLATE_CFG = _struct("<B", 1)  # windowbits
ZSTD_CFG = _struct("<BB", 2)  # format, windowlog


# every layout with named fields, for the size check in the tests
NAMED_LAYOUTS: tuple[tuple[struct.Struct, type], ...] = (
    (SUPER_BLOCK, SuperBlockRaw), (INODE_COMPACT, InodeCompactRaw),
    (INODE_EXTENDED, InodeExtendedRaw), (DIRENT, DirentRaw),
    (XATTR_IBODY_HEADER, XattrIbodyHeaderRaw), (XATTR_ENTRY, XattrEntryRaw),
    (DEVICE_SLOT, DeviceSlotRaw), (CHUNK_INDEX, ChunkIndexRaw), (MAP_HEADER, MapHeaderRaw),
    (LCLUSTER_INDEX, LclusterIndexRaw),
)
