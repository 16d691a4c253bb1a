"""Superblock, compression configuration records and device table (spec §2, §9).

Parsing happens once when an image is opened: unknown incompatible features are refused naming
the bit, and every field later used as an index or size is range-checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import ondisk as d
from .errors import CorruptImageError, UnsupportedFeatureError

ReadFn = Callable[[int, int], bytes]


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC-32C register after ``data``, without the final inversion (what EROFS stores)."""
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """Per-algorithm parameters from the cfg records; defaults where there are none."""

    lz4_max_distance: int = 0
    lz4_max_pclusterblks: int = 1
    lzma_dict_size: int = 8 << 20
    deflate_windowbits: int = 15
    zstd_windowlog: int = 10


@dataclass(frozen=True, slots=True)
class Device:
    """One extra device (blob) described by the device table."""

    tag: bytes
    blocks: int
    uniaddr: int


@dataclass(frozen=True, slots=True)
class SuperBlock:
    raw: d.SuperBlockRaw
    sb_size: int
    blkszbits: int
    root_nid: int
    primary_blocks: int
    metabox_nid: int | None
    packed_nid: int | None
    available_algorithms: frozenset[int]
    compression: CompressionConfig
    devices: tuple[Device, ...] = field(default_factory=tuple)

    @property
    def block_size(self) -> int:
        return 1 << self.blkszbits

    @property
    def feature_compat(self) -> int:
        return self.raw.feature_compat

    @property
    def feature_incompat(self) -> int:
        return self.raw.feature_incompat

    def has_incompat(self, bit: int) -> bool:
        return bool(self.raw.feature_incompat & bit)

    def has_compat(self, bit: int) -> bool:
        return bool(self.raw.feature_compat & bit)

    @property
    def is_48bit(self) -> bool:
        return self.has_incompat(d.INCOMPAT_48BIT)

    @property
    def meta_base(self) -> int:
        """Byte position that primary-device nids are relative to."""
        return self.raw.meta_blkaddr << self.blkszbits

    @property
    def device_id_mask(self) -> int:
        n = len(self.devices) + 1
        return (1 << (n - 1).bit_length()) - 1 if n > 1 else 0

    @property
    def total_blocks(self) -> int:
        return self.primary_blocks + sum(dev.blocks for dev in self.devices)

    @property
    def volume_name(self) -> str:
        return self.raw.volume_name.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def uuid(self) -> str:
        u = self.raw.uuid.hex()
        return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"

    @property
    def build_time(self) -> int:
        return self.raw.epoch + self.raw.build_time

    def feature_names(self) -> list[str]:
        names = [n for bit, n in d.COMPAT_NAMES.items() if self.feature_compat & bit]
        names += [n for bit, n in d.INCOMPAT_NAMES.items() if self.feature_incompat & bit]
        return names


