"""Metadata-only files (``trusted.overlay.metacopy`` + ``redirect``, composefs's layout) served
from object stores (``--data-dir``), verified against the fs-verity digest in the metacopy
xattr. The reference is the kernel: overlayfs with the object store as a data-only lower layer
(``lowerdir=TOP:...:BOTTOM::OBJECTS``, ``metacopy=on``) over kernel erofs mounts of the same
layers, built by Debian's mkfs.erofs from directories whose files carry the two xattrs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from erofs_fuse.erofs.errors import ErofsError, MetacopyError
from erofs_fuse.erofs.image import Image
from erofs_fuse.erofs.metacopy import parse_metacopy, redirect_components
from erofs_fuse.objects import WHOLE_OBJECT_BYTES, ObjectStore, object_name, tree_name
from erofs_fuse.fuse.overlay import MergedTree, Node
from erofs_fuse.verity.build import build_tree
from erofs_fuse.verity.formats import HashParams
from erofs_fuse.verity.sealing import seal
from helpers import flip, kernel_erofs, mkfs_erofs, require_tool
from mounting import env, fuse_mount, require_overlay

BS = 4096
# contents of the objects, by name (deterministic, so failures repeat)
OBJECTS = {
    "shared": 5 * BS + 1000,   # 6 blocks: tampered in the middle and in the last block
    "small": 100,              # one block: no tree, the root hashes the block
    "nodigest": 9000,          # its metacopy carries no digest
    "big": 130 * BS + 7,       # two tree levels
    "second": 5000,            # only in the second data dir
}


def content(name: str) -> bytes:
    size = OBJECTS[name]
    out = b""
    k = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}-{k}".encode()).digest()
        k += 1
    return out[:size]


def fsverity_hex(data: bytes, alg: str = "sha256") -> str:
    return build_tree(lambda o, n: data[o:o + n], len(data),
                      HashParams.fsverity(alg)).fsverity_digest.hex()


def metacopy_value(digest_hex: str | None, algo: int = 1) -> bytes:
    if digest_hex is None:
        return bytes([0, 4, 0, 0])
    digest = bytes.fromhex(digest_hex)
    return bytes([0, 4 + len(digest), 0, algo]) + digest


def name_of(digest_hex: str) -> str:
    return object_name(bytes.fromhex(digest_hex))


def redirect_of(digest_hex: str) -> str:
    return "/" + name_of(digest_hex)


@dataclass
class Stack:
    dir: Path
    layers: list[str]          # bottom to top
    objects: str               # the object store
    second: str                # a second store (holds "second" only)
    digests: dict[str, str]

    def path(self, *parts: str) -> str:
        return str(self.dir.joinpath(*parts))


def _meta_file(path: Path, size: int, redirect: str | None, metacopy: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    os.setxattr(path, "trusted.overlay.metacopy", metacopy)
    if redirect is not None:
        os.setxattr(path, "trusted.overlay.redirect", redirect.encode())


def build_stack(root: Path) -> Stack:
    require_tool("setfattr")
    digests = {name: fsverity_hex(content(name)) for name in OBJECTS}
    store, second = root / "objects", root / "objects2"
    for name, dig in digests.items():
        dest = (second if name == "second" else store) / name_of(dig)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content(name))
    # the fs-verity digest of the test data, checked against the real tool once
    out = subprocess.run(["fsverity", "digest", "--compact",
                          str(store / name_of(digests["shared"]))],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == digests["shared"]
    # a symlink inside the store, pointing at an object: refused (no symlinks are followed)
    (store / "ln").mkdir()
    os.symlink(store / name_of(digests["small"]), store / "ln" / "small")

    def meta(layer: Path, rel: str, name: str, *, digest: bool = True,
             redirect: str | None = None, size: int | None = None) -> None:
        dig = digests[name]
        _meta_file(layer / rel, OBJECTS[name] if size is None else size,
                   redirect if redirect is not None else redirect_of(dig),
                   metacopy_value(dig if digest else None))

    ordinary, lower, top = root / "src-ordinary", root / "src-meta0", root / "src-meta1"
    for d in (ordinary, lower, top):
        d.mkdir()
    # bottom: an ordinary layer
    (ordinary / "etc").mkdir()
    (ordinary / "etc" / "plain").write_bytes(b"ordinary data\n")
    (ordinary / "replaced").write_bytes(b"the ordinary layer's bytes\n" * 100)
    # middle: metadata-only
    meta(lower, "usr/shared-lower", "shared")
    meta(lower, "usr/big", "big")
    # top: metadata-only, over both
    meta(top, "usr/shared-top", "shared")
    meta(top, "usr/shared-again", "shared")
    meta(top, "replaced", "small")  # a metacopy file over an ordinary one
    meta(top, "sub/small", "small")
    meta(top, "nodigest", "nodigest", digest=False)
    meta(top, "in-second", "second")
    meta(top, "bad/missing", "shared", redirect="/00/" + "0" * 62)
    meta(top, "bad/dotdot", "shared", redirect="/../objects" + redirect_of(digests["shared"]))
    fan = name_of(digests["shared"]).split("/")[0]  # "/ab/../ab/cdef..."
    meta(top, "bad/inside-dotdot", "shared",
         redirect=f"/{fan}/.." + redirect_of(digests["shared"]))
    meta(top, "bad/escape", "shared", redirect="/../../../../etc/passwd")
    meta(top, "bad/symlink", "small", redirect="/ln/small")
    meta(top, "bad/wrong-size", "nodigest", digest=False, size=OBJECTS["nodigest"] + 1)
    _meta_file(top / "bad" / "wrong-length", OBJECTS["shared"],
               redirect_of(digests["shared"]),
               bytes([0, 24, 0, 1]) + bytes.fromhex(digests["shared"])[:20])
    (top / "escaped").write_bytes(b"x")
    os.setxattr(top / "escaped", "trusted.overlay.overlay.opaque", b"y")
    os.setxattr(top / "escaped", "user.note", b"kept")
    layers = []
    for src in (ordinary, lower, top):
        out = root / (src.name.removeprefix("src-") + ".erofs")
        mkfs_erofs(str(src), str(out))
        layers.append(str(out))
    return Stack(root, layers, str(store), str(second), digests)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    assert os.geteuid() == 0, "trusted.* xattrs and kernel mounts need root"
    return build_stack(tmp_path_factory.mktemp("metacopy"))


@pytest.fixture
def own_store(stack: Stack, tmp_path: Path) -> str:
    """A copy of the object store a test may change."""
    dest = tmp_path / "objects"
    shutil.copytree(stack.objects, dest, symlinks=True)
    return str(dest)


GOOD = ["usr/shared-top", "usr/shared-again", "usr/shared-lower", "usr/big", "replaced",
        "sub/small", "nodigest", "in-second"]
EXPECTED = {"usr/shared-top": "shared", "usr/shared-again": "shared",
            "usr/shared-lower": "shared", "usr/big": "big", "replaced": "small",
            "sub/small": "small", "nodigest": "nodigest", "in-second": "second"}
BAD = ["bad/missing", "bad/dotdot", "bad/inside-dotdot", "bad/escape", "bad/symlink",
       "bad/wrong-size", "bad/wrong-length"]


@contextlib.contextmanager
def kernel_view(stack: Stack, *data_dirs: str) -> Iterator[str]:
    """Kernel overlayfs of the stack with the stores as data-only layers."""
    require_overlay()
    with contextlib.ExitStack() as es:
        lowers = [es.enter_context(kernel_erofs(img)) for img in reversed(stack.layers)]
        mnt = stack.path("kernel-view")
        os.makedirs(mnt, exist_ok=True)
        spec = ":".join(lowers) + "".join("::" + d for d in data_dirs)
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                               f"ro,metacopy=on,redirect_dir=on,lowerdir={spec}", mnt],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"overlay mount failed: {proc.stderr}"
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=True)


def read_errno(path: str) -> int:
    """0 when the whole file reads, else the errno of the failure."""
    try:
        with open(path, "rb") as f:
            f.read()
        return 0
    except OSError as exc:
        return exc.errno or -1


def attrs(path: str) -> tuple[int, ...]:
    st = os.lstat(path)
    return (st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_mtime_ns)


def xattr_names(path: str) -> list[str]:
    return sorted(os.listxattr(path, follow_symlinks=False))


# the pure parts --------------------------------------------------------------------------------
def test_parse_metacopy_forms() -> None:
    assert parse_metacopy(b"", b"/ab/cd").digest is None
    assert parse_metacopy(bytes([0, 4, 0, 0]), None).digest is None
    meta = parse_metacopy(metacopy_value("11" * 32), b"/11/xx")
    assert (meta.alg, meta.digest, meta.digest_text) == ("sha256", bytes([0x11]) * 32,
                                                          "sha256:" + "11" * 32)
    assert parse_metacopy(metacopy_value("22" * 64, 2), None).alg == "sha512"
    for bad in (bytes([0, 24, 0, 1]) + bytes(20),       # a digest of the wrong length
                bytes([0, 36, 0, 2]) + bytes(32),       # sha512 with 32 bytes
                bytes([1, 4, 0, 0]),                    # version 1
                bytes([0, 5, 0, 0]),                    # length field says 5, value has 4
                bytes([0, 36, 0, 9]) + bytes(32),       # unknown algorithm
                b"abc", bytes(70)):
        with pytest.raises(MetacopyError):
            parse_metacopy(bad, None)


def test_object_name_is_composefs_layout() -> None:
    """Two hex digits, a slash, the rest: what mkcomposefs and ``convert --objects`` write."""
    digest = bytes(range(0xA0, 0xC0))
    assert object_name(digest) == "a0/" + digest.hex()[2:]
    assert redirect_components(b"/" + object_name(digest).encode()) == ["a0", digest.hex()[2:]]


def test_redirect_components() -> None:
    assert redirect_components(b"/ab/cdef") == ["ab", "cdef"]
    for bad in (None, b"ab/cdef", b"/ab//cd", b"/ab/", b"/../x", b"/ab/../ab/cd", b"/./ab",
                b"/a\0b", b"/"):
        with pytest.raises(MetacopyError):
            redirect_components(bad)


def test_library_read_refuses_never_zeros(stack: Stack) -> None:
    with Image.open(stack.layers[2]) as image:
        node = image.lookup("usr/shared-top")
        assert node.is_metacopy and node.size == OBJECTS["shared"]
        with pytest.raises(MetacopyError) as info:
            node.read(0, 100)
        assert isinstance(info.value, ErofsError)
        assert redirect_of(stack.digests["shared"]) in str(info.value) and "metacopy inode" in str(info.value)
        with pytest.raises(MetacopyError):
            node.hole_end(0)
        assert not image.lookup("escaped").is_metacopy
        assert image.lookup("escaped").read(0, 10) == b"x"
        meta = node.metacopy()
        assert meta is not None and meta.digest == bytes.fromhex(stack.digests["shared"])


# in-process: MergedTree with an ObjectStore ----------------------------------------------------
@contextlib.contextmanager
def merged(stack: Stack, *dirs: str, require: bool = False) -> Iterator[MergedTree]:
    images = [Image.open(p) for p in stack.layers]
    store = ObjectStore(list(dirs), require_verity=require) if dirs or require else None
    try:
        yield MergedTree(images, objects=store)
    finally:
        if store is not None:
            store.close()
        for im in images:
            im.close()


def node_at(tree: MergedTree, path: str) -> Node:
    node = tree.root
    for part in path.split("/"):
        found = tree.lookup(node, part.encode())
        assert found is not None, path
        node = found
    return node


def test_in_process_reads_and_refusals(stack: Stack) -> None:
    with merged(stack, stack.objects, stack.second) as tree:
        for path, name in EXPECTED.items():
            node = node_at(tree, path)
            assert tree.read(node, 0, 1 << 30) == content(name), path
            assert tree.read(node, 4000, 200) == content(name)[4000:4200]
        assert tree.read(node_at(tree, "etc/plain"), 0, 100) == b"ordinary data\n"
        for path in BAD:
            with pytest.raises(ErofsError):
                tree.read(node_at(tree, path), 0, 100)
        with pytest.raises(MetacopyError, match="in none of the data dirs"):
            tree.read(node_at(tree, "bad/missing"), 0, 1)
        with pytest.raises(MetacopyError, match=r"'\.\.'"):
            tree.read(node_at(tree, "bad/escape"), 0, 1)
        with pytest.raises(MetacopyError, match="digest of 20 bytes"):
            tree.read(node_at(tree, "bad/wrong-length"), 0, 1)
        with pytest.raises(MetacopyError, match="bytes, the file"):
            tree.read(node_at(tree, "bad/wrong-size"), 0, 1)
    with merged(stack, stack.objects) as tree:  # the second store not given
        with pytest.raises(MetacopyError):
            tree.read(node_at(tree, "in-second"), 0, 1)
    with merged(stack) as tree:  # no data dir at all: never zeros
        for path in GOOD:
            with pytest.raises(MetacopyError, match="give a data dir"):
                tree.read(node_at(tree, path), 0, 10)


def test_require_object_verity(stack: Stack) -> None:
    with merged(stack, stack.objects, require=True) as tree:
        assert tree.read(node_at(tree, "sub/small"), 0, 1000) == content("small")
        with pytest.raises(MetacopyError, match="no fs-verity digest"):
            tree.read(node_at(tree, "nodigest"), 0, 10)


def object_path(store: str, digest: str) -> str:
    return os.path.join(store, name_of(digest))


def test_tampered_object_fails_only_its_blocks(stack: Stack, own_store: str) -> None:
    data = content("shared")
    with merged(stack, own_store) as tree:
        node = node_at(tree, "usr/shared-top")
        assert tree.read(node, 0, len(data)) == data  # first open: tree built and checked
        obj = object_path(own_store, stack.digests["shared"])
        flip(obj, 2 * BS + 77, 0x10)          # the middle
        flip(obj, 5 * BS + 999, 0x10)         # the last (partial) block
        for block in range(6):
            if block in (2, 5):
                with pytest.raises(ErofsError, match=f"data block {block}"):
                    tree.read(node, block * BS, BS)
            else:
                assert tree.read(node, block * BS, BS) == data[block * BS:(block + 1) * BS]
        # the same object through another file and layer: the same tree, the same blocks
        other = node_at(tree, "usr/shared-lower")
        assert tree.read(other, 0, 2 * BS) == data[:2 * BS]
        with pytest.raises(ErofsError):
            tree.read(other, 0, 3 * BS)


def test_object_tampered_before_first_open_is_refused(stack: Stack, own_store: str) -> None:
    flip(object_path(own_store, stack.digests["big"]), 64 * BS + 5, 0x10)
    with merged(stack, own_store) as tree:
        node = node_at(tree, "usr/big")
        with pytest.raises(ErofsError, match="digest mismatch") as info:
            tree.read(node, 0, BS)  # no trusted tree: not one block of it is served
        assert f"object sha256:{stack.digests['big']}" in str(info.value)
        assert "layer" not in str(info.value).split("(the object of")[0], info.value
        assert tree.read(node_at(tree, "usr/shared-top"), 0, 10) == content("shared")[:10]
        with pytest.raises(ErofsError, match="digest mismatch"):
            tree.read(node, BS, BS)  # refused again (without hashing it again)
    # put right, it is served again
    flip(object_path(own_store, stack.digests["big"]), 64 * BS + 5, 0x10)
    with merged(stack, own_store) as tree:
        assert tree.read(node_at(tree, "usr/big"), 0, 1 << 30) == content("big")


def test_open_objects_are_bounded(stack: Stack) -> None:
    images = [Image.open(p) for p in stack.layers]
    store = ObjectStore([stack.objects, stack.second], cache_bytes=3 * BS, open_objects=2)
    try:
        tree = MergedTree(images, objects=store)
        for _ in range(2):
            for path, name in EXPECTED.items():
                assert tree.read(node_at(tree, path), 0, 1 << 30) == content(name)
                assert len(store._open) <= 2 and store.open_bytes <= 3 * BS
    finally:
        store.close()
        for im in images:
            im.close()


def test_open_objects_least_recently_used_goes_first(stack: Stack) -> None:
    """The open objects are kept least recently used first: a read of an open object keeps it,
    the next object opened past the bound closes the one unused longest; ``open_bytes`` is
    what those kept weigh (a tree, or one block for an object without one)."""
    images = [Image.open(p) for p in stack.layers]
    store = ObjectStore([stack.objects, stack.second], open_objects=2)
    try:
        tree = MergedTree(images, objects=store)

        def read(path: str) -> None:
            assert tree.read(node_at(tree, path), 0, 1 << 30) == content(EXPECTED[path])

        def kept() -> set[str]:
            return {key[0].decode() for key in store._open}

        small, nodigest, second = (node_at(tree, p).inode.metacopy() for p in
                                   ("sub/small", "nodigest", "in-second"))
        assert small and nodigest and second and small.redirect and nodigest.redirect
        read("sub/small")
        read("nodigest")
        read("sub/small")  # used again: now the most recent
        read("in-second")  # the bound is 2: "nodigest" goes, not "sub/small"
        assert kept() == {small.redirect.decode(), (second.redirect or b"").decode()}
        assert store.open_bytes == sum(getattr(b, "cost", BS) for b in store._open.values())
    finally:
        store.close()
        for im in images:
            im.close()
    assert store.open_bytes == 0 and not store._open


def test_merged_xattrs_hide_metacopy_and_unescape(stack: Stack) -> None:
    with merged(stack, stack.objects) as tree:
        node = node_at(tree, "usr/shared-top")
        assert tree.listxattr(node) == []
        assert tree.getxattr(node, b"trusted.overlay.metacopy") is None
        assert tree.getxattr(node, b"trusted.overlay.redirect") is None
        esc = node_at(tree, "escaped")
        assert sorted(tree.listxattr(esc)) == [b"trusted.overlay.opaque", b"user.note"]
        assert tree.getxattr(esc, b"trusted.overlay.opaque") == b"y"
        assert tree.getxattr(esc, b"trusted.overlay.overlay.opaque") is None


# against the kernel ----------------------------------------------------------------------------
def test_mount_matches_kernel_overlay(stack: Stack) -> None:
    with kernel_view(stack, stack.objects, stack.second) as kmnt, \
            fuse_mount(stack.layers, "--data-dir", stack.objects,
                       "--data-dir", stack.second) as fm:
        # the kernel refuses even the lookup of a file whose redirect leaves the root with
        # '..' (EACCES); we show its attributes and refuse its reads
        dotdot = ["bad/dotdot", "bad/escape"]
        for path in dotdot:
            with pytest.raises(PermissionError):
                os.lstat(os.path.join(kmnt, path))
        for path in [*GOOD, *BAD, "etc/plain", "escaped"]:
            if path in dotdot:
                continue
            ours, theirs = os.path.join(fm.mountpoint, path), os.path.join(kmnt, path)
            assert attrs(ours) == attrs(theirs), path
            assert xattr_names(ours) == xattr_names(theirs), path
        for path in GOOD + ["etc/plain", "escaped"]:
            with open(os.path.join(kmnt, path), "rb") as f:
                expected = f.read()
            with open(os.path.join(fm.mountpoint, path), "rb") as f:
                assert f.read() == expected, path
        for path in ["escaped"]:
            assert (os.getxattr(os.path.join(fm.mountpoint, path), "trusted.overlay.opaque")
                    == os.getxattr(os.path.join(kmnt, path), "trusted.overlay.opaque"))
        # refused by both: a missing object, a redirect out of the store, a symlink
        for path in ["bad/missing", "bad/symlink", *dotdot]:  # the kernel: ENOENT, EACCES
            assert read_errno(os.path.join(kmnt, path)) != 0, path
            assert read_errno(os.path.join(fm.mountpoint, path)) == errno.EIO, path
        # refused by us only: a redirect with '..' that stays inside the store (the kernel
        # resolves it), an object of the wrong size (the kernel serves the object's bytes
        # under the file's size) and a digest of the wrong length (the kernel, which cannot
        # verify erofs files, ignores the digest)
        for path in ["bad/inside-dotdot", "bad/wrong-size", "bad/wrong-length"]:
            assert read_errno(os.path.join(kmnt, path)) == 0, path
            assert read_errno(os.path.join(fm.mountpoint, path)) == errno.EIO, path
        log = fm.log_text()
        assert "0" * 62 in log and stack.layers[2] in log and "in none of the data dirs" in log


def test_mount_without_data_dir_gives_eio_never_zeros(stack: Stack) -> None:
    with fuse_mount(stack.layers) as fm:
        for path in GOOD:
            full = os.path.join(fm.mountpoint, path)
            assert os.stat(full).st_size == len(content(EXPECTED[path]))  # attributes show
            assert read_errno(full) == errno.EIO, path
        with open(os.path.join(fm.mountpoint, "etc/plain"), "rb") as f:
            assert f.read() == b"ordinary data\n"
        log = fm.log_text()
        lines = [line for line in log.splitlines() if redirect_of(stack.digests["shared"]) in line]
        assert any(stack.layers[2] in line for line in lines)  # the top layer's files
        assert any(stack.layers[1] in line for line in lines)  # the middle layer's
        assert all("metacopy inode" in line for line in lines)


def test_mount_tampered_object_per_block(stack: Stack, own_store: str) -> None:
    data = content("shared")
    with fuse_mount(stack.layers, "-o", f"datadir={own_store}") as fm:
        path = os.path.join(fm.mountpoint, "usr/shared-top")
        with open(path, "rb") as f:
            assert f.read() == data
        obj = object_path(own_store, stack.digests["shared"])
        flip(obj, 2 * BS + 77, 0x10)
        flip(obj, 5 * BS + 999, 0x10)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # forget the good pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)    # one block a read
            for block in range(6):
                if block in (2, 5):
                    with pytest.raises(OSError) as info:
                        os.pread(fd, BS, block * BS)
                    assert info.value.errno == errno.EIO
                else:
                    assert os.pread(fd, BS, block * BS) == data[block * BS:(block + 1) * BS]
        finally:
            os.close(fd)
        failures = [line for line in fm.log_text().splitlines() if "hash mismatch" in line]
        # (the kernel may ask twice for a page whose read failed)
        assert any("data block 2" in line for line in failures)
        assert any("data block 5" in line for line in failures)
        assert all("data block 2" in line or "data block 5" in line for line in failures)
        assert all(obj in line and stack.layers[2] in line for line in failures)
        # an object, named by its digest, not a "layer"
        assert all(f"of this object sha256:{stack.digests['shared']})" in line
                   and "layer)" not in line for line in failures), failures


def test_mount_require_object_verity(stack: Stack) -> None:
    with fuse_mount(stack.layers, "--data-dir", stack.objects,
                    "--require-object-verity") as fm:
        assert read_errno(os.path.join(fm.mountpoint, "nodigest")) == errno.EIO
        with open(os.path.join(fm.mountpoint, "sub/small"), "rb") as f:
            assert f.read() == content("small")


# cat and extract -------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "erofs_fuse", *args], capture_output=True,
                          env=env())


def test_cat(stack: Stack) -> None:
    top = stack.layers[2]
    proc = cli("cat", top, "usr/shared-top")
    assert proc.returncode == 2 and proc.stdout == b""
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and redirect_of(stack.digests["shared"]) in err
    assert top in err
    proc = cli("cat", "--data-dir", stack.second, "--data-dir", stack.objects, top,
               "usr/shared-top")
    assert proc.returncode == 0 and proc.stdout == content("shared")
    proc = cli("cat", "--data-dir", stack.objects, top, "bad/missing")
    assert proc.returncode == 2 and proc.stdout == b""
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    proc = cli("cat", "--data-dir", stack.objects, "--require-object-verity", top, "nodigest")
    assert proc.returncode == 2 and b"no fs-verity digest" in proc.stderr


def test_cat_and_extract_with_a_bad_data_dir(stack: Stack, tmp_path: Path) -> None:
    top = stack.layers[2]
    for bad, why in ((str(tmp_path / "missing"), "No such file or directory"),
                     (stack.layers[0], "Not a directory")):
        for args in (("cat", "--data-dir", bad, top, "usr/shared-top"),
                     ("extract", "--data-dir", bad, top, str(tmp_path / "out"))):
            proc = cli(*args)
            err = proc.stderr.decode()
            assert proc.returncode == 2 and len(err.splitlines()) == 1, err
            assert err.startswith(f"erofs-fuse: {args[0]}: data dir {bad}: {why}"), err
    assert not (tmp_path / "out").exists()


def test_extract(stack: Stack, tmp_path: Path) -> None:
    top = stack.layers[2]
    proc = cli("extract", top, str(tmp_path / "a"))
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "usr/shared-top: metadata-only file not extracted" in err
    assert not (tmp_path / "a" / "usr" / "shared-top").exists()
    assert (tmp_path / "a" / "escaped").read_bytes() == b"x"
    proc = cli("extract", "--data-dir", stack.objects, "--data-dir", stack.second, top,
               str(tmp_path / "b"))
    assert proc.returncode == 1  # the bad/ files are skipped
    err = proc.stderr.decode()
    for path in BAD:
        assert f"{path}: metadata-only file not extracted" in err, path
        assert not (tmp_path / "b" / path).exists()
    for path, name in EXPECTED.items():
        if path in ("usr/shared-lower", "usr/big"):
            continue  # in the lower layer
        out = tmp_path / "b" / path
        assert out.read_bytes() == content(name), path
        assert os.listxattr(out) == []  # an ordinary file now
        assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_mount_options(stack: Stack, tmp_path: Path) -> None:
    from erofs_fuse.console import CliError
    from erofs_fuse.cli.mount import parse_args

    mnt = str(tmp_path)
    cfg = parse_args(["--layers", stack.layers[2], "--data-dir", stack.objects, "-o",
                      f"allow_other,datadir={stack.second}", "--require-object-verity", mnt])
    assert cfg.data_dirs == [stack.objects, stack.second] and cfg.require_object_verity
    assert not any(opt.startswith("datadir") for opt in cfg.options)
    with pytest.raises(CliError, match="not a directory"):
        parse_args(["--layers", stack.layers[2], "--data-dir", stack.layers[0], mnt])
    with pytest.raises(CliError, match="datadir=DIR"):
        parse_args(["--layers", stack.layers[2], "-o", "datadir", mnt])
    from erofs_fuse.cli.main import mount_helper_args

    helper = mount_helper_args([stack.layers[2], mnt, "-o", f"noauto,datadir={stack.objects}"])
    assert helper is not None
    assert parse_args(helper).data_dirs == [stack.objects]


# trees stored beside objects (convert --objects) ----------------------------------------------
STORED = {"huge": 16 * 1024 * 1024 + 123,  # over 4096 leaves: a tree of three levels
          "medium": 300_000,                # just over WHOLE_OBJECT_BYTES: a tree of two blocks
          "aligned": 64 * BS,               # whole blocks: seal writes a veritysetup form
          "little": 10_000}                 # read whole at open: no tree stored
HUGE_BLOCK = 1000                           # the block tampered with in the tests below


@dataclass
class Written:
    dir: Path
    layer: str
    store: str
    data: dict[str, bytes]
    digests: dict[str, bytes]

    def obj(self, store: str, name: str) -> str:
        return os.path.join(store, object_name(self.digests[name]))

    def tree(self, store: str, name: str) -> str:
        return os.path.join(store, tree_name(self.digests[name]))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """A layer and its store made by ``erofs-fuse convert --objects`` from a directory."""
    root = tmp_path_factory.mktemp("stored-trees")
    src = root / "src"
    src.mkdir()
    rng = random.Random(7)
    data = {name: rng.randbytes(size) for name, size in STORED.items()}
    for name, payload in data.items():
        (src / name).write_bytes(payload)
    layer, store = str(root / "meta.erofs"), str(root / "objects")
    proc = cli("convert", "--objects", store, str(src), layer)
    assert proc.returncode == 0, proc.stderr
    digests = {}
    with Image.open(layer) as image:
        for name in STORED:
            meta = image.lookup(name).metacopy()
            assert meta is not None and meta.digest is not None
            digests[name] = meta.digest
    return Written(root, layer, store, data, digests)


@pytest.fixture
def written_store(written: Written, tmp_path: Path) -> str:
    dest = tmp_path / "objects"
    shutil.copytree(written.store, dest)
    return str(dest)


def bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def read_counted(written: Written, store: str, name: str, offset: int,
                 size: int) -> tuple[bytes, int]:
    """Bytes of file ``name`` read through a fresh ObjectStore, and how many bytes the process
    read to get them (the object, its tree, the layer's metadata)."""
    with Image.open(written.layer) as image, ObjectStore([store]) as objects:
        inode = image.lookup(name)
        inode.metacopy()
        before = bytes_read()
        got = objects.read(inode, offset, size)
        return got, bytes_read() - before


def test_writer_keeps_the_trees_of_big_objects(written: Written) -> None:
    for name, payload in written.data.items():
        tree = written.tree(written.store, name)
        if len(payload) <= WHOLE_OBJECT_BYTES:
            assert not os.path.exists(tree)
            continue
        with open(written.obj(written.store, name), "rb") as f:
            assert f.read() == payload
        built = build_tree(lambda o, n: payload[o:o + n], len(payload), HashParams.fsverity())
        assert Path(tree).read_bytes() == built.tree  # fsverity's --out-merkle-tree bytes
        assert 0 < len(built.tree) <= len(payload) // 128 + 3 * BS  # ~1/128, a block a level


def test_stored_tree_spares_the_whole_object_pass(written: Written, written_store: str) -> None:
    """The first read of a big object reads the block asked and the tree (1/128), not the
    object; without its tree the object is hashed whole first, as before."""
    size, payload = STORED["huge"], written.data["huge"]
    offset = 8 << 20
    got, cost = read_counted(written, written_store, "huge", offset, BS)
    assert got == payload[offset:offset + BS]
    assert cost < BS + size // 128 + (64 << 10), cost
    os.unlink(written.tree(written_store, "huge"))
    got, cost = read_counted(written, written_store, "huge", offset, BS)
    assert got == payload[offset:offset + BS] and cost >= size


def test_tree_in_seals_form_is_used(written: Written, written_store: str) -> None:
    """``erofs-fuse seal OBJECT`` writes a veritysetup hash device (a superblock block, then
    the same tree) for a block-aligned object: accepted beside the object as well."""
    obj = written.obj(written_store, "aligned")
    sealed = seal(obj, written.tree(written_store, "aligned"))
    assert sealed.dm_root is not None  # the veritysetup form, not the raw tree
    payload = written.data["aligned"]
    got, cost = read_counted(written, written_store, "aligned", 10 * BS, BS)
    assert got == payload[10 * BS:11 * BS] and cost < len(payload) // 2


def test_small_object_is_read_once(written: Written, written_store: str) -> None:
    payload = written.data["little"]
    got, cost = read_counted(written, written_store, "little", 0, 1 << 20)
    assert got == payload and cost < 2 * len(payload)


def _tree_of_other_contents(written: Written) -> bytes:
    changed = bytearray(written.data["huge"])
    changed[5] ^= 1
    return build_tree(lambda o, n: bytes(changed[o:o + n]), len(changed),
                      HashParams.fsverity()).tree


@pytest.mark.parametrize("damage", ["leaf", "top", "truncated", "other", "symlink"])
def test_bad_stored_tree_is_not_used(written: Written, written_store: str, damage: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """A tree changed anywhere, cut short, of other contents, or a symlink: the object is
    hashed whole instead, and its bytes are still served."""
    tree = written.tree(written_store, "huge")
    tree_size = os.path.getsize(tree)
    if damage == "leaf":
        flip(tree, tree_size - 3 * BS + 100, 0x10)  # a leaf block: the root check alone misses it
    elif damage == "top":
        flip(tree, 10, 0x10)
    elif damage == "truncated":
        os.truncate(tree, tree_size - BS)
    elif damage == "other":
        Path(tree).write_bytes(_tree_of_other_contents(written))
    else:
        os.rename(tree, tree + ".real")
        os.symlink(os.path.basename(tree) + ".real", tree)
    size, payload = STORED["huge"], written.data["huge"]
    caplog.set_level(logging.WARNING, logger="erofs_fuse")
    got, cost = read_counted(written, written_store, "huge", 0, 3 * BS)
    assert got == payload[:3 * BS] and cost >= size  # the whole pass
    assert any("Merkle tree" in r.getMessage() or "symlink" in r.getMessage()
               for r in caplog.records), caplog.text


def test_object_tampered_with_a_stored_tree_fails_only_that_block(
        written: Written, written_store: str) -> None:
    """Tampered before its first open: with a trusted tree, only the changed block is
    refused (without one the whole object is: test_object_tampered_before_first_open)."""
    payload = written.data["huge"]
    flip(written.obj(written_store, "huge"), HUGE_BLOCK * BS + 17, 0x10)
    with Image.open(written.layer) as image, ObjectStore([written_store]) as objects:
        inode = image.lookup("huge")
        for block in (0, HUGE_BLOCK - 1, HUGE_BLOCK + 1):
            assert objects.read(inode, block * BS, BS) == payload[block * BS:(block + 1) * BS]
        with pytest.raises(ErofsError, match=f"data block {HUGE_BLOCK}"):
            objects.read(inode, HUGE_BLOCK * BS, BS)
        with pytest.raises(ErofsError, match=f"data block {HUGE_BLOCK}"):
            objects.read(inode, (HUGE_BLOCK - 2) * BS, 8 * BS)


def test_mount_reads_through_stored_trees(written: Written, written_store: str) -> None:
    """A store written by convert --objects, mounted: every file reads whole; a tampered
    block of a big object is EIO alone; a big object with a bad tree still reads."""
    flip(written.obj(written_store, "huge"), HUGE_BLOCK * BS + 17, 0x10)
    flip(written.tree(written_store, "medium"), 100, 0x10)
    with fuse_mount([written.layer], "--data-dir", written_store,
                    "--require-object-verity") as fm:
        for name in ("medium", "little"):
            with open(os.path.join(fm.mountpoint, name), "rb") as f:
                assert f.read() == written.data[name], name
        payload = written.data["huge"]
        fd = os.open(os.path.join(fm.mountpoint, "huge"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one block a read
            for block in (0, HUGE_BLOCK - 1, HUGE_BLOCK + 1, STORED["huge"] // BS):
                assert os.pread(fd, BS, block * BS) == payload[block * BS:(block + 1) * BS]
            with pytest.raises(OSError) as info:
                os.pread(fd, BS, HUGE_BLOCK * BS)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        log = fm.log_text()
        assert f"data block {HUGE_BLOCK}" in log
        assert "Merkle tree" in log and tree_name(written.digests["medium"]) in log
