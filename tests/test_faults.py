"""Faults under a live mount: a layer file truncated, replaced, overwritten, made unreadable or
failing with I/O errors; the daemon killed (SIGKILL) or stopped (SIGTERM) with reads in flight.

What each case does (the daemon holds one open descriptor per layer file, taken at mount):

- truncated: reads needing bytes past the new end fail with EIO and one log line naming the
  layer and the offset; everything else is served; the daemon stays up.
- replaced (a new file renamed over the path, as an image pull does): nothing changes for the
  mount, which keeps reading the file it opened; the new file is used by the next mount.
- overwritten in place: without verification, changed bytes of an uncompressed file are served
  as they now are (nothing can tell them from the right ones); a changed compressed extent fails
  to decode and gives EIO; with a trusted fs-verity digest every changed block gives EIO.
- made unreadable: ``chmod 000`` does not affect a descriptor already open (and root ignores
  modes anyway): reads go on. A disk that fails (tests/faultyfs.py, a FUSE file that returns EIO
  on demand; there is no device-mapper here) gives EIO for the affected reads and a log line,
  and the same reads succeed once the disk does again.
- SIGKILL: the mount stays, dead (ENOTCONN); ``erofs-fuse umount`` clears it, even while a
  process still has files open in it.
- SIGTERM: unmounts and ends the daemon, also while reads are in flight: a read the daemon is
  serving completes first (a read the backing store never answers would block it, as it would
  block any filesystem; SIGKILL and ``erofs-fuse umount`` are the way out of that).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from erofs_fuse.erofs.extent import Source
from erofs_fuse.erofs.image import Image
from helpers import corpus
from mounting import (
    UMOUNT_CMD,
    FuseMount,
    daemon_pids,
    env,
    force_unmount,
    fuse_mount,
    is_mounted,
    require_fuse,
    wait_until,
)

FAULTYFS = str(Path(__file__).with_name("faultyfs.py"))


def data_start(image_path: str, path: str) -> int:
    """Byte position in the layer file of the first data extent of ``path``."""
    with Image.open(image_path) as image:
        node = image.lookup(path)
        ext = image._mapper(node).map(0)
    assert ext.source == Source.DEVICE
    return ext.pa


def warm(mnt: str) -> None:
    """Look at every entry once, so that later failures can only be reads of file data."""
    for root, dirs, files in os.walk(mnt):
        for name in dirs + files:
            os.lstat(os.path.join(root, name))


def errors_logged(fm: FuseMount) -> list[str]:
    return [ln for ln in fm.log_text().splitlines() if " ERROR " in ln]


def assert_alive(fm: FuseMount) -> None:
    assert is_mounted(fm.mountpoint)
    assert len(daemon_pids(fm.mountpoint)) == 1
    assert os.listdir(fm.mountpoint)


def read_error(path: str) -> int:
    with pytest.raises(OSError) as exc:
        Path(path).read_bytes()
    return exc.value.errno or 0


# truncated ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain.erofs", "lz4.erofs"])
def test_truncated_layer_fails_only_the_reads_it_affects(name: str, tmp_path: Path) -> None:
    layer = tmp_path / name
    layer.write_bytes(Path(corpus(name)).read_bytes())
    cut = data_start(str(layer), "/sizes/text-65543")  # the last data in the file but one
    with Image.open(corpus(name)) as pristine:
        expected = pristine.lookup("/big/mixed.bin").read(0, 1 << 20)
    with fuse_mount([str(layer)]) as fm:
        mnt = fm.mountpoint
        warm(mnt)
        os.truncate(layer, cut)
        assert read_error(f"{mnt}/sizes/text-65543") == errno.EIO
        assert read_error(f"{mnt}/sizes/text-8191") == errno.EIO
        assert Path(mnt, "big/mixed.bin").read_bytes() == expected  # data before the cut
        assert_alive(fm)
        errors = errors_logged(fm)
        assert errors, "no log line for the failed reads"
        for line in errors:
            assert str(layer) in line and "truncated" in line, line
            offset = int(re.search(r"at offset (\d+)", line).group(1))  # type: ignore[union-attr]
            assert offset >= cut, line


# replaced -------------------------------------------------------------------------------------
def test_replaced_layer_is_not_seen_by_the_live_mount(tmp_path: Path) -> None:
    layer = tmp_path / "layer.erofs"
    layer.write_bytes(Path(corpus("plain.erofs")).read_bytes())
    other = tmp_path / "other.erofs"
    other.write_bytes(Path(corpus("layer-lower-aufs.erofs")).read_bytes())
    with fuse_mount([str(layer)]) as fm:
        mnt = fm.mountpoint
        os.rename(other, layer)  # atomically replaced, as a registry pull would do it
        with Image.open(corpus("plain.erofs")) as pristine:
            for path in ("big/mixed.bin", "sizes/text-65543", "big/dup-a.txt"):
                node = pristine.lookup(path)
                assert Path(mnt, path).read_bytes() == node.read(0, node.size)
        assert sorted(os.listdir(mnt)) == sorted(
            e.name.decode() for e in Image.open(corpus("plain.erofs")).root.readdir())
        assert not errors_logged(fm)
    # the next mount uses the new file
    with fuse_mount([str(layer)]) as fm:
        assert not Path(fm.mountpoint, "big").exists()


# overwritten in place -------------------------------------------------------------------------
def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_overwritten_uncompressed_data_is_served_as_it_now_is(tmp_path: Path) -> None:
    """Honest limit: without verification, nothing tells new bytes of a plain file from old."""
    layer = tmp_path / "plain.erofs"
    layer.write_bytes(Path(corpus("plain.erofs")).read_bytes())
    pos = data_start(str(layer), "/big/mixed.bin")
    with fuse_mount([str(layer)]) as fm:
        overwrite(layer, pos, b"\xaa" * 4096)
        data = Path(fm.mountpoint, "big/mixed.bin").read_bytes()
        assert data[:4096] == b"\xaa" * 4096
        assert_alive(fm)


def test_overwritten_compressed_data_gives_eio(tmp_path: Path) -> None:
    layer = tmp_path / "lz4.erofs"
    layer.write_bytes(Path(corpus("lz4.erofs")).read_bytes())
    pos = data_start(str(layer), "/big/mixed.bin")
    with fuse_mount([str(layer)]) as fm:
        warm(fm.mountpoint)
        overwrite(layer, pos, b"\xff" * 4096)
        assert read_error(f"{fm.mountpoint}/big/mixed.bin") == errno.EIO
        assert len(Path(fm.mountpoint, "big/dup-a.txt").read_bytes()) == 30000
        assert_alive(fm)
        errors = errors_logged(fm)
        assert errors and all(str(layer) in ln and "corrupt" in ln for ln in errors), errors


def test_overwritten_data_of_a_verified_layer_gives_eio(tmp_path: Path) -> None:
    layer = tmp_path / "plain.erofs"
    layer.write_bytes(Path(corpus("plain.erofs")).read_bytes())
    seal = subprocess.run([sys.executable, "-m", "erofs_fuse", "seal", str(layer)],
                          capture_output=True, text=True, env=env())
    assert seal.returncode == 0, seal.stderr
    digest = seal.stdout.split()[0]
    assert digest.startswith("sha256:"), seal.stdout
    pos = data_start(str(layer), "/big/mixed.bin")
    with fuse_mount([str(layer)], "--verity", f"{layer}={digest}") as fm:
        warm(fm.mountpoint)
        overwrite(layer, pos, b"\xaa" * 4096)
        assert read_error(f"{fm.mountpoint}/big/mixed.bin") == errno.EIO
        assert len(Path(fm.mountpoint, "big/dup-a.txt").read_bytes()) == 30000
        assert_alive(fm)
        assert errors_logged(fm)


# unreadable -----------------------------------------------------------------------------------
def test_chmod_000_does_not_affect_the_open_layer(tmp_path: Path) -> None:
    layer = tmp_path / "plain.erofs"
    layer.write_bytes(Path(corpus("plain.erofs")).read_bytes())
    with fuse_mount([str(layer)]) as fm:
        os.chmod(layer, 0)
        assert len(Path(fm.mountpoint, "big/mixed.bin").read_bytes()) == 160000
        assert_alive(fm)


@contextlib.contextmanager
def faulty_dir(files: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """tests/faultyfs.py serving copies of ``files`` (name -> source); yields (mnt, control)."""
    require_fuse()
    work = Path(tempfile.mkdtemp(prefix="erofs-faulty-"))
    backing, mnt, control = work / "backing", work / "mnt", work / "control"
    backing.mkdir()
    mnt.mkdir()
    for name, src in files.items():
        (backing / name).write_bytes(Path(src).read_bytes())
    proc = subprocess.Popen([sys.executable, FAULTYFS, str(backing), str(control), str(mnt)],
                            stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_until(lambda: is_mounted(str(mnt)) or proc.poll() is not None, what="faultyfs")
        assert proc.poll() is None, f"faultyfs failed: {proc.stderr.read() if proc.stderr else ''}"
        yield str(mnt), control
    finally:
        force_unmount(str(mnt))
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for path in sorted(work.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        work.rmdir()


def test_failing_disk_gives_eio_and_a_log_line_then_recovers(tmp_path: Path) -> None:
    with faulty_dir({"plain.erofs": corpus("plain.erofs")}) as (disk, control):
        layer = f"{disk}/plain.erofs"
        pos = data_start(layer, "/big/mixed.bin")
        with fuse_mount([layer]) as fm:
            mnt = fm.mountpoint
            warm(mnt)
            control.write_text(f"eio {pos} {pos + 4096}\n")
            assert read_error(f"{mnt}/big/mixed.bin") == errno.EIO
            assert len(Path(mnt, "big/dup-b.txt").read_bytes()) == 30000
            assert_alive(fm)
            errors = errors_logged(fm)
            assert errors and all(layer in ln and "I/O error" in ln and "at offset" in ln
                                  for ln in errors), errors
            control.write_text("")
            assert len(Path(mnt, "big/mixed.bin").read_bytes()) == 160000


# SIGKILL --------------------------------------------------------------------------------------
READER = r"""
import os, sys, time
mnt = sys.argv[1]
os.chdir(mnt)                       # the mount is busy: a cwd and an open file in it
f = open("big/mixed.bin", "rb")
print("ready", flush=True)
time.sleep(60)
"""


def test_sigkill_leaves_a_mount_that_umount_clears_even_when_busy() -> None:
    with fuse_mount([corpus("plain.erofs")]) as fm:
        mnt = fm.mountpoint
        reader = subprocess.Popen([sys.executable, "-c", READER, mnt], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
            (pid,) = daemon_pids(mnt)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not daemon_pids(mnt), what="the daemon to die")
            assert is_mounted(mnt)
            with pytest.raises(OSError) as exc:
                os.listdir(mnt)  # (a stat could be answered from the kernel's cache)
            assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            proc = subprocess.run([*UMOUNT_CMD, mnt], capture_output=True, text=True, env=env(),
                                  timeout=30)
            assert proc.returncode == 0, proc.stderr
            assert not is_mounted(mnt)
        finally:
            reader.kill()
            reader.wait()


# SIGTERM --------------------------------------------------------------------------------------
READERS = r"""
import os, random, sys, threading, time
mnt, seconds, skip = sys.argv[1], float(sys.argv[2]), sys.argv[3]
files = []
for root, dirs, names in os.walk(mnt):
    files += [os.path.join(root, n) for n in names
              if os.path.isfile(os.path.join(root, n)) and os.path.join(root, n) != skip]
