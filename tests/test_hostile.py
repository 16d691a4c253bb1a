"""Hostile images (fixtures/hostile/, rebuilt by its make.py): directory entries written to
escape or confuse (names with ``/`` or NUL, extra ``.``/``..``, empty names, entries pointing at
the directory itself or an ancestor), times at the ends of the 64-bit range, a file of 64 TiB of
hole, a directory larger than its image. Each through the library, ``extract`` and a real
mount: one test per class of bug found (see fixtures/hostile/README.md).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erofs_fuse.erofs.errors import CorruptImageError
from erofs_fuse.erofs.image import Image
from erofs_fuse.cli.extract import Extractor, UnsafeNameError, extract
from erofs_fuse.fuse.operations import Operations
from erofs_fuse.fuse.overlay import MergedTree
from helpers import kernel_erofs
from mounting import daemon_pids, env, fuse_mount, is_mounted

HOSTILE = Path(__file__).resolve().parent.parent / "fixtures" / "hostile"


def fixture(name: str) -> str:
    path = HOSTILE / name
    assert path.exists(), f"{path} is missing (fixtures/hostile/make.py rebuilds it)"
    return str(path)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "erofs_fuse", *args], capture_output=True,
                          text=True, env=env(), timeout=60)


def assert_daemon_fine(fm: object) -> None:
    log = fm.log_text()  # type: ignore[attr-defined]
    assert "Traceback" not in log and "internal error" not in log, log
    mnt = fm.mountpoint  # type: ignore[attr-defined]
    assert is_mounted(mnt) and daemon_pids(mnt)


# names ----------------------------------------------------------------------------------------
def test_library_reports_names_as_they_are() -> None:
    with Image.open(fixture("names.erofs")) as image:
        names = [e.name for e in image.lookup("/d").readdir()]
        # readdir leaves out "." and ".." (all of them); the others are the image's business
        assert sorted(names) == sorted([b"a/b", b"b\0b", b"../x", b"fff", b"sub"])
        with pytest.raises(FileNotFoundError):
            image.lookup("/d/a/b")  # a path walk never matches a name with "/"


def test_extract_refuses_hostile_names_and_writes_nothing_outside(tmp_path: Path) -> None:
    box = tmp_path / "box"
    dest = box / "dest"
    with Image.open(fixture("names.erofs")) as image:
        with pytest.raises(UnsafeNameError):
            extract(image, str(dest), owners=False)
    assert os.listdir(box) == ["dest"]
    assert not (tmp_path / "x").exists() and not (box / "x").exists()
    proc = cli("extract", fixture("names.erofs"), str(tmp_path / "dest2"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unsafe entry name" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["box", "dest2"]


def test_mount_skips_hostile_names_with_a_log_line() -> None:
    with fuse_mount([fixture("names.erofs")]) as fm:
        mnt = fm.mountpoint
        assert set(os.listdir(f"{mnt}/d")) == {"fff", "sub"}
        assert Path(mnt, "d/sub/inner").read_text() == "inner\n"
        assert Path(mnt, "d/../outside").exists()  # ".." is the kernel's: the real parent
        assert os.path.samefile(f"{mnt}/d/.", f"{mnt}/d")
        for name in ("a", "b", "x"):
            assert not os.path.lexists(f"{mnt}/d/{name}")
        walked = [os.path.relpath(os.path.join(r, n), mnt) for r, ds, fs in os.walk(mnt)
                  for n in ds + fs]
        assert sorted(walked) == sorted(["d", "outside", "d/fff", "d/sub", "d/sub/inner"])
        log = fm.log_text()
        for name in (b"a/b", b"b\0b", b"../x"):
            assert f"entry {name!r} skipped" in log, log
        assert_daemon_fine(fm)


def test_empty_name_makes_the_directory_unreadable_not_the_mount() -> None:
    with Image.open(fixture("empty-name.erofs")) as image:
        with pytest.raises(CorruptImageError):
            list(image.lookup("/d").readdir())
    with fuse_mount([fixture("empty-name.erofs")]) as fm:
        with pytest.raises(OSError) as exc:
            os.listdir(f"{fm.mountpoint}/d")
        assert exc.value.errno == errno.EIO
        assert Path(fm.mountpoint, "outside").exists()
        assert_daemon_fine(fm)


# loops ----------------------------------------------------------------------------------------
LOOPS = ["loop-self.erofs", "loop-root.erofs", "loop-ancestor.erofs"]


@pytest.mark.parametrize("name", LOOPS)
def test_directory_loops_stop_walks_and_extract(name: str, tmp_path: Path) -> None:
    with Image.open(fixture(name)) as image:
        with pytest.raises(CorruptImageError, match="twice|cycle"):
            list(image.walk())
        with pytest.raises(CorruptImageError, match="twice"):
            list(MergedTree([image]).walk())
        start = time.monotonic()
        with pytest.raises(CorruptImageError, match="reached twice"):
            extract(image, str(tmp_path / "dest"), owners=False)
        assert time.monotonic() - start < 5
    depth = max(root.count(os.sep) for root, _, _ in os.walk(tmp_path / "dest"))
    assert depth - str(tmp_path / "dest").count(os.sep) <= 3  # stopped at the loop, not below


@pytest.mark.parametrize("name", LOOPS)
def test_directory_loops_do_not_loop_the_mount(name: str) -> None:
    with fuse_mount([fixture(name)]) as fm:
        mnt = fm.mountpoint
        looped = f"{mnt}/d/sub/inner" if name == "loop-ancestor.erofs" else f"{mnt}/d/sub"
        # the kernel refuses a second name for a directory it knows: an error, never a loop
        with pytest.raises(OSError) as exc:
            os.listdir(looped)
        assert exc.value.errno in (errno.ELOOP, errno.EIO, errno.ENOENT), exc.value
        count = sum(len(ds) + len(fs) for _, ds, fs in os.walk(mnt))
        assert count < 20
        assert Path(mnt, "d/fff").read_text() == "file fff\n"
        assert_daemon_fine(fm)


# times ----------------------------------------------------------------------------------------
def test_epoch_overflow_wraps_as_the_kernel_does() -> None:
    wrapped = -(1 << 63) + 4  # (2^63 - 1) + 5, in signed 64 bits
    with Image.open(fixture("epoch-overflow.erofs")) as image:
        node = image.lookup("/d/fff")
        assert node.mtime == wrapped
        tree = MergedTree([image])
        ops = Operations(tree)
        child = tree.lookup(tree.lookup(tree.root, b"d"), b"fff")  # type: ignore[arg-type]
        assert child is not None
        assert ops.attributes(child).st_mtime_ns == wrapped * 10**9
    with kernel_erofs(fixture("epoch-overflow.erofs")) as kmnt:
        assert os.stat(f"{kmnt}/d/fff").st_mtime_ns == wrapped * 10**9
    with fuse_mount([fixture("epoch-overflow.erofs")]) as fm:
        assert os.stat(f"{fm.mountpoint}/d/fff").st_mtime_ns == wrapped * 10**9
        assert os.stat(f"{fm.mountpoint}/d").st_mtime_ns == ((1 << 63) - 1) * 10**9
        assert_daemon_fine(fm)


def test_extreme_mtimes_extract_and_list(tmp_path: Path) -> None:
    with Image.open(fixture("mtime-extremes.erofs")) as image:
        stats = Extractor(image, owners=False).extract(str(tmp_path / "dest"))
    assert stats.files == 8 and not stats.warnings
    assert Path(tmp_path / "dest/d/fff").read_text() == "file fff\n"
    proc = cli("ls", "-l", fixture("mtime-extremes.erofs"), "/d")
    assert proc.returncode == 0, proc.stderr
    assert f"@{(1 << 63) - 1} fff" in proc.stdout
    with fuse_mount([fixture("mtime-extremes.erofs")]) as fm:
        assert os.stat(f"{fm.mountpoint}/d/fff").st_mtime_ns == ((1 << 63) - 1) * 10**9
        assert os.stat(f"{fm.mountpoint}/d").st_mtime_ns == -(1 << 63) * 10**9


# sizes ----------------------------------------------------------------------------------------
def test_64_tib_plain_file_at_the_null_block_address_is_eio_as_in_the_kernel(
        tmp_path: Path) -> None:
    # The kernel does not take the null block address of a plain file as a hole: it maps the
    # blocks there and the read past the device fails (EIO). We used to serve 64 TiB of zeros
    # (and extract read them all: a fuzzer-found hang). Now every way in fails at once.
    with kernel_erofs(fixture("sparse-64tib.erofs")) as kmnt:
        for off in (0, 1 << 45):
            with pytest.raises(OSError) as exc:
                os.pread(fd := os.open(f"{kmnt}/d/fff", os.O_RDONLY), 4096, off)
            os.close(fd)
            assert exc.value.errno == errno.EIO
    start = time.monotonic()
    with Image.open(fixture("sparse-64tib.erofs")) as image:
        node = image.lookup("/d/fff")
        assert node.size == 1 << 46 and node.hole_end(0) == 0
        with pytest.raises(CorruptImageError):
            node.read(1 << 45, 4096)
    # extract stops at the corrupt file, as fsck.erofs --extract does: one line, exit 1
    proc = cli("extract", fixture("sparse-64tib.erofs"), str(tmp_path / "dest"))
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "inode 62" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 5
    with fuse_mount([fixture("sparse-64tib.erofs")]) as fm:
        with open(f"{fm.mountpoint}/d/fff", "rb") as f:
            f.seek(1 << 45)
            with pytest.raises(OSError) as exc:
                f.read(4096)
            assert exc.value.errno == errno.EIO
        assert_daemon_fine(fm)


def test_directory_larger_than_its_image_is_refused() -> None:
    start = time.monotonic()
    with Image.open(fixture("dir-chunk-bomb.erofs")) as image:
        with pytest.raises(CorruptImageError, match="directory of 1228800 bytes"):
            list(image.lookup("/d").readdir())
        with pytest.raises(CorruptImageError):
            image.lookup("/d/fff")
    assert time.monotonic() - start < 1
    with fuse_mount([fixture("dir-chunk-bomb.erofs")]) as fm:
        with pytest.raises(OSError) as exc:
            os.listdir(f"{fm.mountpoint}/d")
        assert exc.value.errno == errno.EIO
        assert "directory of 1228800 bytes" in fm.log_text()
        assert Path(fm.mountpoint, "outside").exists()
        assert_daemon_fine(fm)
