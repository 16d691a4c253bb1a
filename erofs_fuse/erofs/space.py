"""Byte spaces metadata is read from (spec §1): the primary device or the metabox stream.

An inode, its inline xattrs, inline tail, compression indexes and chunk indexes all live in the
same space, selected by bit 63 of its nid.
"""

from __future__ import annotations

from typing import Protocol


class Space(Protocol):
    """Positional read access to a byte space; reads past ``size`` raise CorruptImageError."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...
