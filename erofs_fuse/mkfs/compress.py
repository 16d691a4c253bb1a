"""Compressed file data (placeholder until the LZ4 writer lands)."""

from __future__ import annotations

from typing import Iterable

from .data import FlatData, ImageFile
from .errors import UnsupportedInputError


class Compressor:
    incompat = 0
    max_distance = 0

    def __init__(self, image: ImageFile, algorithm: str, level: int | None) -> None:
        raise UnsupportedInputError("compression is not implemented yet")

    def write(self, pieces: Iterable[memoryview | bytes], size: int, inline_room: int, *,
              entry: bytes, offset: int) -> FlatData:
        raise NotImplementedError
