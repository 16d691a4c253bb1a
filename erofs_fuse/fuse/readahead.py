"""Read-ahead across the metadata-only files of a tree: which objects to open ahead.

A program that reads a tree whole (``tar -cf -``, ``cp -a``) lists a directory and reads its
files from their start, in listing order, walking each subdirectory where it is listed; each
read of a metadata-only file opens its object, and cold that waits on the disk with nothing
overlapping it. So when reads go "in order" (a file read from its start is one asked for ahead,
or is later in its listing than the file read from its start just before it), the objects of
the next ``window`` files in that walk's order are given to the store's prefetcher
(``ObjectStore.prefetch``): a cursor goes on from the file read through the rest of its
listing, into each subdirectory as it meets it (listed now, through ``lister``: the walk would
list it next anyway) and back up to the parent's next entries. Most files sit in small
directories (the Debian base: 5,329 files in 505 directories, half of them in directories of
64 files or fewer), so asking only within one listing would give the objects of a small
directory's files at its listing, just before their reads. When the file before was read up to
its end (a read-all, not ``file *`` or ``head``), more of each object is read ahead than its
first read takes (``ObjectStore.prefetch(whole=True)``). A read out of order stops it until
two reads are in order again; a directory listed by the program (not by the cursor) while
reads are in order moves the cursor there. A program reading a few files here and there costs
nothing but remembering where entries sit in their listing (at most ``places`` of them,
forgotten all at once past that, and only for listings with regular files or directories).

Only a guess about what comes next: a wrong guess costs the opens and page-cache reads of at
most ``window`` objects (their first 128 KiB, or up to 8 MiB each while files were being read
whole, and 128 MiB in all: ``object_prefetch.DEFAULT_HINT_BYTES``) and the listings of the
directories the cursor went into (at most ``4 * window`` entries looked at per ask, files
asked for in batches of half the window); a file's bytes never come from here.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ..erofs.errors import ErofsError

if TYPE_CHECKING:
    from ..objects import ObjectStore
    from .overlay import Ino, Node

# Files asked for ahead. A cold read-all of the Debian base (objects_readall, interleaved runs):
# 64 took 0.87-0.97x the time of 16 in sets of 5, 9 and 9 runs (each against the full layer,
# per run) and 0.94x in 15 (directly, per run); 128 took longer than 64
DEFAULT_WINDOW = 64
DEFAULT_PLACES = 1 << 16

Listing = Sequence[tuple[bytes, "Node"]]


class ObjectReadAhead:
    """Watches listings and the starts of reads; tells ``store`` what to open ahead.
    ``lister(node)``: the merged listing of directory ``node`` (None: the cursor does not go
    into directories not listed yet)."""

    def __init__(self, store: ObjectStore, *, window: int = DEFAULT_WINDOW,
                 places: int = DEFAULT_PLACES,
                 lister: Callable[[Node], Listing] | None = None) -> None:
        self.store = store
        self.window = window
        self._batch = max(1, window // 2)  # files asked for at once, at least, once streaming
        self._max_places = places
        self._lister = lister
        self._lock = threading.Lock()
        # an entry's ino -> (its directory's ino, its index in the directory's listing)
        self._places: dict[Ino, tuple[Ino, int]] = {}
        self._listings: dict[Ino, Listing] = {}  # directory ino -> its listing
        # the files asked for and not read yet, in the cursor's order (and as a set)
        self._outstanding: deque[Ino] = deque()
        self._outstanding_set: set[Ino] = set()
        self._cursor: Iterator[Node] | None = None  # the entries after the last one asked
        self._moving = threading.Lock()  # held while the cursor moves (it may list)
        self._listing_ahead = False  # the cursor is listing a directory
        self._last: tuple[Ino, int] | None = None  # the place of the last file read from 0
        self._last_ino: Ino | None = None  # that file
        self._finished: Ino | None = None  # the last file read up to its end
        self.streaming = False
        self.whole = False  # and the files before were read to their end: a read-all

    def listed(self, dir_ino: Ino, entries: Listing) -> None:
        """A directory's merged listing was made: remember where its entries sit."""
        if not self._remember(dir_ino, entries):
            return
        if self.streaming and not self._listing_ahead:
            # the program went where the cursor did not: its files are read next
            self._move_to(dir_ino, -1)
            self._ask()

    def started(self, node: Node) -> None:
        """A metadata-only file is read from its start."""
        place = self._places.get(node.ino)
        if place is None:
            return
        last, self._last = self._last, place
        self.whole = self._last_ino is not None and self._finished == self._last_ino
        self._last_ino = node.ino
        if node.ino in self._outstanding_set:  # asked for ahead: the cursor is right
            with self._lock:
                while self._outstanding:  # those before it were not read: forgotten
                    ino = self._outstanding.popleft()
                    self._outstanding_set.discard(ino)
                    if ino == node.ino:
                        break
            self.streaming = True
            if len(self._outstanding) > self.window - self._batch:
                return  # asked for in batches: each ask has a cost of its own
        else:
            self.streaming = last is not None and last[0] == place[0] and last[1] < place[1]
            if not self.streaming:
                return
            self._move_to(*place)
        self._ask()

    def finished(self, node: Node) -> None:
        """A metadata-only file was read up to its end."""
        self._finished = node.ino

    def _remember(self, dir_ino: Ino, entries: Listing) -> bool:
        """Note where the entries of a listing sit; False for one without regular files or
        directories (nothing to read or walk into)."""
        if not any(child.dirs or child.inode.info.is_reg for _, child in entries):
            return False
        with self._lock:
            if len(self._places) + len(entries) > self._max_places:
                self._places.clear()
                self._listings.clear()
            for k, (_, child) in enumerate(entries):
                self._places[child.ino] = (dir_ino, k)
            self._listings[dir_ino] = entries
        return True

    def _move_to(self, dir_ino: Ino, index: int) -> None:
        """Start the cursor after entry ``index`` of directory ``dir_ino``."""
        with self._lock:
            self._cursor = self._walk_from(dir_ino, index)
            self._outstanding.clear()
            self._outstanding_set.clear()

    def _ask(self) -> None:
        """Move the cursor on until ``window`` files are asked for and not read yet, and ask
        the store for the new ones."""
        if not self._moving.acquire(blocking=False):
            return  # another thread moves it
        picked: list[Node] = []
        try:
            budget = 4 * self.window
            cursor = self._cursor
            while cursor is not None and budget > 0 and (
                    len(self._outstanding) + len(picked) < self.window):
                budget -= 1
                node = next(cursor, None)
                if node is None:
                    self._cursor = None
                elif not node.dirs and node.inode.info.is_reg and _is_metacopy(node):
                    picked.append(node)
            with self._lock:
                for node in picked:
                    self._outstanding.append(node.ino)
                    self._outstanding_set.add(node.ino)
        finally:
            self._moving.release()
        if picked:
            self.store.prefetch([node.inode for node in picked], whole=self.whole)

    def _walk_from(self, dir_ino: Ino, index: int) -> Iterator[Node]:
        """The entries after entry ``index`` of directory ``dir_ino`` as a walk meets them
        (a subdirectory's entries right after it), then those after the directory in its
        parent's listing, and so on up. Each directory is gone into or up to once: a corrupt
        layer's directory that is its own ancestor ends the walk there, not in a loop."""
        seen = {dir_ino}
        while True:
            listing = self._listings.get(dir_ino)
            if listing is None:
                return
            yield from self._subtree_after(listing, index, seen)
            up = self._places.get(dir_ino)
            if up is None or up[0] in seen:
                return
            dir_ino, index = up
            seen.add(dir_ino)

    def _subtree_after(self, listing: Listing, index: int, seen: set[Ino]) -> Iterator[Node]:
        stack = [(listing, index + 1)]
        while stack:
            entries, k = stack.pop()
            if k >= len(entries):
                continue
            stack.append((entries, k + 1))
            node = entries[k][1]
            yield node
            if node.dirs and node.ino not in seen:
                seen.add(node.ino)
                stack.append((self._list(node), 0))

    def _list(self, node: Node) -> Listing:
        """The listing of a directory the cursor goes into."""
        listing = self._listings.get(node.ino)
        if listing is not None or self._lister is None:
            return listing or ()
        self._listing_ahead = True
        try:
            listing = self._lister(node)
        except (ErofsError, OSError):  # the program's own listing says why
            return ()
        finally:
            self._listing_ahead = False
        self._remember(node.ino, listing)  # if the tree had it cached, listed() was not called
        return listing


def _is_metacopy(node: Node) -> bool:
    try:
        return node.inode.is_metacopy
    except ErofsError:  # its own read says why
        return False
