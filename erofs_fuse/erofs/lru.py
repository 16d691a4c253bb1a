"""A bounded least-recently-used map for the hot caches of the read path.

cachetools' ``LRUCache`` costs about 2 us per ``get`` (a Python ``__contains__``, ``__getitem__``
and order update, and a ``__missing__`` on every miss); the metadata block and inode caches are
consulted several times per directory entry, which made them a quarter of the CPU of a cold
``find`` of the bench rootfs. ``OrderedDict`` does the same bookkeeping in C.
Not thread-safe on its own: callers hold their lock, as they did around ``LRUCache``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """At most ``maxsize`` entries; the least recently got or put one is dropped first."""

    __slots__ = ("maxsize", "_data")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("an LRU map holds at least one entry")
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        data = self._data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.maxsize:
            data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
