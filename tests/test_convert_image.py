"""``erofs-fuse convert-image`` end to end, and ``mount --layers @FILE`` over its result.

Images are built here (tests/ocilayout.py), converted by the real command in a subprocess, and
the merged mount of the ``.layers`` file is compared with the kernel's overlayfs over kernel
erofs mounts of the same layer files.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from erofs_fuse.erofs.image import Image
from erofs_fuse.oci.image import chain_ids, host_platform
from helpers import require_tool
from mounting import (
    MOUNT_CMD,
    env,
    force_unmount,
    fuse_mount,
    kernel_erofs_stack,
    kernel_overlay,
    require_fuse,
    wait_until,
)
from ocilayout import (
    DOCKER_LAYER,
    LayerBlob,
    Layout,
    archive,
    directory,
    file,
    hardlink,
    many_files_tar,
    opaque,
    ref,
    sha256,
    symlink,
    whiteout,
)
from test_mount import assert_same_tree
from treeview import view_of_dir

CLI = [sys.executable, "-m", "erofs_fuse"]


def convert(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "convert-image", *args], capture_output=True, text=True,
                          env=env(), timeout=timeout)


def converted(*args: str) -> Path:
    proc = convert(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return Path(proc.stdout.strip())


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("erofs-fuse: "), proc.stderr
    return lines[0]


def layers_doc(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def layer_file(diff_id: str) -> str:
    return "sha256-" + diff_id.removeprefix("sha256:") + ".erofs"


# images ---------------------------------------------------------------------------------------
def base_layer(lay: Layout) -> LayerBlob:
    return lay.layer([
        directory("etc"), file("etc/os-release", "ID=test\n"), file("etc/passwd", "root:x:0:0\n"),
        directory("usr"), directory("usr/lib"), file("usr/lib/libc.so", b"\x7fELF" * 3000),
        file("usr/lib/data", "d" * 10000, 0o600, note="base"),
        symlink("lib", "usr/lib"), hardlink("usr/lib/libc.so.6", "usr/lib/libc.so"),
        directory("var"), directory("var/cache"), file("var/cache/a", "a"),
        file("var/cache/b", "b"), directory("opt"), file("opt/tool", "#!/bin/sh\n", 0o755),
    ])


def app_layers(lay: Layout, tag: str) -> list[LayerBlob]:
    return [
        lay.layer([  # zstd: deletions, an opaque directory, replacements
            whiteout("etc/passwd"), whiteout("opt"), directory("var"), directory("var/cache"),
            opaque("var/cache"), file("var/cache/new", tag), file("etc/os-release", f"ID={tag}\n"),
        ], "zstd"),
        lay.layer([directory("app"), file("app/main", f"run {tag}\n", 0o755, kind=tag),
                   symlink("app/lib", "../usr/lib")], None),
    ]


def make_image(root: Path, tag: str = "one", base: LayerBlob | None = None) -> tuple[Layout, list[LayerBlob]]:
    lay = Layout(root)
    layers = [base_layer(lay), *app_layers(lay, tag)]
    lay.write_index([{**lay.image(layers), **ref(f"example.com/{tag}:1")}])
    return lay, layers


@pytest.fixture
def image(tmp_path: Path) -> tuple[Layout, list[LayerBlob]]:
    return make_image(tmp_path / "image")


# conversion -----------------------------------------------------------------------------------
def test_layers_are_named_by_diff_id_and_listed(image: tuple[Layout, list[LayerBlob]],
                                                tmp_path: Path) -> None:
    lay, blobs = image
    out = tmp_path / "out"
    listed = converted(str(lay.root), str(out), "-j", "2")
    assert listed == out / "example.com_one_1.layers"
    doc = layers_doc(listed)
    diff_ids = [b.diff_id for b in blobs]
    assert doc["format"] == "erofs-fuse.layers.v1" and doc["ref"] == "example.com/one:1"
    assert doc["platform"] == "linux/amd64" and doc["image"] == str(lay.root)
    assert [x["path"] for x in doc["layers"]] == [layer_file(d) for d in diff_ids]
    assert [x["diff_id"] for x in doc["layers"]] == diff_ids
    assert [x["chain_id"] for x in doc["layers"]] == chain_ids(diff_ids)
    assert [x["digest"] for x in doc["layers"]] == [b.descriptor["digest"] for b in blobs]
    assert all("verity" not in x for x in doc["layers"])
    assert sorted(os.listdir(out)) == sorted([listed.name, *(layer_file(d) for d in diff_ids)])
    for entry in doc["layers"]:
        path = out / entry["path"]
        assert path.stat().st_size == entry["size"]
        with Image.open(str(path)) as img:
            assert img.lookup("/").is_dir


def test_merged_mount_equals_kernel_overlayfs(image: tuple[Layout, list[LayerBlob]],
                                              tmp_path: Path) -> None:
    lay, _ = image
    listed = converted(str(lay.root), str(tmp_path / "out"))
    paths = [str(listed.parent / x["path"]) for x in layers_doc(listed)["layers"]]
    with kernel_erofs_stack(paths) as mounts, kernel_overlay(list(reversed(mounts))) as ovl, \
            fuse_mount(["@" + str(listed)]) as fuse:
        assert_same_tree(ovl, fuse)
        seen = view_of_dir(fuse.mountpoint)
    # what the layers say, spot-checked
    assert not {"etc/passwd", "opt", "var/cache/a"} & set(seen.entries)
    assert {"var/cache/new", "usr/lib/libc.so.6", "app/main", "lib"} <= set(seen.entries)
    assert "user.note=" in seen.entries["usr/lib/data"]


@pytest.mark.parametrize("options", [
    ["--tar-index"], ["--whiteouts", "oci"], ["--block-size", "1024"], ["--compress", "lz4"],
    ["--compress", "lz4hc,9"],
], ids=lambda o: "".join(o).lstrip("-"))
def test_writer_options_give_the_same_tree(image: tuple[Layout, list[LayerBlob]],
                                           tmp_path: Path, options: list[str]) -> None:
    lay, _ = image
    with fuse_mount(["@" + str(converted(str(lay.root), str(tmp_path / "plain")))]) as m:
        expected = view_of_dir(m.mountpoint)
    listed = converted(str(lay.root), str(tmp_path / "other"), *options)
    with fuse_mount(["@" + str(listed)]) as m:
        assert expected.diff(view_of_dir(m.mountpoint)) == []


def test_shared_base_is_not_converted_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, blobs1 = make_image(tmp_path / "one", "one")
    converted(str(first.root), str(out))
    base = out / layer_file(blobs1[0].diff_id)
    before = base.stat()
    second, blobs2 = make_image(tmp_path / "two", "two")
    assert blobs2[0].diff_id == blobs1[0].diff_id and blobs2[1].diff_id != blobs1[1].diff_id
    tar = archive(second.root, tmp_path / "two.tar")
    proc = convert(str(tar), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "3 layers: 2 to convert, 1 present" in proc.stderr
    after = base.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == \
        (before.st_ino, before.st_mtime_ns, before.st_ctime_ns)
    doc = layers_doc(Path(proc.stdout.strip()))
    assert doc["name"] == "example.com_two_1" and doc["layers"][0]["path"] == base.name
    assert len(list(out.glob("*.layers"))) == 2 and len(list(out.glob("*.erofs"))) == 5
    again = convert(str(tar), str(out), "-q")
    assert again.returncode == 0 and again.stderr == ""


def test_repeated_layer_is_converted_once(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "rep")
    empty = lay.layer([directory("x")])
    lay.write_index([lay.image([empty, lay.layer([file("x/a", "1")]), empty])])
    listed = converted(str(lay.root), str(tmp_path / "out"))
    doc = layers_doc(listed)
    assert [x["path"] for x in doc["layers"]][0] == doc["layers"][2]["path"]
    assert len(list((tmp_path / "out").glob("*.erofs"))) == 2


def test_wrong_diff_id_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "bad")
    good = lay.layer([file("a", "1")])
    bad = lay.layer([file("b", "2")])
    wrong = sha256(b"something else")
    lay.write_index([lay.image([good, bad], diff_ids=[good.diff_id, wrong])])
    out = tmp_path / "out"
    line = one_line_error(convert(str(lay.root), str(out), "-q", "-j", "1"))
    assert "layer 2/2 sha256:" in line and "diff_id mismatch" in line and wrong in line, line
    assert not (out / layer_file(wrong)).exists() and not (out / layer_file(bad.diff_id)).exists()
    assert set(os.listdir(out)) <= {layer_file(good.diff_id)}  # no temporary file, no .layers


def test_tampered_blob_of_the_same_tar_is_refused(image: tuple[Layout, list[LayerBlob]],
                                                  tmp_path: Path) -> None:
    lay, blobs = image
    path = lay.blob_path(blobs[0].descriptor["digest"])
    data = bytearray(path.read_bytes())
    data[4:8] = b"\1\2\3\4"  # the gzip header's mtime: the same tar, another blob
    assert gzip.decompress(bytes(data)) == blobs[0].tar
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    line = one_line_error(convert(str(lay.root), str(out), "-q", "-j", "1"))
    assert f"blob {blobs[0].descriptor['digest']} hashes to" in line
    assert not (out / layer_file(blobs[0].diff_id)).exists()
    assert not [n for n in os.listdir(out) if n.startswith(".") or n.endswith(".layers")]


def test_platform_choice(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "multi")
    blobs = {}
    manifests = []
    for arch in ("amd64", "arm64", "s390x"):
        blobs[arch] = lay.layer([file("arch", arch)], media_type=DOCKER_LAYER)
        manifests.append(lay.image([blobs[arch]], arch=arch, platform=True))
    lay.write_index([{**lay.index(manifests), **ref("multi")}])
    out = tmp_path / "out"
    listed = converted(str(lay.root), str(out), "--platform", "linux/arm64", "--name", "m-arm")
    doc = layers_doc(listed)
    assert listed.name == "m-arm.layers" and doc["platform"] == "linux/arm64"
    assert doc["layers"][0]["diff_id"] == blobs["arm64"].diff_id
    host = host_platform().architecture
    if host in blobs:
        doc = layers_doc(converted(str(lay.root), str(out)))
        assert doc["layers"][0]["diff_id"] == blobs[host].diff_id and doc["name"] == "multi-multi"
    line = one_line_error(convert(str(lay.root), str(out), "--platform", "linux/riscv64"))
    assert "no image for linux/riscv64 (the image has: linux/amd64, linux/arm64, linux/s390x)" \
        in line


def test_bad_input_is_one_line_and_exit_2(image: tuple[Layout, list[LayerBlob]],
                                          tmp_path: Path) -> None:
    lay, blobs = image
    out = tmp_path / "out"
    evil = archive(lay.root, tmp_path / "evil.tar", prefix="../")
    notlayout = tmp_path / "empty"
    notlayout.mkdir()
    cases = [
        ([str(evil), str(out)], "leads out of the layout"),
        ([str(notlayout), str(out)], "no oci-layout: not an OCI image layout"),
        ([str(tmp_path / "missing"), str(out)], "No such file or directory"),
        ([str(lay.root), str(out), "--platform", "linux"], "expected OS/ARCH[/VARIANT]"),
        ([str(lay.root), str(out), "-j", "0"], "-j must be 1 or more"),
        ([str(lay.root), str(out), "--block-size", "1000"], "block size 1000"),
        ([str(lay.root), str(out), "--compress", "gzip"], "unknown compression 'gzip'"),
        ([str(lay.root)], "the following arguments are required: outdir"),
    ]
    for args, match in cases:
        line = one_line_error(convert(*args))
        assert match in line, (args, line)
    lay.blob_path(blobs[1].descriptor["digest"]).unlink()
    assert "is missing from" in one_line_error(convert(str(lay.root), str(out)))
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("level", ["0", "-3", "13", "1000"])
def test_compression_levels_are_checked_as_convert_checks_them(
        image: tuple[Layout, list[LayerBlob]], tmp_path: Path, level: str) -> None:
    """One spelling and one check with ``convert``: ``--compress lz4hc,LEVEL``, 1-12 (the old
    ``--compress-level`` took any integer and exited 0)."""
    lay, _ = image
    out = tmp_path / "out"
    line = one_line_error(convert(str(lay.root), str(out), "--compress", f"lz4hc,{level}"))
    assert f"bad compression level {level} (lz4hc takes 1-12)" in line
    line = one_line_error(convert(str(lay.root), str(out), "--compress", "lz4hc",
                                  "--compress-level", level))
    assert "unrecognized arguments: --compress-level" in line
    assert not out.exists() or os.listdir(out) == []


def test_writer_option_refusals_match_convert(image: tuple[Layout, list[LayerBlob]],
                                              tmp_path: Path) -> None:
    lay, _ = image
    out = tmp_path / "out"
    for args, says in [(["--compress", "lz4,5"], "lz4 takes no level"),
                       (["--tar-index", "--block-size", "4096"], "--tar-index writes 512-byte")]:
        line = one_line_error(convert(str(lay.root), str(out), *args))
        assert line.startswith("erofs-fuse: convert-image: ") and says in line, line
        assert "lz4hc takes" not in line


def test_blocks_over_the_page_size_warn_once(image: tuple[Layout, list[LayerBlob]],
                                             tmp_path: Path) -> None:
    lay, blobs = image
    proc = convert(str(lay.root), str(tmp_path / "out"), "-q", "--block-size", "16384")
    assert proc.returncode == 0, proc.stderr
    line, = proc.stderr.splitlines()  # one line, not one per layer
    assert line.startswith("erofs-fuse: warning: 16384-byte blocks") and "erofs-fuse will" in line
    listed = Path(proc.stdout.strip())
    for blob in blobs:
        with Image.open(str(listed.parent / layer_file(blob.diff_id))) as layer:
            assert layer.superblock.block_size == 16384


def test_bad_outdir_is_one_line_and_exit_2(image: tuple[Layout, list[LayerBlob]],
                                          tmp_path: Path) -> None:
    lay, _ = image
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert one_line_error(convert(str(lay.root), str(afile))).endswith(f"{afile}: not a directory")
    assert "afile/sub: not a directory" in one_line_error(convert(str(lay.root), f"{afile}/sub"))
    assert "/proc/nope: No such file" in one_line_error(convert(str(lay.root), "/proc/nope"))
    assert os.geteuid() == 0, "a read-only tmpfs needs root (the suite runs as root)"
    rofs = tmp_path / "rofs"
    rofs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(rofs)], check=True)
    try:
        line = one_line_error(convert(str(lay.root), str(rofs)))
        assert line.endswith(f"{rofs}: cannot write there: Read-only file system"), line
        assert ".tmp" not in line
    finally:
        subprocess.run(["umount", str(rofs)], check=True)


def test_ref_by_full_name_among_images_sharing_a_tag(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "saved")
    entries = []
    for full, tag in (("docker.io/library/debian:12", "debian"),
                      ("docker.io/library/alpine:12", "alpine")):
        entries.append({**lay.image([base_layer(lay), *app_layers(lay, tag)]),
                        "annotations": {"io.containerd.image.name": full,
                                        "org.opencontainers.image.ref.name": "12"}})
    lay.write_index(entries)
    line = one_line_error(convert(str(lay.root), str(tmp_path / "out"), "--ref", "12"))
    assert "ambiguous" in line and "debian:12" in line and "alpine:12" in line
    listed = converted(str(lay.root), str(tmp_path / "out"), "--ref", "alpine:12")
    assert listed.name == "docker.io_library_alpine_12.layers"


# integrity ------------------------------------------------------------------------------------
def test_sealed_layers_are_trusted_by_the_mount(image: tuple[Layout, list[LayerBlob]],
                                                tmp_path: Path) -> None:
    lay, _ = image
    out = tmp_path / "out"
    plain = converted(str(lay.root), str(out), "--name", "plain")
    inodes = {p.name: p.stat().st_ino for p in out.glob("*.erofs")}
    # present but converted unsealed: no digest was recorded, so they are converted again
    sealed = converted(str(lay.root), str(out), "--seal", "--name", "sealed")
    assert not set(inodes.items()) & {(p.name, p.stat().st_ino) for p in out.glob("*.erofs")}
    inodes = {p.name: p.stat().st_ino for p in out.glob("*.erofs")}
    sealed = converted(str(lay.root), str(out), "--seal", "--name", "sealed")  # proven: sealed
    assert {p.name: p.stat().st_ino for p in out.glob("*.erofs")} == inodes
    fresh = converted(str(lay.root), str(tmp_path / "fresh"), "--seal")  # converted and sealed
    fsverity = require_tool("fsverity")
    for listed in (sealed, fresh):
        for entry in layers_doc(listed)["layers"]:
            path = listed.parent / entry["path"]
            digest = subprocess.run([fsverity, "digest", str(path)], capture_output=True,
                                    text=True, check=True).stdout.split()[0]
            assert entry["verity"] == digest and Path(f"{path}.verity").exists()
    assert layers_doc(sealed)["layers"] == layers_doc(fresh)["layers"]
    with fuse_mount(["@" + str(plain)]) as m:
        expected = view_of_dir(m.mountpoint)
    with fuse_mount(["@" + str(sealed)], "--require-verity") as m:
        assert expected.diff(view_of_dir(m.mountpoint)) == []
    proc = run_mount("--layers", "@" + str(plain), "--require-verity", str(tmp_path))
    assert "verity is required" in one_line_error(proc)
    doc = layers_doc(sealed)
    digest = doc["layers"][1]["verity"]
    doc["layers"][1]["verity"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    sealed.write_text(json.dumps(doc))
    line = one_line_error(run_mount("--layers", "@" + str(sealed), str(tmp_path)))
    assert "(layer 1): fs-verity digest mismatch" in line


def test_a_changed_layer_file_is_converted_again_not_sealed(
        image: tuple[Layout, list[LayerBlob]], tmp_path: Path) -> None:
    lay, blobs = image
    out = tmp_path / "out"
    converted(str(lay.root), str(out), "--seal", "--name", "first")
    app = out / layer_file(blobs[2].diff_id)
    data = app.read_bytes()
    assert data.count(b"run one") == 1
    app.write_bytes(data.replace(b"run one", b"run evil"[:7]))
    proc = convert(str(lay.root), str(out), "--seal")
    assert proc.returncode == 0, proc.stderr
    assert "changed since it was converted" in proc.stderr and "converting it again" in proc.stderr
    listed = Path(proc.stdout.strip())
    assert b"run one" in app.read_bytes()
    with fuse_mount(["@" + str(listed)], "--require-verity") as m:
        assert (Path(m.mountpoint) / "app" / "main").read_text() == "run one\n"
    # the same for a layer file without a record (made by another run, unsealed)
    (out / (app.name + ".digest")).unlink()
    proc = convert(str(lay.root), str(out), "--seal")
    assert proc.returncode == 0 and "without a recorded digest" in proc.stderr, proc.stderr


# mount --layers @FILE -------------------------------------------------------------------------
def run_mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MOUNT_CMD, *args], capture_output=True, text=True, env=env(),
                          timeout=60)


def test_layers_file_with_more_layers_and_errors(image: tuple[Layout, list[LayerBlob]],
                                                 tmp_path: Path) -> None:
    lay, _ = image
    listed = converted(str(lay.root), str(tmp_path / "out"))
    extra = Layout(tmp_path / "extra")
    extra.write_index([extra.image([extra.layer([file("extra", "on top")])])])
    top = converted(str(extra.root), str(tmp_path / "out"))
    with fuse_mount(["@" + str(listed), "@" + str(top)]) as m:
        assert Path(m.mountpoint, "extra").read_text() == "on top"
        assert Path(m.mountpoint, "app/main").exists()
    bad = tmp_path / "bad.layers"
    cases = [
        ("@" + str(tmp_path / "nope.layers"), "No such file or directory"),
        ("@" + str(bad), "not a layers file"),
    ]
    bad.write_text('{"format": "something-else", "layers": []}')
    for spec, match in cases:
        assert match in one_line_error(run_mount("--layers", spec, str(tmp_path)))
    bad.write_text('{"format": "erofs-fuse.layers.v1", "layers": [{"path": 3}]}')
    assert "layer 0: 'path' is not a file name" in \
        one_line_error(run_mount("--layers", "@" + str(bad), str(tmp_path)))
    bad.write_text('{"format": "erofs-fuse.layers.v1", "layers": []}')
    assert "names no layer" in one_line_error(run_mount("--layers", "@" + str(bad), str(tmp_path)))


MOUNT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_mount_t_fuse_erofs_fuse_with_a_layers_file(image: tuple[Layout, list[LayerBlob]],
                                                    tmp_path: Path) -> None:
    require_fuse()
    require_tool("mount.fuse3")
    assert shutil.which("erofs-fuse", path=MOUNT_PATH), "run scripts/install-deps"
    lay, _ = image
    listed = converted(str(lay.root), str(tmp_path / "out"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    try:
        proc = subprocess.run(["mount", "-t", "fuse.erofs-fuse", "@" + str(listed), str(mnt)],
                              capture_output=True, text=True, env=mount_env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert Path(mnt, "var/cache/new").read_text() == "one"
        assert not Path(mnt, "etc/passwd").exists()
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    finally:
        force_unmount(str(mnt))


# progress, cancellation -----------------------------------------------------------------------
def test_progress_on_a_terminal_is_redrawn(image: tuple[Layout, list[LayerBlob]],
                                           tmp_path: Path) -> None:
    lay, _ = image
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        proc = subprocess.Popen([*CLI, "convert-image", str(lay.root), str(tmp_path / "out")],
                                stdout=subprocess.PIPE, stderr=slave, env=env())
        os.close(slave)
        slave = -1
        shown = read_all(master, proc)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, shown
    assert "\x1b[" in shown and "total 100%" in shown and "[####################]" in shown
    assert "converted" in shown and "Traceback" not in shown


def read_all(fd: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return b"".join(chunks).decode(errors="replace")


def slow_image(root: Path, bad_second: bool = False) -> tuple[Layout, list[LayerBlob]]:
    """Two layers of 60000 files each (seconds to convert); the second one small with a wrong
    diff_id when ``bad_second``."""
    lay = Layout(root)
    first = lay.layer(many_files_tar(60000, 64), None)
    if bad_second:
        second = lay.layer([file("x", "y")])
        lay.write_index([lay.image([first, second], diff_ids=[first.diff_id, sha256(b"no")])])
    else:
        second = lay.layer(many_files_tar(60000, 65), None)
        lay.write_index([lay.image([first, second])])
    return lay, [first, second]


@contextlib.contextmanager
def started(*args: str) -> Iterator[subprocess.Popen[str]]:
    """convert-image in a process group of its own (a terminal's Ctrl-C reaches a group)."""
    proc = subprocess.Popen([*CLI, "convert-image", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_until(lambda: not group_members(proc.pid), what="the workers to exit")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def wait_for_lines(proc: subprocess.Popen[str], needle: str, count: int) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    while sum(needle in line for line in lines) < count:
        line = proc.stderr.readline()
        assert line, f"convert-image ended first: {lines}"
        lines.append(line)
    return lines


def test_ctrl_c_cancels_every_worker_and_leaves_nothing(tmp_path: Path) -> None:
    lay, blobs = slow_image(tmp_path / "slow")
    out = tmp_path / "out"
    with started(str(lay.root), str(out), "-j", "2") as proc:
        wait_for_lines(proc, ": converting", 2)
        time.sleep(0.5)  # well inside both conversions
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.splitlines()[-1] == ("erofs-fuse: convert-image: interrupted (SIGINT); no "
                                    "partial layer is left"), err
    assert "Traceback" not in err and os.listdir(out) == []


def test_sigterm_cancels_too(tmp_path: Path) -> None:
    lay, _ = slow_image(tmp_path / "slow")
    out = tmp_path / "out"
    with started(str(lay.root), str(out), "-j", "2") as proc:
        wait_for_lines(proc, ": converting", 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and os.listdir(out) == []


def test_a_failing_layer_cancels_the_others(tmp_path: Path) -> None:
    lay, blobs = slow_image(tmp_path / "slow", bad_second=True)
    out = tmp_path / "out"
    with started(str(lay.root), str(out), "-j", "2", "-q") as proc:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    line = one_line_error(subprocess.CompletedProcess([], 2, "", err))
    assert "layer 2/2" in line and "diff_id mismatch" in line
    assert os.listdir(out) == []  # the first layer was cancelled, not finished


def test_objects_one_store_for_every_layer(image: tuple[Layout, list[LayerBlob]],
                                           tmp_path: Path) -> None:
    """``--objects``: metadata-only layer files sharing one store; kernel overlayfs with the
    store as a data-only layer shows what the full layers show."""
    lay, _ = image
    full = converted(str(lay.root), str(tmp_path / "full"))
    store = tmp_path / "objects"
    meta = converted(str(lay.root), str(tmp_path / "meta"), "--objects", str(store))
    views = []
    for listed, data_layer in ((full, ""), (meta, "::" + str(store))):
        paths = [str(listed.parent / x["path"]) for x in layers_doc(listed)["layers"]]
        with kernel_erofs_stack(paths) as mounts:
            mnt = tmp_path / f"merged{len(views)}"
            mnt.mkdir()
            spec = ":".join(reversed(mounts)) + data_layer
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"ro,metacopy=on,redirect_dir=on,lowerdir={spec}", str(mnt)],
                           check=True)
            try:
                views.append(view_of_dir(str(mnt)))
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
    assert views[0].diff(views[1]) == []
    assert any(store.rglob("*"))