def parse_superblock(read: ReadFn, image_size: int, image: str | None = None) -> SuperBlock:
    """Parse and validate the superblock of the image whose bytes ``read`` returns."""

    def corrupt(msg: str, offset: int = d.SUPERBLOCK_OFFSET) -> CorruptImageError:
        return CorruptImageError(msg, image=image, offset=offset)

    if image_size < d.SUPERBLOCK_OFFSET + d.SUPER_BLOCK.size:
        raise corrupt(f"image of {image_size} bytes is too small to hold a superblock", 0)
    head = read(d.SUPERBLOCK_OFFSET, d.SUPER_BLOCK.size)
    raw = d.SuperBlockRaw._make(d.SUPER_BLOCK.unpack(head))
    if raw.magic != d.MAGIC:
        raise corrupt(f"bad magic {raw.magic:#010x} (not an EROFS image)")
    if not d.MIN_BLKSZBITS <= raw.blkszbits <= d.MAX_BLKSZBITS:
        raise corrupt(f"block size bits {raw.blkszbits} outside 9..16")
    if raw.dirblkbits != 0:
        raise corrupt(f"dirblkbits {raw.dirblkbits} is not 0")
    unknown = raw.feature_incompat & ~d.INCOMPAT_SUPPORTED
    if unknown:
        raise UnsupportedFeatureError(
            f"unknown incompatible feature bits {unknown:#x}", image=image, offset=0x450
        )
    bs = 1 << raw.blkszbits
    sb_size = d.SUPER_BLOCK.size + 16 * raw.sb_extslots
    if sb_size > 1024 + 2048:
        raise corrupt(f"superblock size {sb_size} too large")
    if raw.feature_compat & d.COMPAT_SB_CHKSUM:
        _verify_checksum(read, image_size, bs, raw.checksum, image)

    metabox_nid: int | None = None
    if raw.feature_incompat & d.INCOMPAT_METABOX:
        if sb_size <= 0x80:
            raise corrupt("metabox feature without the superblock extension slot")
        if image_size < d.SUPERBLOCK_OFFSET + 0x90:
            raise corrupt("image too small for the superblock extension")
        metabox_nid, _ = d.SUPER_BLOCK_EXT.unpack(read(d.SUPERBLOCK_OFFSET + 0x80, 16))
        if metabox_nid & d.NID_METABOX_BIT:
            raise corrupt("metabox nid refers into the metabox")

    is_48bit = bool(raw.feature_incompat & d.INCOMPAT_48BIT)
    if is_48bit and raw.rootnid_8b != 0:
        root_nid = raw.rootnid_8b
        primary_blocks = raw.blocks_lo | (raw.rootnid_2b << 32)
    else:
        root_nid = raw.rootnid_2b
        primary_blocks = raw.blocks_lo
    if root_nid & d.NID_METABOX_BIT and metabox_nid is None:
        raise corrupt("root nid refers into a metabox the image does not have")

    packed_nid: int | None = None
    if raw.feature_incompat & d.INCOMPAT_FRAGMENTS and raw.packed_nid:
        if raw.packed_nid & d.NID_METABOX_BIT:
            raise corrupt("packed nid refers into the metabox")
        packed_nid = raw.packed_nid

    if raw.feature_compat & d.COMPAT_ISHARE_XATTRS and (
        raw.ishare_xattr_prefix_id >= raw.xattr_prefix_count
    ):
        raise corrupt("ishare xattr prefix id beyond the prefix table")

    algorithms, config = _parse_compression(read, image_size, raw, sb_size, bs, image)
    devices = _parse_devices(read, image_size, raw, image)
    return SuperBlock(
        raw=raw,
        sb_size=sb_size,
        blkszbits=raw.blkszbits,
        root_nid=root_nid,
        primary_blocks=primary_blocks,
        metabox_nid=metabox_nid,
        packed_nid=packed_nid,
        available_algorithms=algorithms,
        compression=config,
        devices=devices,
    )


def _verify_checksum(read: ReadFn, image_size: int, bs: int, stored: int, image: str | None) -> None:
    length = bs - d.SUPERBLOCK_OFFSET if bs > d.SUPERBLOCK_OFFSET else bs
    if image_size < d.SUPERBLOCK_OFFSET + length:
        raise CorruptImageError("image too small for the checksummed block", image=image, offset=0)
    block = bytearray(read(d.SUPERBLOCK_OFFSET, length))
    block[4:8] = b"\0\0\0\0"
    actual = crc32c_raw(bytes(block))
    if actual != stored:
        raise CorruptImageError(
            f"superblock checksum mismatch: stored {stored:#010x}, computed {actual:#010x}",
            image=image,
            offset=d.SUPERBLOCK_OFFSET + 4,
        )


