"""Objects opened ahead of their reads, so that cold disk reads overlap the daemon's work.

A read-all through a metadata layer (``tar -cf -``, ``cp -a``) reads thousands of small
objects one after another; the daemon serves each read in its one thread, so, cold, every
object is a disk read that nothing overlaps (a full layer is one file, which the kernel reads
ahead). A ``Prefetcher`` is told which objects are about to be read (``fuse/readahead.py``
guesses it from the order of a listing): it opens them at once and has the kernel start
reading their first bytes (``POSIX_FADV_WILLNEED``: what the first read of each takes, or
more when files are being read whole, and a big object's stored tree whole) into its page cache, without waiting for them, while the
daemon serves the reads before them. The read of each file then takes its object already open
(``take``) and checks and verifies it exactly as if it had opened it itself: this only warms
the page cache and saves nothing but the time; it never serves, hashes or judges a byte. What
cannot be opened ahead is forgotten (the read meets it again, and raises and logs). Small
objects with a digest go to the object worker instead (``object_worker.py``), which also
reads and hashes them; these are the others (big ones, objects without a digest), and all of
them when there is no worker.

In the daemon's own thread, not in worker threads: measured on the Debian base, worker threads
cost more CPU in handing the GIL back and forth (every open and hint is a system call that
drops it) than they saved, warm and cold, on 2 cores. Bounded: at most ``ahead`` objects open
and not yet taken, the oldest closed past that (a guess that was wrong), and at most
``hint_bytes`` asked of the kernel for them (past it, only what each first read takes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Generic, Hashable, Sequence, TypeVar

if TYPE_CHECKING:
    from .objects import FdBlob

log = logging.getLogger(__name__)

DEFAULT_AHEAD = 128
# What the kernel may be asked to read for the objects open ahead and not taken yet, at most:
# past it, an object gets a hint of what its first read takes only (``want``'s ``least``). The
# bound a window of 16 files of up to 8 MiB each had; a window of 64 (``fuse/readahead.py``)
# keeps it.
DEFAULT_HINT_BYTES = 128 << 20

Opened = tuple["FdBlob", "FdBlob | None"]  # an object and its stored tree, open
K = TypeVar("K", bound=Hashable)  # what names an object
A = TypeVar("A")  # what opening it takes


class Prefetcher(Generic[K, A]):
    """``want((key, what), ..., limit)`` opens ``opener(what)`` for each (None: no such object)
    and hints the kernel to read its first ``limit`` bytes; ``take(key)`` hands one over."""

    def __init__(self, opener: Callable[[A], Opened | None], *,
                 ahead: int = DEFAULT_AHEAD, hint_bytes: int = DEFAULT_HINT_BYTES) -> None:
        self._opener = opener
        self._max_ahead = ahead
        self._max_hinted = hint_bytes
        # each object open ahead, with the bytes the kernel was asked to read for it
        self._ahead: OrderedDict[K, tuple[Opened, int]] = OrderedDict()
        self.hinted = 0  # their sum: what the kernel may still be reading for us
        self._lock = threading.Lock()  # reads may run in threads (``--blocking-reads``)
        self.opened = 0  # objects opened ahead (tests, debugging)
        self.taken = 0  # of which a read took (the guess was right)
        self.most_open = 0  # the most objects open ahead at once
        self.advised = 0  # bytes of objects the kernel was asked to read ahead

    @property
    def open_ahead(self) -> int:
        return len(self._ahead)

    def want(self, jobs: Sequence[tuple[K, A]], limit: int, least: int = 0) -> None:
        """Open these objects (in this order), unless open ahead already, and have the kernel
        read the first ``limit`` bytes of each; only the first ``least`` bytes while what was
        hinted for the objects open ahead is over ``hint_bytes``."""
        for key, what in jobs:
            if key in self._ahead:
                continue
            found = self._open(key, what, limit if self.hinted < self._max_hinted else least)
            if found is None:
                continue
            dropped = []
            with self._lock:
                old = self._ahead.pop(key, None)  # opened meanwhile by another thread
                if old is not None:
                    dropped.append(old)
                self._ahead[key] = found
                self.hinted += found[1]
                self.opened += 1
                while len(self._ahead) > self._max_ahead:
                    dropped.append(self._ahead.popitem(last=False)[1])
                for _, hinted in dropped:
                    self.hinted -= hinted
                self.most_open = max(self.most_open, len(self._ahead))
            for opened, _ in dropped:  # never handed out: nobody else holds them
                _close(opened)

    def take(self, key: K) -> Opened | None:
        """The object opened ahead for ``key`` (now the caller's), or None."""
        if not self._ahead:  # the usual miss: no lock
            return None
        with self._lock:
            found = self._ahead.pop(key, None)
            if found is None:
                return None
            self.taken += 1
            self.hinted -= found[1]
        return found[0]

    def close(self) -> None:
        with self._lock:
            left = list(self._ahead.values())
            self._ahead.clear()
            self.hinted = 0
        for opened, _ in left:
            _close(opened)

    def _open(self, key: K, what: A, limit: int) -> tuple[Opened, int] | None:
        """The object opened, and the bytes the kernel was asked to read for it."""
        try:
            opened = self._opener(what)
            if opened is None:
                return None
            blob, tree = opened
            try:
                length = min(blob.size, limit)
                if length > 0:
                    os.posix_fadvise(blob.fd, 0, length, os.POSIX_FADV_WILLNEED)
                    self.advised += length
                if tree is not None:
                    os.posix_fadvise(tree.fd, 0, tree.size, os.POSIX_FADV_WILLNEED)
                    length += tree.size
            except BaseException:
                _close(opened)
                raise
            return opened, length
        except Exception as exc:  # noqa: BLE001 - the read of that file opens it and says why
            log.debug("object %r not opened ahead: %s", key, exc)
            return None


def _close(opened: Opened) -> None:
    blob, tree = opened
    blob.close()
    if tree is not None:
        tree.close()
