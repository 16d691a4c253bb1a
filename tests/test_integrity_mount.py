"""Integrity through a real mount: sealed layers, trusted roots on the command line, tampering.

The library-level tamper tests (every kind of block, exactly the affected reads) are in
test_verity.py; these check what a user of the mount sees: EIO for reads that touch a tampered
block, correct bytes elsewhere, a daemon that keeps serving, and refusals at mount time.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from erofs_fuse.erofs.extent import Source
from erofs_fuse.erofs.image import Image
from helpers import EXPECTED, corpus, flip
from mounting import MOUNT_CMD, env, fuse_mount, wait_until
from treeview import parse_manifest, view_of_dir

LOWER_LZ4 = "layer-lower-aufs-lz4.erofs"
SEAL_CMD = [*MOUNT_CMD[:2], "import sys; from erofs_fuse.cli import main; "
            "sys.exit(main(['seal', *sys.argv[1:]]))"]
LOWER = "layer-lower-aufs.erofs"
UPPER = "layer-upper-aufs.erofs"


def seal(tmp: Path, names: list[str]) -> tuple[list[str], str]:
    """Copies of the fixture layers, sealed; returns their paths and a roots file."""
    paths = []
    for name in names:
        dst = tmp / name
        shutil.copyfile(corpus(name), dst)
        paths.append(str(dst))
    proc = subprocess.run([*SEAL_CMD, *paths],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stderr
    roots = tmp / "roots"
    roots.write_text(proc.stdout)
    for path in paths:
        digest = subprocess.run(["fsverity", "digest", path], capture_output=True, text=True,
                                check=True).stdout.strip()
        assert digest in proc.stdout.splitlines()  # seal prints what fsverity prints
    return paths, str(roots)


def verity_args(roots: str) -> list[str]:
    return ["--verity-roots", roots, "--require-verity"]


def read_errno(path: str) -> int:
    """0 if the whole file reads, else the errno of the failure."""
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        return 0
    except OSError as exc:
        return exc.errno or -1


def stat_errno(path: str) -> int:
    try:
        os.lstat(path)
        return 0
    except OSError as exc:
        return exc.errno or -1


def test_sealed_stack_mounts_and_equals_the_kernel_merge(tmp_path: Path) -> None:
    paths, roots = seal(tmp_path, [LOWER, UPPER])
    expected = parse_manifest(str(EXPECTED / "layers-lower+upper.manifest"))
    with fuse_mount(paths, *verity_args(roots)) as m:
        got = view_of_dir(m.mountpoint)
    assert expected.diff(got) == []


def test_require_verity_refuses_a_layer_without_a_root(tmp_path: Path) -> None:
    paths, roots = seal(tmp_path, [LOWER_LZ4])
    unsealed = tmp_path / UPPER
    shutil.copyfile(corpus(UPPER), unsealed)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([*MOUNT_CMD, "--layers", f"{paths[0]},{unsealed}", *verity_args(roots),
                           str(mnt)], capture_output=True, text=True, env=env())
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "verity is required" in proc.stderr


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_a_resized_layer_is_refused_at_mount(tmp_path: Path, change: str) -> None:
    paths, roots = seal(tmp_path, [LOWER_LZ4, UPPER])
    with open(paths[0], "r+b") as f:
        if change == "truncate":
            f.truncate(os.path.getsize(paths[0]) - 4096)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\0")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([*MOUNT_CMD, "--layers", ",".join(paths), *verity_args(roots), str(mnt)],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("erofs-fuse: ") and proc.stderr.count("\n") == 1


def _data_pos(image_path: str, path: str) -> int:
    """Where the first byte of a file's data is in the layer file (block or inline tail)."""
    with Image.open(image_path) as image:
        node = image.lookup(path)
        ext = image._mapper(node).map(0)
        assert ext.source in (Source.DEVICE, Source.META)
        return ext.pa


