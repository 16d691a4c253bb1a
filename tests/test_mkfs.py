"""The writer against the oracles: GNU tar's extraction, the kernel's erofs mount, fsck.erofs
and our own reader, for every entry type and tar dialect a layer can hold."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from helpers import EXPECTED, corpus, kernel_erofs, require_tool
from layertar import (TarBuilder, assert_same, fsck, gnu_tar_of, kernel_view, reader_view,
                      reference_view)
from mounting import fuse_mount, kernel_erofs_stack, kernel_overlay
from treeview import TreeView, parse_manifest, view_of_dir

from erofs_fuse.erofs.image import Image
from erofs_fuse.mkfs import ConvertOptions, convert_dir, convert_tar
from erofs_fuse.objects import TREE_SUFFIX, WHOLE_OBJECT_BYTES, object_name

MODES = {"full": ConvertOptions(), "tar-index": ConvertOptions(tar_index=True)}
COMPRESSED = {"lz4": ConvertOptions(compress="lz4"),
              "lz4hc": ConvertOptions(compress="lz4hc", compress_level=12)}


def check_image(tar: str, image: str, *, tar_index: bool = False,
                overlay_whiteouts: bool = True, tar_options: tuple[str, ...] = ()) -> None:
    """The image reads as GNU tar extracts the tar: through the kernel and through our reader."""
    if not tar_index:
        fsck(image)  # Debian's fsck.erofs 1.5 knows no 512-byte blocks (tar-index images)
    ref = reference_view(tar, overlay_whiteouts=overlay_whiteouts, tar_options=tar_options)
    assert_same(ref, kernel_view(image), "the kernel's view")
    assert_same(ref, reader_view(image), "our reader's view")


def convert_and_check(tar: str, tmp: Path, mode: str = "full", *,
                      tar_options: tuple[str, ...] = (), **kw: object) -> str:
    out = str(tmp / f"out-{mode}.erofs")
    options = ConvertOptions(tar_index=mode == "tar-index", **kw)  # type: ignore[arg-type]
    convert_tar(tar, out, options)
    check_image(tar, out, tar_index=mode == "tar-index",
                overlay_whiteouts=options.whiteouts == "overlay", tar_options=tar_options)
    return out


def make_source_tree(root: Path) -> None:
    """Every entry type, xattrs of each namespace, hardlinks, sparse and odd names."""
    (root / "d/e").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "d/big").write_bytes(os.urandom(10000))
    (root / "d/exact").write_bytes(os.urandom(4096))
    (root / "d/tail4000").write_bytes(os.urandom(8192 + 4000))
    (root / "zero").write_bytes(b"")
    (root / "link").symlink_to("a.txt")
    (root / "dangling").symlink_to("/nowhere/" + "x" * 300)
    os.link(root / "a.txt", root / "d/hard")
    os.mkfifo(root / "fifo")
    os.mknod(root / "cdev", 0o620 | 0o020000, os.makedev(8, 300))
    os.mknod(root / "bdev", 0o660 | 0o060000, os.makedev(259, 70000))
    os.setxattr(root / "a.txt", "user.foo", b"bar")
    os.setxattr(root / "d", "trusted.x", b"1")
    os.setxattr(root / "d/big", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.chmod(root / "d/big", 0o4755)
    os.chmod(root / "d/e", 0o3777)
    os.chown(root / "d/exact", 100000, 70000)
    os.utime(root / "d/exact", ns=(1_577_836_800_500_000_000, 1_577_836_800_500_000_000))
    (root / "caf\xe9-\udcff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
     ).write_bytes(b"odd name")
    (root / ("n" * 255)).write_bytes(b"long name")
    deep = root / "/".join(["p" * 50] * 6)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"deep")
    with open(root / "sparse", "wb") as f:
        f.truncate(100 << 20)
        f.seek(50_000_000)
        f.write(b"x" * 5000)
        f.seek(99 << 20)
        f.write(os.urandom(70000))
    subprocess.run(["setfacl", "-m", "u:1000:r-x", str(root / "d/big")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:100:rwx", str(root / "d/e")], check=True)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_source_tree(root)
    return root


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_of_every_entry_type_reads_back_as_extracted(
        source_tree: Path, tmp_path: Path, fmt: str, mode: str) -> None:
    tar = str(tmp_path / "layer.tar")
    gnu_tar_of(str(source_tree), tar, f"--format={fmt}", "--sparse")
    convert_and_check(tar, tmp_path, mode)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "gzip-multimember"])
def test_compressed_tars_are_detected_by_magic(source_tree: Path, tmp_path: Path,
                                               compression: str) -> None:
    plain = tmp_path / "layer.tar"
    gnu_tar_of(str(source_tree), str(plain), "--format=posix")
    data = plain.read_bytes()
    if compression == "gzip":
        packed = gzip.compress(data)
    elif compression == "zstd":
        packed = zstandard.ZstdCompressor().compress(data)
    else:
        half = len(data) // 2
        packed = gzip.compress(data[:half]) + gzip.compress(data[half:])
    layer = tmp_path / "layer.bin"  # no telling suffix: detection is by content
    layer.write_bytes(packed)
    for mode in MODES:
        out = str(tmp_path / f"{mode}.erofs")
        result = convert_tar(str(layer), out, MODES[mode])
        import hashlib
        assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
        check_image(str(plain), out, tar_index=mode == "tar-index")


def compressible_tree(root: Path) -> None:
    """Text that compresses, random bytes that do not, and mixes at odd offsets."""
    words = b" ".join(b"word%d" % (k % 1000) for k in range(200_000))
    (root / "text").write_bytes(words)
    (root / "random").write_bytes(os.urandom(300_000))
    (root / "mixed").write_bytes(os.urandom(5000) + words[:70000] + os.urandom(9000) + b"z" * 2_000_000)
    (root / "small").write_bytes(b"a" * 3000)
    (root / "zeros-5mib").write_bytes(bytes(5 << 20))
    (root / "exactly-2-blocks").write_bytes(b"ab" * 4096)


@pytest.mark.parametrize("alg", COMPRESSED)
def test_lz4_compressed_images_read_back_through_the_kernel(tmp_path: Path, alg: str,
                                                            source_tree: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    compressible_tree(src)
    for tree in (src, source_tree):
        tar = str(tmp_path / "layer.tar")
        gnu_tar_of(str(tree), tar, "--format=posix")
        out = str(tmp_path / "out.erofs")
        result = convert_tar(tar, out, COMPRESSED[alg])
        check_image(tar, out)
        if tree is src:
            assert result.image_size < 0.5 * os.path.getsize(tar), "nothing was compressed"


def test_a_directory_converts_to_the_same_view(source_tree: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "dir.erofs")
    convert_dir(str(source_tree), out, ConvertOptions())
    fsck(out)
    expected = view_of_dir(str(source_tree))
    assert_same(expected, kernel_view(out), "the kernel's view of the directory image")
    assert_same(expected, reader_view(out), "our reader's view of the directory image")


@pytest.mark.parametrize("block_size", [512, 1024, 2048, 4096])
def test_block_sizes(source_tree: Path, tmp_path: Path, block_size: int) -> None:
    tar = str(tmp_path / "layer.tar")
    gnu_tar_of(str(source_tree), tar, "--format=posix")
    out = str(tmp_path / "out.erofs")
    convert_tar(tar, out, ConvertOptions(block_size=block_size))
    if block_size == 4096:
        fsck(out)
    ref = reference_view(tar)
    assert_same(ref, kernel_view(out), f"the kernel's view at {block_size}-byte blocks")
    assert_same(ref, reader_view(out), f"our reader's view at {block_size}-byte blocks")


def test_same_input_gives_the_same_bytes(source_tree: Path, tmp_path: Path) -> None:
    tar = str(tmp_path / "layer.tar")
    gnu_tar_of(str(source_tree), tar, "--format=posix", "--sparse")
    for mode, options in MODES.items():
        a, b = tmp_path / f"a-{mode}.erofs", tmp_path / f"b-{mode}.erofs"
        convert_tar(tar, str(a), options)
        convert_tar(tar, str(b), options)
        assert a.read_bytes() == b.read_bytes(), mode


# dialects that mkfs.erofs 1.9.3 drops or mishandles (erofs-writer.md 5.4), and the rest -------
def build(tmp_path: Path, builder: TarBuilder, name: str = "layer.tar") -> str:
    path = tmp_path / name
    path.write_bytes(builder.bytes())
    return str(path)


@pytest.mark.parametrize("mode", MODES)
def test_old_style_regular_files_are_kept(tmp_path: Path, mode: str) -> None:
    """mkfs.erofs 1.9.3 skips typeflag NUL members silently."""
    b = TarBuilder(tarfile.GNU_FORMAT)
    b.add("old", tarfile.AREGTYPE, b"old-style regular file")
    b.add("new", tarfile.REGTYPE, b"new")
    convert_and_check(build(tmp_path, b), tmp_path, mode)


@pytest.mark.parametrize("mode", MODES)
def test_global_pax_headers_apply_to_every_later_entry(tmp_path: Path, mode: str) -> None:
    """mkfs.erofs 1.9.3 misses the entry right after a global header."""
    raw = TarBuilder(tarfile.PAX_FORMAT)
    raw.tar.pax_headers = {"mtime": "1234567890.25", "uid": "4242"}
    raw.add("first", data=b"1")
    raw.add("second", data=b"22")
    raw.add("own", data=b"3", pax={"mtime": "5.5"})
    convert_and_check(build(tmp_path, raw), tmp_path, mode)


@pytest.mark.parametrize("mode", MODES)
def test_pax_records_and_gnu_long_names(tmp_path: Path, mode: str) -> None:
    long = "/".join(["dir" + "x" * 90] * 3) + "/file"
    b = TarBuilder(tarfile.PAX_FORMAT)
    b.add(long, data=b"pax path")
    b.add("frac", data=b"f", pax={"mtime": "1600000000.123456789"})
    b.add("neg", data=b"n", pax={"mtime": "-100.5"})
    b.add("bigids", data=b"i", uid=3_000_000, gid=2_500_000)
    b.add("sym", tarfile.SYMTYPE, linkname="t" * 3000)
    b.add("xat", data=b"x", pax={"SCHILY.xattr.user.k": "v",
                                 "SCHILY.xattr.trusted.overlay.redirect": "/r",
                                 "SCHILY.xattr.security.selinux": "system_u:object_r:x:s0"})
    convert_and_check(build(tmp_path, b), tmp_path, mode)
    g = TarBuilder(tarfile.GNU_FORMAT)
    g.add(long, data=b"gnu long name")
    g.add("glink", tarfile.SYMTYPE, linkname="/" + "L" * 400)
    g.add("bigid", data=b"b", uid=1 << 30, gid=(1 << 32) - 2)
    convert_and_check(build(tmp_path, g, "gnu.tar"), tmp_path, mode)


@pytest.mark.parametrize("mode", MODES)
def test_duplicates_later_entry_wins_and_directories_keep_children(tmp_path: Path,
                                                                   mode: str) -> None:
    b = TarBuilder()
    b.add("dir", tarfile.DIRTYPE, mode=0o700, uid=5)
    b.add("dir/child", data=b"kept")
    b.add("dir", tarfile.DIRTYPE, mode=0o755, uid=6, pax={"SCHILY.xattr.user.d": "2"})
    b.add("file", data=b"first")
    b.add("file", data=b"second, longer")
    b.add("implicit/parents/here", data=b"x")
    b.add("./dotted", data=b"./ stripped")
    b.add("/absolute", data=b"/ stripped")
    b.add(".", tarfile.DIRTYPE, mode=0o751, uid=0)
    convert_and_check(build(tmp_path, b), tmp_path, mode)
    swap = TarBuilder()
    swap.add("swap", tarfile.DIRTYPE)
    swap.add("swap/gone", data=b"replaced with its directory")
    swap.add("swap", data=b"now a file")
    swap.add("back", data=b"a file")
    swap.add("back", tarfile.DIRTYPE, mode=0o700)
    # GNU tar refuses to replace a non-empty directory by default; OCI appliers replace it
    convert_and_check(build(tmp_path, swap, "swap.tar"), tmp_path, mode,
                      tar_options=("--recursive-unlink",))


@pytest.mark.parametrize("mode", MODES)
def test_hardlinks_with_data_and_to_replaced_targets(tmp_path: Path, mode: str) -> None:
    b = TarBuilder()
    b.add("t", data=b"target data")
    b.add("l1", tarfile.LNKTYPE, linkname="t")
    b.add("sub/l2", tarfile.LNKTYPE, linkname="./t")
    b.add("s", tarfile.SYMTYPE, linkname="t")
    b.add("ls", tarfile.LNKTYPE, linkname="s")
    data = bytearray(b.bytes())
    path = tmp_path / "links.tar"
    path.write_bytes(data)
    convert_and_check(str(path), tmp_path, mode)


@pytest.mark.parametrize("mode", MODES)
def test_whiteouts_become_overlay_form(tmp_path: Path, mode: str) -> None:
    b = TarBuilder()
    b.add("etc", tarfile.DIRTYPE)
    b.add("etc/.wh.passwd", uid=3, mtime=1_700_000_000)
    b.add("opq", tarfile.DIRTYPE)
    b.add("opq/.wh..wh..opq")
    b.add("opq/kept", data=b"k")
    b.add("x/.wh..wh..opq")
    b.add("gone", data=b"replaced by its whiteout")
    b.add(".wh.gone")
    tar = build(tmp_path, b)
    convert_and_check(tar, tmp_path, mode)
    convert_and_check(tar, tmp_path, mode, whiteouts="oci")


def test_empty_files_and_zero_byte_members(tmp_path: Path) -> None:
    b = TarBuilder()
    b.add("empty")
    b.add("d", tarfile.DIRTYPE)
    b.add("d/empty2", mode=0o600)
    b.add("fifo", tarfile.FIFOTYPE)
    b.add("chr", tarfile.CHRTYPE, devmajor=1, devminor=3)
    b.add("blk", tarfile.BLKTYPE, devmajor=8, devminor=1)
    tar = build(tmp_path, b)
    for mode in MODES:
        convert_and_check(tar, tmp_path, mode)


def _samples(read_at: object, size: int) -> list[bytes]:
    assert callable(read_at)
    spots = [0, 4096, 1 << 20, 5 << 30, (9 << 30) - 1, 9 << 30, size - 4000]
    return [read_at(pos, 4000) for pos in spots]


def test_a_sparse_file_over_8_gib_keeps_its_holes(tmp_path: Path) -> None:
    """A base-256 size (over 8 GiB) in GNU and PAX sparse form; sampled, not hashed whole."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.write(b"head")
        f.seek(9 << 30)
        f.write(b"tail" * 1000)
    size = (9 << 30) + 4000
    with open(src / "huge", "rb") as f:
        expected = _samples(lambda pos, n: os.pread(f.fileno(), n, pos), size)
    for fmt in ("gnu", "posix"):
        tar = str(tmp_path / f"{fmt}.tar")
        gnu_tar_of(str(src), tar, f"--format={fmt}", "--sparse")
        for mode, options in MODES.items():
            out = str(tmp_path / f"{fmt}-{mode}.erofs")
            convert_tar(tar, out, options)
            assert os.stat(out).st_blocks * 512 < 1 << 20, "holes were written out"
            with Image.open(out) as image:
                node = image.lookup("/huge")
                assert node.size == size
                assert _samples(node.read, size) == expected, f"our reader, {fmt} {mode}"
            with kernel_erofs(out) as mnt, open(os.path.join(mnt, "huge"), "rb") as f:
                assert os.fstat(f.fileno()).st_size == size
                got = _samples(lambda pos, n: os.pread(f.fileno(), n, pos), size)
                assert got == expected, f"the kernel, {fmt} {mode}"