def _parse_compression(
    read: ReadFn, image_size: int, raw: d.SuperBlockRaw, sb_size: int, bs: int, image: str | None
) -> tuple[frozenset[int], CompressionConfig]:
    if not raw.feature_incompat & d.INCOMPAT_COMPR_CFGS:
        # Before cfg records, only LZ4 existed. Old kernels accept it unconditionally (pre-1.0
        # mkfs images); we do the same so that legacy images stay readable.
        return frozenset({d.ALG_LZ4}), CompressionConfig(lz4_max_distance=raw.available_compr_algs)
    algs = raw.available_compr_algs
    if algs & ~0xF:
        raise UnsupportedFeatureError(
            f"unknown compression algorithm bits {algs:#x}", image=image, offset=0x454
        )
    fields: dict[str, int] = {}
    pos = d.SUPERBLOCK_OFFSET + sb_size
    for alg in range(4):
        if not algs & (1 << alg):
            continue
        pos = (pos + 3) & ~3
        if pos + 2 > image_size:
            raise CorruptImageError("compression config past the end", image=image, offset=pos)
        (size,) = d.U16.unpack(read(pos, 2))
        if size == 0 or pos + 2 + size > image_size:
            raise CorruptImageError(f"bad compression config size {size}", image=image, offset=pos)
        payload = read(pos + 2, size)
        _apply_cfg(alg, payload, fields, bs, image, pos)
        pos += 2 + size
    return frozenset(a for a in range(4) if algs & (1 << a)), CompressionConfig(**fields)


def _apply_cfg(
    alg: int, payload: bytes, fields: dict[str, int], bs: int, image: str | None, pos: int
) -> None:
    def bad(msg: str) -> CorruptImageError:
        return CorruptImageError(f"{d.ALG_NAMES[alg]} config: {msg}", image=image, offset=pos)

    if alg == d.ALG_LZ4:
        if len(payload) < 14:
            raise bad("record too short")
        dist, blks = d.LZ4_CFG.unpack_from(payload)
        blks = max(blks, 1)
        if blks * bs > d.Z_PCLUSTER_MAX_SIZE:
            raise bad(f"max pcluster of {blks} blocks exceeds 1 MiB")
        fields["lz4_max_distance"] = dist
        fields["lz4_max_pclusterblks"] = blks
    elif alg == d.ALG_LZMA:
        if len(payload) < 14:
            raise bad("record too short")
        dict_size, fmt = d.LZMA_CFG.unpack_from(payload)
        if fmt != 0 or not 4096 <= dict_size <= 8 << 20:
            raise bad(f"format {fmt}, dictionary {dict_size}")
        fields["lzma_dict_size"] = dict_size
    elif alg == d.ALG_DEFLATE:
        if len(payload) < 6:
            raise bad("record too short")
        (wbits,) = d.DEFLATE_CFG.unpack_from(payload)
        if wbits > 15:
            raise bad(f"window bits {wbits}")
        fields["deflate_windowbits"] = wbits
    else:
        if len(payload) < 6:
            raise bad("record too short")
        fmt, wlog = d.ZSTD_CFG.unpack_from(payload)
        if fmt != 0 or wlog > 10:
            raise bad(f"format {fmt}, window log {wlog}")
        fields["zstd_windowlog"] = wlog


def _parse_devices(
    read: ReadFn, image_size: int, raw: d.SuperBlockRaw, image: str | None
) -> tuple[Device, ...]:
    if not raw.feature_incompat & d.INCOMPAT_DEVICE_TABLE or raw.extra_devices == 0:
        return ()
    start = raw.devt_slotoff * 128
    end = start + raw.extra_devices * d.DEVICE_SLOT.size
    if start < d.SUPERBLOCK_OFFSET or end > image_size:
        raise CorruptImageError("device table outside the image", image=image, offset=start)
    table = read(start, end - start)
    is_48bit = bool(raw.feature_incompat & d.INCOMPAT_48BIT)
    devices = []
    for k in range(raw.extra_devices):
        tag, blocks_lo, uni_lo, blocks_hi, uni_hi, _ = d.DEVICE_SLOT.unpack_from(table, k * 128)
        blocks = blocks_lo | (blocks_hi << 32 if is_48bit else 0)
        uniaddr = uni_lo | (uni_hi << 32 if is_48bit else 0)
        devices.append(Device(tag=tag.split(b"\0", 1)[0], blocks=blocks, uniaddr=uniaddr))
    return tuple(devices)
