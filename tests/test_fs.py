"""The FUSE operations called in-process (pytest-trio): attributes, lookup counts, readdir with
dots and offsets, reads, xattrs, the read-only refusals and the one errno boundary."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse.operations import LOOKUP_PREFETCH_BYTES, MAX_DEFERRED_HINTS, Operations
from erofs_fuse.fuse.overlay import MergedTree
from helpers import WatchedBlob, corpus, mkfs_erofs, resolve

ROOT = pyfuse3.ROOT_INODE


def ops_for(*names: str, **kwargs: Any) -> Operations:
    return Operations(MergedTree([Image.open(corpus(n)) for n in names]), **kwargs)


# Both ways of serving opens: stateless (open and opendir answer ENOSYS, handles are inodes: what
# a mount does with the patched pyfuse3) and with handles (what it does with stock pyfuse3).
MODES = [pytest.param(True, id="stateless"), pytest.param(False, id="handles")]


@pytest.fixture(params=MODES)
def layered(request: pytest.FixtureRequest) -> Operations:
    return ops_for("layer-lower-aufs.erofs", "layer-upper-oci.erofs",
                   stateless_open=request.param)


async def open_file(ops: Operations, inode: int) -> int:
    """The handle reads of ``inode`` use: the inode itself after an ENOSYS open."""
    if ops.stateless_open:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.open(inode, os.O_RDONLY)
        assert exc.value.errno == errno.ENOSYS
        return inode
    fi = await ops.open(inode, os.O_RDONLY)
    assert fi.keep_cache
    return int(fi.fh)


async def open_dir(ops: Operations, inode: int) -> int:
    if ops.stateless_open:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.opendir(inode)
        assert exc.value.errno == errno.ENOSYS
        return inode
    return await ops.opendir(inode)


async def list_all(ops: Operations, inode: int, monkeypatch: pytest.MonkeyPatch,
                   chunk: int = 4) -> list[tuple[bytes, int]]:
    """A whole listing through readdir calls of ``chunk`` entries, resuming at next_id."""
    out: list[tuple[bytes, int]] = []
    fh = await open_dir(ops, inode)
    start = 0
    while True:
        batch: list[tuple[bytes, int, int]] = []

        def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, nid: int) -> bool:
            if len(batch) == chunk:
                return False
            batch.append((name, attr.st_ino, nid))
            return True

        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        await ops.readdir(fh, start, pyfuse3.ReaddirToken())
        if not batch:
            break
        out.extend((n, i) for n, i, _ in batch)
        start = batch[-1][2]
    await ops.releasedir(fh)
    return out


# attributes -----------------------------------------------------------------------------------
async def test_root_attributes(layered: Operations) -> None:
    attr = await layered.getattr(ROOT)
    assert attr.st_ino == ROOT and stat.S_ISDIR(attr.st_mode)
    assert attr.st_nlink == 1  # merged from two layers, as overlayfs reports it
    assert attr.attr_timeout >= 3600 and attr.entry_timeout >= 3600


async def test_file_attributes_match_the_inode(layered: Operations) -> None:
    attr = await resolve(layered, "usr/lib/big.bin")
    inode = Image.open(corpus("layer-lower-aufs.erofs")).lookup("usr/lib/big.bin")
    assert attr.st_mode == inode.mode and attr.st_size == inode.size == 300000
    assert (attr.st_uid, attr.st_gid, attr.st_nlink) == (inode.uid, inode.gid, inode.nlink)
    assert attr.st_mtime_ns == attr.st_atime_ns == attr.st_ctime_ns == inode.mtime_ns
    assert attr.st_blocks == inode.st_blocks and attr.st_blksize == 4096
    assert attr.st_ino not in (0, ROOT)


async def test_device_attributes() -> None:
    ops = ops_for("plain.erofs")
    for name in (await list_names(ops, "special")):
        attr = await resolve(ops, f"special/{name}")
        if stat.S_ISCHR(attr.st_mode) or stat.S_ISBLK(attr.st_mode):
            node = Image.open(corpus("plain.erofs")).lookup(f"special/{name}")
            assert attr.st_rdev == node.rdev
            return
    pytest.fail("no device in special/")


async def list_names(ops: Operations, path: str) -> list[str]:
    tree = ops.tree
    node = tree.root
    for part in filter(None, path.split("/")):
        found = tree.lookup(node, part.encode())
        assert found is not None
        node = found
    return [n.decode() for n, _ in tree.listdir(node).entries]


async def test_hardlinks_share_st_ino(layered: Operations) -> None:
    hard = await resolve(layered, "etc/app/hard")
    keep = await resolve(layered, "etc/app/keep")
    assert hard.st_ino == keep.st_ino and hard.st_nlink == 2


# lookup ---------------------------------------------------------------------------------------
async def test_negative_lookups_are_cacheable(layered: Operations) -> None:
    app = await resolve(layered, "etc/app")
    for name in (b"config", b".wh.config", b"missing"):
        attr = await layered.lookup(app.st_ino, name)
        assert attr.st_ino == 0 and attr.entry_timeout >= 3600


async def test_dot_lookups(layered: Operations) -> None:
    app = await resolve(layered, "etc/app")
    etc = await resolve(layered, "etc")
    assert (await layered.lookup(app.st_ino, b".")).st_ino == app.st_ino
    assert (await layered.lookup(app.st_ino, b"..")).st_ino == etc.st_ino
    assert (await layered.lookup(ROOT, b"..")).st_ino == ROOT


async def test_lookup_counts_and_forget(layered: Operations) -> None:
    etc = await layered.lookup(ROOT, b"etc")
    await layered.lookup(ROOT, b"etc")
    assert layered.known_inodes() == 1
    await layered.forget([(etc.st_ino, 1)])
    assert (await layered.getattr(etc.st_ino)).st_ino == etc.st_ino
    await layered.forget([(etc.st_ino, 1)])
    assert layered.known_inodes() == 0
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await layered.getattr(etc.st_ino)
    assert exc.value.errno == errno.ESTALE
    assert (await layered.getattr(ROOT)).st_ino == ROOT  # the root is never forgotten


async def test_lookup_in_a_file_is_enotdir(layered: Operations) -> None:
    hosts = await resolve(layered, "etc/hosts")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await layered.lookup(hosts.st_ino, b"x")
    assert exc.value.errno == errno.ENOTDIR


# readdir --------------------------------------------------------------------------------------
async def test_readdir_lists_dots_first_and_resumes(layered: Operations,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    app = await resolve(layered, "etc/app")
    etc = await resolve(layered, "etc")
    before = layered.known_inodes()
    for chunk in (1, 3, 100):
        listing = await list_all(layered, app.st_ino, monkeypatch, chunk)
        assert [n for n, _ in listing[:2]] == [b".", b".."]
        assert listing[0][1] == app.st_ino and listing[1][1] == etc.st_ino
        assert sorted(n for n, _ in listing[2:]) == [b"attr", b"hard", b"keep", b"link", b"new"]
    # each listed entry (not the dots) is one more kernel reference; hard and keep are one
    assert layered.known_inodes() - before == 4
    names = dict(listing)
    assert layered.lookup_count(names[b"new"]) == 3 and layered.lookup_count(names[b"hard"]) == 6
    assert layered.lookup_count(app.st_ino) == 1  # "." gave no reference
    attr = await layered.lookup(app.st_ino, b"new")
    assert attr.st_ino == dict(listing)[b"new"]


async def test_readdir_of_root_names_root_as_parent(layered: Operations,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    listing = await list_all(layered, ROOT, monkeypatch)
    assert listing[:2] == [(b".", ROOT), (b"..", ROOT)]
    assert sorted(n for n, _ in listing[2:]) == [b"etc", b"opt", b"usr", b"var"]


async def test_listing_a_file_is_enotdir(layered: Operations) -> None:
    hosts = await resolve(layered, "etc/hosts")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        if layered.stateless_open:
            await layered.readdir(hosts.st_ino, 0, pyfuse3.ReaddirToken())
        else:
            await layered.opendir(hosts.st_ino)
    assert exc.value.errno == errno.ENOTDIR


# files ----------------------------------------------------------------------------------------
async def test_open_read_release(layered: Operations) -> None:
    attr = await resolve(layered, "etc/hosts")
    fh = await open_file(layered, attr.st_ino)
    assert await layered.read(fh, 0, 4096) == b"127.0.0.1 localhost upper\n"
    assert await layered.read(fh, 10, 9) == b"localhost"
    assert await layered.read(fh, 4096, 10) == b""
    await layered.release(fh)


@pytest.mark.parametrize("stateless", MODES)
@pytest.mark.parametrize("threads", [0, 2])
async def test_large_compressed_reads(threads: int, stateless: bool) -> None:
    ops = ops_for("lz4.erofs", read_threads=threads, stateless_open=stateless)
    image = Image.open(corpus("lz4.erofs"))
    want = image.lookup("big/mixed.bin")
    attr = await resolve(ops, "big/mixed.bin")
    fh = await open_file(ops, attr.st_ino)
    data = b"".join([await ops.read(fh, off, 131072) for off in range(0, want.size, 131072)])
    assert data == want.read(0, want.size)


def hinting(defer_hints: bool) -> tuple[WatchedBlob, Image, Operations]:
    """Operations over noinline.erofs in a blob that notes its hints (read-around windows off,
    so that only the operations' hints show)."""
    blob = WatchedBlob(corpus("noinline.erofs"))
    image = Image(blob, readaround_bytes=0)
    return blob, image, Operations(MergedTree([image]), defer_hints=defer_hints)


@pytest.mark.parametrize("deferred", [pytest.param(False, id="at-once"),
                                      pytest.param(True, id="after-reply")])
async def test_a_file_looked_up_is_hinted_and_its_rest_after_its_first_read(
        deferred: bool) -> None:
    # the layer file is asked (Blob.prefetch) for a file's first bytes at its lookup, and for
    # the rest after a first read that did not reach its end; directories and later reads get
    # no hint. With defer_hints (the patched pyfuse3: AFTER_REPLY) a request's hints are given
    # by after_reply, which the request loop calls once the reply is sent, and only once
    blob, image, ops = hinting(deferred)

    def given() -> list[tuple[int, int]]:
        if deferred:
            assert blob.hints() == []
            ops.after_reply()
            ops.after_reply()
        hints = blob.hints()
        blob.events.clear()
        return hints

    inode = image.lookup("big/zeros-with-tail.bin")
    start = inode.info.startblk * image.superblock.block_size
    big = await resolve(ops, "big")
    given()
    attr = await ops.lookup(big.st_ino, b"zeros-with-tail.bin")
    assert given() == [(start, min(inode.size, LOOKUP_PREFETCH_BYTES))]
    fh = await open_file(ops, attr.st_ino)
    assert await ops.read(fh, 0, 65536) == inode.read(0, 65536)
    assert given() == [(start + 65536, inode.size - 65536)]
    await ops.read(fh, 65536, 65536)  # not a first read
    await ops.read(fh, 0, inode.size)  # one that reaches the end
    await ops.lookup(ROOT, b"big")  # a directory
    assert given() == []


async def test_hints_nobody_collects_are_given_at_once() -> None:
    # a loop that never calls after_reply (stock pyfuse3 has no such call) holds at most
    # MAX_DEFERRED_HINTS of them; past that each is given when asked
    blob, _, ops = hinting(True)
    big = await resolve(ops, "big")
    ops.after_reply()
    blob.events.clear()
    for _ in range(MAX_DEFERRED_HINTS + 3):
        await ops.lookup(big.st_ino, b"zeros-with-tail.bin")
    assert len(blob.hints()) == 3
    ops.after_reply()
    assert len(blob.hints()) == MAX_DEFERRED_HINTS + 3


async def test_a_failing_hint_does_not_reach_the_request_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    # after_reply runs outside every handler's errno boundary, in pyfuse3's loop: a hint that
    # raises (a bug) is noted at debug level and the later hints are still given
    blob, _, ops = hinting(True)
    big = await resolve(ops, "big")
    await ops.lookup(big.st_ino, b"zeros-with-tail.bin")
    await ops.lookup(big.st_ino, b"zeros-with-tail.bin")
    calls = []

    def broken(offset: int, length: int) -> None:
        calls.append(offset)
        raise RuntimeError("a bug in a hint")

    blob.prefetch = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="erofs_fuse.fuse.operations"):
        ops.after_reply()
    assert len(calls) == 2
    assert caplog.text.count("read-ahead hint for inode") == 2


