"""The one exception family of the format reader.

Every failure caused by the bytes of an image is a ``CorruptImageError``; a valid image that uses
something this reader does not implement is an ``UnsupportedFeatureError``. Both carry the image,
the nid and the byte offset where known, so that one log line locates the problem.
"""

from __future__ import annotations

from typing import ClassVar


class ErofsError(Exception):
    """Root of every error the reader raises."""

    kind: ClassVar[str] = "error"  # what the message calls it; each subclass says its own

    def __init__(
        self,
        message: str,
        *,
        image: str | None = None,
        nid: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.image = image
        self.nid = nid
        self.offset = offset

    def with_context(
        self, *, image: str | None = None, nid: int | None = None
    ) -> ErofsError:
        """Fill in location fields that the raiser did not know; returns self."""
        if self.image is None and image is not None:
            self.image = image
        if self.nid is None and nid is not None:
            self.nid = nid
        return self

    def __str__(self) -> str:
        where = []
        if self.image is not None:
            where.append(f"{self.image}:")
        what = self.kind
        if self.nid is not None:
            what += f" inode {self.nid}"
        if self.offset is not None:
            what += f" at offset {self.offset}"
        where.append(what + ":")
        return " ".join(where) + " " + self.message


class CorruptImageError(ErofsError):
    """The image contradicts the format: a field out of range, a bad checksum, a broken stream."""

    kind = "corrupt"


class UnsupportedFeatureError(ErofsError):
    """The image is valid but uses a feature or algorithm this reader cannot handle."""

    kind = "unsupported"


class MissingDeviceError(ErofsError):
    """The image keeps data in extra device files that were not given (or not all of them):
    the image itself may be fine, it cannot be read alone."""

    kind = "missing device"


class MetacopyError(ErofsError):
    """A metadata-only file (overlayfs ``metacopy``): its bytes are in an object store, not in
    the image. Raised instead of reading it (it would read as zeros), and when its object is
    missing, refused or of the wrong size."""

    kind = "metacopy"


class NotFoundError(ErofsError, FileNotFoundError):
    """A path or name does not exist in the image (not corruption)."""

    kind = "not found"


class NotADirectoryErofsError(ErofsError, NotADirectoryError):
    """A path component that must be a directory is not one."""

    kind = "not a directory"
