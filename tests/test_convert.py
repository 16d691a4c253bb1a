"""``erofs-fuse convert``: the command line, bad input, sealing, stdin."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
import tarfile
from pathlib import Path

import pytest
import zstandard
from helpers import require_tool
from layertar import (TarBuilder, assert_same, check_image_views, gnu_tar_of, reader_view,
                      reference_view)
from mounting import env, fuse_mount

from erofs_fuse.erofs.image import Image

CLI = [sys.executable, "-m", "erofs_fuse"]


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=None if stdin is None else stdin.decode("latin-1"),
                          capture_output=True, text=True, env=env(), encoding="latin-1")


def good_tar() -> bytes:
    b = TarBuilder()
    b.add("dir", tarfile.DIRTYPE)
    b.add("dir/file", data=b"x" * 5000)
    b.add("dir/link", tarfile.LNKTYPE, linkname="dir/file")
    b.add("sym", tarfile.SYMTYPE, linkname="dir/file")
    return b.bytes()


def assert_refused(tmp_path: Path, data: bytes, *words: str) -> str:
    """Exit 2, one line naming what is wrong, and nothing left in the output directory."""
    src = tmp_path / "bad.tar"
    src.write_bytes(data)
    outdir = tmp_path / "out"
    outdir.mkdir(exist_ok=True)
    proc = run("convert", str(src), str(outdir / "layer.erofs"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erofs-fuse: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert os.listdir(outdir) == [], "output or temporary files left behind"
    return lines[0]


def test_truncated_tar(tmp_path: Path) -> None:
    data = good_tar()
    line = assert_refused(tmp_path, data[:512 + 2000], "dir/file", "truncated", "at byte")
    assert "at byte 512" in line
    assert_refused(tmp_path, data[:700], "truncated")


def test_bad_gzip_and_zstd_streams(tmp_path: Path) -> None:
    packed = gzip.compress(good_tar())
    corrupt = bytearray(packed)
    corrupt[len(corrupt) // 2] ^= 0xFF
    assert_refused(tmp_path, bytes(corrupt), "gzip")
    assert_refused(tmp_path, packed[:len(packed) // 2], "gzip", "truncated")
    z = zstandard.ZstdCompressor().compress(good_tar())
    zc = bytearray(z)
    zc[len(zc) // 2] ^= 0xFF
    assert_refused(tmp_path, bytes(zc), "zstd")
    assert_refused(tmp_path, z[:len(z) // 2], "truncated")


def test_bad_header_checksum(tmp_path: Path) -> None:
    data = bytearray(good_tar())
    data[1536 + 10] ^= 1  # inside the second header's name... find a header: use the first
    data = bytearray(good_tar())
    data[100] ^= 1  # the first header's mode field (the PAX header, or the entry)
    assert_refused(tmp_path, bytes(data), "checksum", "at byte 0")


def test_hardlink_to_a_missing_target(tmp_path: Path) -> None:
    b = TarBuilder()
    b.add("link", tarfile.LNKTYPE, linkname="nowhere")
    assert_refused(tmp_path, b.bytes(), "link", "missing", "nowhere")


def test_a_path_climbing_out_is_refused(tmp_path: Path) -> None:
    b = TarBuilder()
    b.add("ok", data=b"1")
    b.add("../../etc/evil", data=b"2")
    assert_refused(tmp_path, b.bytes(), "../../etc/evil", "'..'")
    b = TarBuilder()
    b.add("l", tarfile.LNKTYPE, linkname="../x")
    assert_refused(tmp_path, b.bytes(), "'..'")


def test_a_name_with_nul(tmp_path: Path) -> None:
    b = TarBuilder(tarfile.PAX_FORMAT)
    b.add("plain", data=b"1", pax={"path": "bad\x00name"})
    assert_refused(tmp_path, b.bytes(), "NUL")


def test_a_size_past_the_end(tmp_path: Path) -> None:
    b = TarBuilder()
    b.add("big", data=b"y" * 3000)
    data = bytearray(b.bytes())
    # claim 100000 bytes in the ustar size field and fix the checksum
    header = data[0:512]
    if header[156:157] == b"x":  # skip a PAX header if tarfile wrote one
        raise AssertionError("no PAX header expected")
    header[124:136] = b"%011o\0" % 100000
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[0:512] = header
    assert_refused(tmp_path, bytes(data[:512 + 3584]), "big", "truncated")


def test_converts_stdin_and_a_directory_and_is_deterministic(tmp_path: Path) -> None:
    data = good_tar()
    (tmp_path / "in.tar").write_bytes(data)
    a, b = tmp_path / "a.erofs", tmp_path / "b.erofs"
    proc = subprocess.run([*CLI, "convert", "-", str(a)], input=gzip.compress(data),
                          capture_output=True, env=env())
    assert proc.returncode == 0, proc.stderr
    assert run("convert", str(tmp_path / "in.tar"), str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    check_image_views(str(tmp_path / "in.tar"), str(a))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"dir source")
    assert run("convert", str(src), str(tmp_path / "d.erofs")).returncode == 0


def test_seal_prints_what_seal_and_fsverity_print(tmp_path: Path) -> None:
    (tmp_path / "in.tar").write_bytes(good_tar())
    out = tmp_path / "layer.erofs"
    proc = run("convert", "--seal", str(tmp_path / "in.tar"), str(out))
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.endswith(f" {out}") and line.startswith("sha256:")
    assert (tmp_path / "layer.erofs.verity").exists()
    sealed = run("seal", str(out)).stdout.splitlines()[0]
    assert sealed == line
    fsverity = require_tool("fsverity")
    digest = subprocess.run([fsverity, "digest", str(out)], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert digest == line


@pytest.mark.parametrize("args, says", [
    (["--block-size", "3000"], "block size 3000"), (["--compress", "zip"], "unknown compression"),
    (["--compress", "lz4hc,13"], "lz4hc takes 1-12"), (["--compress", "lz4hc,0"], "lz4hc takes 1-12"),
    (["--compress", "lz4hc,x"], "lz4hc takes 1-12"), (["--uuid", "nope"], "bad UUID"),
    (["--compress", "lz4,5"], "lz4 takes no level"),
    (["--tar-index", "--block-size", "4096"], "--tar-index writes 512-byte blocks"),
    (["--tar-index", "--compress", "lz4"], "no data to compress"), (["--whiteouts", "x"], "x")])
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    (tmp_path / "in.tar").write_bytes(good_tar())
    proc = run("convert", *args, str(tmp_path / "in.tar"), str(tmp_path / "o.erofs"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert says in proc.stderr, proc.stderr
    if args == ["--compress", "lz4,5"]:
        assert "lz4hc takes" not in proc.stderr, proc.stderr  # it was "(lz4hc takes 1-12)"
    assert not (tmp_path / "o.erofs").exists()


def test_tar_index_block_size_512_or_not_given(tmp_path: Path) -> None:
    (tmp_path / "in.tar").write_bytes(good_tar())
    for extra in ([], ["--block-size", "512"]):
        out = tmp_path / "i.erofs"
        proc = run("convert", "--tar-index", *extra, str(tmp_path / "in.tar"), str(out))
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        check_image_views(str(tmp_path / "in.tar"), str(out), tar_index=True)
        with Image.open(str(out)) as image:
            assert image.superblock.block_size == 512


@pytest.mark.parametrize("block_size", [16384, 65536])
def test_blocks_over_the_page_size_are_written_with_a_warning(tmp_path: Path,
                                                              block_size: int) -> None:
    """Written, readable by erofs-fuse, refused by this kernel: one warning line says so."""
    assert os.sysconf("SC_PAGE_SIZE") < block_size, "the test assumes 4 KiB pages"
    src = tmp_path / "in.tar"
    src.write_bytes(good_tar())
    out = tmp_path / "big.erofs"
    proc = run("convert", "--block-size", str(block_size), str(src), str(out))
    assert proc.returncode == 0, proc.stderr
    line, = proc.stderr.splitlines()
    assert line.startswith("erofs-fuse: warning: ") and f"{block_size}-byte blocks" in line
    assert "kernel will not mount" in line and "erofs-fuse will" in line
    assert_same(reference_view(str(src)), reader_view(str(out)), "our reader's view")
    with fuse_mount([str(out)]) as fuse:
        assert (Path(fuse.mountpoint) / "dir/file").read_bytes() == b"x" * 5000
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    kernel = subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(out), str(mnt)],
                            capture_output=True, text=True)
    if kernel.returncode == 0:
        subprocess.run(["umount", str(mnt)], check=True)
    assert kernel.returncode != 0, "this kernel mounts blocks larger than a page: the " \
        "warning is wrong here"
    small = run("convert", "--block-size", "4096", str(src), str(tmp_path / "small.erofs"))
    assert small.returncode == 0 and small.stderr == ""


def test_mtime_and_source_date_epoch_set_the_build_time(tmp_path: Path) -> None:
    (tmp_path / "in.tar").write_bytes(good_tar())

    out = str(tmp_path / "o.erofs")
    assert run("convert", "--mtime", "1600000000", str(tmp_path / "in.tar"), out).returncode == 0
    with Image.open(out) as image:
        assert image.superblock.build_time == 1600000000
        assert image.superblock.uuid == "00000000-0000-0000-0000-000000000000"
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        assert run("convert", str(tmp_path / "in.tar"), out).returncode == 0
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    with Image.open(out) as image:
        assert image.superblock.build_time == 1700000000


def test_gnu_tar_made_layer_via_cli(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a/b").mkdir(parents=True)
    (src / "a/b/c").write_bytes(b"c" * 10000)
    gnu_tar_of(str(src), str(tmp_path / "l.tar"))
    assert run("convert", "--compress", "lz4hc,9", str(tmp_path / "l.tar"),
               str(tmp_path / "l.erofs")).returncode == 0
    check_image_views(str(tmp_path / "l.tar"), str(tmp_path / "l.erofs"))


@pytest.mark.parametrize("wrap", ["plain", "gzip"])
def test_tar_index_from_stdin_appends_the_uncompressed_tar(tmp_path: Path, wrap: str) -> None:
    data = good_tar()
    (tmp_path / "in.tar").write_bytes(data)
    out = tmp_path / "i.erofs"
    feed = gzip.compress(data) if wrap == "gzip" else data
    proc = subprocess.run([*CLI, "convert", "--tar-index", "-", str(out)], input=feed,
                          capture_output=True, env=env())
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().endswith(data)  # image ‖ tar, as containerd lays it out
    check_image_views(str(tmp_path / "in.tar"), str(out), tar_index=True)


# found by scripts/fuzz --mode convert -----------------------------------------------------
def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "",
            pax: dict[str, str] | None = None) -> bytes:
    b = TarBuilder()
    b.add(name, kind, data, linkname=linkname, pax=pax)
    return b.bytes()


@pytest.mark.parametrize("data,words", [
    (_member("l", tarfile.SYMTYPE), ("symlink target of 0 bytes",)),
    (_member("l", tarfile.SYMTYPE, linkname="t" * 4096), ("symlink target of 4096 bytes",)),
    (_member("f", pax={"mtime": "18446744073709551616"}), ("mtime", "out of range")),
    (_member("f", pax={"uid": "4294967295"}), ("owner", "out of range")),
    (_member("s", data=b"x", pax={"GNU.sparse.map": "0,1", "GNU.sparse.size": str(10**30)}),
     ("size", "out of range")),
    (_member("s", data=b"x", pax={"GNU.sparse.map": "0,1", "GNU.sparse.size": str(1 << 62)}),
     ("sparse file",)),
    (_member("link", tarfile.LNKTYPE, linkname="new\nline"), ("new\\nline",)),
], ids=["empty-symlink", "long-symlink", "mtime", "no-id", "sparse-size", "sparse-cost",
        "newline"])
def test_fuzz_findings_are_refused_in_one_line(tmp_path: Path, data: bytes,
                                               words: tuple[str, ...]) -> None:
    assert_refused(tmp_path, data, *words)


def test_malformed_capabilities_and_acls_are_dropped_with_a_warning(tmp_path: Path) -> None:
    b = TarBuilder()
    b.add("cap", data=b"c", pax={"SCHILY.xattr.security.capability": "not a valid value"})
    b.add("acl", data=b"a", pax={"SCHILY.xattr.system.posix_acl_access": "not an acl"})
    (tmp_path / "in.tar").write_bytes(b.bytes())
    proc = run("convert", str(tmp_path / "in.tar"), str(tmp_path / "o.erofs"))
    assert proc.returncode == 0, proc.stderr
    assert "not a valid capability set" in proc.stderr and "not a valid POSIX ACL" in proc.stderr
    check_image_views(str(tmp_path / "in.tar"), str(tmp_path / "o.erofs"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_leaves_no_temporary_file(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT while the tar is still arriving: exit 128+N, one line, nothing left;
    the stdin pipe is held open so that the conversion is under way."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    data = good_tar()
    # SIGINT as a foreground shell leaves it: a suite started from a background job inherits
    # it ignored (bash ignores SIGINT in its asynchronous commands), and so, rightly, would convert
    proc = subprocess.Popen([*CLI, "convert", "-", str(outdir / "layer.erofs")],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(data[:1024])
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not os.listdir(outdir):  # the writer's temporary file: it is converting
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(sig)
        assert proc.wait(30) == 128 + sig
        err = proc.stderr.read().decode()
        assert len(err.splitlines()) == 1 and f"interrupted ({sig.name})" in err, err
        assert os.listdir(outdir) == []
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stderr.close()


def one_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erofs-fuse: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_out_that_is_the_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "x.tar"
    src.write_bytes(good_tar())
    one_line(run("convert", str(src), str(src)), "is the input", str(src))
    (tmp_path / "link.tar").symlink_to(src)
    os.link(src, tmp_path / "hard.tar")
    for out in ("link.tar", "hard.tar"):
        one_line(run("convert", str(src), str(tmp_path / out)), "is the input")
    with open(src, "rb") as f:
        proc = subprocess.run([*CLI, "convert", "-", str(src)], stdin=f, capture_output=True,
                              text=True, env=env())
    one_line(proc, "is the input (standard input)")
    assert src.read_bytes() == good_tar()


def test_empty_input_is_not_a_tar(tmp_path: Path) -> None:
    assert_refused(tmp_path, b"", "does not look like a tar archive")
    assert_refused(tmp_path, gzip.compress(b""), "does not look like a tar archive")
    out = tmp_path / "out" / "layer.erofs"
    one_line(run("convert", "-", str(out), stdin=b""), "does not look like a tar archive")
    assert not out.exists()
    # an archive of no member (end-of-archive blocks only) is a tar, as for GNU tar
    assert run("convert", "-", str(out), stdin=bytes(10240)).returncode == 0


def test_out_that_is_a_directory_is_named(tmp_path: Path) -> None:
    src = tmp_path / "x.tar"
    src.write_bytes(good_tar())
    (tmp_path / "d").mkdir()
    one_line(run("convert", str(src), str(tmp_path / "d")), f"{tmp_path / 'd'}: is a directory")
    assert os.listdir(tmp_path / "d") == [] and sorted(os.listdir(tmp_path)) == ["d", "x.tar"]
