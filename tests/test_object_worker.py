"""The object worker (``object_worker.py``) and the read-ahead's cursor across directories
(``fuse/readahead.py``): objects read ahead are read and verified in a child process and
served from the bytes that gave their digest; a bad object is still the daemon's to refuse
(the same errors as without a worker); a worker killed or stopped leaves every read to the
daemon, and nothing it holds is unbounded or outlives its mount.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from devtools.bench.stacks import alive, children_of
from erofs_fuse.erofs.image import Image, Inode
from erofs_fuse.fuse.overlay import MergedTree, Node
from erofs_fuse.fuse.readahead import ObjectReadAhead
from erofs_fuse.object_worker import VerifyWorker
from erofs_fuse.objects import ObjectStore
from mounting import daemon_pids, fuse_mount

HOSTILE = Path(__file__).resolve().parent.parent / "fixtures" / "hostile"
from test_object_readahead import (  # noqa: F401 - fixtures
    Tree, damaged, in_order, read_all_of_damaged, read_whole, tree, walk_order,
)


@contextlib.contextmanager
def merged_with_cursor(layer: str, store: ObjectStore, window: int) -> Iterator[MergedTree]:
    with Image.open(layer) as image, store:
        merged_tree = MergedTree([image], objects=store)
        merged_tree.readahead = ObjectReadAhead(
            store, window=window, lister=lambda node: merged_tree.listdir(node).entries)
        yield merged_tree


def gone_soon(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_worker_reads_and_verifies_objects_ahead_and_serves_them(tree: Tree) -> None:
    store = ObjectStore([tree.store], worker=True)
    with merged_with_cursor(tree.layer, store, window=8) as merged_tree:
        for path, node in in_order(merged_tree):
            assert read_whole(merged_tree, node) == tree.data[path], path
        worker = store.worker
        assert worker is not None and not worker.dead
        # all but the first two files read (before reads were known to go in order); the big
        # ones too, read whole
        assert worker.served >= len(tree.data) - 2
        assert store.prefetcher is None  # nothing left for the daemon to open ahead
        pid = worker.pid
        assert pid is not None and alive(pid)
    assert store.worker is None and gone_soon(pid)


def test_bad_objects_fail_as_without_a_worker(damaged: Tree) -> None:
    store = ObjectStore([damaged.store], worker=True)
    with merged_with_cursor(damaged.layer, store, window=8) as merged_tree:
        read_all_of_damaged(merged_tree, damaged)
        assert store.worker is not None and not store.worker.dead
        assert store.worker.served >= len(damaged.data) - 2 - 3


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_a_worker_killed_or_hung_leaves_the_reads_to_the_daemon(
        tree: Tree, sig: signal.Signals, caplog: pytest.LogCaptureFixture) -> None:
    store = ObjectStore([tree.store], worker=lambda fds: VerifyWorker(fds, wait=0.5))
    pid = None
    try:
        with merged_with_cursor(tree.layer, store, window=8) as merged_tree:
            with caplog.at_level(logging.WARNING):
                for k, (path, node) in enumerate(in_order(merged_tree)):
                    if k == 5:
                        assert store.worker is not None and store.worker.served > 0
                        pid = store.worker.pid
                        assert pid is not None
                        os.kill(pid, sig)
                    assert read_whole(merged_tree, node) == tree.data[path], path
            assert store.worker is not None and store.worker.dead
            assert store.worker.pid is None and pid is not None and gone_soon(pid)
            assert store.prefetcher is not None and store.prefetcher.taken > 0  # its turn
    finally:
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert "object worker stopped" in caplog.text
    why = "it exited" if sig == signal.SIGKILL else "no reply in 0.5 s"
    assert why in caplog.text


def test_what_the_worker_holds_is_bounded(tree: Tree) -> None:
    """Reading every other file: the replies read past on the way to a wanted one are kept
    within their bound, and never more objects are asked than ``max_pending``."""
    bound = 40000
    store = ObjectStore([tree.store],
                        worker=lambda fds: VerifyWorker(fds, max_pending=6, ready_bytes=bound))
    with merged_with_cursor(tree.layer, store, window=16) as merged_tree:
        for k, (path, node) in enumerate(in_order(merged_tree)):
            if k % 2:
                continue
            assert read_whole(merged_tree, node) == tree.data[path], path
            worker = store.worker
            if worker is not None:
                assert worker.pending <= 6
                # or the one object read last, whatever its size
                assert worker.ready_bytes <= max(bound, *map(len, tree.data.values()))
        assert store.worker is not None and store.worker.served > 0


class RecordingStore(ObjectStore):
    """A store that notes which files' objects were asked for ahead, in order."""

    def __init__(self, dirs: Sequence[str], events: list[tuple[str, int]]) -> None:
        super().__init__(dirs)
        self.events = events

    def prefetch(self, inodes: Sequence[Inode], *, whole: bool = False) -> None:
        self.events += [("asked", inode.nid) for inode in inodes]
        super().prefetch(inodes, whole=whole)


