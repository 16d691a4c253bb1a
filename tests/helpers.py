"""Shared test helpers: the fixture corpus, real mkfs.erofs, real kernel mounts.

A component a test needs and cannot find is a failure, never a skip: CI must not go green by
testing less.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pyfuse3

from erofs_fuse import native
from erofs_fuse.blob import FileBlob
from erofs_fuse.erofs.image import Inode
from erofs_fuse.erofs.superblock import crc32c_raw

if TYPE_CHECKING:
    from erofs_fuse.fuse.operations import Operations

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fixtures" / "corpus"
EXPECTED = CORPUS / "expected"


def corpus(name: str) -> str:
    path = CORPUS / name
    assert path.exists(), f"fixture {path} is missing"
    return str(path)


class WatchedBlob(FileBlob):
    """A layer file that notes each read and each prefetch hint, in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.events: list[tuple[str, int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.events.append(("read", offset, length))
        return super().read(offset, length)

    def prefetch(self, offset: int, length: int) -> None:
        self.events.append(("prefetch", offset, length))
        super().prefetch(offset, length)

    def hints(self) -> list[tuple[int, int]]:
        return [(offset, length) for kind, offset, length in self.events if kind == "prefetch"]


def on_python_sources(test: Callable[..., None]) -> Callable[..., None]:
    """For a test that replaces a module's function to count the calls other modules make to
    it: compiled modules (erofs_fuse/native.py) call each other directly and would not see the
    replacement. Where they are compiled, the test runs in a child pytest on the Python sources
    (EROFS_FUSE_PURE=1) and passes or fails with it."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        if native.pure_requested():
            return test(*args, **kwargs)
        nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid],
            cwd=ROOT, env={**os.environ, "EROFS_FUSE_PURE": "1"}, capture_output=True, text=True,
            timeout=600)
        last = child.stdout.strip().splitlines()[-1:]
        assert child.returncode == 0 and last[0].startswith("1 passed"), child.stdout[-4000:]

    return run


def read_through(node: Inode, chunk: int) -> None:
    """Read the file ``node`` from start to end, ``chunk`` bytes a call (to the first empty one)."""
    pos = 0
    while pos < node.size:
        data = node.read(pos, chunk)
        if not data:
            break
        pos += len(data)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run scripts/install-deps"
    return path


def mkfs_erofs(src: str, out: str, *options: str) -> None:
    """Build an image with the machine's (Debian's) mkfs.erofs."""
    mkfs = require_tool("mkfs.erofs")
    proc = subprocess.run([mkfs, *options, out, src], capture_output=True, text=True)
    assert proc.returncode == 0, f"mkfs.erofs {' '.join(options)} failed: {proc.stderr}"


@contextlib.contextmanager
def kernel_erofs(image: str, *options: str) -> Iterator[str]:
    """The image mounted by the kernel's erofs (the reference view), unmounted afterwards."""
    assert os.geteuid() == 0, "kernel mounts need root"
    mnt = tempfile.mkdtemp(prefix="erofs-kernel-")
    opts = ",".join(("ro", "loop", *options))
    proc = subprocess.run(["mount", "-t", "erofs", "-o", opts, image, mnt],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"kernel mount of {image} failed: {proc.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


def reseal(data: bytearray) -> bytearray:
    """Recompute the checksum after editing, so a test reaches the check it means to reach."""
    bs = 1 << data[1024 + 12]
    length = bs - 1024 if bs > 1024 else bs
    block = bytearray(data[1024 : 1024 + length])
    block[4:8] = bytes(4)
    struct.pack_into("<I", data, 1028, crc32c_raw(bytes(block)))
    return data


async def resolve(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    """The attributes of ``path`` (from the root), looked up a component at a time."""
    attr = await ops.getattr(pyfuse3.ROOT_INODE)
    for part in filter(None, path.split("/")):
        attr = await ops.lookup(attr.st_ino, part.encode())
        assert attr.st_ino != 0, f"{path}: {part} not found"
    return attr


def flip(path: str, offset: int, mask: int) -> None:
    """XOR the byte at ``offset`` of the file ``path`` with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def read_or_errno(path: str) -> bytes | int:
    """The bytes of file ``path``, or the errno its open or read failed with (EIO from a mount
    that refuses unverified bytes, say)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        return exc.errno or -1
