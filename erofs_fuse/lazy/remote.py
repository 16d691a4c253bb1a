"""A layer in a registry read as a ``Blob``: blocks fetched by HTTP range on first read,
verified against the layer's Merkle tree, kept in the block cache (``cache.py``).

Trust: the image manifest was fetched by the digest the user pinned, so its layer descriptors
are trusted, and with them the annotations ``push`` writes (``registry.push.ANNOTATIONS``): the
fs-verity digest of the layer blob, and digest, size and offset of its tree blob. The tree blob
is fetched whole and must hash to its annotated digest; the root of the tree, with the data
size (the descriptor's), must give the annotated fs-verity digest (``VerifiedBlob`` checks it
on open). From then on every 4 KiB block is hashed against its leaf before it is served or
written to the cache, and again whenever it is read back from the cache.

Fetching: the blob is cut into fetch units (``DEFAULT_UNIT``, block-aligned); a read fetches
the units it touches that are not all present, adjacent ones merged into one Range request (at
most ``MAX_REQUEST`` bytes). One fetch per unit is in flight at a time: a second reader of the
same unit waits for the first one's result. A sequential reader gets read-ahead windows fetched
in the background while it is served (see ``_read_ahead``), and the units fetched last are kept
in memory, verified (``RECENT_BYTES``): read from there, they cost no read-back from the cache
file and no second hash. A unit whose bytes fail their hashes is fetched
once more; blocks that still fail are never served (``IntegrityError``, EIO at the mount),
their good neighbours are. Registry failures (after the client's bounded retries) are
``BlobIOError`` for that read: the next read tries again, so the mount recovers when the
registry does. A read never waits longer than ``deadline`` seconds for another's fetch.

One module just past the house's ~450 lines on purpose: the read path, the read-ahead, the
units kept in memory and the background fill are one ``LazyBlob``'s, sharing its lock, its
table of fetches in flight and its cache entry; split apart, each would reach into the others'
state. The registry client (``registry``) and the cache (``cache``) are rooms of their own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from ..blob import BlobIOError, WouldBlock, may_block
from ..erofs.errors import CorruptImageError, ErofsError
from ..oci.image import Descriptor
from ..registry.client import RegistryClient
from ..registry.errors import BadResponse, RegistryError
from ..registry.reference import Reference
from ..verity.blob import VerifiedBlob
from ..verity.trust import IntegrityError
from .cache import BlockCache, CacheEntry

log = logging.getLogger("erofs_fuse")

# Measured against the local docker-registry (tests/test_lazy.py's numbers in the report):
# per-request cost dominates below 256 KiB, and larger units fetch more than a small file needs.
DEFAULT_UNIT = 256 << 10
MAX_REQUEST = 4 << 20  # adjacent missing units merged into one Range request, up to this
# Verified units a reader fetched, kept in memory per layer: the read-ahead window being read
# and the next one (each up to MAX_REQUEST), so that a sequential reader is served from memory.
RECENT_BYTES = 2 * MAX_REQUEST
FILL_THREADS = 2
FILL_RETRY_WAIT = 5.0


@dataclass
class _Fetch:
    """One unit's fetch in flight: when ``done``, either ``data`` (the unit's fetched bytes,
    every block verified except those in ``bad``) or ``error``."""

    done: threading.Event = field(default_factory=threading.Event)
    data: bytes | memoryview = b""
    bad: dict[int, ErofsError] = field(default_factory=dict)  # block -> why
    error: ErofsError | None = None


class LazyBlob:
    """A registry blob read through the block cache; see the module docstring. ``verified``
    is a ``VerifiedBlob`` over the cache's data file: it checks cache hits as they are read
    and (``check``) fetched bytes before they are kept."""

    def __init__(self, client: RegistryClient, ref: Reference, descriptor: Descriptor,
                 entry: CacheEntry, verified: VerifiedBlob, *, name: str,
                 unit: int = DEFAULT_UNIT, deadline: float = 60.0,
                 cache: BlockCache | None = None) -> None:
        self.name = name
        self._cache = cache  # told of the bytes stored (eviction)
        self.fetched_bytes = 0
        self.requests = 0
        self._client = client
        self._ref = ref
        self._desc = descriptor
        self._entry = entry
        self._verified = verified
        self._bs = entry.block_size
        self._unit_blocks = max(unit // self._bs, 1)
        self._unit = self._unit_blocks * self._bs
        self._deadline = deadline
        self._lock = threading.Lock()
        self._inflight: dict[int, _Fetch] = {}
        self._units = -(-descriptor.size // self._unit)
        # unit -> its verified bytes, oldest first, at most RECENT_BYTES in all
        self._recent: OrderedDict[int, memoryview] = OrderedDict()
        self._recent_bytes = 0
        self._last_miss = -1  # the unit after the last miss outside a read-ahead window
        self._ra_mark = -1  # the first unit of the last read-ahead window: reading it ...
        self._ra_next = -1  # ... starts the next window, from this unit
        self._ahead = 0  # units in the last read-ahead window
        _LIVE.add(self)
        self._stop = threading.Event()
        self._fillers: list[threading.Thread] = []
        self._fill_failing = False

    @property
    def size(self) -> int:
        return self._desc.size

    # reading ----------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        size = self.size
        if offset < 0 or length < 0 or offset + length > size:
            raise CorruptImageError(f"read of {length} bytes past the end of the layer "
                                    f"({size} bytes)", image=self.name, offset=offset)
        if length == 0:
            return b""
        end = offset + length
        fetched = self._ensure(offset // self._bs, -(-end // self._bs))
        parts = []
        for unit in range(offset // self._unit, (end - 1) // self._unit + 1):
            lo = max(offset, unit * self._unit)
            hi = min(end, (unit + 1) * self._unit)
            parts.append(self._part(unit, lo, hi, fetched.get(unit)))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _part(self, unit: int, lo: int, hi: int, fetch: _Fetch | None) -> bytes:
        """Bytes ``lo``..``hi`` of one unit: from memory if fetched lately, from the cache
        (hashed again as read) when its blocks are there, else from the bytes this read's
        fetch verified."""
        base = unit * self._unit
        recent = self._recent.get(unit)  # one dict lookup: atomic under the GIL
        if recent is not None:
            return bytes(recent[lo - base:hi - base])
        first, end = lo // self._bs, -(-hi // self._bs)
        if self._entry.present(first, end):
            try:
                return self._verified.read(lo, hi - lo)
            except IntegrityError as exc:
                if not may_block():
                    raise WouldBlock(self.name) from None  # refetched from a thread
                # a torn or tampered cache block: forget it, fetch it again (once)
                log.warning("%s: cached block failed its hash, fetching it again: %s",
                            self.name, exc.message)
                self._entry.forget(first, end)
                fetch = self._ensure(first, end).get(unit)
        if fetch is None or fetch.error is not None:
            if fetch is not None and fetch.error is not None:
                raise fetch.error
            raise BlobIOError("block not fetched", image=self.name, offset=lo)
        for block in range(first, end):
            if block in fetch.bad:
                raise fetch.bad[block]
        return bytes(fetch.data[lo - base:hi - base])

    def _ensure(self, first: int, end: int, reader: bool = True) -> dict[int, _Fetch]:
        """Fetch the units holding blocks ``first``..``end - 1`` that are not all present;
        the fetches of the units that were missing, by unit (waited for). For a ``reader``
        (not the background fill) also starts the read-ahead it calls for (not waited for)."""
        ub = self._unit_blocks
        mine: list[int] = []
        waits: dict[int, _Fetch] = {}
        first_unit, last_unit = first // ub, (end - 1) // ub
        with self._lock:
            for unit in range(first_unit, last_unit + 1):
                lo, hi = max(first, unit * ub), min(end, (unit + 1) * ub)
                if unit in self._recent or self._entry.present(lo, hi):
                    continue
                if not may_block():
                    raise WouldBlock(self.name)
                fetch = self._inflight.get(unit)
                if fetch is None:
                    fetch = self._inflight[unit] = _Fetch()
                    mine.append(unit)
                waits[unit] = fetch
            ahead = self._read_ahead(first_unit, last_unit, mine) if reader else []
            extra = {unit: self._inflight[unit] for unit in ahead}
        longest = max(MAX_REQUEST // self._unit, 1)
        # Each fetch runs in a thread of its own, so that this read can give up after its
        # deadline (retries nested in the client could otherwise keep it minutes); the fetch
        # goes on, and what it brings is cached for the next read. The read-ahead is not
        # waited for: it is fetched while this read and the next ones are served.
        for run in _runs(mine, longest):
            self._start_fetch(run, [waits[u] for u in run], reader)
        for run in _runs(ahead, longest):
            self._start_fetch(run, [extra[u] for u in run], reader)
        until = time.monotonic() + self._deadline
        for unit, fetch in waits.items():
            if not fetch.done.wait(max(until - time.monotonic(), 0)):
                raise BlobIOError(f"fetch of bytes {unit * self._unit}.. not done after "
                                  f"{self._deadline:.0f} s", image=self.name)
        return waits

    def _start_fetch(self, run: list[int], fetches: list[_Fetch], reader: bool) -> None:
        threading.Thread(target=self._fetch_run, args=(run, fetches, reader), name="fetch",
                         daemon=True).start()

    def _read_ahead(self, first_unit: int, last_unit: int, mine: list[int]) -> list[int]:
        """Units to fetch in the background for a read of units ``first_unit``..``last_unit``
        that misses ``mine`` (called under the lock; their fetches are registered here). Much
        as the kernel's read-ahead: a miss right after the previous miss starts a stream, with
        a window of one unit after it; a read reaching the middle of the last window starts
        the next one, twice as large (up to ``MAX_REQUEST``, one request each), while the
        rest of the current one is served, so that fetching and serving overlap; a miss right
        after the last window (the reader outran it) goes on with the stream. Reading a whole
        cold layer took 8.1 s without read-ahead, 4.0-4.9 s with read-ahead fetched in the
        request of the miss that asked for it, which waited for all of it. A miss elsewhere (a
        directory block read between two files) leaves the stream alone."""
        longest = max(MAX_REQUEST // self._unit, 1)
        if mine:
            outran, starts = mine[0] == self._ra_next, mine[0] == self._last_miss
            self._last_miss = mine[-1] + 1
            if not (outran or starts):
                return []
            self._ahead = min(self._ahead * 2, longest) if outran else 1
            start = mine[-1] + 1
        elif self._ra_mark <= last_unit < self._ra_next:
            self._ahead = min(self._ahead * 2, longest)
            start = self._ra_next
        else:
            return []
        stop = min(start + self._ahead, self._units)
        self._ra_mark, self._ra_next = start + (stop - start) // 2, stop
        ub, blocks = self._unit_blocks, self._entry.blocks
        units = [unit for unit in range(start, stop)
                 if unit not in self._inflight and unit not in self._recent
                 and not self._entry.present(unit * ub, min((unit + 1) * ub, blocks))]
        for unit in units:
            self._inflight[unit] = _Fetch()
        return units

    def _fetch_run(self, run: list[int], fetches: list[_Fetch], reader: bool = True) -> None:
        """Fetch, verify and cache the units of ``run``; a ``reader``'s (not the fill's) are
        also kept in memory for the reads that follow."""
        start = run[0] * self._unit
        stop = min((run[-1] + 1) * self._unit, self.size)
        try:
            data, bad = self._download_verified(start, stop)
            if not self._stop.is_set():  # not after close (read-ahead in the forked parent)
                self._keep(start, data, bad)
            view = memoryview(data)
            for unit, fetch in zip(run, fetches):
                base = unit * self._unit - start
                fetch.data = view[base:base + self._unit]
                fetch.bad = {b: e for b, e in bad.items()
                             if unit * self._unit_blocks <= b < (unit + 1) * self._unit_blocks}
        except ErofsError as exc:
            for fetch in fetches:
                fetch.error = exc
        finally:
            with self._lock:
                for unit, fetch in zip(run, fetches):
                    if reader and fetch.error is None and not fetch.bad and fetch.data:
                        # a copy: a slice would keep its whole request (up to MAX_REQUEST)
                        # alive, 16 times RECENT_BYTES when the units kept are of many
                        self._remember(unit, memoryview(bytes(fetch.data)))
                    self._inflight.pop(unit, None)
            for fetch in fetches:
                fetch.done.set()

    def _remember(self, unit: int, data: memoryview) -> None:
        """Keep a unit's verified bytes in memory (under the lock), the oldest dropped."""
        self._recent[unit] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def _download_verified(self, start: int, stop: int) -> tuple[bytes, dict[int, ErofsError]]:
        """Bytes ``start``..``stop`` and the blocks among them that failed their hash; fetched
        a second time if any did."""
        bad: dict[int, ErofsError] = {}
        for attempt in range(2):
            data = self._download(start, stop)
            bad = self._bad_blocks(start, data)
            if not bad:
                break
            log.debug("%s: %d block(s) of bytes %d-%d failed their hash%s", self.name,
                        len(bad), start, stop - 1,
                        ", fetching again" if attempt == 0 else "; not served")
        return data, bad

    def _bad_blocks(self, start: int, data: bytes) -> dict[int, ErofsError]:
        try:
            self._verified.check(start, data)
            return {}
        except IntegrityError:
            pass
        bad: dict[int, ErofsError] = {}
        bs = self._bs
        for pos in range(0, len(data), bs):
            try:
                self._verified.check(start + pos, data[pos:pos + bs])
            except IntegrityError as exc:
                bad[(start + pos) // bs] = exc
        return bad

    def _download(self, start: int, stop: int) -> bytes:
        """Bytes ``start``..``stop`` as the registry sends them. The client retries what is
        transient (connections, 5xx, bodies cut short); a reply that breaks the protocol (a
        wrong Content-Range: a proxy's fault as often as the registry's) gets one more try."""
        try:
            try:
                data = self._client.read_range(self._ref, self._desc, start, stop - start)
            except BadResponse:
                data = self._client.read_range(self._ref, self._desc, start, stop - start)
        except RegistryError as exc:
            raise BlobIOError(f"fetch failed: {exc}", image=self.name, offset=start) from None
        with self._lock:
            self.fetched_bytes += len(data)
            self.requests += 1
        return data

    def _keep(self, start: int, data: bytes, bad: dict[int, ErofsError]) -> None:
        """Write the verified blocks to the cache (runs between bad blocks). A cache that
        cannot be written costs refetches, not the read: the bytes are served from memory."""
        bs = self._bs
        pos, end = 0, len(data)
        try:
            while pos < end:
                if (start + pos) // bs in bad:
                    pos += bs
                    continue
                stop = pos
                while stop < end and (start + stop) // bs not in bad:
                    stop += bs
                stop = min(stop, end)
                self._entry.store(start + pos, data[pos:stop])
                pos = stop
            if self._cache is not None:
                self._cache.note_stored(len(data))
        except OSError as exc:
            log.warning("%s: cache %s not written: %s", self.name, self._entry.path, exc)

    # background fill --------------------------------------------------------------------------
    def start_fill(self, threads: int = FILL_THREADS, first: int = 0) -> None:
        """Fetch every missing unit in the background (``threads`` requests at a time),
        retrying after failures until done or closed, those from byte ``first`` on first
        (an EROFS layer's metadata, see ``start_prefetch``). Call in the process that serves."""
        head = self._missing_units(first, self.size)
        units = head + self._missing_units(0, first)
        if not units:
            log.info("%s: all in the cache", self.name)
            return
        started = time.monotonic()

        def done() -> None:
            missing = len(self._entry.missing())
            if missing:  # blocks that failed their hash twice
                log.warning("%s: fill done, %d blocks could not be verified", self.name,
                            missing)
            else:
                log.info("%s: all in the cache (%d bytes fetched, %.1f s)", self.name,
                         self.fetched_bytes, time.monotonic() - started)
        self._fetch_in_background(units, threads, done)

    def start_prefetch(self, start: int, stop: int, threads: int = FILL_THREADS) -> None:
        """Fetch the missing units of bytes ``start``..``stop`` in the background, as the fill
        does. For the metadata of a layer our writer made (inodes, directories and xattrs
        after the data, from the superblock's ``meta_blkaddr``): a walk of the tree then
        finds them cached instead of waiting for them one round trip at a time, and its
        misses no longer break up a reader's sequential data."""
        units = self._missing_units(start, stop)
        started = time.monotonic()

        def done() -> None:
            log.info("%s: bytes %d-%d prefetched (%d units fetched, %.2f s)", self.name,
                     start, stop - 1, len(units), time.monotonic() - started)
        if units:
            self._fetch_in_background(units, threads, done)
        else:
            done()

    def _missing_units(self, start: int, stop: int) -> list[int]:
        ub, blocks = self._unit_blocks, self._entry.blocks
        first, last = start // self._unit, -(-min(stop, self.size) // self._unit)
        return [u for u in range(first, last)
                if not self._entry.present(u * ub, min((u + 1) * ub, blocks))]

    def _fetch_in_background(self, units: list[int], threads: int,
                             done: Callable[[], None]) -> None:
        """``units`` fetched in runs by ``threads`` threads, in order; ``done`` after the last
        (and a flush of the cache)."""
        todo = iter(_runs(units, max(MAX_REQUEST // self._unit, 1)))
        lock = threading.Lock()
        left = [threads]

        def work() -> None:
            while not self._stop.is_set():
                with lock:
                    run = next(todo, None)
                if run is None:
                    break
                self._fill_run(run)
            with lock:
                left[0] -= 1
                if left[0] == 0 and not self._stop.is_set():
                    try:
                        self._entry.flush()
                    except OSError as exc:
                        log.warning("%s: cache not flushed: %s", self.name, exc)
                    done()

        for k in range(threads):
            t = threading.Thread(target=work, name=f"fill-{k}", daemon=True)
            t.start()
            self._fillers.append(t)

    def _fill_run(self, run: list[int]) -> None:
        ub = self._unit_blocks
        first, end = run[0] * ub, min((run[-1] + 1) * ub, self._entry.blocks)
        while not self._stop.is_set():
            error: ErofsError | None = None
            try:
                fetches = self._ensure(first, end, reader=False)
            except ErofsError as exc:
                error = exc
            else:
                error = next((f.error for f in fetches.values() if f.error is not None), None)
            if error is None:
                self._fill_failing = False
                return  # blocks that failed their hash twice are left out, for good
            if not self._fill_failing:  # one line per outage, not one per try
                self._fill_failing = True
                log.warning("%s: fill: %s; trying again every %.0f s", self.name,
                            error.message, FILL_RETRY_WAIT)
            self._stop.wait(FILL_RETRY_WAIT)

    def close(self) -> None:
        self._stop.set()
        for t in self._fillers:
            t.join(timeout=1)
        self._verified.close()
        self._entry.close()


_LIVE: weakref.WeakSet[LazyBlob] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child (the mount's daemon) no thread of the parent runs: a fetch it had
    in flight (one a read gave up on while the layers were opened) would never finish, and
    a lock may be held. Start afresh."""
    for blob in list(_LIVE):
        blob._lock = threading.Lock()
        blob._inflight = {}
        blob._recent.clear()
        blob._recent_bytes = 0


os.register_at_fork(after_in_child=_after_fork)


def _runs(units: list[int], longest: int) -> list[list[int]]:
    """Consecutive units grouped (at most ``longest`` per group)."""
    runs: list[list[int]] = []
    for unit in units:
        if runs and runs[-1][-1] == unit - 1 and len(runs[-1]) < longest:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs

