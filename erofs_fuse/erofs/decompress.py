"""Decompressors behind one function (spec §5). Placeholder until compression lands."""

from __future__ import annotations

from .errors import UnsupportedFeatureError
from .superblock import CompressionConfig


def decompress(codec: int, src: bytes, llen: int, partial: bool, config: CompressionConfig) -> bytes:
    raise UnsupportedFeatureError(f"compressed data (algorithm {codec}) is not supported yet")
