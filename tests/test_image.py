"""The reader against its references: fixture manifests, the kernel, and mkfs.erofs-made trees."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_fuse.erofs.errors import NotADirectoryErofsError, NotFoundError
from erofs_fuse.erofs.image import Image
from helpers import EXPECTED, corpus, kernel_erofs, mkfs_erofs
from treeview import TreeView, parse_manifest, view_of_dir, view_of_image

# image -> (manifest, whether mtimes are part of the comparison)
UNCOMPRESSED = {
    "plain.erofs": ("plain", True),
    "compact.erofs": ("compact", True),
    "old-plain.erofs": ("old-plain", True),
    "extended.erofs": ("plain", False),
    "noinline.erofs": ("plain", False),
    "b512.erofs": ("plain", False),
    "chunked.erofs": ("plain", False),
    "dot-omitted.erofs": ("plain", False),
    "plain-48bit.erofs": ("plain", False),
    "xattr-prefix.erofs": ("plain", False),
    "xattr-digest.erofs": ("plain", False),
}


def without_mtime(view: TreeView) -> TreeView:
    entries = {
        path: "\t".join(col for col in line.split("\t") if not col.startswith("mtime="))
        for path, line in view.entries.items()
    }
    return TreeView(entries, view.hardlinks)


@pytest.mark.parametrize("name", sorted(UNCOMPRESSED))
def test_fixture_reads_to_its_source_tree(name: str) -> None:
    manifest, with_mtime = UNCOMPRESSED[name]
    expected = parse_manifest(str(EXPECTED / f"{manifest}.manifest"))
    with Image.open(corpus(name)) as image:
        got = view_of_image(image, with_mtime=with_mtime)
    if not with_mtime:
        expected = without_mtime(expected)
    assert expected.diff(got) == []


def test_blob_device_image_reads_with_its_device() -> None:
    expected = without_mtime(parse_manifest(str(EXPECTED / "plain.manifest")))
    with Image.open(corpus("blobdev.erofs"), devices=[corpus("blobdev.blob")]) as image:
        assert image.superblock.devices[0].blocks == 807
        assert expected.diff(view_of_image(image, with_mtime=False)) == []


def test_flattened_blob_device_image_reads_from_the_concatenation(tmp_path: object) -> None:
    flat = os.path.join(str(tmp_path), "flat.erofs")
    with open(flat, "wb") as out:
        for part in ("blobdev.erofs", "blobdev.blob"):
            with open(corpus(part), "rb") as f:
                data = f.read()
            if part == "blobdev.erofs":
                # the device's unified address says where the blob starts in a flat image
                with Image.open(corpus("blobdev.erofs"), devices=[corpus("blobdev.blob")]) as img:
                    data = data.ljust(img.superblock.devices[0].uniaddr * 4096, b"\0")
            out.write(data)
    expected = without_mtime(parse_manifest(str(EXPECTED / "plain.manifest")))
    with Image.open(flat) as image:
        assert expected.diff(view_of_image(image, with_mtime=False)) == []


@contextlib.contextmanager
def kernel_erofs_with_device(image: str, device_file: str) -> Iterator[str]:
    """The image mounted by the kernel with its extra device as a read-only loop device."""
    loop = subprocess.run(["losetup", "-f", "--show", "-r", device_file], capture_output=True,
                          text=True)
    assert loop.returncode == 0, f"losetup {device_file}: {loop.stderr}"
    try:
        with kernel_erofs(image, f"device={loop.stdout.strip()}") as mnt:
            yield mnt
    finally:
        subprocess.run(["losetup", "-d", loop.stdout.strip()], check=True)


def debian_blobdev_image(tmp: str) -> tuple[str, str, str]:
    """(image, device file, source) made as issue #15 made them: Debian 12's own mkfs.erofs
    (1.5) with ``--chunksize=4096 --blobdev``, whose device table records 0 blocks."""
    src = os.path.join(tmp, "src")
    os.makedirs(os.path.join(src, "sub"))
    for name, size in (("a.bin", 20000), ("sub/b.bin", 9000), ("sub/empty", 0),
                       ("big.bin", 300 * 4096 + 17)):
        with open(os.path.join(src, name), "wb") as f:
            f.write(bytes((k * 7 + size) % 251 for k in range(size)))
    os.symlink("sub/b.bin", os.path.join(src, "link"))
    image, blob = os.path.join(tmp, "layer.erofs"), os.path.join(tmp, "blob.bin")
    mkfs_erofs(src, image, "--chunksize=4096", f"--blobdev={blob}")
    return image, blob, src


def test_debian_blobdev_image_reads_as_the_kernel_reads_it(tmp_path: Path) -> None:
    image, blob, src = debian_blobdev_image(str(tmp_path))
    with Image.open(image, devices=[blob]) as img, kernel_erofs_with_device(image, blob) as mnt:
        assert img.superblock.devices[0].blocks == 0  # what makes this image a case
        want = view_of_dir(mnt)
        assert want.diff(view_of_image(img)) == []
    assert view_of_dir(src, with_mtime=False).diff(without_mtime(want)) == []


def test_tar_index_layer_reads_the_appended_tar() -> None:
    with Image.open(corpus("layer-lower-tarindex.erofs")) as tarindex, \
            Image.open(corpus("layer-lower-oci.erofs")) as oci:
        # the tar-index image was made without -T0: its mtimes are the tar's
        assert view_of_image(oci, with_mtime=False).diff(view_of_image(tarindex, with_mtime=False)) == []


@pytest.mark.parametrize("name", sorted(UNCOMPRESSED) + ["layer-lower-aufs.erofs",
                                                        "layer-upper-aufs.erofs"])
def test_fixture_equals_the_kernel_view(name: str) -> None:
    with Image.open(corpus(name)) as image, kernel_erofs(corpus(name)) as mnt:
        assert view_of_dir(mnt).diff(view_of_image(image)) == []


def test_lookup_and_errors() -> None:
    with Image.open(corpus("plain.erofs")) as image:
        node = image.lookup("/sizes/text-4097")
        assert node.size == 4097 and node.nlink == 3
        assert image.lookup("sizes/text-4097").nid == node.nid
        assert image.lookup("/").nid == image.root.nid
        with pytest.raises(NotFoundError):
            image.lookup("/sizes/nope")
        with pytest.raises(FileNotFoundError):  # the error family also speaks the built-in
            image.lookup("/nope/deeper")
        with pytest.raises(NotADirectoryErofsError):
            image.lookup("/sizes/text-1/x")
        assert node.read(4096, 100) == node.read(0, 4097)[4096:]
        assert node.read(5000, 10) == b""
        manydir = image.lookup("/manydir")
        names = [e.name for e in manydir.readdir()]
        assert names == sorted(names) and len(names) > 200
        for name in names[::37]:
            entry = manydir.lookup(name)
            assert entry is not None and entry.name == name
        assert manydir.lookup(b"zzzz-not-there") is None
        assert manydir.lookup(b"") is None


def test_readdir_dots_follow_the_kernel() -> None:
    with Image.open(corpus("plain.erofs")) as plain, Image.open(corpus("dot-omitted.erofs")) as omitted:
        for image in (plain, omitted):
            big = image.lookup("/big")
            entries = {e.name: e.nid for e in big.readdir(dots=True)}
            assert entries[b"."] == big.nid
            assert entries[b".."] == image.root.nid
        with kernel_erofs(corpus("dot-omitted.erofs")) as mnt:
            # the kernel lists "." of a dot-omitted directory after the stored entries
            assert "." not in os.listdir(os.path.join(mnt, "big"))


def test_xattrs_getxattr_listxattr() -> None:
    with Image.open(corpus("xattr-prefix.erofs")) as image:
        node = image.lookup("/xattrs/trusted")
        assert set(node.listxattr()) == {b"security.selinux", b"trusted.secret"}
        assert node.getxattr(b"user.none") is None
        short = image.lookup("/xattrs/short")
        assert short.getxattr(b"user.a") == b"1"


# Property: random trees through Debian's mkfs.erofs read back equal ---------------------------

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=40).filter(
    lambda n: n not in (".", "..")
)


@st.composite
def trees(draw: st.DrawFn) -> dict[str, object]:
    """A nested dict: name -> bytes (file) | str (symlink target) | dict (directory)."""

    def level(depth: int) -> dict[str, object]:
        names = draw(st.lists(NAME, max_size=8 if depth else 12, unique=True))
        out: dict[str, object] = {}
        for name in names:
            kind = draw(st.sampled_from(["file", "file", "file", "link", "dir"] if depth < 3 else ["file", "link"]))
            if kind == "file":
                size = draw(st.sampled_from([0, 1, 100, 4095, 4096, 4097, 9000, 70000]))
                seed = draw(st.integers(0, 255))
                out[name] = bytes((seed + i * 7) % 251 for i in range(size))
            elif kind == "link":
                out[name] = draw(st.text(alphabet="abc/._", min_size=1, max_size=60))
            else:
                out[name] = level(depth + 1)
        return out

    return level(0)


def write_tree(root: str, tree: dict[str, object]) -> None:
    for name, value in tree.items():
        path = os.path.join(root, name)
        if isinstance(value, dict):
            os.mkdir(path)
            write_tree(path, value)
        elif isinstance(value, bytes):
            with open(path, "wb") as f:
                f.write(value)
            os.chmod(path, 0o644)
        else:
            assert isinstance(value, str)
            os.symlink(value, path)


# Debian's mkfs.erofs 1.5 has no -b: other block sizes are covered by the b512/b1024 fixtures.
MKFS_OPTIONS = [
    (),
    ("-Eforce-inode-extended",),
    ("-Eforce-inode-compact",),
    ("--chunksize=8192",),
    ("--chunksize=4096", "-Eforce-chunk-indexes"),
    ("-Enoinline_data",),
]


@pytest.mark.parametrize("options", MKFS_OPTIONS, ids=lambda o: " ".join(o) or "default")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees())
def test_random_trees_read_back_equal(options: tuple[str, ...], tree: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        os.mkdir(src)
        write_tree(src, tree)
        img = os.path.join(tmp, "img.erofs")
        mkfs_erofs(src, img, *options)
        with Image.open(img) as image:
            got = view_of_image(image, with_mtime=False)
        want = view_of_dir(src, with_mtime=False)
        # mkfs makes the root of the image from src itself
        assert want.diff(got) == []


def test_lookups_read_each_directory_block_once(tmp_path: Path) -> None:
    """Decoded directory blocks are kept: python's imports probe dozens of names in one
    directory, and each search read its blocks again through the data path (with a verified
    layer, hashing them again)."""
    from erofs_fuse.blob import FileBlob

    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    names = [f"module_{k:04d}.cpython-311.pyc" for k in range(600)]
    for name in names:
        (src / "big" / name).write_bytes(b"")
    image_path = str(tmp_path / "big.erofs")
    mkfs_erofs(str(src), image_path, "-T0")

    class CountingBlob(FileBlob):
        reads = 0

        def read(self, offset: int, length: int) -> bytes:
            CountingBlob.reads += 1
            return super().read(offset, length)

    with Image(CountingBlob(image_path)) as image:
        big = image.inode(image.lookup_entry(image.root, b"big").nid)  # type: ignore[union-attr]
        assert big.size > 4 * image.superblock.block_size  # several blocks to search
        for name in names:
            assert big.lookup(name.encode()) is not None
        CountingBlob.reads = 0
        for name in names:
            assert big.lookup(name.encode()) is not None
            assert big.lookup(name.encode() + b"x") is None
        assert CountingBlob.reads == 0
