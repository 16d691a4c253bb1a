"""The uncompressed bytes of a layer tar, read once from a file or a pipe.

The compression is told by the stream's first bytes (gzip ``1f 8b``, zstd ``28 b5 2f fd``,
anything else is taken as a plain tar), never by a file name. Every byte passes through one
SHA-256 on its way, so the layer's diff_id (the digest of the uncompressed tar, OCI image spec)
is known when the last byte has been read, and the caller can refuse a mismatch before the
output is renamed into place.

Reading, inflating and hashing run in a thread of their own, a few chunks ahead of the parser
(``_ReadAhead``): zlib, ISA-L, zstd and SHA-256 release the GIL, so on two cores they overlap
the Python work of parsing headers and writing the image. gzip is inflated by ISA-L
(``isal``) when it is installed, else by zlib; both give the same bytes, and the same errors
for a bad stream.
"""

from __future__ import annotations

import hashlib
import queue
import signal
import threading
import zlib
from types import ModuleType
from typing import BinaryIO, Callable, Iterator, cast

from .errors import BadInputError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20
PROGRESS_STEP = 4 << 20
ZSTD_STEP = 4096

CLOSE_WAIT = 5.0  # seconds close() waits for the read-ahead thread
AHEAD = 4  # chunks decoded ahead of the parser: bounded memory, 4 x CHUNK at most

Progress = Callable[[int], None]