async def test_a_file_whose_xattrs_are_unreadable_is_still_looked_up(tmp_path: Path) -> None:
    # the hint at lookup asks whether the file is metadata-only, which parses its xattrs: when
    # they are corrupt the lookup still answers, and the read reports the damage (EIO)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(20000))
    os.setxattr(src / "f", "user.k", b"v" * 8)
    image_path = str(tmp_path / "layer.erofs")
    mkfs_erofs(str(src), image_path)
    with Image.open(image_path) as image:
        info = image.lookup("f").info
    data = bytearray(Path(image_path).read_bytes())
    data[info.pos + (64 if info.extended else 32) + 4] = 200  # shared xattr ids past the region
    Path(image_path).write_bytes(data)
    ops = Operations(MergedTree([Image.open(image_path)]))
    attr = await ops.lookup(ROOT, b"f")
    assert attr.st_size == 20000
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.read(await open_file(ops, attr.st_ino), 0, 4096)
    assert exc.value.errno == errno.EIO


async def test_lookups_of_remote_layers_hint_nothing() -> None:
    # blocking reads: a remote layer's blob has no page cache to fill, and a lookup must not
    # map extents that may wait for a fetch
    blob = WatchedBlob(corpus("noinline.erofs"))
    ops = Operations(MergedTree([Image(blob, readaround_bytes=0)]), blocking_reads=True)
    await resolve(ops, "big/zeros-with-tail.bin")
    assert blob.hints() == []


