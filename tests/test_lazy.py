"""Lazy mounts of pushed images (``mount --image``) against Debian's docker-registry, through
the fault proxy: the merged tree equals the kernel's erofs + overlayfs view of the same layers
(made locally by ``convert --seal``, byte-identical to what ``push`` sends); a small read
fetches a small part of the image; every fault of the proxy gives EIO or the right bytes,
never wrong ones; a tampered blob in the registry's store fails only the files on it; a
daemon killed mid-fetch leaves a cache whose present blocks all verify; the size limit evicts
whole layers not in use."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from erofs_fuse.lazy import BlockCache, LazyBlob, LazyOptions, open_layers, resolve_pinned
from erofs_fuse.lazy.cache import BITMAP, DATA, HEADER_BYTES, TREE, _set_bits
from erofs_fuse.registry import Reference, RegistryClient, RetryPolicy
from erofs_fuse.blob import FileBlob
from erofs_fuse.erofs.image import Image
from erofs_fuse.verity.blob import MerkleTree, VerifiedBlob
from erofs_fuse.verity.formats import HashParams
from erofs_fuse.verity.trust import FsVerityDigest
from helpers import read_or_errno
from mounting import MOUNT_CMD, daemon_pids, env, force_unmount, is_mounted, \
    kernel_erofs_stack, kernel_overlay, require_fuse, wait_until
from ocilayout import Layout, directory, file, hardlink, opaque, ref, symlink, whiteout
from registry_server import FaultProxy, Registry
from test_mount import assert_same_tree
from treeview import view_of_dir

CLI = [sys.executable, "-m", "erofs_fuse"]
FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, timeout=1, deadline=2)
BIG = 1 << 20  # bytes of each big file


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def layers(lay: Layout) -> list:  # type: ignore[type-arg]
    small = [file(f"usr/share/doc/f{k:03}", f"small file {k}\n" * (k % 7 + 1))
             for k in range(150)]
    return [
        lay.layer([directory("usr"), directory("usr/lib"), directory("usr/share"),
                   directory("usr/share/doc"), *small,
                   *(file(f"usr/lib/big{k}", _random(k, BIG)) for k in range(4)),
                   file("usr/lib/note", "hello\n", user_note="base"),
                   hardlink("usr/lib/big0.link", "usr/lib/big0"), symlink("lib", "usr/lib"),
                   directory("var"), directory("var/cache"), file("var/cache/a", "a")]),
        lay.layer([whiteout("usr/lib/big3"), directory("var"), directory("var/cache"),
                   opaque("var/cache"), file("var/cache/new", "new\n"),
                   file("usr/lib/big2", _random(22, BIG // 2))], "zstd"),
        lay.layer([directory("app"), file("app/main", "run\n", 0o755),
                   symlink("app/lib", "../usr/lib")], None),
    ]


@dataclass
class Stack:
    registry: Registry
    proxy: FaultProxy
    root: Path
    ref: str  # through the proxy, pinned
    local: list[str]  # the same layers converted and sealed here
    image_bytes: int  # layer blobs in the registry


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env(), timeout=300)


def _push(root: Path, lay: Layout, host: str, name: str) -> str:
    proc = run("push", "--plain-http", "-q", "-j", "2", str(lay.root), f"{host}/test/{name}:v1")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().rpartition("@")[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("lazy")
    lay = Layout(root / "layout")
    blobs = layers(lay)
    lay.write_index([{**lay.image(blobs), **ref("example.com/lazy:1")}])
    registry = Registry(root / "server")
    proxy = FaultProxy(registry.host)
    made: Stack | None = None
    try:
        digest = _push(root, lay, registry.host, "lazy")
        local = []
        for k, blob in enumerate(blobs):
            tar = root / f"{k}.tar"
            tar.write_bytes(blob.tar)
            out = root / f"{k}.erofs"
            proc = run("convert", "--seal", str(tar), str(out))
            assert proc.returncode == 0, proc.stderr
            local.append(str(out))
        size = sum(os.path.getsize(p) for p in local)
        made = Stack(registry, proxy, root, f"{proxy.host}/test/lazy@{digest}", local, size)
        yield made
    finally:
        proxy.stop()
        registry.stop()
        if made is not None:  # a test may have restarted it (test_registry_down_then_restarted)
            made.registry.stop()


@pytest.fixture
def clean(stack: Stack) -> Iterator[Stack]:
    stack.proxy.faults.clear()
    stack.proxy.blob_bytes = 0
    yield stack
    stack.proxy.faults.clear()


@dataclass
class LazyMount:
    mountpoint: str
    log: str
    cache: str

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return Path(self.log).read_text(errors="replace")
        return ""


@contextlib.contextmanager
def lazy_mount(image: str, cache: str, *args: str) -> Iterator[LazyMount]:
    require_fuse()
    mnt = tempfile.mkdtemp(prefix="erofs-lazy-")
    log = mnt + ".log"
    cmd = [*MOUNT_CMD, "--image", image, "--cache", cache, "--log", log,
           "--fetch-timeout", "1", *args, mnt]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=60)
        assert proc.returncode == 0, f"mount failed ({proc.returncode}): {proc.stderr}"
        assert is_mounted(mnt)
        yield LazyMount(mnt, log, cache)
    finally:
        force_unmount(mnt)
        wait_until(lambda: not daemon_pids(mnt), what="the daemon to exit")
        os.rmdir(mnt)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)


def expected(stack: Stack, rel: str) -> bytes:
    with kernel_erofs_stack(stack.local) as mounts, \
            kernel_overlay(list(reversed(mounts))) as ovl:
        return Path(ovl, rel).read_bytes()


# the tree -------------------------------------------------------------------------------------
def test_lazy_mount_equals_kernel_overlay_of_the_same_layers(clean: Stack,
                                                            tmp_path: Path) -> None:
    with kernel_erofs_stack(clean.local) as mounts, \
            kernel_overlay(list(reversed(mounts))) as ovl, \
            lazy_mount(clean.ref, str(tmp_path / "cache")) as m:
        assert_same_tree(ovl, m)  # type: ignore[arg-type]
    assert "ERROR" not in m.log_text()


def test_reading_one_small_file_fetches_a_small_part(clean: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    with lazy_mount(clean.ref, str(tmp_path / "cache")) as m:
        ready = time.monotonic() - started
        at_mount = clean.proxy.blob_bytes
        assert Path(m.mountpoint, "app/main").read_bytes() == b"run\n"
        fetched = clean.proxy.blob_bytes
    print(f"\nimage {clean.image_bytes} bytes; mount ready in {ready:.2f} s after "
          f"{at_mount} bytes; one small file: {fetched} bytes fetched")
    assert fetched < clean.image_bytes / 4


def test_tag_without_digest_is_refused(stack: Stack, tmp_path: Path) -> None:
    proc = run("mount", "--image", f"{stack.proxy.host}/test/lazy:v1", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "pinned by a digest" in proc.stderr


# faults, in process (the blob under the reader, no FUSE) ---------------------------------------
@contextlib.contextmanager
def lazy_blobs(stack: Stack, cache: Path) -> Iterator[list[LazyBlob]]:
    client = RegistryClient(credentials=None, retry=FAST)
    resolved = resolve_pinned(client, Reference.parse(stack.ref))
    blobs = open_layers(client, resolved, LazyOptions(cache_dir=str(cache), deadline=10))
    try:
        assert all(isinstance(b, LazyBlob) for b in blobs)
        yield blobs  # type: ignore[misc]
    finally:
        for b in blobs:
            b.close()
        client.close()


@pytest.mark.parametrize("fault", ["flip", "truncate", "short", "eof", "ignore-range",
                                   "bad-range", "500", "stall", "stall-body"])
def test_every_fault_gives_eio_or_the_right_bytes(clean: Stack, tmp_path: Path,
                                                  fault: str) -> None:
    local = FileBlob(clean.local[0])
    clean.proxy.stall = 1.5
    try:
        with lazy_blobs(clean, tmp_path / "cache") as blobs:
            blob = blobs[0]
            offsets = [0, blob.size // 3, blob.size - 8192]
            for many in (1, 10):
                for off in offsets:
                    clean.proxy.faults[:] = [fault] * many
                    try:
                        got = blob.read(off, 8192)
                    except Exception as exc:
                        assert type(exc).__name__ in ("BlobIOError", "IntegrityError"), exc
                        assert many > 1, f"{fault} once should be retried: {exc}"
                    else:
                        assert got == local.read(off, 8192)
                clean.proxy.faults.clear()
                for off in offsets:  # the registry is back: reads recover
                    assert blob.read(off, 8192) == local.read(off, 8192)
    finally:
        local.close()
        clean.proxy.stall = 2.0


def test_a_read_gives_up_after_its_deadline(clean: Stack, tmp_path: Path) -> None:
    client = RegistryClient(credentials=None, retry=FAST)
    resolved = resolve_pinned(client, Reference.parse(clean.ref))
    blobs = open_layers(client, resolved, LazyOptions(cache_dir=str(tmp_path), deadline=2))
    local = FileBlob(clean.local[0])
    clean.proxy.stall = 1.5
    try:
        # every try stalls past the 1 s socket timeout: the client's nested retries alone
        # would keep the read about 9 s
        clean.proxy.faults[:] = ["stall"] * 12
        started = time.monotonic()
        with pytest.raises(Exception, match="not done after 2 s"):
            blobs[0].read(1 << 20, 4096)
        assert time.monotonic() - started < 3
        clean.proxy.faults.clear()
        wait_until(lambda: _reads(blobs[0], 1 << 20) == local.read(1 << 20, 4096), 30,
                   "the registry to answer again")
    finally:
        clean.proxy.stall = 2.0
        local.close()
        for b in blobs:
            b.close()
        client.close()


def _reads(blob: object, offset: int) -> bytes | None:
    try:
        return blob.read(offset, 4096)  # type: ignore[attr-defined,no-any-return]
    except Exception:
        return None


def test_blocks_failing_their_hash_are_never_cached(clean: Stack, tmp_path: Path) -> None:
    unit = 256 << 10
    bad = unit + unit // 2  # the proxy flips the middle byte of the (one-unit) body
    local = FileBlob(clean.local[0])
    with lazy_blobs(clean, tmp_path / "cache") as blobs:
        clean.proxy.faults[:] = ["flip"] * 10
        with pytest.raises(Exception, match="hash mismatch"):
            blobs[0].read(bad, 4096)
        assert blobs[0].read(unit, 4096) == local.read(unit, 4096)  # its good neighbours
        clean.proxy.faults.clear()
    entry = next(p for p in (tmp_path / "cache").iterdir()
                 if (p / DATA).stat().st_size == local.size)
    bits = (entry / BITMAP).read_bytes()[HEADER_BYTES:]
    block = bad // 4096
    assert not bits[block >> 3] >> (block & 7) & 1
    assert bits[(unit // 4096) >> 3] & 1
    with lazy_blobs(clean, tmp_path / "cache") as blobs:
        assert blobs[0].read(bad, 4096) == local.read(bad, 4096)  # fetched again, now right
    local.close()
    assert_cache_consistent(tmp_path / "cache")


def test_a_tampered_cache_is_caught_and_fetched_again(clean: Stack, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    local = FileBlob(clean.local[0])
    where = 2 << 20
    with lazy_blobs(clean, tmp_path) as blobs:
        assert blobs[0].read(where, 8192) == local.read(where, 8192)
    entry = next(p for p in tmp_path.iterdir() if (p / DATA).stat().st_size == local.size)
    with open(entry / DATA, "r+b") as f:
        f.seek(where + 100)
        byte = f.read(1)
        f.seek(where + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    requests = len(clean.proxy.seen)
    with lazy_blobs(clean, tmp_path) as blobs:
        assert blobs[0].read(where, 8192) == local.read(where, 8192)
    assert "cached block failed its hash" in caplog.text
    assert len(clean.proxy.seen) > requests
    local.close()
    assert_cache_consistent(tmp_path)


def _ranges(stack: Stack, since: int) -> set[str]:
    return {s.headers.get("Range", "") for s in stack.proxy.seen[since:]
            if "/blobs/" in s.path and s.headers.get("Range")}


def test_a_sequential_read_is_served_while_its_read_ahead_is_fetched(
        clean: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The second of two adjacent misses fetches its own unit in one request and the next
    unit in another, which the read does not wait for; the read that gets there is served
    the verified bytes from memory, not read back from the cache (changed here on disk)."""
    unit = 256 << 10
    local = FileBlob(clean.local[0])
    with lazy_blobs(clean, tmp_path) as blobs:
        blob = blobs[0]
        assert blob.size >= 4 * unit
        since = len(clean.proxy.seen)
        assert blob.read(0, 4096) == local.read(0, 4096)
        assert blob.read(unit, 4096) == local.read(unit, 4096)
        ahead = f"bytes={2 * unit}-{3 * unit - 1}"
        assert f"bytes={unit}-{2 * unit - 1}" in _ranges(clean, since)  # its own unit only
        wait_until(lambda: ahead in _ranges(clean, since) and blob.requests == 3, 30,
                   "the read-ahead")
        entry = next(p for p in tmp_path.iterdir() if (p / DATA).stat().st_size == local.size)
        with open(entry / DATA, "r+b") as f:
            f.seek(2 * unit)
            f.write(bytes(4096))
        since = len(clean.proxy.seen)
        assert blob.read(2 * unit, 4096) == local.read(2 * unit, 4096)
        assert ahead not in _ranges(clean, since)  # not fetched again
        # a read across two missing units: one request for both, each unit kept apart
        assert blob.read(9 * unit - 10, 20) == local.read(9 * unit - 10, 20)
        kept = list(blob._recent.values())  # noqa: SLF001
        # each unit kept holds its own bytes, not a view keeping its whole request alive
        assert kept and all(len(view.obj) == len(view) <= unit for view in kept)
    assert "cached block failed its hash" not in caplog.text
    local.close()


