"""``mount -o noxattr`` and the snapshotter's xattr-free chains (issue 21).

A mount that answers getxattr ENOSYS makes the kernel stop sending GETXATTR on that connection
(``fs/fuse/xattr.c``: ``no_getxattr``); every later getxattr fails with EOPNOTSUPP without a
request, which kernel overlayfs takes as "no such xattr". The writer counts the inodes that show
an xattr in a merged tree; the snapshotter records, per layer, that the count was 0 (Commit,
and the label of our image import/pull), and mounts a chain of such layers ``-o noxattr``. A
chain with one layer showing an xattr is mounted as before, and its container sees the xattr
as kernel overlayfs over the extracted layers shows it. A database of an older version gets the
new column, its rows "not known to be free".

Real components only: the kernel's FUSE and overlayfs, its request tracepoint, containerd with
our snapshotter (``ctrstack.py``), ``ctr run``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from ctrstack import SNAPSHOTTER, Stack, containerd_stack
from devtools.bench.requests import RequestTrace, kernel_dev
from erofs_fuse.mkfs import ConvertOptions, convert_tar
from erofs_fuse.snapshotter.store import Kind, Store
from mounting import env, force_unmount, fuse_mount
from ocilayout import (Entry, Layout, archive, busybox_entries, directory, file, opaque, ref,
                       tar_bytes, whiteout)
from rootfs import CAP_NET_BIND, assert_rootfs_is_kernel_overlay


def plain_entries(prefix: str) -> list[Entry]:
    """A few directories of files, none with an xattr."""
    out: list[Entry] = []
    for d in range(4):
        out.append(directory(f"{prefix}{d}"))
        out += [file(f"{prefix}{d}/f{k}", f"{prefix} {d} {k}\n") for k in range(5)]
    return out


def base_entries(prefix: str) -> list[Entry]:
    """A container's bottom layer: busybox, /run (else runc makes it in the upper), files."""
    return busybox_entries() + [directory("run")] + plain_entries(prefix)


def convert(tmp: Path, name: str, entries: list[Entry], **opts: object) -> tuple[str, int]:
    """The layer ``name``.erofs of these entries and its count of inodes showing xattrs."""
    out = str(tmp / f"{name}.erofs")
    options = ConvertOptions(**opts)  # type: ignore[arg-type]
    result = convert_tar(io.BytesIO(tar_bytes(entries)), out, options)
    return out, result.shown_xattr_inodes


# the writer ------------------------------------------------------------------------------------
def test_writer_counts_inodes_showing_xattrs(tmp_path: Path) -> None:
    base = plain_entries("d")
    assert convert(tmp_path, "plain", base)[1] == 0
    # whiteouts and opaque directories become overlayfs's own xattrs: hidden, so none shows
    hidden = [directory("opq"), opaque("opq"), file("opq/x", "x\n"), whiteout("gone"),
              directory("w"), whiteout("w/y")]
    assert convert(tmp_path, "hidden", base + hidden)[1] == 0
    # an object store's metacopy and redirect xattrs are overlayfs's own too
    store = tmp_path / "objects"
    big = [file("big", b"x" * 10000)]
    assert convert(tmp_path, "objects", base + big, objects=str(store))[1] == 0
    assert convert(tmp_path, "user", base + [file("u", "u\n", foo="1")])[1] == 1
    cap = [file("c", "c\n", raw_xattrs={"security.capability": CAP_NET_BIND}),
           file("c2", "c\n", raw_xattrs={"security.capability": CAP_NET_BIND})]
    assert convert(tmp_path, "cap", base + cap)[1] == 2
    # an escaped xattr of a nested overlay shows, unescaped (trusted.overlay.x)
    escaped = [file("e", "e\n", raw_xattrs={"trusted.overlay.overlay.x": b"1"})]
    assert convert(tmp_path, "escaped", base + escaped)[1] == 1
    # erofs-fuse convert -v says so
    tar = tmp_path / "user.tar"
    tar.write_bytes(tar_bytes(base + [file("u", "u\n", foo="1")]))
    proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "convert", "-v", str(tar),
                           str(tmp_path / "cli.erofs")], capture_output=True, text=True,
                          env=env())
    assert proc.returncode == 0 and " inodes (1 showing xattrs), " in proc.stderr, proc.stderr