def _inode_pos(image_path: str, path: str) -> int:
    with Image.open(image_path) as image:
        return image.lookup(path).info.pos


def _xattr_pos(image_path: str, path: str) -> int:
    with Image.open(image_path) as image:
        info = image.lookup(path).info
        assert info.xattr_isize > 0
        return info.pos + info.isize + 12


def _dir_block_pos(image_path: str, path: str) -> int:
    with Image.open(image_path) as image:
        node = image.lookup(path)
        return image._mapper(node).map(node.size - 1).pa


def _blocks_needed(image_path: str, path: str) -> set[int]:
    """4 KiB blocks holding the inodes on the way to ``path`` (root included)."""
    with Image.open(image_path) as image:
        blocks = {image.root.info.pos // 4096}
        node = image.root
        for part in path.strip("/").split("/"):
            entry = node.lookup(part.encode())
            assert entry is not None
            node = image.inode(entry.nid)
            blocks.add(node.info.pos // 4096)
        return blocks


@pytest.fixture(scope="module")
def custom_layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A lower layer with enough entries that its metadata spans many blocks (plain and lz4hc),
    made with the machine's mkfs.erofs; the upper layer is the fixture."""
    base = tmp_path_factory.mktemp("layers")
    src = base / "src"
    (src / "a").mkdir(parents=True)
    (src / "d").mkdir()
    for i in range(300):
        (src / "a" / f"f{i:03d}").write_bytes(b"%03d " % i * 40)
        (src / "d" / f"entry-with-a-long-name-{i:03d}").write_bytes(b"d")
    os.setxattr(src / "a" / "f200", "user.x", b"value of x" * 5)
    (src / "big.bin").write_bytes(bytes(range(256)) * 1200)
    (src / "huge.bin").write_bytes(bytes(range(251)) * 6000)  # 1.5 MB: the tree gets 3+ leaves
    out = {}
    for key, opts in (("plain", []), ("lz4", ["-zlz4hc"])):
        img = str(base / f"lower-{key}.erofs")
        subprocess.run(["mkfs.erofs", "--quiet", "-T0", *opts, img, str(src)], check=True)
        out[key] = img
    return out


# kind -> (lower variant, which layer to tamper, where, paths that must fail, paths that must
# still read correctly)
Case = tuple[str, int, Callable[[str], int], list[str], list[str]]
CASES: dict[str, Case] = {
    "inode": ("plain", 0, lambda p: _inode_pos(p, "/a/f250") + 8, ["a/f250"],
              ["big.bin", "a/f000", "etc/hosts"]),
    "xattr": ("plain", 0, lambda p: _xattr_pos(p, "/a/f200"), ["a/f200"],
              ["big.bin", "a/f000", "etc/hosts"]),
    "inline tail": ("plain", 0, lambda p: _data_pos(p, "/a/f150"), ["a/f150"],
                    ["big.bin", "a/f000", "etc/hosts"]),
    "directory": ("plain", 0, lambda p: _dir_block_pos(p, "/d"), ["d/entry-with-a-long-name-299"],
                  ["big.bin", "a/f000", "etc/hosts"]),
    "plain data": ("plain", 0, lambda p: _data_pos(p, "/big.bin") + 5000, ["big.bin"],
                   ["a/f000", "a/f299", "etc/hosts"]),
    "compressed pcluster": ("lz4", 0, lambda p: _data_pos(p, "/big.bin") + 100, ["big.bin"],
                            ["a/f000", "etc/hosts"]),
}


def _getxattrs(path: str) -> int:
    try:
        for name in os.listxattr(path):
            os.getxattr(path, name)
        return 0
    except OSError as exc:
        return exc.errno or -1


@pytest.mark.parametrize("kind", list(CASES))
def test_tampered_block_gives_eio_and_the_rest_still_reads(
    tmp_path: Path, kind: str, custom_layers: dict[str, str]
) -> None:
    variant, victim, where, broken, intact = CASES[kind]
    lower = tmp_path / "lower.erofs"
    shutil.copyfile(custom_layers[variant], lower)
    paths, roots = seal(tmp_path, [UPPER])
    paths = [str(lower), paths[0]]
    roots_text = subprocess.run([*SEAL_CMD, str(lower)],
                                capture_output=True, text=True, env=env(), check=True).stdout
    Path(roots).write_text(Path(roots).read_text() + roots_text)
    offset = where(paths[victim])
    for rel in intact:  # the test is only meaningful if the intact paths avoid the block
        if not rel.startswith("etc/"):
            assert offset // 4096 not in _blocks_needed(paths[0], rel), (kind, rel)
    with fuse_mount(paths) as clean:  # the reference bytes, read before tampering
        want = {p: Path(clean.mountpoint, p).read_bytes() for p in intact}
    flip(paths[victim], offset, 0x01)
    with fuse_mount(paths, *verity_args(roots)) as m:
        for rel in broken:
            full = os.path.join(m.mountpoint, rel)
            results = (stat_errno(full), read_errno(full), _getxattrs(full))
            assert errno.EIO in results, (rel, results)
        for rel in intact:
            assert Path(m.mountpoint, rel).read_bytes() == want[rel], rel
        log = m.log_text()
        assert "hash mismatch" in log and "verification failure" in log
        assert os.path.basename(paths[victim]) in log


def test_tampered_superblock_is_refused_at_mount(tmp_path: Path) -> None:
    paths, roots = seal(tmp_path, [LOWER, UPPER])
    flip(paths[0], 1024 + 0x40, 0x01)  # the lower layer: more than one block, so a real tree
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([*MOUNT_CMD, "--layers", ",".join(paths), *verity_args(roots), str(mnt)],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "hash mismatch" in proc.stderr


def test_tampered_tree_nodes(tmp_path: Path, custom_layers: dict[str, str]) -> None:
    """A bad leaf fails exactly the data blocks below it; a bad top block refuses the mount."""
    lower = tmp_path / "lower.erofs"
    shutil.copyfile(custom_layers["plain"], lower)
    paths, roots = seal(tmp_path, [UPPER])
    paths = [str(lower), paths[0]]
    Path(roots).write_text(Path(roots).read_text() + subprocess.run(
        [*SEAL_CMD, str(lower)],
        capture_output=True, text=True, env=env(), check=True).stdout)
    blocks = os.path.getsize(lower) // 4096
    assert 256 < blocks <= 128 * 128  # two levels: the top block, then the leaves
    with Image.open(str(lower)) as image:
        huge = image.lookup("/huge.bin")
        inside = image._mapper(huge).map(0).pa // 4096 + 300  # a block of huge.bin's data
    leaf = inside // 128
    assert leaf >= 1
    for rel in ("a/f000", "etc/hosts"):
        if not rel.startswith("etc/"):
            assert all(b // 128 != leaf for b in _blocks_needed(str(lower), rel))
    with fuse_mount(paths) as clean:
        want = Path(clean.mountpoint, "a/f000").read_bytes()
    sidecar = str(lower) + ".verity"
    saved = Path(sidecar).read_bytes()
    flip(sidecar, 4096 + 4096 * (1 + leaf) + 40, 0x01)  # superblock, top block, then leaves
    with fuse_mount(paths, *verity_args(roots)) as m:
        assert read_errno(os.path.join(m.mountpoint, "huge.bin")) == errno.EIO
        assert Path(m.mountpoint, "a/f000").read_bytes() == want
        assert "Merkle tree block" in m.log_text()
    Path(sidecar).write_bytes(saved)
    flip(sidecar, 4096 + 40, 0x01)  # the top block: nothing below it can be trusted
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([*MOUNT_CMD, "--layers", ",".join(paths), *verity_args(roots),
                           str(mnt)], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def test_layer_changed_while_mounted_is_caught_on_the_next_read(tmp_path: Path) -> None:
    paths, roots = seal(tmp_path, [LOWER, UPPER])
    target = _data_pos(paths[0], "/usr/lib/big.bin") + 8192
    with fuse_mount(paths, *verity_args(roots)) as m:
        assert read_errno(os.path.join(m.mountpoint, "etc/hosts")) == 0
        flip(paths[0], target, 0x01)  # after mounting, before anything read big.bin
        assert read_errno(os.path.join(m.mountpoint, "usr/lib/big.bin")) == errno.EIO
        assert read_errno(os.path.join(m.mountpoint, "etc/app/new")) == 0
        assert "hash mismatch" in m.log_text()


HELPER_CMD = [*MOUNT_CMD[:2], "import sys; from erofs_fuse.cli import main; "
              "sys.exit(main(sys.argv[1:]))"]


def test_integrity_options_have_o_forms_for_fstab(tmp_path: Path) -> None:
    """mount(8) and fstab lines pass -o only: -o require_verity and the other integrity
    options, in `mount -o` and in the helper form `erofs-fuse SOURCE MOUNTPOINT -o ...`."""
    from erofs_fuse.cli.mount import parse_args
    from erofs_fuse.console import CliError

    paths, roots = seal(tmp_path, [LOWER_LZ4])
    unsealed = tmp_path / UPPER
    shutil.copyfile(corpus(UPPER), unsealed)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    both = f"{paths[0]},{unsealed}"
    for cmd in ([*MOUNT_CMD, "--layers", both, "-o", f"verity_roots={roots},require_verity",
                 str(mnt)],
                [*HELPER_CMD, both, str(mnt), "-o", f"noauto,verity_roots={roots},require_verity"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "verity is required" in proc.stderr
    # the sealed layer alone, trusted through -o verity_roots=: mounted and verified
    proc = subprocess.run([*HELPER_CMD, paths[0], str(mnt), "-o",
                           f"verity_roots={roots},require_verity,require_object_verity"],
                          capture_output=True, text=True, env=env())
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.listdir(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    cfg = parse_args(["--layers", paths[0], "-o", f"require_object_verity,verity={paths[0]}="
                      + open(roots).read().split()[0], "-o", "trust_dmverity_sidecar",
                      str(mnt)])
    assert cfg.require_object_verity and cfg.trust and not cfg.require_verity
    assert not any("verity" in opt for opt in cfg.options)  # none is given to FUSE
    for bad, match in (("require_verity=1", "takes no value"),
                       ("verity_roots", "expected -o verity_roots=FILE"),
                       ("dm_verity=", "expected -o dm_verity=LAYER=ROOT:BLOCKS")):
        with pytest.raises(CliError, match=match):
            parse_args(["--layers", paths[0], "-o", bad, str(mnt)])


def test_a_mount_loads_its_layers_hash_trees_ahead(tmp_path: Path,
                                                   custom_layers: dict[str, str]) -> None:
    """Once it answers, the daemon reads and verifies each layer's whole tree in the background
    (VerifiedBlob.load_tree): then no read waits for a tree block (a container's first command,
    cold: 21% sooner). A one-block tree has nothing below its top, which is read at open."""
    lower = tmp_path / "lower.erofs"
    shutil.copyfile(custom_layers["plain"], lower)
    paths, roots = seal(tmp_path, [UPPER])
    paths = [str(lower), paths[0]]
    Path(roots).write_text(Path(roots).read_text() + subprocess.run(
        [*SEAL_CMD, str(lower)], capture_output=True, text=True, env=env(), check=True).stdout)
    with fuse_mount(paths, *verity_args(roots), "--debug") as m:
        os.listdir(m.mountpoint)
        wait_until(lambda: f"{lower}: hash tree loaded" in m.log_text(), what="the tree loaded")
        assert f"{paths[1]}: hash tree left lazy" in m.log_text()