def test_the_cursor_asks_for_the_files_of_directories_not_listed_yet(tree: Tree) -> None:
    """Reading ``a/f00`` and ``a/f01`` puts reads in order: the files after them are asked for
    in the order ``tar`` reads them, ``a/sub``'s and then ``b``'s and ``c``'s (window 64: all
    of them) before the walk lists those directories."""
    events: list[tuple[str, int]] = []
    store = RecordingStore([tree.store], events)
    with merged_with_cursor(tree.layer, store, window=64) as merged_tree:
        order: list[tuple[str, Node]] = []
        dirs: dict[str, Node] = {}

        def walk(top: Node, prefix: str) -> None:
            events.append(("listed", top.ino))
            dirs[prefix.rstrip("/")] = top
            for name, node in merged_tree.listdir(top).entries:
                path = prefix + name.decode()
                if node.is_dir:
                    walk(node, path + "/")
                elif node.inode.info.is_reg:
                    order.append((path, node))
                    read_whole(merged_tree, node)

        walk(merged_tree.root, "")
        asked = [nid for kind, nid in events if kind == "asked"]
        nids = [node.inode.nid for _, node in order]
        assert asked == nids[2:]  # each once, in the walk's own order
        first_listing = {ino: k for k, (kind, ino) in reversed(list(enumerate(events)))
                         if kind == "listed"}
        first_ask = {nid: k for k, (kind, nid) in reversed(list(enumerate(events)))
                     if kind == "asked"}
        for path, node in order:
            if path.startswith(("a/sub/", "b/", "c/")):
                parent = dirs[os.path.dirname(path)]
                assert first_ask[node.inode.nid] < first_listing[parent.ino], path


def test_a_mount_s_worker_is_its_child_and_ends_with_it(tree: Tree) -> None:
    with fuse_mount([tree.layer], "--data-dir", tree.store) as fm:
        for path in walk_order(fm.mountpoint):
            assert Path(fm.mountpoint, path).read_bytes() == tree.data[path]
        (daemon,) = daemon_pids(fm.mountpoint)
        workers = [pid for pid in children_of(daemon) if b"erofs_fuse.object_worker" in cmdline(pid)]
        assert len(workers) == 1
    assert gone_soon(workers[0])


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", ["loop-self.erofs", "loop-root.erofs", "loop-ancestor.erofs"])
def test_the_cursor_walks_a_corrupt_layer_s_directory_loop_once(name: str,
                                                               tmp_path: Path) -> None:
    """A directory that is its own ancestor (``fixtures/hostile``) is gone into once: the walk
    ahead ends, instead of going round forever, or, going up, without ever yielding."""
    with Image.open(str(HOSTILE / name)) as image, ObjectStore([str(tmp_path)]) as store:
        merged_tree = MergedTree([image], objects=store)
        readahead = merged_tree.readahead
        assert readahead is not None
        d = merged_tree.lookup(merged_tree.root, b"d")
        assert d is not None
        merged_tree.listdir(merged_tree.root)
        for start in range(-1, len(merged_tree.listdir(d).entries)):
            walked = list(itertools.islice(readahead._walk_from(d.ino, start), 1000))
            assert len(walked) < 30, (start, len(walked))