def _meta_base(path: str) -> int:
    image = Image(FileBlob(path))
    try:
        return image.superblock.meta_base
    finally:
        image.close()


def test_the_fill_fetches_the_metadata_first(clean: Stack, tmp_path: Path) -> None:
    unit = 256 << 10
    meta = _meta_base(clean.local[0])
    assert meta > unit  # our writer puts the metadata after the data
    with lazy_blobs(clean, tmp_path) as blobs:
        since = len(clean.proxy.seen)
        blobs[0].start_fill(threads=1, first=meta)
        wait_until(lambda: not blobs[0]._entry.missing(), 30, "the fill")  # noqa: SLF001
    ranges = [s.headers["Range"] for s in clean.proxy.seen[since:] if "Range" in s.headers]
    assert ranges[0].startswith(f"bytes={meta // unit * unit}-"), ranges
    assert ranges[1].startswith("bytes=0-"), ranges


def test_a_mount_prefetches_the_metadata_and_a_walk_fetches_nothing(clean: Stack,
                                                                     tmp_path: Path) -> None:
    """With --fill-metadata, once serving, the mount fetches each layer's metadata region
    (inodes, directories; after the data, from the superblock's meta_blkaddr) in the
    background: a walk of the whole tree then needs no fetch."""
    layers = [p for p in clean.local if _meta_base(p) > 0]
    with lazy_mount(clean.ref, str(tmp_path / "cache"), "--fill-metadata") as m:
        wait_until(lambda: m.log_text().count("prefetched") == len(layers), 30,
                   "the metadata prefetch")
        since = len(clean.proxy.seen)
        for root, dirs, files in os.walk(m.mountpoint):
            for name in dirs + files:
                os.lstat(os.path.join(root, name))
                os.listxattr(os.path.join(root, name), follow_symlinks=False)
        assert not _ranges(clean, since)
        assert m.log_text().count("prefetched") == len(layers)  # once per layer, no more


