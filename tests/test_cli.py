"""The command line without a mount: info, ls, cat, extract, and its one-line errors."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from erofs_fuse.erofs.image import Image
from helpers import EXPECTED, corpus, kernel_erofs, mkfs_erofs
from treeview import parse_manifest, view_of_dir

CLI = [sys.executable, "-m", "erofs_fuse"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True)


def test_info_names_block_size_and_features() -> None:
    proc = run("info", corpus("lz4-fragments.erofs"))
    assert proc.returncode == 0, proc.stderr
    assert "block size:    4096" in proc.stdout
    assert "fragments/dedupe" in proc.stdout and "sb_chksum" in proc.stdout


def test_ls_and_cat() -> None:
    proc = run("ls", "-l", corpus("plain.erofs"), "/links")
    assert proc.returncode == 0, proc.stderr
    assert "short -> ../sizes/text-1" in proc.stdout
    assert run("ls", "-R", corpus("plain.erofs")).stdout.count("\n") > 800
    proc = subprocess.run([*CLI, "cat", corpus("plain.erofs"), "/sizes/text-4097"], capture_output=True)
    assert proc.returncode == 0 and len(proc.stdout) == 4097


def test_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    not_erofs = tmp_path / "x.img"
    not_erofs.write_bytes(b"\0" * 8192)
    cases = [
        ("cat", str(tmp_path / "missing.erofs"), "/a"),
        ("cat", str(not_erofs), "/a"),
        ("cat", corpus("plain.erofs"), "/nope"),
        ("cat", corpus("plain.erofs"), "/big"),
        ("ls", corpus("blobdev.erofs")),
    ]
    for args in cases:
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("erofs-fuse: "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    # a corrupt inode names the image and the nid
    bad = tmp_path / "bad.erofs"
    data = bytearray(Path(corpus("plain.erofs")).read_bytes())
    with Image.open(corpus("plain.erofs")) as image:
        node = image.lookup("/sizes/text-1")
    pos = node.info.pos
    assert pos >= 4096  # outside the checksummed superblock block
    data[pos + 4 : pos + 6] = b"\xff\xff"  # i_mode with an invalid file type
    bad.write_bytes(bytes(data))
    proc = run("cat", str(bad), "/sizes/text-1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"erofs-fuse: {bad}: corrupt inode {node.nid} at offset {pos}: bad file type in mode 0o177777"
    )


def test_extract_equals_the_manifest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    proc = run("extract", corpus("plain.erofs"), str(dest))
    assert proc.returncode == 0, proc.stderr
    expected = parse_manifest(str(EXPECTED / "plain.manifest"))
    assert expected.diff(view_of_dir(str(dest))) == []


def make_big_tree(root: Path, count: int, seed: int = 7) -> None:
    """A few thousand entries of every type, owners, modes, xattrs and hardlinks."""
    rnd = random.Random(seed)
    dirs = [root]
    for i in range(count):
        parent = rnd.choice(dirs)
        kind = rnd.random()
        path = parent / f"e{i:05d}"
        if kind < 0.08:
            path.mkdir(mode=rnd.choice([0o755, 0o700, 0o1777]))
            dirs.append(path)
        elif kind < 0.12:
            os.symlink(f"../target-{i}" * rnd.randint(1, 30), path)
        elif kind < 0.14:
            os.mknod(path, 0o600 | (0o020000 if i % 2 else 0o060000), os.makedev(i % 300, i % 70000))
        elif kind < 0.15:
            os.mkfifo(path)
        elif kind < 0.18 and i > 10:
            files = [p for p in parent.iterdir() if p.is_file() and not p.is_symlink()]
            if files:
                os.link(files[0], path)
                continue
            path.write_bytes(b"x")
        else:
            size = rnd.choice([0, 1, 511, 4096, 4097, 12345, 70000, 200001])
            path.write_bytes(rnd.randbytes(size) if i % 3 else (b"text %d\n" % i) * (size // 8 + 1))
            os.chmod(path, rnd.choice([0o644, 0o600, 0o755, 0o4755, 0o2711]))
        os.lchown(path, rnd.choice([0, 1000, 65534, 100000]), rnd.choice([0, 100, 70000]))
        if kind >= 0.18 and i % 5 == 0:
            os.setxattr(path, f"user.k{i % 4}", os.urandom(i % 200 + 1))
            os.setxattr(path, "trusted.t", b"v" * (i % 50))
        os.utime(path, ns=(i * 1_000_000_123, i * 1_000_000_123), follow_symlinks=False)


def test_extract_agrees_with_the_kernel_on_thousands_of_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_big_tree(src, 3000)
    img = str(tmp_path / "big.erofs")
    mkfs_erofs(str(src), img)
    dest = tmp_path / "out"
    proc = run("extract", img, str(dest))
    assert proc.returncode == 0, proc.stderr
    with kernel_erofs(img) as mnt:
        kernel = view_of_dir(mnt)
    assert len(kernel.entries) > 3000
    assert kernel.diff(view_of_dir(str(dest))) == []


def _rename_entry(image: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and image.count(old) == 1
    return image.replace(old, new)


def test_extract_refuses_names_that_escape(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "aaaaaaa").write_text("a")
    (src / "d" / "zzzzzzz").write_text("z")
    img = tmp_path / "img.erofs"
    mkfs_erofs(str(src), str(img))
    data = img.read_bytes()
    for hostile in (b"../../z", b"zz/../z", b"..\0\0\0\0\0"[:7]):
        bad = tmp_path / "bad.erofs"
        bad.write_bytes(_rename_entry(data, b"zzzzzzz", hostile))
        dest = tmp_path / "dest" / "inner"
        proc = run("extract", str(bad), str(dest))
        assert proc.returncode == 2, (hostile, proc.stderr)
        assert "erofs-fuse: " in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "dest" / "z").exists() and not (tmp_path / "z").exists()
        assert not list((tmp_path / "dest").glob("**/z"))
        subprocess.run(["rm", "-rf", str(tmp_path / "dest")], check=True)


def test_extract_is_rejected_into_existing_entries(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert run("extract", corpus("plain.erofs"), str(dest)).returncode == 0
    proc = run("extract", corpus("plain.erofs"), str(dest))
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1