# a direct mount --------------------------------------------------------------------------------
@contextlib.contextmanager
def container_overlay(lower: str, tmp: Path) -> Iterator[str]:
    """Kernel overlayfs as the snapshotter hands it to a container: upper, work, one lower."""
    dirs = {name: tmp / name for name in ("upper", "work", "ovl")}
    for d in dirs.values():
        d.mkdir(parents=True)
    opts = f"lowerdir={lower},upperdir={dirs['upper']},workdir={dirs['work']}"
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["ovl"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"overlay mount failed: {proc.stderr}"
    try:
        yield str(dirs["ovl"])
    finally:
        force_unmount(str(dirs["ovl"]))


def walk_counts(layers: list[str], tmp: Path, *args: str) -> tuple[dict[str, int], int]:
    """FUSE requests of a walk (every entry lstat'ed) of the container's overlay over a mount
    of ``layers``, and how many entries it saw."""
    with fuse_mount(layers, *args) as m, container_overlay(m.mountpoint, tmp) as ovl:
        trace = RequestTrace(kernel_dev(m.mountpoint))
        trace.start()
        seen = 0
        try:
            for dirpath, dirnames, filenames in os.walk(ovl):
                for name in dirnames + filenames:
                    os.lstat(os.path.join(dirpath, name))
                    seen += 1
        finally:
            counts = trace.stop()
    return dict(counts), seen


def errno_of_getxattr(path: str, name: str) -> int:
    try:
        os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_noxattr_mount_shows_none_and_the_kernel_stops_asking(tmp_path: Path) -> None:
    layers = [convert(tmp_path, "l0", plain_entries("a"))[0],
              convert(tmp_path, "l1", plain_entries("b"))[0]]
    with fuse_mount(layers) as plain:
        assert errno_of_getxattr(plain.mountpoint + "/a0/f0", "user.foo") == errno.ENODATA
    with fuse_mount(layers, "-o", "noxattr") as m:
        f = m.mountpoint + "/a0/f0"
        for name in ("user.foo", "security.capability", "trusted.overlay.metacopy"):
            assert errno_of_getxattr(f, name) == errno.EOPNOTSUPP, name
        # ACLs go through the kernel's ACL code (fs/fuse/acl.c), which takes no_getxattr as
        # "no ACL": ENODATA, as without the option
        assert errno_of_getxattr(f, "system.posix_acl_access") == errno.ENODATA
        assert os.listxattr(f) == [] and os.listxattr(m.mountpoint) == []
        assert os.access(f, os.R_OK) and open(f).read() == "a 0 0\n"  # no ACL: plain modes
    before, entries = walk_counts(layers, tmp_path / "before")
    after, again = walk_counts(layers, tmp_path / "after", "--no-xattr")
    assert entries == again == 2 * 4 * 6
    # overlayfs asks every lower file (metacopy) and directory (origin): one request each...
    assert before.get("GETXATTR", 0) >= 2 * 4 * 5, before
    # ... but once answered ENOSYS, the kernel sends none again
    assert after.get("GETXATTR", 0) <= 1, after
    assert after.get("READDIRPLUS", 0) == before.get("READDIRPLUS", 0), (before, after)


def test_container_overlay_over_noxattr(tmp_path: Path) -> None:
    """What a container sees: no xattr on lower files, a named probe fails EOPNOTSUPP (not
    ENODATA), and setting one copies the file up and works."""
    layers = [convert(tmp_path, "l0", plain_entries("a"))[0]]
    with fuse_mount(layers, "-o", "noxattr") as m, container_overlay(m.mountpoint, tmp_path) as ovl:
        f = ovl + "/a1/f2"
        assert os.listxattr(f) == []
        assert errno_of_getxattr(f, "user.foo") == errno.EOPNOTSUPP
        os.setxattr(f, "user.new", b"v")
        assert os.getxattr(f, "user.new") == b"v" and os.listxattr(f) == ["user.new"]
        assert open(f).read() == "a 1 2\n"
        assert (tmp_path / "upper" / "a1" / "f2").exists()  # copied up


def test_noxattr_option_forms(tmp_path: Path) -> None:
    layer = convert(tmp_path, "l0", plain_entries("a"))[0]
    proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "mount", "--layers", layer,
                           "-o", "noxattr=1", str(tmp_path)], capture_output=True, text=True,
                          env=env())
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "erofs-fuse: mount: -o noxattr=1: noxattr takes no value"], proc.stderr
    # with other options in one -o list, and not handed to FUSE (which would refuse it)
    with fuse_mount([layer], "-o", "allow_other,noxattr") as m:
        assert errno_of_getxattr(m.mountpoint, "user.foo") == errno.EOPNOTSUPP
        opts = next(line.split()[3] for line in open("/proc/mounts")
                    if line.split()[1] == m.mountpoint)
        assert "noxattr" not in opts and "allow_other" in opts


# the store -------------------------------------------------------------------------------------
OLD_SCHEMA = """
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    layer TEXT,
    digest TEXT
);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
"""
DIGEST = "sha256:" + "ab" * 32


def test_old_database_migrates(tmp_path: Path) -> None:
    path = str(tmp_path / "metadata.db")
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns, "
               "layer, digest) VALUES ('old', NULL, ?, '{}', 1, 1, 'layers/x.erofs', ?)",
               (int(Kind.COMMITTED), DIGEST))
    db.commit()
    db.close()
    store = Store(path)
    try:
        old = store.get("old")
        assert old.kind == Kind.COMMITTED and old.digest == DIGEST and not old.xattr_free
        assert store.layer_digest("layers/x.erofs") == (DIGEST, False)
        free = store.add_committed("free", "old", {}, "layers/y.erofs", DIGEST, xattr_free=True)
        assert free.xattr_free and store.chain(free)[0].key == "old"
        assert store.layer_digest("layers/y.erofs") == (DIGEST, True)
        store.create("act", "free", Kind.ACTIVE, {})
        done = store.commit("act", "done", {}, "snapshots/3/layer.erofs", DIGEST,
                            xattr_free=True)
        assert done.xattr_free and [s.xattr_free for s in store.chain(done)] == [
            False, True, True]
    finally:
        store.close()
    again = Store(path)  # opening it again changes nothing
    try:
        assert [(s.key, s.xattr_free) for s in again.all()] == [
            ("old", False), ("free", True), ("done", True)]
    finally:
        again.close()