@pytest.mark.parametrize("fill,hooks", [((), 0), (("--fill-metadata",), 1), (("--fill",), 1)])
def test_background_fetches_only_with_fill(clean: Stack, tmp_path: Path, fill: tuple[str, ...],
                                           hooks: int) -> None:
    """By default a mount fetches only what is read (a container start's bytes stay few);
    --fill-metadata and --fill schedule their background fetch for when it serves."""
    from erofs_fuse.cli.lazy_mount import open_remote
    from erofs_fuse.cli.mount import parse_mount

    cfg, remote = parse_mount(["--image", clean.ref, "--cache", str(tmp_path / "cache"),
                               *fill, str(tmp_path)])
    assert remote is not None
    assert remote.fill == {(): "", ("--fill",): "all"}.get(fill, "metadata")
    images = open_remote(remote, cfg)
    try:
        assert len(cfg.on_serve) == hooks
    finally:
        for image in images:
            image.close()


def test_reading_a_small_file_after_a_large_one_fetches_little_ahead(
        clean: Stack, tmp_path: Path) -> None:
    """A new sequential stream starts with a read-ahead of one unit, however far the last
    stream's windows had grown."""
    unit = 256 << 10
    with lazy_blobs(clean, tmp_path) as blobs:
        blob = blobs[0]
        units = blob.size // unit
        assert units >= 14
        for k in range(6):  # a stream whose windows grow to 4 units, read to unit 8
            blob.read(k * unit, unit)
        wait_until(lambda: not blob._inflight, 30, "the read-ahead")  # noqa: SLF001
        since = len(clean.proxy.seen)
        far = units - 5  # a new stream past what was read ahead, 4 units from the end
        blob.read(far * unit, 4096)
        blob.read((far + 1) * unit, 4096)
        wait_until(lambda: not blob._inflight, 30, "the read-ahead")  # noqa: SLF001
        assert _ranges(clean, since) == {f"bytes={u * unit}-{(u + 1) * unit - 1}"
                                         for u in (far, far + 1, far + 2)}