def _inflate_module() -> tuple[ModuleType, tuple[type[Exception], ...]]:
    """ISA-L's zlib-compatible inflater when the ``isal`` package is installed (measured 2-3x
    zlib's speed on layer tars), else zlib; with the errors each raises for a bad stream."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib, (zlib.error,)
    # its stubs declare the class as an instance
    isal_error = cast("type[Exception]", isal_zlib.error)
    return isal_zlib, (isal_error, zlib.error)


class InputStream:
    """Sequential reads of the uncompressed stream, with ``pos`` = bytes consumed so far."""

    def __init__(self, raw: BinaryIO, *, progress: Progress | None = None) -> None:
        self._raw = raw
        self._progress = progress
        self._raw_pos = 0
        self.produced = 0  # uncompressed bytes decoded so far (where a decoding error sits)
        self._next_report = PROGRESS_STEP
        self._hash = hashlib.sha256()
        head = self._raw_read(4)
        if head.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            self._chunks: Iterator[bytes] = self._gunzip(head)
        elif head == ZSTD_MAGIC:
            self.compression = "zstd"
            self._chunks = self._unzstd(head)
        else:
            self.compression = "none"
            self._chunks = self._plain(head)
        self._ahead = _ReadAhead(self._hashed(self._chunks))
        self._buf = b""
        self._off = 0
        self.pos = 0
        self.eof = False
        self.tee: BinaryIO | None = None  # gets a copy of every uncompressed byte

    # raw input ---------------------------------------------------------------------------
    def _raw_read(self, n: int) -> bytes:
        data = self._raw.read(n)
        self._raw_pos += len(data)
        if self._progress is not None and self._raw_pos >= self._next_report:
            self._next_report = self._raw_pos + PROGRESS_STEP
            self._progress(self._raw_pos)
        return data

    def _plain(self, head: bytes) -> Iterator[bytes]:
        if head:
            yield head
        while True:
            data = self._raw_read(CHUNK)
            if not data:
                return
            yield data

    def _gunzip(self, head: bytes) -> Iterator[bytes]:
        """Every member of a (possibly multi-member) gzip stream, with bounded output per step."""
        inflate, errors = _inflate_module()
        data = head
        while True:
            inflater = inflate.decompressobj(16 + zlib.MAX_WBITS)
            try:
                while not inflater.eof:
                    if not data:
                        data = self._raw_read(CHUNK // 4)
                        if not data:
                            out = inflater.flush()
                            if out:
                                yield out
                            if not inflater.eof:
                                raise BadInputError(f"gzip stream truncated after "
                                                    f"{self._raw_pos} compressed bytes",
                                                    offset=self.produced)
                            break
                    out = inflater.decompress(data, CHUNK)
                    data = inflater.unconsumed_tail
                    if out:
                        yield out
            except errors as exc:
                raise BadInputError(f"bad gzip stream near compressed byte {self._raw_pos}: "
                                    f"{exc}", offset=self.produced) from exc
            data = inflater.unused_data
            if len(data) < 2:
                data += self._raw_read(2 - len(data))
            if not data.startswith(GZIP_MAGIC):
                return  # trailing bytes that are no gzip member are ignored, as gzip -d does

    def _unzstd(self, head: bytes) -> Iterator[bytes]:
        """Every frame of a zstd stream. Input goes in small steps so that one step's output
        stays bounded (a zstd block holds at most 128 KiB), and a stream that ends inside a
        frame is an error, which the library's stream reader would hide."""
        import zstandard

        data = head
        while True:
            inflater = zstandard.ZstdDecompressor().decompressobj()
            try:
                while not inflater.eof:
                    if not data:
                        data = self._raw_read(ZSTD_STEP)
                        if not data:
                            raise BadInputError(f"zstd stream truncated after {self._raw_pos} "
                                                "compressed bytes", offset=self.produced)
                    step, data = data[:ZSTD_STEP], data[ZSTD_STEP:]
                    out = inflater.decompress(step)
                    if out:
                        yield out
            except zstandard.ZstdError as exc:
                raise BadInputError(f"bad zstd stream near compressed byte {self._raw_pos}: "
                                    f"{exc}", offset=self.produced) from exc
            data = inflater.unused_data + data
            if len(data) < 4:
                data += self._raw_read(4 - len(data))
            if data[:4] != ZSTD_MAGIC:
                return

    def _hashed(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """The decoded chunks, each hashed and counted as it is made (in the read-ahead
        thread)."""
        for chunk in chunks:
            if chunk:
                self._hash.update(chunk)
                self.produced += len(chunk)
                yield chunk

    def close(self) -> None:
        """Stop the read-ahead thread (the conversion failed or was cancelled midway)."""
        self._ahead.close()

    # decoded reads -----------------------------------------------------------------------
    def _refill(self) -> bool:
        chunk = self._ahead.next()
        if not chunk:
            self.eof = True
            return False
        if self.tee is not None:
            self.tee.write(chunk)
        self._buf = chunk
        self._off = 0
        return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        avail = len(self._buf) - self._off
        if avail >= n:
            data = self._buf[self._off:self._off + n]
            self._off += n
            self.pos += n
            return data
        parts = []
        while n > 0:
            avail = len(self._buf) - self._off
            if avail == 0:
                if not self._refill():
                    break
                continue
            take = min(avail, n)
            parts.append(self._buf[self._off:self._off + take])
            self._off += take
            n -= take
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def pieces(self, n: int) -> Iterator[memoryview]:
        """The next ``n`` bytes as views of up to ``CHUNK`` bytes each, without joining them
        (the data path); stops early only at the end of the stream."""
        while n > 0:
            avail = len(self._buf) - self._off
            if avail == 0:
                if not self._refill():
                    return
                continue
            take = min(avail, n)
            view = memoryview(self._buf)[self._off:self._off + take]
            self._off += take
            self.pos += take
            n -= take
            yield view

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes (still hashed); the number actually skipped."""
        done = 0
        for piece in self.pieces(n):
            done += len(piece)
        return done

    def drain(self) -> int:
        """Read to the end (the digest covers every byte, padding after the end blocks too)."""
        done = len(self._buf) - self._off
        self.pos += done
        self._off = len(self._buf)
        while self._refill():
            done += len(self._buf)
            self.pos += len(self._buf)
            self._off = len(self._buf)
        if self._progress is not None:
            self._progress(self._raw_pos)
        return done

    def diff_id(self) -> str:
        """``sha256:HEX`` of the whole uncompressed stream; valid after ``drain``."""
        return "sha256:" + self._hash.hexdigest()


class _ReadAhead:
    """Runs a chunk iterator in a thread, up to ``AHEAD`` chunks ahead of ``next()``; an
    exception in the thread is raised by the ``next()`` that reaches it, in order."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(AHEAD)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True,
                                        name="erofs-fuse-read-ahead")
        # Born with every signal blocked (a thread inherits its creator's mask), not blocking
        # them as its first act: a SIGINT the kernel handed it in that instant would leave the
        # main thread asleep in the queue's lock (only a signal to the main thread interrupts
        # it), and `convert -` reading a pipe held open would never end
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _run(self, chunks: Iterator[bytes]) -> None:
        # Signals are the main thread's: a process-directed one (a worker's SIGTERM, which it
        # blocks while it reports) must never be taken by this thread, whose Python handler
        # would then run in the main thread whatever the main thread's mask
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            for chunk in chunks:
                if not self._put(chunk):
                    return
            self._put(b"")
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> bytes:
        """The next chunk; b"" at the end of the stream (and after it)."""
        if self._done:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            raise item
        if not item:
            self._done = True
            self._thread.join()
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
        # bounded: a thread blocked in a read of a stalled pipe or socket ends with that read
        # (it is a daemon thread; it stops at its next put)
        self._thread.join(CLOSE_WAIT)