# the snapshotter, with containerd ---------------------------------------------------------------
@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with containerd_stack() as s:
        yield s


def chain_getxattr_errno(stack: Stack) -> int:
    """A probe of the one chain mount: EOPNOTSUPP when mounted -o noxattr, else ENODATA."""
    (mount,) = stack.chain_mounts()
    return errno_of_getxattr(mount, "user.erofs-fuse-probe")


def run_and_compare(stack: Stack, image: str, layers: list[bytes]) -> tuple[int, dict[str, str]]:
    """Start a container of ``image``, compare its root with kernel overlayfs over the layers'
    tars, probe its chain mount; (the probe's errno, the container's entries)."""
    tars = []
    for k, tar in enumerate(layers):
        tars.append(stack.tmp / f"{image.rpartition(':')[2]}-{k}.tar")
        tars[-1].write_bytes(tar)
    probe: list[int] = []
    original = stack.rootfs

    def rootfs(cid: str) -> Path:  # while the container runs: probe its chain mount
        probe.append(chain_getxattr_errno(stack))
        return original(cid)

    stack.rootfs = rootfs  # type: ignore[method-assign]
    try:
        ours = assert_rootfs_is_kernel_overlay(stack, image, tars, "/bin/busybox", "sleep", "600")
    finally:
        stack.rootfs = original  # type: ignore[method-assign]
    return probe[0], ours.entries


def import_image(stack: Stack, name: str, layers: list[list[Entry]]) -> list[bytes]:
    layout = Layout(stack.tmp / f"layout-{name}")
    blobs = [layout.layer(entries) for entries in layers]
    layout.write_index([{**layout.image(blobs), **ref(name)}])
    stack.ctr("images", "import", "--snapshotter", SNAPSHOTTER, "--base-name",
              "example.com/noxattr", str(archive(layout.root, stack.tmp / f"{name}.tar")))
    return [b.tar for b in blobs]


def test_committed_xattr_free_chain_is_mounted_noxattr(stack: Stack) -> None:
    """ctr import: containerd unpacks, our Commit converts and records the layer xattr-free."""
    tars = import_image(stack, "free", [base_entries("a"),
                                        plain_entries("b") + [whiteout("a0")]])
    try:
        probe, entries = run_and_compare(stack, "example.com/noxattr:free", tars)
        assert probe == errno.EOPNOTSUPP
        assert "b1/f1" in entries and "a0/f0" not in entries
        assert "layers, noxattr) at " in stack.snapshotter_log()
    finally:
        stack.ctr("images", "rm", "--sync", "example.com/noxattr:free", check=False)


def test_one_layer_with_xattrs_keeps_them(stack: Stack) -> None:
    """A chain whose top layer alone shows xattrs is mounted as before: the container sees
    user.* and security.capability as kernel overlayfs shows them."""
    top = plain_entries("c") + [
        file("c0/user", "u\n", foo="bar"),
        file("c0/cap", b"#!/bin/sh\n", mode=0o755,
             raw_xattrs={"security.capability": CAP_NET_BIND})]
    tars = import_image(stack, "some", [base_entries("a"), top])
    try:
        probe, entries = run_and_compare(stack, "example.com/noxattr:some", tars)
        assert probe == errno.ENODATA
        assert "user.foo=" in entries["c0/user"], entries["c0/user"]
        assert "security.capability=" in entries["c0/cap"], entries["c0/cap"]
    finally:
        stack.ctr("images", "rm", "--sync", "example.com/noxattr:some", check=False)


def test_image_import_labels_xattr_free_layers(stack: Stack) -> None:
    """erofs-fuse image import converts the layers itself and says which are xattr-free."""
    layout = Layout(stack.tmp / "layout-client")
    blobs = [layout.layer(base_entries("x")),
             layout.layer(plain_entries("y"))]
    layout.write_index([{**layout.image(blobs), **ref("client")}])
    path = archive(layout.root, stack.tmp / "client.tar")
    proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "image", "import", "-a",
                           stack.address, "-n", "default", "--staging", str(stack.tmp / "stage"),
                           "--name", "example.com/noxattr:client", str(path)],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    image = "example.com/noxattr:client"
    try:
        info = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        assert "erofs-fuse.xattr-free" in "".join(
            stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", line.split()[0])
            for line in info.splitlines()[1:] if line.strip())
        probe, entries = run_and_compare(stack, image, [b.tar for b in blobs])
        assert probe == errno.EOPNOTSUPP and "y3/f4" in entries
    finally:
        stack.ctr("images", "rm", "--sync", image, check=False)