async def test_readlink(layered: Operations) -> None:
    link = await resolve(layered, "etc/app/link")
    assert await layered.readlink(link.st_ino) == b"config"
    hosts = await resolve(layered, "etc/hosts")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await layered.readlink(hosts.st_ino)
    assert exc.value.errno == errno.EINVAL


async def test_xattrs(layered: Operations) -> None:
    attr = await resolve(layered, "etc/app/attr")
    assert await layered.listxattr(attr.st_ino) == [b"user.origin"]
    assert await layered.getxattr(attr.st_ino, b"user.origin") == b"upper"
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await layered.getxattr(attr.st_ino, b"user.nothing")
    assert exc.value.errno == pyfuse3.ENOATTR


async def test_overlay_xattrs_are_hidden() -> None:
    ops = ops_for("layer-lower-aufs.erofs", "layer-upper-aufs.erofs")
    cache = await resolve(ops, "var/cache")
    assert await ops.listxattr(cache.st_ino) == []
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.getxattr(cache.st_ino, b"trusted.overlay.opaque")
    assert exc.value.errno == pyfuse3.ENOATTR


async def test_statfs(layered: Operations) -> None:
    st = await layered.statfs()
    assert st.f_bsize == 4096 and st.f_bfree == 0 and st.f_bavail == 0
    assert st.f_blocks > 0 and st.f_files > 0 and st.f_namemax == 255


