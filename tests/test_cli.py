"""The command line without a mount: info, ls, cat, extract, and its one-line errors."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from pathlib import Path

from erofs_fuse.erofs.image import Image
from helpers import EXPECTED, ROOT, corpus, kernel_erofs, mkfs_erofs
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


def _into_head(*args: str) -> tuple[int, str]:
    """``erofs-fuse ARGS | head -c 1``: the command's status and stderr."""
    cmd = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-c", "1"], stdin=cmd.stdout, capture_output=True)
    assert cmd.stdout is not None and cmd.stderr is not None
    cmd.stdout.close()
    err = cmd.stderr.read().decode()
    return cmd.wait(), err


def test_a_closed_pipe_ends_quietly() -> None:
    # issue #15: "cat IMAGE PATH | head -1" and "ls | head" printed "erofs-fuse: Broken pipe"
    for args in (("cat", corpus("plain.erofs"), "/big/zeros-with-tail.bin"),
                 ("ls", "-lR", corpus("plain.erofs"))):
        status, err = _into_head(*args)
        assert err == "" and status == 128 + 13, (args, status, err)  # as if killed by SIGPIPE


def test_info_without_the_extra_device_describes_what_is_needed(tmp_path: Path) -> None:
    # issue #15: info refused such an image and called it corrupt
    from test_image import debian_blobdev_image

    image, blob, _ = debian_blobdev_image(str(tmp_path))
    proc = run("info", image)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "chunked_file device_table" in proc.stdout
    assert "device 1:" in proc.stdout and "needed: give it with --device" in proc.stdout
    proc = run("info", "--device", blob, image)
    assert proc.returncode == 0 and f"file {blob}" in proc.stdout, proc.stderr
    proc = run("ls", image)  # reading needs the device: one line, and not "corrupt"
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "missing device" in proc.stderr and "corrupt" not in proc.stderr
    proc = subprocess.run([*CLI, "cat", "--device", blob, image, "/a.bin"], capture_output=True)
    assert proc.returncode == 0 and len(proc.stdout) == 20000, proc.stderr


def test_info_says_a_truncated_image_is_short(tmp_path: Path) -> None:
    # issue #15: info exited 0 on a truncated image without saying it was short
    short = tmp_path / "short.erofs"
    short.write_bytes(Path(corpus("plain.erofs")).read_bytes()[:50000])
    proc = run("info", str(short))
    assert "block size:" in proc.stdout  # what the superblock says is still shown
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{short}: truncated: 50000 bytes" in proc.stderr
    assert run("info", corpus("plain.erofs")).returncode == 0


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


def test_extract_into_a_non_empty_directory_needs_merge(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine").write_text("kept")
    proc = run("extract", corpus("plain.erofs"), str(dest))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"erofs-fuse: {corpus('plain.erofs')}: ")
    assert "not empty" in proc.stderr and "--merge" in proc.stderr
    assert os.listdir(dest) == ["mine"]  # nothing written


def test_extract_merge_lays_layers_one_over_another(tmp_path: Path) -> None:
    # issue #15: extracting a second layer over a first stopped at the first existing entry
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for rel, data in (("etc/hosts", "lower"), ("etc/only-lower", "l"), ("opt/dir/f", "f"),
                      ("bin/sh", "shell"), ("hl/a", "link")):
        (lower / rel).parent.mkdir(parents=True, exist_ok=True)
        (lower / rel).write_text(data)
    os.link(lower / "hl/a", lower / "hl/b")
    for rel, data in (("etc/hosts", "upper"), ("opt/dir", "a file over a directory"),
                      ("etc/new", "n")):
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        (upper / rel).write_text(data)
    (upper / "bin").mkdir()
    (upper / "bin/sh").symlink_to("busybox")
    os.chmod(upper / "etc", 0o700)
    images = []
    for tree in (lower, upper):
        mkfs_erofs(str(tree), str(tree) + ".erofs")
        images.append(str(tree) + ".erofs")
    dest = tmp_path / "out"
    assert run("extract", images[0], str(dest)).returncode == 0
    (dest / "mine").write_text("kept")
    proc = run("extract", "--merge", images[1], str(dest))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (dest / "etc/hosts").read_text() == "upper"
    assert (dest / "etc/only-lower").read_text() == "l" and (dest / "etc/new").read_text() == "n"
    assert (dest / "opt/dir").read_text() == "a file over a directory"
    assert os.readlink(dest / "bin/sh") == "busybox"
    assert os.stat(dest / "hl/a").st_ino == os.stat(dest / "hl/b").st_ino
    assert (dest / "mine").read_text() == "kept"
    assert stat.S_IMODE(os.stat(dest / "etc").st_mode) == 0o700  # the upper layer's mode


def test_extract_errors_name_the_image(tmp_path: Path) -> None:
    # issue #15: a hostile name's error lacked the "IMAGE: " prefix
    hostile = str(ROOT / "fixtures/hostile/names.erofs")
    proc = run("extract", hostile, str(tmp_path / "d"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"erofs-fuse: {hostile}: corrupt inode "), proc.stderr
