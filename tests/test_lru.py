"""The LRU map of the metadata and inode caches (erofs/lru.py)."""

from __future__ import annotations

import pytest

from erofs_fuse.erofs.lru import Lru


def test_least_recently_used_goes_first() -> None:
    lru: Lru[int, str] = Lru(2)
    lru.put(1, "a")
    lru.put(2, "b")
    assert lru.get(1) == "a"  # 1 is now the most recent
    lru.put(3, "c")
    assert (lru.get(2), lru.get(1), lru.get(3), len(lru)) == (None, "a", "c", 2)


def test_put_again_replaces_and_refreshes() -> None:
    lru: Lru[str, int] = Lru(2)
    lru.put("x", 1)
    lru.put("y", 2)
    lru.put("x", 3)
    lru.put("z", 4)
    assert ("x" in lru, "y" in lru, lru.get("x")) == (True, False, 3)


def test_needs_room_for_one() -> None:
    with pytest.raises(ValueError):
        Lru(0)
