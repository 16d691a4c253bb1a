"""Reading layer files: the one seam every byte of a layer passes through.

``FileBlob`` is positional I/O over one file (``os.pread``, safe from several threads). The
integrity layer wraps a blob in a verifying one with the same protocol, so no other code opens a
layer file.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Iterator, Protocol

from mypy_extensions import mypyc_attr

from .erofs.errors import CorruptImageError, ErofsError


class Blob(Protocol):
    """Positional, read-only access to the bytes of a layer file."""

    name: str

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; ``CorruptImageError`` past the end."""
        ...

    def close(self) -> None: ...


class BytesBlob:
    """Bytes held in memory, as a blob: a one-block layer (whose tree is its root alone), a
    Merkle tree checked whole, an object verified whole. ``cost``: what it weighs."""

    def __init__(self, data: bytes, name: str) -> None:
        self.name = name
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def cost(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise CorruptImageError(f"read past the end ({len(self._data)} bytes)",
                                    image=self.name, offset=offset)
        return self._data[offset:offset + length]

    def close(self) -> None:
        pass


class BlobIOError(ErofsError):
    """The layer file could not be read (an OS error, not a format error)."""

    kind = "I/O error"  # a ClassVar (ErofsError's): compiled, a class attribute as it should be


class WouldBlock(Exception):
    """A read inside ``nonblocking()`` needs I/O that may wait long (a remote layer's fetch);
    nothing was changed: do it again where waiting is fine (a worker thread). Not an
    ``ErofsError``: the reader lets it pass unchanged."""


_MAY_BLOCK: ContextVar[bool] = ContextVar("erofs_fuse_may_block", default=True)


@contextlib.contextmanager
def nonblocking() -> Iterator[None]:
    """Reads inside raise ``WouldBlock`` instead of waiting for a network (blobs that can
    wait check ``may_block``): the FUSE loop serves cached blocks inline this way and hands
    only the reads that must fetch to threads."""
    token = _MAY_BLOCK.set(False)
    try:
        yield
    finally:
        _MAY_BLOCK.reset(token)


def may_block() -> bool:
    return _MAY_BLOCK.get()


@mypyc_attr(allow_interpreted_subclasses=True)  # tests watch and count reads in subclasses
class FileBlob:
    """A layer file read with ``os.pread``."""

    def __init__(self, path: str, name: str | None = None) -> None:
        self.path = path
        self.name = name if name is not None else path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(self._fd).st_size
        except OSError:
            os.close(self._fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise CorruptImageError(
                f"read of {length} bytes past the end of the file ({self._size} bytes)",
                image=self.name,
                offset=offset,
            )
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise BlobIOError(str(exc), image=self.name, offset=offset) from exc
        if len(data) != length:
            # the file shrank under us: report it as corruption of this read only
            raise CorruptImageError(
                f"short read: {len(data)} of {length} bytes (file truncated?)",
                image=self.name,
                offset=offset,
            )
        return data

    def prefetch(self, offset: int, length: int) -> None:
        """Have the kernel start reading ``[offset, offset + length)`` into its page cache.

        A hint (POSIX_FADV_WILLNEED), so errors are ignored; no bytes come back, so nothing
        here needs verifying: they are checked when ``read`` returns them."""
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_atomic(path: str, data: bytes) -> None:
    """Write ``path`` via a temporary file, fsync and rename, so that a reader never sees half
    of it (and no stale bytes survive past the end, the trap ``veritysetup format`` sets)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