def test_names_with_any_byte_but_nul_and_slash(tmp_path: Path) -> None:
    b = TarBuilder(tarfile.PAX_FORMAT)
    for k, name in enumerate([b"\xff\xfe", b"tab\there", b"new\nline", b"sp ace", b"\x01",
                              "ünï".encode(), b"back\\slash"]):
        b.add(name.decode("utf-8", "surrogateescape"), data=bytes([k]))
    b.add(b"\xc3(".decode("utf-8", "surrogateescape"), tarfile.DIRTYPE)
    convert_and_check(build(tmp_path, b), tmp_path)


def test_gnu_tar_reference_tools_are_present() -> None:
    require_tool("tar")
    require_tool("setfacl")
    require_tool("fsck.erofs")


# against mkfs.erofs 1.9.3 (the corpus layers) and through a merged mount --------------------
def _without_mtimes(view: TreeView) -> TreeView:
    entries = {p: "\t".join(c for c in line.split("\t") if not c.startswith("mtime="))
               for p, line in view.entries.items()}
    return TreeView(entries, view.hardlinks)


def _known_mkfs_quirks(view: TreeView) -> TreeView:
    """mkfs.erofs 1.9.3's view with the two places where we follow GNU tar instead: a root the
    tar never names is 0777 there (overlayfs shows the top layer's root, so a layer would make
    a container's / world-writable) and 0755 here; symlinks keep the tar's permission bits
    there, while every symlink Linux creates shows 0777."""
    entries = {}
    for path, line in view.entries.items():
        cols = line.split("\t")
        mode = int(cols[1], 8)
        if path == ".":
            cols[1] = "0o40755"
        elif stat.S_ISLNK(mode):
            cols[1] = f"0o{stat.S_IFLNK | 0o777:o}"
        entries[path] = "\t".join(cols)
    return TreeView(entries, view.hardlinks)


@pytest.mark.parametrize("layer", ["lower", "upper"])
def test_same_view_as_mkfs_erofs_1_9_3_tar_aufs(tmp_path: Path, layer: str) -> None:
    """``layer-*-aufs.erofs`` were made from the same tars by ``mkfs.erofs --tar=f --aufs -T0``
    of erofs-utils 1.9.3. ``-T0`` also sets every mtime to 0 there, so mtimes are left out;
    everything else must match, and mtimes must match GNU tar (``check_image``)."""
    tar = corpus(f"{layer}.tar")
    out = str(tmp_path / f"{layer}.erofs")
    convert_tar(tar, out, ConvertOptions())
    check_image(tar, out)
    anchor = _known_mkfs_quirks(_without_mtimes(kernel_view(corpus(f"layer-{layer}-aufs.erofs"))))
    ours = _without_mtimes(kernel_view(out))
    assert anchor.diff(ours) == []
    newer = os.environ.get("EROFS_UTILS_BIN")
    if newer:  # a newer mkfs.erofs at hand: the same comparison on every test tree
        ref = str(tmp_path / "anchor.erofs")
        subprocess.run([os.path.join(newer, "mkfs.erofs"), "--tar=f", "--aufs", "-T0",
                        "--mkfs-time", ref, tar], check=True, capture_output=True)
        assert kernel_view(ref).diff(kernel_view(out)) == []


