"""The block cache of lazily fetched layers: verified blocks on disk, shared by mounts.

Layout: ``ROOT/<alg>-<fs-verity hex>/`` per layer (the key is what the pinned manifest trusts
for it, and it covers the data size), holding

- ``lock``: every mount using the layer holds a shared ``flock`` on it; eviction takes it
  exclusively (so a layer in use is never evicted). Its mtime is the layer's last use (LRU).
- ``tree``: the layer's Merkle tree (raw fs-verity levels, root first), checked against the
  fs-verity digest on every open (its top block) and block by block as used.
- ``data``: a sparse file of the layer's size; only blocks that hashed to their leaf are ever
  written into it.
- ``bitmap``: ``BITMAP_HEADER`` (in a 4096-byte header block), then one bit per data block.

Write order, so that a crash (or SIGKILL) leaves at worst a block fetched again: ``pwrite`` the
verified bytes (this process reads them from then on), and in batches (``flush``: at most a
second or 32 MiB later, and on close) ``fdatasync`` the data file, then set the bits on disk
(merged with what other mounts set, under a record lock on those bitmap bytes) and fsync the
bitmap. A bit is a hint, not a proof: every block read from ``data`` is hashed again against the
tree, and a block that fails is forgotten and fetched again (a torn or tampered cache is
caught, never served).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import struct
import threading
import time
import weakref
from dataclasses import dataclass

log = logging.getLogger("erofs_fuse")

DEFAULT_CACHE_DIR = "/var/cache/erofs-fuse/blobs"
DEFAULT_CACHE_SIZE = 10 << 30

# magic, version, data block size, data size, trusted digest (fs-verity, zero-padded to 64)
BITMAP_HEADER = struct.Struct("<8sIIQ64s")
BITMAP_MAGIC = b"erofsbm\0"
BITMAP_VERSION = 1
HEADER_BYTES = 4096  # the bits start at this offset
assert BITMAP_HEADER.size <= HEADER_BYTES

LOCK, DATA, TREE, BITMAP = "lock", "data", "tree", "bitmap"
TRASH_PREFIX = ".evicted-"
SYNC_INTERVAL = 1.0  # seconds a stored block may wait to be made durable and marked
SYNC_BYTES = 32 << 20  # bytes stored that make a flush due at once
EVICT_EVERY = 256 << 20  # bytes written by a mount between evictions (besides at open)
OPEN_TRIES = 8  # an entry evicted between our open and our lock is opened again


def entry_key(alg: str, digest: bytes) -> str:
    """The directory name of a layer: ``sha256-<hex>`` of its fs-verity digest."""
    return f"{alg}-{digest.hex()}"


@dataclass(frozen=True)
class Usage:
    key: str
    path: str
    bytes: int  # allocated on disk
    last_use: float


class BlockCache:
    """A cache directory holding layer entries, bounded by ``limit`` bytes on disk."""

    def __init__(self, root: str, limit: int = DEFAULT_CACHE_SIZE,
                 evict_every: int = EVICT_EVERY) -> None:
        self.root = root
        self.limit = limit
        self.evict_every = evict_every
        self._stored = 0
        self._lock = threading.Lock()
        os.makedirs(root, mode=0o700, exist_ok=True)  # layers of private images

    def note_stored(self, nbytes: int) -> None:
        """Count bytes a mount wrote; every ``evict_every`` of them, evict (a mount that
        fills a large image makes room by evicting layers nobody uses)."""
        with self._lock:
            self._stored += nbytes
            if self._stored < self.evict_every:
                return
            self._stored = 0
        try:
            self.evict()
        except OSError as exc:
            log.warning("cache %s: eviction failed: %s", self.root, exc)

    def open_entry(self, key: str, data_size: int, block_size: int,
                   digest: bytes) -> CacheEntry:
        """The entry of one layer, locked shared (created empty if missing)."""
        return CacheEntry(os.path.join(self.root, key), data_size, block_size, digest)

    def usage(self) -> list[Usage]:
        out = []
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            total = 0
            last = 0.0
            for part in (LOCK, DATA, TREE, BITMAP):
                try:
                    st = os.stat(os.path.join(path, part))
                except FileNotFoundError:
                    continue
                total += st.st_blocks * 512
                if part == LOCK:
                    last = st.st_mtime
            out.append(Usage(name, path, total, last))
        return out

    def evict(self) -> list[str]:
        """Remove whole layers not in use, least recently used first, until the cache holds
        at most ``limit`` bytes; the keys removed. Layers in use (a shared lock held) stay,
        even if the cache then stays over its limit."""
        entries = sorted(self.usage(), key=lambda u: u.last_use)
        total = sum(u.bytes for u in entries)
        removed: list[str] = []
        for u in entries:
            if total <= self.limit:
                break
            if self._remove_unused(u):
                total -= u.bytes
                removed.append(u.key)
        if total > self.limit:
            log.info("cache %s: %d bytes in layers in use, over its %d-byte limit",
                     self.root, total, self.limit)
        return removed

    def _remove_unused(self, u: Usage) -> bool:
        try:
            fd = os.open(os.path.join(u.path, LOCK), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a mount uses it
            trash = os.path.join(self.root, f"{TRASH_PREFIX}{u.key}.{os.getpid()}")
            try:
                os.rename(u.path, trash)
            except OSError:
                return False
            log.info("cache %s: evicted %s (%d bytes)", self.root, u.key, u.bytes)
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        return True


class CacheEntry:
    """One layer's files in the cache; thread-safe. Holds a shared lock until closed."""

    def __init__(self, path: str, data_size: int, block_size: int, digest: bytes) -> None:
        self.path = path
        self.data_size = data_size
        self.block_size = block_size
        self.blocks = -(-data_size // block_size)
        self._lock = threading.Lock()
        self._bits = bytearray()  # blocks readable from the data file (this process)
        self._durable = bytearray()  # blocks whose data is known to be on disk
        self._pending: list[tuple[int, int]] = []  # stored, not yet flushed
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._data_fd = -1
        self._bitmap_fd = -1
        self._lock_fd = self._lock_shared()
        _ENTRIES.add(self)
        try:
            os.utime(self._lock_fd)  # last use, for eviction
            self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self._data_fd).st_size != data_size:
                os.ftruncate(self._data_fd, data_size)  # sparse
            self._bitmap_fd = os.open(os.path.join(path, BITMAP),
                                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            header = BITMAP_HEADER.pack(BITMAP_MAGIC, BITMAP_VERSION, block_size, data_size,
                                        digest.ljust(64, b"\0"))
            self._bits = self._load_bitmap(header)
            self._durable = bytearray(self._bits)
        except BaseException:
            self.close()
            raise

    @property
    def data_path(self) -> str:
        return os.path.join(self.path, DATA)

    @property
    def tree_path(self) -> str:
        return os.path.join(self.path, TREE)

    def _lock_shared(self) -> int:
        """The lock file opened and locked shared, in the directory that is (still) ours: an
        eviction renames the directory away after locking it, so check that we locked the
        file at ``path`` and try again otherwise."""
        lock = os.path.join(self.path, LOCK)
        for _ in range(OPEN_TRIES):
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise OSError(errno.EAGAIN, f"cache entry {self.path} keeps being evicted")

    def _load_bitmap(self, header: bytes) -> bytearray:
        """The present bits; a bitmap of another layout (or none yet) starts empty. Rewritten
        under an exclusive record lock so that two mounts starting together agree."""
        nbytes = -(-self.blocks // 8)
        fd = self._bitmap_fd
        fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
        try:
            raw = os.pread(fd, HEADER_BYTES + nbytes, 0)
            if raw[:BITMAP_HEADER.size] == header and len(raw) == HEADER_BYTES + nbytes:
                return bytearray(raw[HEADER_BYTES:])
            os.ftruncate(fd, 0)  # stale or torn: no block is known present
            os.pwrite(fd, header.ljust(HEADER_BYTES, b"\0") + bytes(nbytes), 0)
            os.fsync(fd)
            return bytearray(nbytes)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0)

    # bits -------------------------------------------------------------------------------------
    def present(self, first: int, end: int) -> bool:
        """Whether blocks ``first`` .. ``end - 1`` are all marked present (asked for every
        read: the whole bitmap bytes among them compared at once)."""
        bits = self._bits
        lo, hi = -(-first // 8), end // 8  # the whole bytes inside the range
        if lo >= hi:
            return _all_set(bits, first, end)
        return (bits[lo:hi].count(0xFF) == hi - lo and _all_set(bits, first, lo * 8)
                and _all_set(bits, hi * 8, end))

    def missing(self) -> list[int]:
        bits = self._bits
        return [b for b in range(self.blocks) if not bits[b >> 3] >> (b & 7) & 1]

    def count_present(self) -> int:
        return sum(bin(x).count("1") for x in self._bits)

    def store(self, offset: int, data: bytes) -> None:
        """Write verified ``data`` (whole blocks at block-aligned ``offset``): readable from
        the cache by this process at once, marked present on disk by the next ``flush``
        (after the data is durable), which runs when the oldest write waiting for it is
        ``SYNC_INTERVAL`` old or ``SYNC_BYTES`` wait (one ``fdatasync`` per batch: one per
        fetch cost 1.6 s of an 8.1 s cold read of the python image) and on close."""
        first = offset // self.block_size
        end = -(-(offset + len(data)) // self.block_size)
        with self._lock:  # a fetch finishing after close must not write to a reused fd
            if self._data_fd < 0:
                raise OSError(errno.EBADF, "cache entry closed")
            view = memoryview(data)  # a short write's rest, not a copy of it
            written = 0
            while written < len(data):
                written += os.pwrite(self._data_fd, view[written:], offset + written)
            _set_bits(self._bits, first, end, True)
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append((first, end))
            self._pending_bytes += len(data)
            due = (self._pending_bytes >= SYNC_BYTES
                   or time.monotonic() - self._pending_since >= SYNC_INTERVAL)
        if due:
            self.flush()

    def flush(self) -> None:
        """Make the stored blocks durable, then mark them present on disk."""
        with self._lock:
            if not self._pending or self._data_fd < 0:
                return
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            os.fdatasync(self._data_fd)
            for first, end in pending:
                _set_bits(self._durable, first, end, True)
            lo = min(f for f, _ in pending) >> 3
            hi = (max(e for _, e in pending) - 1 >> 3) + 1
            self._write_bits_locked(lo, hi)
            os.fsync(self._bitmap_fd)

    def forget(self, first: int, end: int) -> None:
        """Mark blocks absent (they failed their hash when read back)."""
        with self._lock:
            _set_bits(self._bits, first, end, False)
            _set_bits(self._durable, first, end, False)
            self._write_bits_locked(first >> 3, (end - 1 >> 3) + 1, clear=(first, end))
            os.fsync(self._bitmap_fd)

    def _write_bits_locked(self, lo: int, hi: int, clear: tuple[int, int] | None = None) -> None:
        """Bitmap bytes ``lo``..``hi - 1`` on disk: what other mounts of the layer set there,
        plus the bits durable here (never one whose data may not be on disk yet), minus the
        ``clear`` blocks; under a record lock on those bytes."""
        fd = self._bitmap_fd
        fcntl.lockf(fd, fcntl.LOCK_EX, hi - lo, HEADER_BYTES + lo)
        try:
            disk = bytearray(os.pread(fd, hi - lo, HEADER_BYTES + lo).ljust(hi - lo, b"\0"))
            for i in range(hi - lo):
                disk[i] |= self._durable[lo + i]
            if clear is not None:
                _set_bits(disk, clear[0] - lo * 8, clear[1] - lo * 8, False)
            for i in range(hi - lo):  # theirs are durable too (they flushed first)
                self._durable[lo + i] |= disk[i]
                self._bits[lo + i] |= disk[i]
            os.pwrite(fd, bytes(disk), HEADER_BYTES + lo)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, hi - lo, HEADER_BYTES + lo)

    def close(self) -> None:
        """Close the files. The shared lock goes with the last descriptor of it: closing a
        forked copy (the mount's parent process) leaves the daemon's lock held."""
        try:
            self.flush()
        except OSError:
            pass
        with self._lock:
            if self._bitmap_fd >= 0:
                os.close(self._bitmap_fd)
                self._bitmap_fd = -1
            if self._data_fd >= 0:
                os.close(self._data_fd)
                self._data_fd = -1
            if self._lock_fd >= 0:
                try:
                    os.utime(self._lock_fd)
                except OSError:
                    pass
                os.close(self._lock_fd)
                self._lock_fd = -1


_ENTRIES: weakref.WeakSet[CacheEntry] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child (the mount's daemon) no thread of the parent runs: a fetch that was
    storing blocks when the parent forked (read-ahead goes on in the background) would hold
    the lock forever. Its bits are set only after its bytes are written, so what the child
    sees is consistent (a batch both flush is made durable and marked twice, harmlessly)."""
    for entry in list(_ENTRIES):
        entry._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _all_set(bits: bytearray, first: int, end: int) -> bool:
    return all(bits[b >> 3] >> (b & 7) & 1 for b in range(first, end))


def _set_bits(bits: bytearray, first: int, end: int, value: bool) -> None:
    """Blocks ``first`` .. ``end - 1`` set or cleared (whole bytes at once: a fetch of 4 MiB
    is 1024 blocks)."""
    lo, hi = -(-first // 8), end // 8
    edges = range(first, end) if lo >= hi else (*range(first, lo * 8), *range(hi * 8, end))
    if lo < hi:
        bits[lo:hi] = (b"\xff" if value else b"\0") * (hi - lo)
    for b in edges:
        if value:
            bits[b >> 3] |= 1 << (b & 7)
        else:
            bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF
