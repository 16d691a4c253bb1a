"""Objects opened ahead of their reads (``fuse/readahead.py``, ``object_prefetch.py``): only
when files are read in listing order, within their bounds, and never changing what a read
gives: the same bytes as the kernel's overlayfs with the store as a data-only layer, and EIO
with a log line for an object missing or changed, whether or not it was opened ahead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from erofs_fuse.erofs.errors import ErofsError, MetacopyError
from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse.overlay import MergedTree, Node
from erofs_fuse.fuse.readahead import ObjectReadAhead
from erofs_fuse.object_prefetch import Prefetcher
from erofs_fuse.objects import (
    PASS_KEPT_BYTES, WHOLE_OBJECT_BYTES, FdBlob, ObjectStore, object_name,
)
from erofs_fuse.verity.trust import IntegrityError
from helpers import flip, kernel_erofs, read_or_errno
from mounting import daemon_pids, env, fuse_mount, require_overlay

CHUNK = 128 << 10  # what the kernel asks for at a time


def sizes() -> dict[str, int]:
    """Files of the tree by path: many small ones in one directory (more than the window and
    the bounds below), a subdirectory, big ones (their trees stored beside them), a lone one."""
    rng = random.Random(21)
    out = {f"a/f{k:02}": rng.randrange(65, 30000) for k in range(40)}
    out.update({f"a/sub/s{k}": rng.randrange(65, 9000) for k in range(6)})
    out.update({f"b/g{k}": rng.randrange(65, 20000) for k in range(6)})
    out.update({"b/big0": 300 << 10, "b/big1": (200 << 10) + 5, "c/alone": 5000})
    return out


@dataclass
class Tree:
    layer: str
    store: str
    data: dict[str, bytes]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    root = tmp_path_factory.mktemp("readahead")
    src = root / "src"
    rng = random.Random(1)
    data = {path: rng.randbytes(size) for path, size in sizes().items()}
    for path, payload in data.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(payload)
    layer, store = str(root / "meta.erofs"), str(root / "objects")
    proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "convert", "--objects", store,
                           str(src), layer], capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stderr
    return Tree(layer, store, data)


def object_of(tree: Tree, path: str) -> str:
    with Image.open(tree.layer) as image:
        meta = image.lookup(path).metacopy()
    assert meta is not None and meta.digest is not None
    return os.path.join(tree.store, object_name(meta.digest))


@contextlib.contextmanager
def merged(layer: str, store: ObjectStore, window: int) -> Iterator[MergedTree]:
    with Image.open(layer) as image, store:
        merged_tree = MergedTree([image], objects=store)
        merged_tree.readahead = ObjectReadAhead(store, window=window)
        yield merged_tree


def read_whole(merged_tree: MergedTree, node: Node) -> bytes:
    out = b""
    while len(out) < node.inode.size:
        out += merged_tree.read(node, len(out), CHUNK)
    return out


def in_order(merged_tree: MergedTree, top: Node | None = None,
             prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Regular files as ``tar -c`` meets them: a directory's entries in listing order, a
    subdirectory walked where it is listed."""
    for name, node in merged_tree.listdir(top or merged_tree.root).entries:
        path = prefix + name.decode()
        if node.is_dir:
            yield from in_order(merged_tree, node, path + "/")
        elif node.inode.info.is_reg:
            yield path, node


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_reads_in_listing_order_open_objects_ahead_within_bounds(tree: Tree) -> None:
    store = ObjectStore([tree.store], open_objects=8, prefetch_ahead=6)
    with merged(tree.layer, store, window=4) as merged_tree:
        fans = len({os.path.dirname(object_of(tree, path)) for path in tree.data})
        base = open_fds()
        most = 0
        for path, node in in_order(merged_tree):
            assert read_whole(merged_tree, node) == tree.data[path], path
            most = max(most, open_fds() - base)
        ahead = store.prefetcher
        assert ahead is not None
        assert ahead.opened > len(tree.data) // 2  # most objects were opened ahead
        assert ahead.taken > ahead.opened // 2  # and most of those taken by their read
        assert ahead.most_open <= 6
        # open objects, objects open ahead, the kept directories of the store: nothing more
        assert most <= 8 + 6 + fans


def test_listing_or_reading_out_of_order_opens_nothing_ahead(tree: Tree) -> None:
    store = ObjectStore([tree.store])
    with merged(tree.layer, store, window=4) as merged_tree:
        files = list(in_order(merged_tree))  # every directory listed, nothing read
        for path, node in reversed(files):  # read backwards: never two in listing order
            assert read_whole(merged_tree, node) == tree.data[path]
        assert store.prefetcher is None


def test_more_is_read_ahead_only_when_files_are_read_whole(tree: Tree) -> None:
    """Reading each file's first bytes (``file *``) has the kernel read ahead at most what
    those first reads take; reading files whole, whole objects (the big ones too)."""
    store = ObjectStore([tree.store])
    with merged(tree.layer, store, window=4) as merged_tree:
        for path, node in in_order(merged_tree):  # every file has more than 64 bytes
            assert merged_tree.read(node, 0, 64) == tree.data[path][:64]
        assert store.prefetcher is not None
        opened, first_bytes = store.prefetcher.opened, store.prefetcher.advised
        assert opened > 0 and first_bytes <= opened * WHOLE_OBJECT_BYTES
    store = ObjectStore([tree.store])
    with merged(tree.layer, store, window=4) as merged_tree:
        for path, node in in_order(merged_tree):
            assert read_whole(merged_tree, node) == tree.data[path]
        assert store.prefetcher is not None and store.prefetcher.opened == opened
        big = len(tree.data["b/big0"]) + len(tree.data["b/big1"])
        assert store.prefetcher.advised >= first_bytes + big - 2 * WHOLE_OBJECT_BYTES


@pytest.fixture
def damaged(tree: Tree, tmp_path: Path) -> Tree:
    """A copy of the store with a small object changed, one missing and a big object changed
    in its second block."""
    store = tmp_path / "objects"
    shutil.copytree(tree.store, store)
    copy = Tree(tree.layer, str(store), tree.data)
    flip(object_of(copy, "a/f05"), 100, 0x20)
    os.unlink(object_of(copy, "a/f07"))
    flip(object_of(copy, "b/big0"), 4096 + 17, 0x20)
    return copy


def read_all_of_damaged(merged_tree: MergedTree, damaged: Tree) -> None:
    """Read every file in walk order: the damaged ones fail, each as it should (a big object
    only in its changed block, checked through its tree), the others give their bytes."""
    failed: dict[str, ErofsError] = {}
    for path, node in in_order(merged_tree):
        try:
            got = read_whole(merged_tree, node)
        except ErofsError as exc:
            failed[path] = exc
            continue
        assert got == damaged.data[path], path
    assert sorted(failed) == ["a/f05", "a/f07", "b/big0"]
    assert isinstance(failed["a/f05"], IntegrityError)
    assert isinstance(failed["a/f07"], MetacopyError)
    assert "in none of the data dirs" in str(failed["a/f07"])
    assert isinstance(failed["b/big0"], IntegrityError)
    assert "data block 1" in str(failed["b/big0"])


def test_changed_or_missing_objects_fail_their_reads_when_opened_ahead(damaged: Tree) -> None:
    store = ObjectStore([damaged.store])
    with merged(damaged.layer, store, window=8) as merged_tree:
        read_all_of_damaged(merged_tree, damaged)
        assert store.prefetcher is not None and store.prefetcher.taken > 20
        # the first block of the changed big object is still good, read alone
        node = dict(in_order(merged_tree))["b/big0"]
        assert merged_tree.read(node, 0, 4096) == damaged.data["b/big0"][:4096]


def test_mount_read_all_matches_kernel_overlay_and_fails_bad_objects(tree: Tree,
                                                                      damaged: Tree) -> None:
    require_overlay()
    bad = {"a/f05", "a/f07", "b/big0"}
    with kernel_erofs(tree.layer) as lower, fuse_mount([damaged.layer], "--data-dir",
                                                       damaged.store) as fm:
        view = tempfile_dir(tree)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"ro,metacopy=on,redirect_dir=on,lowerdir={lower}::{tree.store}", view],
                       check=True)
        try:
            for path in walk_order(fm.mountpoint):
                got = read_or_errno(os.path.join(fm.mountpoint, path))
                if path in bad:
                    assert got == errno.EIO, path
                else:
                    with open(os.path.join(view, path), "rb") as f:
                        assert got == f.read() == tree.data[path], path
        finally:
            subprocess.run(["umount", view], check=True)
        log = fm.log_text()
        assert "in none of the data dirs" in log
        assert log.count("digest mismatch") >= 1 and "data block 1" in log, log


def tempfile_dir(tree: Tree) -> str:
    view = os.path.join(os.path.dirname(tree.layer), "kernel-view")
    os.makedirs(view, exist_ok=True)
    return view


def walk_order(top: str, prefix: str = "") -> Iterator[str]:
    """Regular files of a mount in its own listing order, as ``tar -c`` reads them."""
    for entry in os.scandir(os.path.join(top, prefix)):
        path = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from walk_order(top, path + "/")
        elif entry.is_file(follow_symlinks=False):
            yield path


# stores without trees (mkcomposefs's) ----------------------------------------------------------
@pytest.fixture
def treeless(tree: Tree, tmp_path: Path) -> Tree:
    """A copy of the store without the trees kept beside big objects."""
    store = tmp_path / "objects"
    shutil.copytree(tree.store, store, ignore=shutil.ignore_patterns("*.verity"))
    return Tree(tree.layer, str(store), tree.data)


def bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_object_without_tree_is_read_and_hashed_once(treeless: Tree) -> None:
    """Hashed whole at its first open for want of a tree, a big object is read once, in one
    read, and its verified bytes serve the reads after the first: not read (and hashed) a
    second time block by block."""
    data = treeless.data["b/big0"]
    assert WHOLE_OBJECT_BYTES < len(data) <= PASS_KEPT_BYTES
    with Image.open(treeless.layer) as image, ObjectStore([treeless.store]) as objects:
        inode = image.lookup("b/big0")
        inode.metacopy()
        before = bytes_read()
        got = b"".join(objects.read(inode, offset, CHUNK) for offset in range(0, len(data), CHUNK))
        assert got == data
        assert bytes_read() - before < len(data) + 64 * 1024  # was twice the object
        assert objects.kept_bytes == len(data)


def test_kept_bytes_are_bounded_and_a_changed_object_is_refused(treeless: Tree) -> None:
    big0, big1 = treeless.data["b/big0"], treeless.data["b/big1"]
    with Image.open(treeless.layer) as image, \
            ObjectStore([treeless.store], kept_bytes=len(big0) + 1000) as objects:
        for name, data in (("b/big0", big0), ("b/big1", big1)):
            assert objects.read(image.lookup(name), 0, len(data)) == data
            assert objects.kept_bytes <= len(big0) + 1000
    flip(object_of(treeless, "b/big1"), 3 * 4096 + 5, 0x20)
    with Image.open(treeless.layer) as image, ObjectStore([treeless.store]) as objects:
        for offset in (0, 4096 * 40):  # no block of it is served, the changed one or another
            with pytest.raises(IntegrityError):
                objects.read(image.lookup("b/big1"), offset, 4096)
        assert objects.kept_bytes == 0


def test_hints_for_objects_open_ahead_stay_within_their_bound(tmp_path: Path) -> None:
    """Past ``hint_bytes`` hinted for the objects open ahead and not read yet, an object gets a
    hint of its first read's bytes only; the bound frees as reads take their objects."""
    sizes = [3 << 20, 3 << 20, 3 << 20, 3 << 20]
    for k, size in enumerate(sizes):
        (tmp_path / f"o{k}").write_bytes(bytes(size))

    def opener(k: int) -> tuple[FdBlob, None]:
        path = str(tmp_path / f"o{k}")
        return FdBlob(os.open(path, os.O_RDONLY), os.path.getsize(path), path), None

    least = WHOLE_OBJECT_BYTES
    ahead: Prefetcher[int, int] = Prefetcher(opener, ahead=8, hint_bytes=5 << 20)
    try:
        ahead.want([(0, 0), (1, 1)], 8 << 20, least)  # 3 MiB, then 3 MiB more: over the bound
        assert ahead.hinted == 6 << 20
        ahead.want([(2, 2)], 8 << 20, least)
        assert ahead.hinted == (6 << 20) + least  # only what its first read takes
        taken = ahead.take(0)
        assert taken is not None
        taken[0].close()
        assert ahead.hinted == (3 << 20) + least
        ahead.want([(3, 3)], 8 << 20, least)  # under the bound again: all of it
        assert ahead.hinted == (6 << 20) + least
        assert ahead.advised == (9 << 20) + least
    finally:
        ahead.close()
    assert ahead.hinted == 0 and ahead.open_ahead == 0


def test_a_mount_with_an_object_store_raises_its_open_files_limit(tree: Tree) -> None:
    """A store holds hundreds of descriptors (objects open and opened ahead, its directories):
    the daemon raises its soft limit of open files to the hard one, so that a login shell's
    1024 never makes a read fail with EMFILE; reads go on as before."""
    with fuse_mount([tree.layer], "--data-dir", tree.store,
                    prefix=["prlimit", "--nofile=256:4096"]) as fm:
        (pid,) = daemon_pids(fm.mountpoint)
        with open(f"/proc/{pid}/limits", encoding="ascii") as f:
            limit = next(line.split()[3:5] for line in f if line.startswith("Max open files"))
        assert limit == ["4096", "4096"]
        for path, data in tree.data.items():
            assert Path(fm.mountpoint, path).read_bytes() == data