def test_the_image_read_around_hint_starts_no_fetch(clean: Stack, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """``Image`` hints each metadata window to its blob (``Blob.prefetch(offset, length)``,
    a page-cache hint for files); a lazy layer's metadata is prefetched once, by the mount,
    never again per window."""
    caplog.set_level(logging.INFO, logger="erofs_fuse")
    with lazy_blobs(clean, tmp_path) as blobs:
        image = Image(blobs[0], name="layer 0")
        meta = image.superblock.meta_base
        assert meta > 0
        hint = getattr(blobs[0], "prefetch", None)
        if hint is not None:
            for window in (0, meta // 2, meta):
                hint(window, 256 << 10)
        assert not blobs[0]._fillers  # noqa: SLF001
    assert "prefetched" not in caplog.text


def test_a_store_in_flight_when_the_daemon_forks_does_not_hold_it_up(tmp_path: Path) -> None:
    """The mount forks its daemon after reading the superblock, possibly while a read-ahead
    is storing blocks: the daemon must not inherit the cache entry's lock held."""
    entry = BlockCache(str(tmp_path)).open_entry(f"sha256-{9:064x}", 1 << 20, 4096,
                                                 bytes(32))
    entry.store(0, b"x" * 4096)
    with entry._lock:  # noqa: SLF001  # a fetch thread storing blocks
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a child that waits for the lock dies of SIGALRM, never hangs
            try:
                entry.close()
            finally:
                os._exit(0)
    _, status = os.waitpid(pid, 0)
    entry.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# the registry's own store tampered with ---------------------------------------------------------
def _blob_files(registry_root: Path) -> list[Path]:
    return list((registry_root / "data").rglob("blobs/sha256/*/*/data"))


def test_tampered_blob_in_the_store_fails_only_its_files(clean: Stack, tmp_path: Path) -> None:
    needle = _random(1, BIG)[BIG // 2:BIG // 2 + 64]  # inside usr/lib/big1
    target = next(p for p in _blob_files(clean.root / "server") if needle in p.read_bytes())
    data = bytearray(target.read_bytes())
    pos = data.index(needle)
    original = bytes(data)
    data[pos] ^= 0x01
    target.write_bytes(bytes(data))
    try:
        with lazy_mount(clean.ref, str(tmp_path / "cache")) as m:
            assert read_or_errno(os.path.join(m.mountpoint, "usr/lib/big1")) == errno.EIO
            assert read_or_errno(os.path.join(m.mountpoint, "usr/lib/big0")) == _random(0, BIG)
            assert Path(m.mountpoint, "usr/lib/note").read_bytes() == b"hello\n"
            assert "hash mismatch" in m.log_text()
    finally:
        target.write_bytes(original)
    assert_cache_consistent(tmp_path / "cache")


# the registry down, restarted -------------------------------------------------------------------
def test_registry_down_then_restarted(clean: Stack, tmp_path: Path) -> None:
    with lazy_mount(clean.ref, str(tmp_path / "cache")) as m:
        big0 = os.path.join(m.mountpoint, "usr/lib/big0")
        assert read_or_errno(big0) == _random(0, BIG)  # now cached
        clean.registry.stop()
        try:
            started = time.monotonic()
            assert read_or_errno(os.path.join(m.mountpoint, "usr/lib/big1")) == errno.EIO
            assert time.monotonic() - started < 30  # bounded, never a hang
            assert read_or_errno(big0) == _random(0, BIG)  # cached blocks still serve
        finally:
            clean.registry = Registry(clean.root / "server")  # same storage, a new port
            clean.proxy.upstream = clean.registry.host
        assert read_or_errno(os.path.join(m.mountpoint, "usr/lib/big1")) == _random(1, BIG)


def test_two_mounts_share_one_cache(clean: Stack, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    with lazy_mount(clean.ref, cache) as a, lazy_mount(clean.ref, cache) as b:
        readers = [subprocess.Popen(["tar", "-cf", "-", "."], cwd=m.mountpoint,
                                    stdout=subprocess.PIPE) for m in (a, b, a)]
        outs = [r.communicate(timeout=120)[0] for r in readers]
        assert all(r.returncode == 0 for r in readers)
        assert outs[0] == outs[1] == outs[2]
    assert_cache_consistent(Path(cache))


def test_a_stalled_fetch_holds_up_no_cached_read(clean: Stack, tmp_path: Path) -> None:
    clean.proxy.stall = 4.0
    try:
        with lazy_mount(clean.ref, str(tmp_path / "cache")) as m:
            big0 = os.path.join(m.mountpoint, "usr/lib/big0")
            assert read_or_errno(big0) == _random(0, BIG)
            clean.proxy.faults[:] = ["stall"] * 3
            reader = subprocess.Popen(["cat", os.path.join(m.mountpoint, "usr/lib/big2")],
                                      stdout=subprocess.PIPE)
            time.sleep(0.5)
            fd = os.open(big0, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read it from us again
                started = time.monotonic()
                data = b"".join(os.pread(fd, 1 << 17, off) for off in range(0, BIG, 1 << 17))
                took = time.monotonic() - started
            finally:
                os.close(fd)
            assert reader.poll() is None, "the stalled read was not waiting"
            assert data == _random(0, BIG) and took < 1.5
            out, _ = reader.communicate(timeout=60)
            assert out == _random(22, BIG // 2)  # the stall over, the retry brings it
    finally:
        clean.proxy.stall = 2.0


# crashes and the cache --------------------------------------------------------------------------
def assert_cache_consistent(cache: Path) -> None:
    """Every block the bitmap marks present hashes to its leaf (the tree checked against the
    entry's fs-verity digest)."""
    for entry in cache.iterdir():
        if entry.name.startswith("."):
            continue
        alg, _, hexdigest = entry.name.partition("-")
        size = (entry / DATA).stat().st_size
        tree = MerkleTree(HashParams.fsverity(alg), size, FileBlob(str(entry / TREE)), 0,
                          FsVerityDigest.parse(f"{alg}:{hexdigest}"))
        verified = VerifiedBlob(FileBlob(str(entry / DATA)), tree)
        bits = (entry / BITMAP).read_bytes()[HEADER_BYTES:]
        present = [b for b in range(-(-size // 4096)) if bits[b >> 3] >> (b & 7) & 1]
        for block in present:
            verified.read(block * 4096, min(4096, size - block * 4096))
        verified.close()


def test_daemon_killed_mid_fetch_leaves_a_consistent_cache(clean: Stack,
                                                           tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    clean.proxy.stall = 3.0
    try:
        with lazy_mount(clean.ref, cache) as m:
            assert read_or_errno(os.path.join(m.mountpoint, "usr/lib/big0")) == _random(0, BIG)
            clean.proxy.faults[:] = ["stall-body"] * 5
            reader = subprocess.Popen(["cat", os.path.join(m.mountpoint, "usr/lib/big2")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            assert reader.poll() is None, "the read was not waiting for a fetch"
            for pid in daemon_pids(m.mountpoint):
                os.kill(pid, signal.SIGKILL)
            reader.wait(30)
    finally:
        clean.proxy.stall = 2.0
        clean.proxy.faults.clear()
    assert_cache_consistent(Path(cache))
    with kernel_erofs_stack(clean.local) as mounts, \
            kernel_overlay(list(reversed(mounts))) as ovl, lazy_mount(clean.ref, cache) as m:
        assert view_of_dir(m.mountpoint).diff(view_of_dir(ovl)) == []
    assert_cache_consistent(Path(cache))


def test_bitmap_ranges_agree_with_bit_by_bit(tmp_path: Path) -> None:
    """present() and the bits set or cleared work on whole bytes where they can: the same
    answers as block by block, at every alignment."""
    entry = BlockCache(str(tmp_path)).open_entry(f"sha256-{5:064x}", 200 * 4096, 4096,
                                                 bytes(32))
    rng = random.Random(7)
    model = [False] * entry.blocks
    try:
        for _ in range(3000):
            first = rng.randrange(entry.blocks)
            end = rng.randrange(first, entry.blocks + 1)
            if rng.random() < 0.5:
                value = rng.random() < 0.7
                _set_bits(entry._bits, first, end, value)  # noqa: SLF001
                model[first:end] = [value] * (end - first)
            assert entry.present(first, end) == all(model[first:end]), (first, end)
        assert entry.missing() == [b for b, on in enumerate(model) if not on]
    finally:
        entry.close()


def test_size_limit_evicts_whole_layers_not_in_use(tmp_path: Path) -> None:
    cache = BlockCache(str(tmp_path), limit=3 * 65536 + 3 * 2 * 4096)
    entries = []
    for k in range(4):
        e = cache.open_entry(f"sha256-{k:064x}", 65536, 4096, bytes([k]) * 32)
        e.store(0, b"x" * 65536)
        entries.append(e)
    for k, e in enumerate(entries):
        os.utime(os.path.join(e.path, "lock"), (1000 + k, 1000 + k))
    for e in entries[1:]:
        e.close()  # 0 stays in use, though the oldest
    assert cache.evict() == [f"sha256-{1:064x}"]
    assert sorted(os.listdir(tmp_path)) == [f"sha256-{k:064x}" for k in (0, 2, 3)]
    cache.limit = 0
    assert cache.evict() == [f"sha256-{k:064x}" for k in (2, 3)]
    entries[0].close()
    assert cache.evict() == [f"sha256-{0:064x}"]
    assert os.listdir(tmp_path) == []


def test_a_mount_storing_blocks_evicts_unused_layers(clean: Stack, tmp_path: Path) -> None:
    cache = BlockCache(str(tmp_path))
    unused = cache.open_entry(f"sha256-{7:064x}", 1 << 20, 4096, bytes(32))
    unused.store(0, b"u" * (1 << 20))
    unused.close()
    client = RegistryClient(credentials=None, retry=FAST)
    resolved = resolve_pinned(client, Reference.parse(clean.ref))
    blobs = open_layers(client, resolved, LazyOptions(cache_dir=str(tmp_path),
                                                      cache_size=2 << 20, evict_every=1))
    try:
        assert os.path.exists(unused.path)  # under the limit at open
        blobs[0].read(0, blobs[0].size)  # about 4 MiB stored: over the limit
        assert not os.path.exists(unused.path)
        assert len(os.listdir(tmp_path)) == 3  # those in use stay
    finally:
        for b in blobs:
            b.close()
        client.close()


def test_mounting_another_image_evicts_unused_layers(clean: Stack, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with lazy_mount(clean.ref, str(cache), "--fill") as m:
        wait_until(lambda: m.log_text().count("all in the cache") == 3, timeout=60,
                   what="the fill")
    first = set(os.listdir(cache))
    assert len(first) == 3
    for entry in first:  # the fill left every block present
        bits = (cache / entry / BITMAP).read_bytes()[HEADER_BYTES:]
        blocks = -(-(cache / entry / DATA).stat().st_size // 4096)
        assert all(bits[b >> 3] >> (b & 7) & 1 for b in range(blocks))
    assert_cache_consistent(cache)
    lay = Layout(tmp_path / "other")
    blob = lay.layer([file("only", "other image\n")])
    lay.write_index([{**lay.image([blob]), **ref("example.com/other:1")}])
    digest = _push(tmp_path, lay, clean.registry.host, "other")
    with lazy_mount(f"{clean.proxy.host}/test/other@{digest}", str(cache),
                    "--cache-size", "1K") as m:  # less than its own layer: all others go
        assert Path(m.mountpoint, "only").read_bytes() == b"other image\n"
        left = set(os.listdir(cache))
    assert not left & first and len(left) == 1


# info, ls, cat --image --------------------------------------------------------------------------
def test_info_ls_cat_read_the_pushed_image_merged(clean: Stack, tmp_path: Path) -> None:
    image = ["--image", clean.ref, "--cache", str(tmp_path / "cache")]
    proc = run("info", *image)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("block size:") == 3
    proc = run("ls", *image, "/usr/lib")
    assert proc.returncode == 0, proc.stderr
    with kernel_erofs_stack(clean.local) as mounts, \
            kernel_overlay(list(reversed(mounts))) as ovl:
        assert sorted(proc.stdout.split()) == sorted(os.listdir(os.path.join(ovl, "usr/lib")))
    assert "big3" not in proc.stdout  # whited out above
    proc = run("cat", *image, "var/cache/new")
    assert (proc.returncode, proc.stdout) == (0, "new\n"), proc.stderr
    proc = run("ls", *image, "-l", "/")
    assert proc.returncode == 0 and "lib -> usr/lib" in proc.stdout, proc.stderr
    proc = run("cat", *image, "var/cache/a")  # under an opaque directory
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    proc = run("ls", "--image", clean.ref.partition("@")[0] + ":v1")
    assert proc.returncode == 2 and "pinned by a digest" in proc.stderr, proc.stderr
