"""A blob streamed from a registry, hashed as it arrives.

``BlobReader`` is a raw binary stream (``readinto``, so ``io.BufferedReader``, ``tarfile`` and
the decompressors can read it) and an iterator of chunks (``chunks()``). Every byte passes
through one sha256; the reader refuses a byte beyond the descriptor's size at once, and at the
end of the body (the read that returns nothing) checks that the size and digest are the
descriptor's: a short body raises ``IncompleteBody``, other bytes ``DigestMismatch``. So a
consumer that reads to the end cannot miss a bad blob; one that stops early (tar padding, a
compressed stream's trailer) calls ``finish()``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator

import httpx

from ..oci.image import CheckedStream, Descriptor
from .errors import DigestMismatch, IncompleteBody
from .session import iter_body

__all__ = ["BlobReader"]


class BlobReader(CheckedStream):
    """The body of ``response`` as the blob ``descriptor``; ``on_read(n)`` hears the bytes
    received so far (and may raise to stop); ``name`` is for messages."""

    def __init__(self, response: httpx.Response, descriptor: Descriptor, name: str,
                 on_read: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.name = name
        self._response = response
        self._body = iter_body(response, name)
        self._on_read = on_read
        self._hash = hashlib.sha256()
        self._pending = memoryview(b"")
        self.received = 0
        self.verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            if self.verified or not self._next():
                return 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def chunks(self) -> Iterator[bytes]:
        """The rest of the blob, chunk by chunk, verified at the end."""
        if self._pending:
            yield bytes(self._pending)
            self._pending = memoryview(b"")
        while not self.verified and self._next():
            chunk, self._pending = bytes(self._pending), memoryview(b"")
            yield chunk

    def finish(self) -> None:
        """Read what is left and verify the whole blob."""
        for _ in self.chunks():
            pass

    def _next(self) -> bool:
        """Take the next chunk of the body into ``_pending``; at its end verify, False."""
        for chunk in self._body:
            if not chunk:
                continue
            self.received += len(chunk)
            if self.received > self.descriptor.size:
                raise DigestMismatch(f"{self.name}: more than the {self.descriptor.size} "
                                     f"bytes of {self.descriptor.digest}")
            self._hash.update(chunk)
            self._pending = memoryview(chunk)
            if self._on_read is not None:
                self._on_read(self.received)
            return True
        self._verify()
        return False

    def _verify(self) -> None:
        desc = self.descriptor
        if self.received < desc.size:
            raise IncompleteBody(f"{self.name}: the reply ended after {self.received} of the "
                                 f"{desc.size} bytes of {desc.digest}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != desc.digest:
            raise DigestMismatch(f"{self.name}: blob {desc.digest} hashes to {actual}: "
                                 "corrupt or tampered with")
        self.verified = True

    def close(self) -> None:
        self._response.close()
        super().close()
