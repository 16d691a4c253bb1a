"""Hostile bytes: the reader raises only its own errors, never loops, never over-allocates."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from erofs_fuse.blob import FileBlob
from erofs_fuse.erofs.errors import CorruptImageError, ErofsError
from erofs_fuse.erofs.image import Image
from helpers import corpus, read_through, reseal


def read_everything(image: Image) -> int:
    """Walk the tree and read every file, symlink and xattr; returns the errors met."""
    errors = 0
    try:
        for _, node in image.walk():
            try:
                if node.is_reg:
                    read_through(node, 1 << 20)
                elif node.is_symlink:
                    node.readlink()
                node.xattrs()
            except ErofsError:
                errors += 1
    except ErofsError:
        errors += 1
    return errors


def mutate(data: bytes, rnd: random.Random) -> bytes:
    out = bytearray(data)
    kind = rnd.randrange(4)
    if kind == 0:  # bit flips anywhere after the checksummed block
        for _ in range(rnd.randint(1, 8)):
            pos = rnd.randrange(4096, len(out))
            out[pos] ^= 1 << rnd.randrange(8)
    elif kind == 1:  # a run of bytes set to 0x00 or 0xff
        pos = rnd.randrange(4096, len(out) - 16)
        out[pos : pos + rnd.randint(1, 16)] = bytes([rnd.choice([0, 0xFF])]) * 16
    elif kind == 2:  # truncation
        del out[rnd.randrange(4096, len(out)) :]
    else:  # random 32-bit words
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(4096, len(out) - 4)
            struct.pack_into("<I", out, pos, rnd.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, rnd.getrandbits(32)]))
    return bytes(out)


@pytest.mark.parametrize("name", ["plain.erofs", "compact.erofs", "chunked.erofs", "b512.erofs",
                                  "plain-48bit.erofs", "xattr-prefix.erofs", "dot-omitted.erofs"])
def test_seeded_mutants_raise_only_our_errors(name: str, tmp_path: Path) -> None:
    data = Path(corpus(name)).read_bytes()
    rnd = random.Random(f"{name}-v1")
    path = tmp_path / "mutant.erofs"
    for _ in range(40):
        path.write_bytes(mutate(data, rnd))
        start = time.monotonic()
        try:
            with Image.open(str(path)) as image:
                read_everything(image)
        except ErofsError:
            pass
        assert time.monotonic() - start < 20, "a mutant took too long: a loop without a bound?"


def test_directory_cycle_is_reported(tmp_path: Path) -> None:
    """A subdirectory entry pointing back at the root must not make a walk loop forever."""
    data = bytearray(Path(corpus("plain.erofs")).read_bytes())
    with Image.open(corpus("plain.erofs")) as image:
        deep = image.lookup("/deep/d0")
        root_nid = image.root.nid
        # find the dirent of "d0" in /deep and point it at the root
        parent = image.lookup("/deep")
        mapper = image._mapper(parent)
        ext = mapper.map(0)
    block_pos = ext.pa
    raw = bytes(data[block_pos : block_pos + 4096])
    needle = struct.pack("<Q", deep.nid)
    pos = raw.find(needle)
    assert pos >= 0
    struct.pack_into("<Q", data, block_pos + pos, root_nid)
    bad = tmp_path / "cycle.erofs"
    bad.write_bytes(bytes(reseal(data)))
    with Image.open(str(bad)) as image:
        with pytest.raises(CorruptImageError, match="cycle"):
            list(image.walk())


def test_blob_truncated_under_an_open_image(tmp_path: Path) -> None:
    path = tmp_path / "img.erofs"
    path.write_bytes(Path(corpus("plain.erofs")).read_bytes())
    image = Image(FileBlob(str(path)))
    node = image.lookup("/big/mixed.bin")
    with open(path, "r+b") as f:
        f.truncate(8192)
    with pytest.raises(CorruptImageError):
        node.read(0, node.size)
    image.close()


def test_hostile_sizes_do_not_allocate(tmp_path: Path) -> None:
    """A file claiming an enormous size reads only what a request asks for."""
    data = bytearray(Path(corpus("noinline.erofs")).read_bytes())
    with Image.open(corpus("noinline.erofs")) as image:
        node = image.lookup("/sizes/rand-65543")
    assert node.info.layout == 0  # FLAT_PLAIN
    struct.pack_into("<Q" if node.info.extended else "<I", data, node.info.pos + 8, 0xFFFFFFF0)
    bad = tmp_path / "huge.erofs"
    bad.write_bytes(bytes(data))
    with Image.open(str(bad)) as image:
        huge = image.lookup("/sizes/rand-65543")
        assert huge.size == 0xFFFFFFF0
        assert len(huge.read(0, 4096)) == 4096
        with pytest.raises(CorruptImageError):
            huge.read(1 << 31, 4096)  # beyond the image: refused, not zero-filled
