"""Read-ahead across the metadata-only files of a listing: which objects to open ahead.

A program that reads a tree whole (``tar -cf -``, ``cp -a``, a backup) lists a directory and
reads its files from their start, in listing order; each read of a metadata-only file opens its
object, and cold that waits on the disk with nothing overlapping it. So when reads go "in
order" (a file read from its start is later in its listing than the file read from its start
just before it, or is one that was opened ahead), the objects of the next ``window`` files of
the listing are given to the store's prefetcher (``ObjectStore.prefetch``), and so are the first
``window`` of each directory listed while that lasts; when the file before was read up to
its end (a read-all, not ``file *`` or ``head``), more of each object is read ahead than its
first read takes (``ObjectStore.prefetch(whole=True)``). A read out of order stops it until two
reads are in order again: a program reading a few files here and there costs nothing but
remembering where files sit in their listing (at most ``places`` of them, forgotten all at once
past that, and only for listings of this mount with regular files).

Only a guess about what comes next: a wrong guess costs the opens and page-cache reads of at
most ``window`` objects (their first 128 KiB, or up to 8 MiB each while files were being read
whole, and 128 MiB in all: ``object_prefetch.DEFAULT_HINT_BYTES``); a file's bytes never come
from here.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Sequence

from ..erofs.errors import ErofsError

if TYPE_CHECKING:
    from ..objects import ObjectStore
    from .overlay import Ino, Node

# Files asked for ahead. A cold read-all of the Debian base (objects_readall, interleaved runs):
# 64 took 0.87-0.97x the time of 16 in sets of 5, 9 and 9 runs (each against the full layer,
# per run) and 0.94x in 15 (directly, per run); 128 took longer than 64
DEFAULT_WINDOW = 64
DEFAULT_PLACES = 1 << 16


class ObjectReadAhead:
    """Watches listings and the starts of reads; tells ``store`` what to open ahead."""

    def __init__(self, store: ObjectStore, *, window: int = DEFAULT_WINDOW,
                 places: int = DEFAULT_PLACES) -> None:
        self.store = store
        self.window = window
        self._max_places = places
        self._lock = threading.Lock()
        # regular file ino -> (its directory's ino, its index among the directory's files)
        self._places: dict[Ino, tuple[Ino, int]] = {}
        # directory ino -> its regular files in listing order, and how far they were asked for
        self._files: dict[Ino, tuple[Node, ...]] = {}
        self._asked: dict[Ino, int] = {}
        # the files asked for lately (a set beside it: looked up at every file's first read)
        self._recent: deque[Ino] = deque(maxlen=4 * window)
        self._recent_set: set[Ino] = set()
        self._last: tuple[Ino, int] | None = None  # the place of the last file read from 0
        self._last_ino: Ino | None = None  # that file
        self._finished: Ino | None = None  # the last file read up to its end
        self.streaming = False
        self.whole = False  # and the files before were read to their end: a read-all

    def listed(self, dir_ino: Ino, entries: Sequence[tuple[bytes, Node]]) -> None:
        """A directory's merged listing was made: remember where its regular files sit."""
        files: list[Node] = []
        with self._lock:
            places = self._places
            for _, child in entries:
                if not child.dirs and child.inode.info.is_reg:
                    if len(places) >= self._max_places:
                        places.clear()
                        self._files.clear()
                        self._asked.clear()
                    places[child.ino] = (dir_ino, len(files))
                    files.append(child)
            if not files:
                return
            self._files[dir_ino] = tuple(files)
            self._asked.pop(dir_ino, None)
            streaming = self.streaming
        if streaming:
            self._ask(dir_ino, 0)

    def started(self, node: Node) -> None:
        """A metadata-only file is read from its start."""
        place = self._places.get(node.ino)
        if place is None:
            return
        last, self._last = self._last, place
        self.whole = self._last_ino is not None and self._finished == self._last_ino
        self._last_ino = node.ino
        in_order = node.ino in self._recent_set or (
            last is not None and last[0] == place[0] and last[1] < place[1])
        self.streaming = in_order
        if in_order:
            self._ask(place[0], place[1] + 1)

    def finished(self, node: Node) -> None:
        """A metadata-only file was read up to its end."""
        self._finished = node.ino

    def _ask(self, dir_ino: Ino, start: int) -> None:
        """Ask for the files of ``dir_ino`` from index ``start`` up to ``window`` of them,
        those asked for already left out."""
        with self._lock:
            files = self._files.get(dir_ino)
            if files is None:
                return
            stop = min(len(files), start + self.window)
            start = max(start, self._asked.get(dir_ino, 0))
            if start >= stop:
                return
            self._asked[dir_ino] = stop
            chosen = files[start:stop]
        picked = [node for node in chosen if _is_metacopy(node)]
        with self._lock:
            for node in picked:
                if len(self._recent) == self._recent.maxlen:
                    self._recent_set.discard(self._recent[0])  # pushed out by the append
                self._recent.append(node.ino)
                self._recent_set.add(node.ino)
        if picked:
            self.store.prefetch([node.inode for node in picked], whole=self.whole)


def _is_metacopy(node: Node) -> bool:
    try:
        return node.inode.is_metacopy
    except ErofsError:  # its own read says why
        return False