# read-only ------------------------------------------------------------------------------------
async def test_changes_are_refused_with_erofs(layered: Operations) -> None:
    hosts = await resolve(layered, "etc/hosts")
    # A stateless mount answers every open with ENOSYS, and the VFS refuses writing opens of the
    # read-only mount before they reach us; with handles, the open itself says EROFS.
    opens = [] if layered.stateless_open else [layered.open(hosts.st_ino, os.O_WRONLY),
                                               layered.open(hosts.st_ino, os.O_RDWR)]
    attempts = [
        *opens,
        layered.mkdir(ROOT, b"new", 0o755, None),
        layered.unlink(ROOT, b"etc", None),
        layered.rmdir(ROOT, b"etc", None),
        layered.rename(ROOT, b"etc", ROOT, b"etc2", 0, None),
        layered.symlink(ROOT, b"s", b"t", None),
        layered.link(hosts.st_ino, ROOT, b"l", None),
        layered.mknod(ROOT, b"n", 0o600, 0, None),
        layered.create(ROOT, b"c", 0o600, os.O_WRONLY, None),
        layered.setxattr(hosts.st_ino, b"user.x", b"1", None),
        layered.removexattr(hosts.st_ino, b"user.x", None),
        layered.write(1, 0, b"x"),
        layered.setattr(hosts.st_ino, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None,
                        None),
    ]
    for coro in attempts:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await coro
        assert exc.value.errno == errno.EROFS


# the errno boundary ---------------------------------------------------------------------------
@pytest.fixture
def truncated(tmp_path: Path) -> str:
    """plain.erofs cut after block 190: the data of sizes/text-65543 runs past the end."""
    path = tmp_path / "trunc.erofs"
    with open(corpus("plain.erofs"), "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(190 * 4096)
    return str(path)


async def test_corrupt_data_is_eio_with_one_log_line(truncated: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    ops = Operations(MergedTree([Image.open(truncated, name="trunc.erofs")]))
    bad = await resolve(ops, "sizes/text-65543")
    good = await resolve(ops, "big/dup-b.txt")
    fh = await open_file(ops, bad.st_ino)
    caplog.set_level(logging.INFO, logger="erofs_fuse")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.read(fh, 0, 65536)
    assert exc.value.errno == errno.EIO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    line = errors[0].getMessage()
    assert "\n" not in line and "read(" in line
    assert "trunc.erofs" in line and "inode 20522" in line and "offset 753664" in line
    # the operations keep serving
    fh2 = await open_file(ops, good.st_ino)
    assert len(await ops.read(fh2, 0, 30000)) == 30000


async def test_unexpected_exception_is_eio_not_a_crash(layered: Operations,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    class Broken(MergedTree):  # a subclass: compiled callers do not see patched attributes
        def read(self, *args: object) -> bytes:
            raise ValueError("a bug")

    hosts = await resolve(layered, "etc/hosts")
    fh = await open_file(layered, hosts.st_ino)
    monkeypatch.setattr(layered, "tree", Broken(layered.tree.images))
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await layered.read(fh, 0, 10)
    assert exc.value.errno == errno.EIO
    assert any("internal error" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_debug_logs_every_request(layered: Operations,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="erofs_fuse")
    await layered.lookup(ROOT, b"etc")
    await layered.getattr(ROOT)
    messages = [r.getMessage() for r in caplog.records]
    assert "lookup(1, b'etc')" in messages and "getattr(1)" in messages


async def test_init_marks_the_mount_initialized() -> None:
    ops = ops_for("plain.erofs")
    assert not ops.initialized
    ops.init()
    assert ops.initialized