outcomes = {}
def reader(k):
    rnd = random.Random(k)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with open(rnd.choice(files), "rb") as f:
                f.seek(rnd.randrange(200000))
                f.read(rnd.choice([1, 4096, 65536]))
            outcome = "ok"
        except OSError as exc:
            outcome = os.strerror(exc.errno)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
print("ready", flush=True)
for t in threads: t.start()
for t in threads: t.join()
print(outcomes, flush=True)
"""

SLOW_READ = r"""
import os, sys
print("reading", flush=True)
try:
    with open(sys.argv[1], "rb") as f:
        print(len(f.read()), flush=True)
except OSError as exc:
    print(os.strerror(exc.errno), flush=True)
"""


def test_sigterm_unmounts_with_reads_in_flight(tmp_path: Path) -> None:
    """8 threads read at random while SIGTERM arrives; one more read is inside the daemon (its
    backing read takes 2 s): it completes, then the daemon unmounts and exits.

    (The daemon serves one request at a time: with every backing read slow, the requests already
    taken from the kernel are answered before the signal is seen, so the time to unmount grows
    with the backlog; it stays bounded, since nothing new is taken once terminating.)"""
    with faulty_dir({"lz4.erofs": corpus("lz4.erofs")}) as (disk, control):
        layer = f"{disk}/lz4.erofs"
        slow_path = "sizes/text-65543"
        pos = data_start(layer, "/" + slow_path)
        with fuse_mount([layer]) as fm:
            mnt = fm.mountpoint
            warm(mnt)
            readers = subprocess.Popen([sys.executable, "-c", READERS, mnt, "6",
                                        f"{mnt}/{slow_path}"], stdout=subprocess.PIPE, text=True)
            slow = None
            try:
                assert readers.stdout is not None and readers.stdout.readline() == "ready\n"
                time.sleep(0.5)
                control.write_text(f"delay 2 {pos} {pos + 1}\n")
                slow = subprocess.Popen([sys.executable, "-c", SLOW_READ, f"{mnt}/{slow_path}"],
                                        stdout=subprocess.PIPE, text=True)
                assert slow.stdout is not None and slow.stdout.readline() == "reading\n"
                time.sleep(0.5)  # the daemon is now waiting for its backing read
                (pid,) = daemon_pids(mnt)
                os.kill(pid, signal.SIGTERM)
                start = time.monotonic()
                wait_until(lambda: not is_mounted(mnt), timeout=20, what="the unmount")
                wait_until(lambda: not daemon_pids(mnt), timeout=20, what="the daemon to exit")
                assert time.monotonic() - start < 10
                # the read in flight was answered (its data, or an error once unmounted)
                assert slow.wait(timeout=20) == 0
                answer = slow.stdout.read().strip()
                print("the read in flight got:", answer)
                assert answer in ("65543", os.strerror(errno.ENOTCONN)), answer
                out, _ = readers.communicate(timeout=30)
                assert readers.returncode == 0 and "ok" in out, out
            finally:
                control.write_text("")
                for proc in (readers, slow):
                    if proc is not None:
                        proc.kill()
                        proc.wait()
            text = fm.log_text()
            assert "SIGTERM: unmounting" in text and f"unmounted {mnt}" in text, text
            assert "Traceback" not in text and "internal error" not in text, text