def test_converted_layers_merge_as_the_kernels_overlay(tmp_path: Path) -> None:
    """lower.tar and upper.tar converted, then merged: by kernel overlayfs over kernel erofs
    mounts, and by erofs-fuse; both equal the corpus listing of the 1.9.3 layers' merge."""
    images = []
    for layer in ("lower", "upper"):
        out = str(tmp_path / f"{layer}.erofs")
        convert_tar(corpus(f"{layer}.tar"), out, ConvertOptions())
        images.append(out)
    manifest = _known_mkfs_quirks(_without_mtimes(parse_manifest(
        str(EXPECTED / "layers-lower+upper.manifest"))))
    with kernel_erofs_stack(images) as mounts, kernel_overlay(mounts[::-1]) as ovl:
        kernel_merged = view_of_dir(ovl)
    with fuse_mount(images) as fuse:
        ours = view_of_dir(fuse.mountpoint)
    assert manifest.diff(_without_mtimes(kernel_merged)) == []
    assert kernel_merged.diff(ours) == []


def test_objects_store_file_bytes_by_fsverity_digest(tmp_path: Path) -> None:
    """``--objects``: metadata-only layers whose files kernel overlayfs reads from the store
    (a data-only lower layer, ``lowerdir=TOP:BOTTOM::OBJECTS``) exactly as the full layers."""
    store = tmp_path / "objects"
    plain, meta = [], []
    stored = 0
    for layer in ("lower", "upper"):
        convert_tar(corpus(f"{layer}.tar"), str(tmp_path / f"{layer}.erofs"), ConvertOptions())
        result = convert_tar(corpus(f"{layer}.tar"), str(tmp_path / f"{layer}-meta.erofs"),
                             ConvertOptions(objects=str(store)))
        fsck(str(tmp_path / f"{layer}-meta.erofs"))
        plain.append(str(tmp_path / f"{layer}.erofs"))
        meta.append(str(tmp_path / f"{layer}-meta.erofs"))
        stored += result.objects_stored
    fsverity = require_tool("fsverity")
    files = sorted(p for p in store.rglob("*") if p.is_file())
    objects = [p for p in files if p.suffix != TREE_SUFFIX]
    assert len(objects) == stored > 0
    trees = 0
    for obj in objects:
        tree = tmp_path / "tree"
        digest = subprocess.run([fsverity, "digest", str(obj), f"--out-merkle-tree={tree}"],
                                capture_output=True, text=True, check=True).stdout.split()[0]
        name = obj.relative_to(store).as_posix()
        assert name == object_name(bytes.fromhex(digest.removeprefix("sha256:")))
        # big objects have their tree beside them, exactly fsverity's; small ones none
        stored_tree = store / (name + TREE_SUFFIX)
        if obj.stat().st_size > WHOLE_OBJECT_BYTES:
            assert stored_tree.read_bytes() == tree.read_bytes()
            trees += 1
        else:
            assert not stored_tree.exists()
    assert len(files) == len(objects) + trees and trees > 0
    with kernel_erofs_stack(plain) as mounts, kernel_overlay(mounts[::-1]) as ovl:
        expected = view_of_dir(ovl)
    with kernel_erofs_stack(meta) as mounts:
        spec = ":".join(mounts[::-1]) + "::" + str(store)
        mnt = tmp_path / "merged"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"ro,metacopy=on,redirect_dir=on,lowerdir={spec}", str(mnt)], check=True)
        try:
            got = view_of_dir(str(mnt))
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert expected.diff(got) == []
    with fuse_mount(meta, "--data-dir", str(store), "--require-object-verity") as fuse:
        assert expected.diff(view_of_dir(fuse.mountpoint)) == []


def test_objects_are_stored_once(tmp_path: Path) -> None:
    b = TarBuilder()
    for k in range(5):
        b.add(f"copy{k}", data=b"same content " * 100)
    b.add("other", data=b"different " * 100)
    b.add("tiny", data=b"inline")
    tar = build(tmp_path, b)
    store = str(tmp_path / "objects")
    first = convert_tar(tar, str(tmp_path / "a.erofs"), ConvertOptions(objects=store))
    assert (first.objects_stored, first.objects_shared) == (2, 4)
    again = convert_tar(tar, str(tmp_path / "b.erofs"), ConvertOptions(objects=store))
    assert (again.objects_stored, again.objects_shared) == (0, 6)
    with Image.open(str(tmp_path / "a.erofs")) as image:
        assert image.lookup("/tiny").read(0, 6) == b"inline"  # small files stay in the image
