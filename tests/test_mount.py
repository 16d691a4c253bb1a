"""Real mounts through /dev/fuse, compared with the kernel: each fixture image against the kernel's
erofs, layer stacks against kernel overlayfs over kernel erofs mounts (fixtures and random
stacks made with mkfs.erofs), and the mount lifecycle (background, signals, umount, errors).

Every mount is made in a subprocess and unmounted in a ``finally`` (tests/mounting.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pyfuse3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse.operations import AFTER_REPLY, STATELESS_OPEN
from helpers import CORPUS, EXPECTED, corpus, kernel_erofs, mkfs_erofs
from mounting import (
    MOUNT_CMD,
    UMOUNT_CMD,
    FuseMount,
    daemon_pids,
    env,
    force_unmount,
    fuse_mount,
    is_mounted,
    kernel_erofs_stack,
    kernel_overlay,
    require_fuse,
    wait_until,
)
from treeview import TreeView, parse_manifest, view_of_dir, view_of_image

ALL_IMAGES = sorted(p.name for p in CORPUS.glob("*.erofs") if p.name != "blobdev.erofs")
LOWERS = ["aufs", "oci", "aufs-lz4", "tarindex"]
UPPERS = ["aufs", "oci", "aufs-lz4"]
T0 = {"layer-lower-aufs", "layer-lower-oci", "layer-upper-aufs", "layer-upper-oci"}


# Kernel overlayfs quirk: in a directory that is not merged (one layer only), readdir lists a
# whiteout (``ls`` shows ``c?????????``) while lookup of it fails with ENOENT. erofs-fuse hides
# it in both. The kernel's views below therefore skip listed names that do not exist.
def kernel_view(root: str) -> TreeView:
    real_listdir = os.listdir

    def listdir(path: str) -> list[str]:
        return [n for n in real_listdir(path) if os.path.lexists(os.path.join(path, n))]

    with mock.patch.object(os, "listdir", listdir):
        return view_of_dir(root)


# views beyond treeview: what overlayfs decides about nlink, sizes, times and inode identity
def stat_view(root: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            full = os.path.normpath(os.path.join(dirpath, name))
            if not os.path.lexists(full):
                continue  # the kernel quirk above
            st_ = os.lstat(full)
            rel = os.path.relpath(full, root)
            out[rel] = (st_.st_mode, st_.st_nlink, st_.st_size, st_.st_blocks, st_.st_mtime_ns)
    return out


def identity_groups(root: str) -> set[frozenset[str]]:
    """Paths that are one inode (same st_dev and st_ino), every type included."""
    groups: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            if not os.path.lexists(full):
                continue  # the kernel quirk above
            st_ = os.lstat(full)
            groups.setdefault((st_.st_dev, st_.st_ino), set()).add(os.path.relpath(full, root))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def without_mtime(view: TreeView) -> TreeView:
    entries = {p: "\t".join(c for c in line.split("\t") if not c.startswith("mtime="))
               for p, line in view.entries.items()}
    return TreeView(entries, view.hardlinks)


def overlay_artefacts(view: TreeView) -> set[str]:
    """Paths an overlay never shows: whiteouts (char 0:0) and ``.wh.*`` names."""
    hidden = set()
    for path, line in view.entries.items():
        cols = line.split("\t")
        if os.path.basename(path).startswith(".wh.") or (
                stat.S_ISCHR(int(cols[1], 8)) and "rdev=0:0" in cols):
            hidden.add(path)
    return hidden


def as_overlay_shows(view: TreeView) -> TreeView:
    """A single layer's kernel erofs view as an overlay of it shows it: no whiteouts, no
    ``.wh.*`` names, no ``trusted.overlay.*``/``user.overlay.*`` xattrs."""
    hidden = overlay_artefacts(view)
    entries = {}
    for path, line in view.entries.items():
        if path in hidden:
            continue
        cols = line.split("\t")
        kept = [x for x in cols[-1].split(",")
                if x and not x.startswith(("trusted.overlay.", "user.overlay."))]
        entries[path] = "\t".join([*cols[:-1], ",".join(kept)])
    return TreeView(entries, {g for g in view.hardlinks if not g & hidden})


def assert_same_tree(reference: str, fuse: FuseMount, *, single_layer: bool = False) -> None:
    """The erofs-fuse mount shows what the reference (kernel) mount shows."""
    try:
        got = view_of_dir(fuse.mountpoint)
    except OSError as exc:
        raise AssertionError(f"{exc}; daemon log:\n{fuse.log_text()}") from exc
    ref = kernel_view(reference)
    hidden: set[str] = set()
    if single_layer:
        hidden = overlay_artefacts(ref)
        ref = as_overlay_shows(ref)
    assert ref.diff(got) == []
    ref_stats = {p: s for p, s in stat_view(reference).items() if p not in hidden}
    assert ref_stats == stat_view(fuse.mountpoint)
    ref_groups = {g - hidden for g in identity_groups(reference)}
    assert {g for g in ref_groups if len(g) > 1} == identity_groups(fuse.mountpoint)


# each fixture image alone = the kernel's erofs ---------------------------------------------------
@pytest.mark.parametrize("name", ALL_IMAGES)
def test_single_image_equals_kernel_erofs(name: str) -> None:
    # a stack of one layer is still an overlay: the layer-* images' whiteouts, .wh. files and
    # overlay xattrs, which the kernel's plain erofs mount shows, are hidden (as_overlay_shows)
    with kernel_erofs(corpus(name)) as ref, fuse_mount([corpus(name)]) as fuse:
        assert_same_tree(ref, fuse, single_layer=True)


def test_blob_device_image_with_its_device() -> None:
    expected = view_of_image(Image.open(corpus("blobdev.erofs"),
                                        devices=[corpus("blobdev.blob")]))
    with fuse_mount([corpus("blobdev.erofs")], "--device", f"0:{corpus('blobdev.blob')}") as fuse:
        assert expected.diff(view_of_dir(fuse.mountpoint)) == []


def test_debian_blobdev_image_mounts_as_the_kernel_reads_it(tmp_path: Path) -> None:
    from test_image import debian_blobdev_image, kernel_erofs_with_device

    image, blob, _ = debian_blobdev_image(str(tmp_path))
    with kernel_erofs_with_device(image, blob) as ref, \
            fuse_mount([image], "--device", f"0:{blob}") as fuse:
        assert_same_tree(ref, fuse, single_layer=True)


# the fixture layer stacks = kernel overlayfs over the aufs layers = the manifest --------------
@pytest.fixture(scope="module")
def overlay_reference() -> Iterator[tuple[TreeView, dict[str, tuple[int, ...]],
                                          set[frozenset[str]]]]:
    images = [corpus("layer-lower-aufs.erofs"), corpus("layer-upper-aufs.erofs")]
    with kernel_erofs_stack(images) as (lower, upper), kernel_overlay([upper, lower]) as ovl:
        yield kernel_view(ovl), stat_view(ovl), identity_groups(ovl)


@pytest.mark.parametrize("lower", LOWERS)
@pytest.mark.parametrize("upper", UPPERS)
def test_layer_stack_equals_kernel_overlayfs(lower: str, upper: str,
                                             overlay_reference: Any) -> None:
    names = [f"layer-lower-{lower}", f"layer-upper-{upper}"]
    ref_view, ref_stats, ref_groups = overlay_reference
    manifest = parse_manifest(str(EXPECTED / "layers-lower+upper.manifest"))
    with_mtime = set(names) <= T0
    with fuse_mount([corpus(f"{n}.erofs") for n in names]) as fuse:
        got = view_of_dir(fuse.mountpoint, with_mtime=with_mtime)
        stats = stat_view(fuse.mountpoint)
        groups = identity_groups(fuse.mountpoint)
    if not with_mtime:
        ref_view, manifest = without_mtime(ref_view), without_mtime(manifest)
    assert manifest.diff(got) == []
    assert ref_view.diff(got) == []
    assert groups == ref_groups
    # modes and nlink (1 for merged directories) as overlayfs reports them; directory sizes
    # differ where a layer keeps OCI .wh. entries, blocks where block sizes differ
    assert {p: s[:2] for p, s in stats.items()} == {p: s[:2] for p, s in ref_stats.items()}


def test_layer_stack_exact_stats_against_the_kernel(overlay_reference: Any) -> None:
    _, ref_stats, _ = overlay_reference
    layers = [corpus("layer-lower-aufs.erofs"), corpus("layer-upper-aufs.erofs")]
    with fuse_mount(layers) as fuse:
        assert stat_view(fuse.mountpoint) == ref_stats  # blocks and directory mtimes too


# random stacks through the real mkfs.erofs, against kernel overlayfs ---------------------------
NAMES = ["a", "b", "c"]
_xattrs = st.dictionaries(st.sampled_from(["user.one", "user.two"]), st.binary(max_size=8),
                          max_size=2)
_content = st.one_of(st.binary(max_size=40),
                     st.builds(lambda n, b: b * n, st.integers(1, 3000), st.binary(min_size=1,
                                                                                     max_size=3)))
_mode = st.sampled_from([0o644, 0o600, 0o755])
_leaf = st.one_of(
    st.tuples(st.just("file"), _content, _xattrs, _mode),
    st.tuples(st.just("whiteout")),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../b", "/c/a"])),
    st.tuples(st.just("fifo")),
)
_opaque = st.sampled_from([False, False, False, True])


def _dir(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(st.just("dir"), st.dictionaries(st.sampled_from(NAMES), children,
                                                     max_size=3), _opaque, _xattrs)


_tree = st.recursive(_leaf, _dir, max_leaves=10)
_layer = st.tuples(_dir(_tree), st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)),
                                         max_size=2))
STACKS = st.lists(_layer, min_size=2, max_size=4)


def write_tree(path: Path, spec: Any) -> None:
    kind = spec[0]
    if kind == "dir":
        path.mkdir(exist_ok=True)
        _, children, opaque, xattrs = spec
        for name, child in children.items():
            write_tree(path / name, child)
        if opaque:
            os.setxattr(path, "trusted.overlay.opaque", b"y")
        for name, value in xattrs.items():
            os.setxattr(path, name, value)
    elif kind == "file":
        _, content, xattrs, mode = spec
        path.write_bytes(content)
        path.chmod(mode)
        for name, value in xattrs.items():
            os.setxattr(path, name, value)
    elif kind == "whiteout":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    elif kind == "symlink":
        os.symlink(spec[1], path)
    elif kind == "fifo":
        os.mkfifo(path)


def add_hardlinks(root: Path, pairs: list[tuple[int, int]]) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    for i, j in pairs:
        if len(files) < 2 or files[i % len(files)] == files[j % len(files)]:
            continue
        src, dst = files[i % len(files)], files[j % len(files)]
        dst.unlink()
        os.link(src, dst)


def all_paths(roots: list[Path]) -> set[str]:
    return {str(p.relative_to(r)) for r in roots for p in r.rglob("*")}


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(STACKS)
def test_random_stacks_equal_kernel_overlayfs(stack: list[Any]) -> None:
    require_fuse()
    with tempfile.TemporaryDirectory(prefix="erofs-stack-") as tmp:
        roots, images = [], []
        for k, (spec, links) in enumerate(stack):
            root = Path(tmp) / f"layer{k}"
            write_tree(root, spec)
            add_hardlinks(root, links)
            roots.append(root)
            images.append(f"{root}.erofs")
            mkfs_erofs(str(root), images[-1])
        with kernel_erofs_stack(images) as mounts, \
                kernel_overlay(list(reversed(mounts))) as ovl, fuse_mount(images) as fuse:
            assert_same_tree(ovl, fuse)
            for rel in sorted(all_paths(roots)):  # lookups of hidden and deleted names too
                assert os.path.lexists(os.path.join(ovl, rel)) == \
                    os.path.lexists(os.path.join(fuse.mountpoint, rel)), rel


# lifecycle ------------------------------------------------------------------------------------
def run_mount(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MOUNT_CMD, *args], capture_output=True, text=True, env=env(),
                          timeout=timeout)


def run_umount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UMOUNT_CMD, *args], capture_output=True, text=True, env=env(),
                          timeout=60)


@contextlib.contextmanager
def empty_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="erofs-fuse-mnt-")
    try:
        yield path
    finally:
        force_unmount(path)
        wait_until(lambda: not daemon_pids(path), what="the daemon to exit")
        os.rmdir(path)


def test_background_mount_returns_when_ready() -> None:
    require_fuse()
    with empty_dir() as mnt:
        proc = run_mount("--layers", corpus("plain.erofs"), mnt)
        assert proc.returncode == 0 and proc.stdout == proc.stderr == ""
        assert is_mounted(mnt)
        assert "big" in os.listdir(mnt)  # served at once: the daemon is past INIT
        assert len(daemon_pids(mnt)) == 1
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == mnt)
        assert "fuse.erofs-fuse" in line and " ro," in line and "nosuid" in line
        assert run_umount(mnt).returncode == 0
        assert not is_mounted(mnt)


def test_mount_start_up_imports_no_trio_lazy_registry_or_writer_code() -> None:
    # the modules a mount imports before it is ready are its start-up: checking --layers for
    # lazy: names once imported the whole lazy package, and with it the registry client, httpx
    # and the writer (0.38 s of every mount's 0.5-0.8 s with a cold page cache); trio (40 ms)
    # loads in the daemon once the mount is made (pyfuse3 patch 04 and fuse/daemon.py)
    require_fuse()
    with empty_dir() as mnt:
        proc = subprocess.run([sys.executable, "-X", "importtime", *MOUNT_CMD[1:], "--layers",
                               corpus("plain.erofs"), mnt],
                              capture_output=True, text=True, env=env(), timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert is_mounted(mnt)
        imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "erofs_fuse.fuse.daemon" in imported and "erofs_fuse.lazy.source" in imported
        unwanted = {name for name in imported
                    if name.split(".")[0] in ("httpx", "trio")
                    or name.startswith(("erofs_fuse.registry", "erofs_fuse.mkfs",
                                        "erofs_fuse.lazy.layer", "erofs_fuse.lazy.remote",
                                        "erofs_fuse.verity", "erofs_fuse.oci.image"))}
        assert not unwanted, sorted(unwanted)
        # scripts/install-deps installs the checkout editable in compat mode (a path in a .pth):
        # setuptools' default import hook would run at every start (14 ms of pathlib & co)
        hooks = sorted(name for name in imported if name.startswith("__editable__"))
        assert not hooks, hooks
        assert "big" in os.listdir(mnt)  # served once the daemon has loaded trio
        assert run_umount(mnt).returncode == 0


def test_unmount_before_the_daemon_has_served_anything() -> None:
    # the command returns once the mount is made, before the daemon has loaded trio and
    # answered INIT: an unmount right then must still end the mount and the daemon
    require_fuse()
    with empty_dir() as mnt:
        for _ in range(3):
            assert run_mount("--layers", corpus("plain.erofs"), mnt).returncode == 0
            assert run_umount(mnt).returncode == 0
            assert not is_mounted(mnt)
            wait_until(lambda: not daemon_pids(mnt), what="the daemon to exit")


def test_sigterm_unmounts_cleanly() -> None:
    require_fuse()
    with empty_dir() as mnt:
        log = mnt + ".log"
        try:
            assert run_mount("--layers", corpus("plain.erofs"), "--log", log, mnt).returncode == 0
            (pid,) = daemon_pids(mnt)
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not is_mounted(mnt), what="the unmount")
            wait_until(lambda: not daemon_pids(mnt), what="the daemon to exit")
            text = Path(log).read_text()
            assert "SIGTERM: unmounting" in text and f"unmounted {mnt}" in text
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log)


def test_foreground_mount_and_sigint() -> None:
    require_fuse()
    with empty_dir() as mnt:
        proc = subprocess.Popen([*MOUNT_CMD, "-f", "--layers", corpus("plain.erofs"), mnt],
                                stderr=subprocess.PIPE, text=True, env=env())
        try:
            wait_until(lambda: is_mounted(mnt), what="the mount")
            assert "big" in os.listdir(mnt)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
            assert not is_mounted(mnt)
            assert proc.stderr is not None and "mounted" in proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()


def test_umount_clears_a_mount_whose_daemon_died() -> None:
    require_fuse()
    with empty_dir() as mnt:
        assert run_mount("--layers", corpus("plain.erofs"), mnt).returncode == 0
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not daemon_pids(mnt), what="the daemon to die")
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        proc = run_umount(mnt)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)


def test_umount_refuses_a_busy_mount() -> None:
    with fuse_mount([corpus("plain.erofs")]) as fm:
        fd = os.open(os.path.join(fm.mountpoint, "big"), os.O_RDONLY)
        try:
            proc = run_umount(fm.mountpoint)
            assert proc.returncode == 1 and is_mounted(fm.mountpoint)
            assert proc.stderr.startswith("erofs-fuse: ") and proc.stderr.count("\n") == 1
            assert "busy" in proc.stderr
        finally:
            os.close(fd)
        assert run_umount(fm.mountpoint).returncode == 0


def test_umount_of_something_not_mounted() -> None:
    with empty_dir() as mnt:
        proc = run_umount(mnt)
        assert proc.returncode == 1
        assert proc.stderr == f"erofs-fuse: {mnt}: not a FUSE mount\n"


def test_options_reach_the_mount() -> None:
    with fuse_mount([corpus("plain.erofs")], "-o", "allow_other", "--fsname", "my-stack") as fm:
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == fm.mountpoint)
        assert "allow_other" in line and " my-stack " in line


def requests_in(log: str) -> list[str]:
    """The names of the requests a --debug daemon logged, in order."""
    return [m.group(1) for m in re.finditer(r" DEBUG ([a-z]+)\(", log)]


def test_files_and_directories_are_served_without_opens() -> None:
    # pyfuse3 must carry third_party/pyfuse3's patches; without them every file read costs two
    # more requests (open, release), each at 4x the CPU. scripts/install-deps builds them: a
    # missing patch fails here.
    assert STATELESS_OPEN, "pyfuse3 lacks the stateless-open patch: run scripts/install-deps"
    assert hasattr(pyfuse3, "INLINE_BATCH"), "pyfuse3 lacks the inline-poll patch"
    assert AFTER_REPLY, "pyfuse3 lacks the after-reply patch"
    paths = ("big/dup-b.txt", "sizes/text-65543", "sizes/text-4097")
    with Image.open(corpus("plain.erofs")) as image:
        want = {p: image.lookup(p).read(0, image.lookup(p).size) for p in paths}
        names = {d: sorted(e.name.decode() for e in image.lookup(d).readdir()
                           if e.name not in (b".", b".."))
                 for d in ("big", "sizes")}
    with fuse_mount([corpus("plain.erofs")], "--debug") as fuse:
        passes = []
        for _ in range(2):
            for path, data in want.items():
                assert Path(fuse.mountpoint, path).read_bytes() == data
            for d, listing in names.items():
                assert sorted(os.listdir(Path(fuse.mountpoint, d))) == listing
            assert os.readlink(Path(fuse.mountpoint, "links/short")) == "../sizes/text-1"
            passes.append(requests_in(fuse.log_text()))
    first, both = passes
    # the first open and opendir answer ENOSYS, and the kernel sends none after them
    assert both.count("open") == 1 and both.count("opendir") == 1, both
    assert "release" not in both and "releasedir" not in both, both
    # the second pass is served from the kernel's caches: pages, listings (FOPEN_CACHE_DIR)
    # and symlink targets
    assert both == first


def resident_bytes(path: str, offset: int, length: int) -> int:
    """How many bytes of ``path``'s ``[offset, offset + length)`` are in the page cache
    (mincore(2) over a mapping of the file; page-aligned ``offset`` and ``length``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = length // mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), offset)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec) * mmap.PAGESIZE
        finally:
            libc.munmap(addr, length)


def test_a_lookup_starts_the_read_of_the_files_first_bytes(tmp_path: Path) -> None:
    # the read-ahead hint of a lookup is given after its reply (pyfuse3's loop calls
    # Operations.after_reply, third_party/pyfuse3/06-after-reply.patch): looking a file up,
    # without reading it, brings its first bytes into the layer file's page cache
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(2 << 20))
    layer = str(tmp_path / "l.erofs")
    mkfs_erofs(str(src), layer)
    with Image.open(layer) as image:
        start = image.lookup("f").info.startblk * image.superblock.block_size
    # past the window read around the metadata blocks, within the hint's first MiB
    window = (start + (512 << 10), 256 << 10)
    with fuse_mount([layer]) as fm:
        with open(layer, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert resident_bytes(layer, *window) == 0
        os.stat(Path(fm.mountpoint, "f"))
        wait_until(lambda: resident_bytes(layer, *window) == window[1], 10,
                   "the hinted bytes in the page cache")


def test_corrupt_layer_gives_eio_and_the_mount_keeps_serving(tmp_path: Path) -> None:
    bad = tmp_path / "trunc.erofs"
    bad.write_bytes(Path(corpus("plain.erofs")).read_bytes()[:190 * 4096])
    with fuse_mount([str(bad)]) as fuse:
        with pytest.raises(OSError) as exc:
            Path(fuse.mountpoint, "sizes/text-65543").read_bytes()
        assert exc.value.errno == errno.EIO
        assert len(Path(fuse.mountpoint, "big/dup-b.txt").read_bytes()) == 30000
        errors = [ln for ln in fuse.log_text().splitlines() if " ERROR " in ln]
        assert errors and all(str(bad) in ln and "inode 20522" in ln for ln in errors)


def _bad_layer(tmp_path: Path) -> Path:
    """plain.erofs cut short: /sizes/text-65543 lies past the end (EIO and one log line)."""
    bad = tmp_path / f"trunc-{os.getpid()}-{time.monotonic_ns()}.erofs"
    bad.write_bytes(Path(corpus("plain.erofs")).read_bytes()[:190 * 4096])
    return bad


def _read_fails_with_eio(mnt: str) -> None:
    with pytest.raises(OSError) as exc:
        Path(mnt, "sizes/text-65543").read_bytes()
    assert exc.value.errno == errno.EIO


def test_without_syslog_the_daemon_logs_to_a_file_under_run(tmp_path: Path) -> None:
    # issue #15: with no /dev/log (containers) every log line was dropped
    from erofs_fuse.fuse.daemon import default_log_file

    bad = _bad_layer(tmp_path)
    with empty_dir() as mnt:
        proc = subprocess.run([*MOUNT_CMD, "--layers", str(bad), mnt], capture_output=True,
                              text=True, env={**env(), "EROFS_FUSE_SYSLOG": ""}, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        _read_fails_with_eio(mnt)
        assert run_umount(mnt).returncode == 0
    log = default_log_file()
    assert log == "/run/erofs-fuse/erofs-fuse.log"  # root's
    lines = [ln for ln in Path(log).read_text().splitlines() if str(bad) in ln]
    assert any(" ERROR " in ln and "inode 20522" in ln for ln in lines), lines


def test_log_mount_option_names_the_log_file(tmp_path: Path) -> None:
    bad, log = _bad_layer(tmp_path), tmp_path / "daemon.log"
    with empty_dir() as mnt:
        proc = run_mount("--layers", str(bad), "-o", f"noatime,log={log}", mnt)
        assert proc.returncode == 0, proc.stderr
        assert "log=" not in next(ln for ln in open("/proc/self/mountinfo") if mnt in ln)
        _read_fails_with_eio(mnt)
        assert run_umount(mnt).returncode == 0
    errors = [ln for ln in log.read_text().splitlines() if " ERROR " in ln]
    assert errors and all(str(bad) in ln for ln in errors)
    with empty_dir() as mnt:
        proc = run_mount("--layers", str(bad), "-o", "log=", mnt)
        assert proc.returncode == 2 and "expected -o log=FILE" in proc.stderr


def test_unknown_option_is_one_line_exit_2_and_nothing_mounted() -> None:
    # issue #15: libfuse's complaint came on a second line and the exit status was 1
    with empty_dir() as mnt:
        for args in (["-o", "bogus_option"], ["-f", "-o", "bogus_option"]):
            proc = run_mount("--layers", corpus("plain.erofs"), *args, mnt)
            assert proc.returncode == 2, (args, proc.stderr)
            assert proc.stderr.count("\n") == 1 and "unknown option" in proc.stderr, proc.stderr
            assert proc.stderr.startswith("erofs-fuse: ") and not is_mounted(mnt)


def test_mount_through_the_cli_dispatcher() -> None:
    require_fuse()
    with empty_dir() as mnt:
        proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "mount", "--layers",
                               corpus("plain.erofs"), mnt], capture_output=True, text=True,
                              env=env(), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "big" in os.listdir(mnt)
        proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "umount", mnt],
                              capture_output=True, text=True, env=env(), timeout=60)
        assert proc.returncode == 0 and not is_mounted(mnt)


