"""Superblock parsing: fields, checksum, feature refusal, compression configs, device table."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.errors import CorruptImageError, UnsupportedFeatureError
from erofs_fuse.erofs.superblock import SuperBlock, crc32c_raw, parse_superblock
from helpers import corpus, reseal


def parse(data: bytes) -> SuperBlock:
    return parse_superblock(lambda off, n: data[off : off + n], len(data), "img")


def load(name: str) -> bytearray:
    return bytearray(Path(corpus(name)).read_bytes())


def test_crc32c_matches_the_standard_check_value() -> None:
    # CRC-32C("123456789") is 0xE3069283 with the final inversion EROFS leaves out
    assert crc32c_raw(b"123456789") ^ 0xFFFFFFFF == 0xE3069283


def test_fields_of_known_images() -> None:
    sb = parse(bytes(load("plain.erofs")))
    assert sb.block_size == 4096 and sb.root_nid == 36 and sb.raw.inos == 803
    assert sb.feature_names() == ["sb_chksum", "mtime", "xattr_filter"]
    assert parse(bytes(load("b512.erofs"))).block_size == 512
    zstd = parse(bytes(load("zstd.erofs")))
    assert zstd.available_algorithms == {d.ALG_ZSTD}
    meta = parse(bytes(load("metabox.erofs")))
    assert meta.metabox_nid == 37 and meta.root_nid == d.NID_METABOX_BIT
    dev = parse(bytes(load("blobdev.erofs")))
    assert len(dev.devices) == 1 and dev.devices[0].blocks == 807 and dev.device_id_mask == 1


def test_checksum_mismatch_is_refused() -> None:
    data = load("plain.erofs")
    data[1024 + 0x40] ^= 1  # the volume name is covered by the checksum
    with pytest.raises(CorruptImageError, match="checksum mismatch"):
        parse(bytes(data))


def test_unknown_incompat_feature_is_refused_naming_the_bit() -> None:
    data = load("plain.erofs")
    struct.pack_into("<I", data, 1024 + 0x50, 0x400)
    with pytest.raises(UnsupportedFeatureError, match="0x400"):
        parse(bytes(reseal(data)))


def test_unknown_compat_feature_is_ignored() -> None:
    data = load("plain.erofs")
    struct.pack_into("<I", data, 1024 + 0x08, 0x8000_0003)
    assert parse(bytes(reseal(data))).block_size == 4096


@pytest.mark.parametrize(
    "offset,value,message",
    [
        (0x00, b"\0\0\0\0", "bad magic"),
        (0x0C, b"\x08", "block size bits"),
        (0x0C, b"\x11", "block size bits"),
        (0x5A, b"\x01", "dirblkbits"),
    ],
)
def test_bad_fields_are_corrupt(offset: int, value: bytes, message: str) -> None:
    data = load("plain.erofs")
    data[1024 + offset : 1024 + offset + len(value)] = value
    with pytest.raises(CorruptImageError, match=message):
        parse(bytes(data))


def test_truncated_images() -> None:
    data = bytes(load("plain.erofs"))
    for size in (0, 100, 1024, 1100):
        with pytest.raises(CorruptImageError):
            parse(data[:size])


def test_compression_config_sizes_are_checked() -> None:
    data = load("zstd.erofs")
    sb = parse(bytes(data))
    pos = 1024 + sb.sb_size
    struct.pack_into("<H", data, pos, 0)  # a zero-length record
    with pytest.raises(CorruptImageError, match="config"):
        parse(bytes(reseal(data)))
