"""A pure-Python reader of the EROFS on-disk format: no FUSE, no trio, no I/O but ``Blob`` reads."""

from __future__ import annotations

from .dirent import DirEntry
from .errors import (
    CorruptImageError,
    ErofsError,
    MetacopyError,
    MissingDeviceError,
    NotADirectoryErofsError,
    NotFoundError,
    UnsupportedFeatureError,
)
from .image import Image, Inode
from .superblock import SuperBlock

__all__ = [
    "CorruptImageError",
    "DirEntry",
    "ErofsError",
    "Image",
    "Inode",
    "MetacopyError",
    "MissingDeviceError",
    "NotADirectoryErofsError",
    "NotFoundError",
    "SuperBlock",
    "UnsupportedFeatureError",
]