@pytest.fixture
def not_erofs(tmp_path: Path) -> str:
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(8192))
    return str(path)


def error_cases(not_erofs: str, mnt: str, tmp: Path) -> list[tuple[list[str], str]]:
    full = tmp / "full"
    full.mkdir()
    (full / "x").write_text("x")
    plain = corpus("plain.erofs")
    return [
        (["--layers", str(tmp / "missing.erofs"), mnt], "No such file or directory"),
        (["--layers", f"{plain},{not_erofs}", mnt], "(layer 1)"),
        (["--layers", str(tmp), mnt], "is a directory"),
        (["--layers", plain, str(full)], "mountpoint is not empty"),
        (["--layers", plain, str(tmp / "nowhere")], "No such file or directory"),
        (["--layers", plain, plain], "mountpoint is not a directory"),
        (["--layers", plain, "--device", "3:/x", mnt], "there are only 1 layers"),
        (["--layers", plain, "--device", "nonsense", mnt], "expected LAYER_INDEX:PATH"),
        (["--layers", corpus("blobdev.erofs"), mnt], "give its file as a device"),
        (["--layers", plain, "-o", "rw", mnt], "read-only"),
        ([mnt], "required: --layers"),
    ]


def test_errors_before_mounting_are_one_line_and_exit_2(not_erofs: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from erofs_fuse.cli.mount import main

    with empty_dir() as mnt:
        for argv, fragment in error_cases(not_erofs, mnt, tmp_path):
            assert main(argv) == 2, argv
            out, err = capsys.readouterr()
            assert out == "" and err.startswith("erofs-fuse: ") and err.count("\n") == 1, err
            assert fragment in err, (argv, err)
            assert not is_mounted(mnt)


def test_error_in_a_real_process_has_no_traceback(not_erofs: str) -> None:
    with empty_dir() as mnt:
        start = time.monotonic()
        proc = run_mount("--layers", not_erofs, mnt)
        assert proc.returncode == 2 and time.monotonic() - start < 30
        assert proc.stderr.startswith("erofs-fuse: ") and proc.stderr.count("\n") == 1
        assert "Traceback" not in proc.stderr
