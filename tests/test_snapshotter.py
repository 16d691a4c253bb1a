"""``erofs-fuse snapshotter`` against the real containerd (Debian 12's 1.6), driven by ``ctr``.

Each test module run starts its own containerd (temporary config, root, state and socket:
never the system service) and our snapshotter as a proxy plugin (``ctrstack.py``), imports
OCI archives built here, runs containers from them and removes them. Everything started is
stopped, and every mount under the temporary directory unmounted, in ``finally`` blocks: other
suites share the machine. A missing component (containerd, ctr, runc, fsck.erofs, busybox)
fails the tests.

The containerd tests share one containerd and run in file order, each on the state the one
before left (import, ls, run, restart, ..., removal). ``test_api_errors_and_labels`` talks gRPC
to a snapshotter of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from ctrstack import (NS, SNAPSHOTTER, Stack, chain_daemon, containerd_stack, direct_snapshotter,
                      mounts_under, unmount_all, wait_for)
from helpers import ROOT
from mounting import env
from ocilayout import (
    Layout,
    archive,
    busybox_entries,
    directory,
    file,
    hardlink,
    many_files_tar,
    opaque,
    ref,
    symlink,
    whiteout,
)
from rootfs import assert_rootfs_is_kernel_overlay, tree_layers

IMAGE = "example.com/erofstest:v1"
BIG = b"".join(b"block %05d of a file with its own data blocks\n" % k for k in range(400))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with containerd_stack() as s:
        yield s


@pytest.fixture(scope="module")
def image_archive(stack: Stack) -> Path:
    layout = Layout(stack.tmp / "layout")
    base = layout.layer(busybox_entries() + [
        file("etc/hello", "hello from layer 1\n"),
        file("gone.txt", "deleted by layer 2\n"),
        directory("opq"), file("opq/old", "hidden by the opaque dir\n"),
        directory("keep"), file("keep/a", "a\n"),
    ])
    top = layout.layer([
        whiteout("gone.txt"),
        file("msg", "layer two\n"),
        opaque("opq"), file("opq/new", "new\n"),
        file("keep/b", "b\n"),
        file("big", BIG),
    ])
    manifest = layout.image([base, top])
    layout.write_index([{**manifest, **ref("v1")}])
    return archive(layout.root, stack.tmp / "image.tar")


def committed_dirs(stack: Stack) -> list[Path]:
    return sorted((stack.root / "snapshots").iterdir())


def test_import(stack: Stack, image_archive: Path) -> None:
    stack.ctr("images", "import", "--snapshotter", SNAPSHOTTER,
              "--base-name", "example.com/erofstest", str(image_archive))
    assert IMAGE in stack.ctr("images", "ls", "-q").split()
    dirs = committed_dirs(stack)
    assert len(dirs) == 2, dirs
    for d in dirs:
        # one layer file (its fs-verity Merkle tree beside it); the staging dir is gone
        assert sorted(os.listdir(d)) == ["layer.erofs", "layer.erofs.verity"], d
        proc = subprocess.run(["fsck.erofs", str(d / "layer.erofs")], capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"fsck.erofs rejects {d}: {proc.stdout}{proc.stderr}"
    assert stack.chain_mounts() == []  # import done: nothing mounted
    # the sign that containerd reaches the snapshotter, once
    assert stack.snapshotter_log().count("INFO erofs_fuse.snapshotter: containerd connected: "
                                         "first call ") == 1, stack.snapshotter_log()


def test_snapshots_ls(stack: Stack) -> None:
    out = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
    lines = out.strip().splitlines()
    assert lines[0].split() == ["KEY", "PARENT", "KIND"], out
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 2 and all(r[-1] == "Committed" for r in rows), out
    top = [r for r in rows if len(r) == 3]
    assert len(top) == 1, out
    info = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", top[0][0])
    assert '"Kind": "Committed"' in info and top[0][1] in info, info
    usage = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage", top[0][0])
    assert top[0][0] in usage, usage


def run(stack: Stack, cid: str, *cmd: str) -> str:
    return stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, IMAGE, cid, *cmd)


def test_run(stack: Stack) -> None:
    assert run(stack, "t-cat", "/bin/busybox", "cat", "/msg", "/etc/hello") == \
        "layer two\nhello from layer 1\n"
    listing = run(stack, "t-ls", "/bin/busybox", "ls", "/", "/opq", "/keep")
    assert "gone.txt" not in listing, listing
    assert "/opq:\nnew\n" in listing and "old" not in listing, listing
    assert "/keep:\na\nb\n" in listing, listing
    # the container writes into its own upper directory, not into a layer
    assert run(stack, "t-write", "/bin/busybox", "sh", "-c",
               "echo x > /msg && cat /msg") == "x\n"
    assert run(stack, "t-again", "/bin/busybox", "cat", "/msg") == "layer two\n"
    # every root filesystem was an overlay over the erofs-fuse mount of the image's chain
    assert "mounted chain" in stack.snapshotter_log()


def test_containers_share_one_mount(stack: Stack) -> None:
    ids = ("t-shared-1", "t-shared-2")
    try:
        for cid in ids:
            stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, IMAGE, cid,
                      "/bin/busybox", "sleep", "600")
        assert len(stack.chain_mounts()) == 1, stack.chain_mounts()
        out = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        assert sum(line.split()[0] in ids and line.split()[-1] == "Active"
                   for line in out.splitlines()[1:]) == 2, out
        mounts = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "mounts", "/mnt", ids[0])
        assert "overlay" in mounts and "lowerdir=" + str(stack.root / "mounts") in mounts, mounts
    finally:
        for cid in ids:
            stack.remove_container(cid)


TREE_IMAGE = "example.com/erofstest:tree"
def test_rootfs_equals_kernel_overlay(stack: Stack) -> None:
    """A running container's whole root filesystem equals the kernel's overlayfs over the
    same layers. Every entry is compared: type, mode (setuid, setgid, sticky), owner, size and
    content, symlink target, device number, mtime, xattrs (user.* and security.capability)
    and hardlink groups."""
    layout = Layout(stack.tmp / "layout-tree")
    layers = tree_layers(layout)
    layout.write_index([{**layout.image(layers), **ref("tree")}])
    stack.ctr("images", "import", "--snapshotter", SNAPSHOTTER, "--base-name",
              "example.com/erofstest", str(archive(layout.root, stack.tmp / "tree.tar")))
    try:
        tars = [stack.tmp / f"tree-layer{k}.tar" for k in range(len(layers))]
        for tar, layer in zip(tars, layers):
            tar.write_bytes(layer.tar)
        ours = assert_rootfs_is_kernel_overlay(stack, TREE_IMAGE, tars,
                                               "/bin/busybox", "sleep", "600")
    finally:
        stack.ctr("images", "rm", "--sync", TREE_IMAGE, check=False)
    assert "bin/suid" in ours.entries and "security.capability=" in ours.entries["bin/suid"]
    assert frozenset({"data/orig", "data/link", "data/link2"}) in ours.hardlinks


def test_view(stack: Stack) -> None:
    """A view on the top layer is a read-only bind of the chain's FUSE mount. (ctr makes it
    under a lease that ends with the command, so GC may remove it at any moment after: the
    mount is read through in test_api_errors_and_labels instead.)"""
    rows = [line.split() for line in stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER,
                                               "ls").splitlines()[1:]]
    committed = [r for r in rows if r[-1] == "Committed"]
    parents = {r[1] for r in committed if len(r) == 3}
    top_name = next(r[0] for r in committed if r[0] not in parents)
    out = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "view", "--mounts", "v1",
                    top_name)
    mounts = json.loads(out)
    assert len(mounts) == 1 and mounts[0]["Type"] == "bind", out
    assert sorted(mounts[0]["Options"]) == ["rbind", "ro"], out
    assert Path(mounts[0]["Source"]).parent == stack.root / "mounts", out
    stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "v1", check=False)
    wait_for(lambda: "v1" not in stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER,
                                            "ls").split(), 30, "the view's removal")


def test_restart(stack: Stack) -> None:
    """State survives a restart (SIGTERM or SIGKILL), and a running container keeps its root
    filesystem while the snapshotter is down: its FUSE mount is an independent daemon."""
    stack.stop_snapshotter()
    stack.start_snapshotter()
    stack.wait_reachable()
    assert run(stack, "t-restarted", "/bin/busybox", "cat", "/msg") == "layer two\n"
    cid = "t-survivor"
    try:
        stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, IMAGE, cid,
                  "/bin/busybox", "sleep", "600")
        mounts = stack.chain_mounts()
        assert len(mounts) == 1, mounts
        stack.stop_snapshotter(signal.SIGKILL)
        out = stack.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/busybox", "cat", "/msg")
        assert out == "layer two\n"
        stack.start_snapshotter()
        stack.wait_reachable()
        assert stack.chain_mounts() == mounts  # adopted, not mounted again
        out = stack.ctr("task", "exec", "--exec-id", "e2", cid, "/bin/busybox", "cat", "/msg")
        assert out == "layer two\n"
    finally:
        stack.remove_container(cid)


def test_tampered_layer_gives_eio(stack: Stack) -> None:
    """A byte flipped in a committed layer.erofs: EIO in the container, never altered bytes.
    (No test before reads /big: none of its blocks is in a page cache.)"""
    layers = [d / "layer.erofs" for d in committed_dirs(stack)
              if (d / "layer.erofs").exists() and BIG[:4096] in (d / "layer.erofs").read_bytes()]
    assert len(layers) == 1, layers
    data = layers[0].read_bytes()
    pos = data.index(BIG[:4096]) + 8192 + 100  # inside the file's third data block
    with open(layers[0], "r+b") as f:
        f.seek(pos)
        f.write(bytes([data[pos] ^ 0x01]))
    try:
        proc = subprocess.run(["ctr", "-a", stack.address, "-n", NS, "run", "--rm",
                               "--snapshotter", SNAPSHOTTER, IMAGE, "t-tampered",
                               "/bin/busybox", "cat", "/big"], capture_output=True, text=True)
        assert proc.returncode != 0, "a tampered layer was read without error"
        assert "I/O error" in proc.stderr or "Input/output error" in proc.stderr, proc.stderr
        assert proc.stdout == BIG[:len(proc.stdout)].decode()  # what came is right, and
        assert len(proc.stdout) <= 8192  # nothing of the tampered block or after it
    finally:
        with open(layers[0], "r+b") as f:
            f.seek(pos)
            f.write(bytes([data[pos]]))


BIG_IMAGE = "example.com/erofstest:many"


def test_killed_during_import(stack: Stack) -> None:
    """SIGKILL while a layer is being committed; after a restart the import is retried and
    succeeds, and the image runs."""
    layout = Layout(stack.tmp / "layout-many")
    base = layout.layer(busybox_entries() + [file("etc/which", "many\n")])
    many = layout.layer(many_files_tar(4000))
    layout.write_index([{**layout.image([base, many]), **ref("many")}])
    tar = archive(layout.root, stack.tmp / "many.tar")
    args = ["ctr", "-a", stack.address, "-n", NS, "images", "import", "--snapshotter",
            SNAPSHOTTER, "--base-name", "example.com/erofstest", str(tar)]
    start = len(stack.log.read_bytes())
    importer = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def committing_second_layer() -> bool:
            log = stack.log.read_bytes()[start:]
            return log.count(b"DEBUG erofs_fuse.snapshotter: -> Commit ") >= 2 or \
                importer.poll() is not None
        wait_for(committing_second_layer, 60, "the second layer's Commit")
        stack.stop_snapshotter(signal.SIGKILL)
        importer.wait(60)
        assert importer.returncode != 0, "the import finished before the snapshotter was killed"
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.wait()
    stack.start_snapshotter()
    stack.wait_reachable()
    stack.ctr("images", "import", "--snapshotter", SNAPSHOTTER, "--base-name",
              "example.com/erofstest", str(tar))
    out = stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, BIG_IMAGE, "t-many",
                    "/bin/busybox", "sh", "-c", "cat /etc/which; ls /many/3 | wc -l")
    assert out.split() == ["many", "1000"], out
    for d in committed_dirs(stack):
        assert not [n for n in os.listdir(d) if n.endswith(".tmp")], os.listdir(d)


DEBIAN_IMAGE = "example.com/erofstest:debian"


def test_debian_rootfs_demo(stack: Stack) -> None:
    """The Debian root filesystem of scripts/rootfs-demo as an OCI image of three layers
    (debootstrap minbase; apt-get install hello, apt-get clean: whiteouts; docs deleted and
    /usr/share/locale, a directory, replaced by a file): imported, run, and its whole root
    filesystem compared with the kernel's overlayfs. The archive is built once and cached
    (devtools/images.py; the first build runs rootfs-demo if its trees are gone)."""
    from devtools.images import oci_archive

    tar, layer_tars = oci_archive("demo")
    stack.ctr("images", "import", "--snapshotter", SNAPSHOTTER, "--index-name", DEBIAN_IMAGE,
              str(tar), timeout=900)
    try:
        out = stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, DEBIAN_IMAGE, "t-debian",
                        "/bin/sh", "-c", "echo ok; hello; cat /usr/share/locale; "
                        "ls /usr/share/doc 2>&1; ls /var/cache/apt/archives/*.deb 2>&1; true")
        lines = out.splitlines()
        assert lines[:3] == ["ok", "Hello, world!", "locales were removed in layer 2"], out
        assert "No such file or directory" in lines[3], out  # whited out in layer 2
        assert "No such file or directory" in lines[4], out  # apt-get clean in layer 1
        ours = assert_rootfs_is_kernel_overlay(stack, DEBIAN_IMAGE, layer_tars,
                                               "/bin/sleep", "infinity")
        assert len(ours.entries) > 4000, len(ours.entries)  # the whole tree was compared
    finally:
        stack.ctr("images", "rm", "--sync", DEBIAN_IMAGE, check=False)


def test_remove_image_leaves_nothing(stack: Stack) -> None:
    stack.wait_reachable()
    stack.ctr("images", "rm", "--sync", IMAGE, BIG_IMAGE)

    def empty() -> bool:
        out = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        return len(out.strip().splitlines()) <= 1 and not committed_dirs(stack)

    try:
        wait_for(empty, 30, "garbage collection of every snapshot")
    except AssertionError as exc:
        left = stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        clog = [line for line in (stack.tmp / "containerd.log").read_text(errors="replace")
                .splitlines() if "snapshot" in line.lower() or "gc" in line.lower()]
        raise AssertionError(f"{exc}\nleft: {left}\n{committed_dirs(stack)}\n"
                             f"{stack.snapshotter_log()}\n--- containerd ---\n"
                             + "\n".join(clog[-30:])) from None
    assert stack.chain_mounts() == []
    left = [p for p in (stack.root / "mounts").iterdir()]
    assert left == [], left


# the API alone, through a gRPC client, on a snapshotter of its own (containerd's GC would
# remove snapshots it does not know) -------------------------------------------------------------
@pytest.fixture
def direct_stack() -> Iterator[tuple[object, Stack]]:
    """A snapshotter of its own (no containerd) and a gRPC stub talking to it."""
    with direct_snapshotter() as pair:
        yield pair


@pytest.fixture
def direct(direct_stack: tuple[object, Stack]) -> tuple[object, Path]:
    return direct_stack[0], direct_stack[1].root


def test_api_errors_and_labels(direct: tuple[object, Path]) -> None:
    import grpc
    from google.protobuf import field_mask_pb2

    from erofs_fuse.containerd.api import snapshots_pb2 as pb

    stub, root = direct

    def code(call: object, request: object) -> object:
        assert callable(call)
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        return info.value.code()

    NOT_FOUND = grpc.StatusCode.NOT_FOUND
    assert code(stub.Stat, pb.StatSnapshotRequest(key="ns/1/missing")) == NOT_FOUND
    assert code(stub.Remove, pb.RemoveSnapshotRequest(key="ns/1/missing")) == NOT_FOUND
    assert code(stub.Prepare, pb.PrepareSnapshotRequest(key="ns/1/a", parent="ns/0/x")) \
        == NOT_FOUND
    r = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/a b", labels={"l": "1"}))
    assert r.mounts[0].type == "bind" and "rw" in r.mounts[0].options
    fs = Path(r.mounts[0].source)
    (fs / "hello").write_text("hi\n")
    assert code(stub.Prepare, pb.PrepareSnapshotRequest(key="ns/1/a b")) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code(stub.Prepare, pb.PrepareSnapshotRequest(key="ns/2/c", parent="ns/1/a b")) == \
        grpc.StatusCode.FAILED_PRECONDITION  # parent not committed
    stub.Commit(pb.CommitSnapshotRequest(key="ns/1/a b", name="ns/2/sha256:x",
                                         labels={"containerd.io/snapshot.ref": "x"}))
    assert code(stub.Commit, pb.CommitSnapshotRequest(key="ns/1/a b", name="ns/2/y")) == \
        NOT_FOUND
    info = stub.Stat(pb.StatSnapshotRequest(key="ns/2/sha256:x")).info
    assert info.kind == pb.COMMITTED and info.labels["containerd.io/snapshot.ref"] == "x"
    assert info.created_at.seconds > 0 and info.updated_at.seconds > 0
    assert not fs.exists()
    # a child keeps its parent, which is then in use by its mount
    c = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/3/c", parent="ns/2/sha256:x"))
    assert c.mounts[0].type == "overlay"
    lower = next(o for o in c.mounts[0].options if o.startswith("lowerdir="))[9:]
    assert (Path(lower) / "hello").read_text() == "hi\n"
    v = stub.View(pb.ViewSnapshotRequest(key="ns/3/v", parent="ns/2/sha256:x"))
    assert v.mounts[0].type == "bind" and v.mounts[0].source == lower
    assert code(stub.Remove, pb.RemoveSnapshotRequest(key="ns/2/sha256:x")) == \
        grpc.StatusCode.FAILED_PRECONDITION
    # Update: labels only; other fields refused
    new = pb.Info(name="ns/3/c", labels={"a": "1", "b": "2"})
    got = stub.Update(pb.UpdateSnapshotRequest(info=new)).info
    assert dict(got.labels) == {"a": "1", "b": "2"}
    got = stub.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="ns/3/c", labels={"b": "3"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.b"]))).info
    assert dict(got.labels) == {"a": "1", "b": "3"}
    assert code(stub.Update, pb.UpdateSnapshotRequest(
        info=pb.Info(name="ns/3/c"), update_mask=field_mask_pb2.FieldMask(paths=["parent"]))) \
        == grpc.StatusCode.INVALID_ARGUMENT

    def listed(*filters: str) -> list[str]:
        return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters)))
                      for i in r.info)

    assert listed() == ["ns/2/sha256:x", "ns/3/c", "ns/3/v"]
    assert listed("kind==committed") == ["ns/2/sha256:x"]
    assert listed('labels."containerd.io/snapshot.ref"==x,parent==') == ["ns/2/sha256:x"]
    assert listed("parent==ns/2/sha256:x,labels.a") == ["ns/3/c"]
    assert listed("kind==view", "name==ns/3/c") == ["ns/3/c", "ns/3/v"]
    usage = stub.Usage(pb.UsageRequest(key="ns/2/sha256:x"))
    assert usage.size > 0 and usage.inodes == 2
    # removing the users unmounts the chain; then the parent goes too
    for key in ("ns/3/c", "ns/3/v"):
        stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert mounts_under(str(root)) == []
    stub.Remove(pb.RemoveSnapshotRequest(key="ns/2/sha256:x"))
    stub.Cleanup(pb.CleanupRequest())
    assert listed() == [] and os.listdir(root / "snapshots") == []


def test_every_call_logged_and_the_first_at_info(direct_stack: tuple[Any, Stack]) -> None:
    """--debug logs every RPC once it ends (method, key, parent, outcome), from one wrapper;
    the first call after start is logged at INFO, the sign that containerd reaches us."""
    import grpc

    from erofs_fuse.containerd.api import snapshots_pb2 as pb

    stub, s = direct_stack
    with pytest.raises(grpc.RpcError):
        stub.Stat(pb.StatSnapshotRequest(key="ns/1/missing"))
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/a"))
    stub.Mounts(pb.MountsRequest(key="ns/1/a"))
    stub.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="ns/1/a", labels={"x": "1"})))
    list(stub.List(pb.ListSnapshotsRequest()))
    stub.Usage(pb.UsageRequest(key="ns/1/a"))
    stub.Remove(pb.RemoveSnapshotRequest(key="ns/1/a"))
    stub.Cleanup(pb.CleanupRequest())
    log = s.snapshotter_log()
    assert log.count("INFO erofs_fuse.snapshotter: containerd connected: first call Stat") \
        == 1, log
    done = [line.split("snapshotter: <- ", 1)[1] for line in log.splitlines()
            if "erofs_fuse.snapshotter: <- " in line]
    assert [line.split(" ")[0].rstrip(":") for line in done] == \
        ["Stat", "Prepare", "Mounts", "Update", "List", "Usage", "Remove", "Cleanup"], log
    assert done[0].startswith("Stat key='ns/1/missing': NOT_FOUND"), done
    assert done[1].startswith("Prepare key='ns/1/a': ok, mounts bind"), done
    assert done[3].startswith("Update name='ns/1/a': ok"), done
    assert done[4].startswith("List: ok, 1 infos in 1 replies"), done
    assert done[6].startswith("Remove key='ns/1/a': ok"), done


def run_snapshotter(root: Path, address: Path, timeout: float = 30) -> tuple[int | None, str]:
    """(exit status, stderr) of a snapshotter expected to refuse to start; None if it was
    still running after ``timeout`` (then it is stopped)."""
    proc = subprocess.Popen([sys.executable, "-m", "erofs_fuse", "snapshotter", "--root",
                             str(root), "--address", str(address)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env())
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        return None, err


@pytest.fixture
def scratch() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="efs-snapa-", dir="/tmp"))
    try:
        yield tmp
    finally:
        unmount_all(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def test_address_that_is_not_ours_is_refused(scratch: Path) -> None:
    """--address naming a regular file or a symlink: refused (exit 2), left alone; naming a
    socket that a server answers on: refused (exit 1), the server still reachable."""
    target = scratch / "precious"
    target.write_text("keep me\n")
    link = scratch / "link.sock"
    link.symlink_to(target)
    for path in (target, link):
        code, err = run_snapshotter(scratch / "root", path)
        assert code == 2 and err == f"erofs-fuse: --address {path}: exists and is not a " \
            "socket\n", (code, err)
        assert target.read_text() == "keep me\n" and link.is_symlink()
    live = scratch / "live.sock"
    with listener(live):
        code, err = run_snapshotter(scratch / "root", live)
        assert code == 1 and err == f"erofs-fuse: --address {live}: a server is listening " \
            "on it already\n", (code, err)
        assert answers(live)


def test_stale_socket_taken_and_a_successors_kept(scratch: Path) -> None:
    """A stale socket (nobody listens) is replaced; at stop the snapshotter removes its socket
    only if it is still the one it bound, not one bound there since."""
    s = Stack(scratch, scratch / "snapshotter", "", scratch / "snapshotter.log")
    sock = scratch / "snapshotter.sock"
    listener(sock).close()  # the path stays: a killed server's socket
    assert sock.exists() and not answers(sock)
    with open(s.log, "ab") as log:
        s.snapshotter = subprocess.Popen(
            [sys.executable, "-m", "erofs_fuse", "snapshotter", "--root", str(s.root),
             "--address", str(sock)], stdout=log, stderr=subprocess.STDOUT, env=env())
    try:
        wait_for(lambda: answers(sock) or s.snapshotter.poll() is not None, 30,
                 "the snapshotter")
        assert s.snapshotter.poll() is None, s.snapshotter_log()
        sock.unlink()  # a successor (given the same address) binds its own socket there
        with listener(sock):
            ino = sock.stat().st_ino
            s.stop_snapshotter()
            assert sock.exists() and sock.stat().st_ino == ino and answers(sock), \
                s.snapshotter_log()
    finally:
        s.stop_snapshotter()


def test_one_snapshotter_per_root(direct_stack: tuple[Any, Stack]) -> None:
    """A second snapshotter on the same root is refused, naming the first one's pid, before
    it touches anything (here: an in-flight temporary layer file the first one owns)."""
    from erofs_fuse.containerd.api import snapshots_pb2 as pb

    stub, s = direct_stack
    assert s.snapshotter is not None
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/a"))
    (snap_dir,) = (s.root / "snapshots").iterdir()
    in_flight = snap_dir / "layer.erofs.tmp"
    in_flight.write_bytes(b"being written")
    code, err = run_snapshotter(s.root, s.tmp / "second.sock")
    assert code == 1 and err == f"erofs-fuse: --root {s.root}: in use by another snapshotter " \
        f"(pid {s.snapshotter.pid})\n", (code, err)
    assert in_flight.read_bytes() == b"being written"
    assert not (s.tmp / "second.sock").exists()


def test_mount_daemons_titled_and_lock_free(direct_stack: tuple[Any, Stack]) -> None:
    """The mount daemons carry their own process title, so `pkill -f 'erofs-fuse
    snapshotter'` spares them, and do not hold the root's lock: the snapshotter restarts
    beside them."""
    from erofs_fuse.containerd.api import snapshots_pb2 as pb

    stub, s = direct_stack
    assert s.snapshotter is not None
    fs = Path(stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/a")).mounts[0].source)
    (fs / "f").write_text("f\n")
    stub.Commit(pb.CommitSnapshotRequest(key="ns/1/a", name="ns/1/c"))
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/2/b", parent="ns/1/c"))
    (mountpoint,) = [m for m in mounts_under(str(s.root / "mounts"))]
    daemon = chain_daemon(mountpoint)
    cmdline = Path(f"/proc/{daemon}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    title = f"erofs-fuse mount {Path(mountpoint).name} {mountpoint}"
    assert cmdline == title.encode()
    ps = subprocess.run(["ps", "-o", "args=", "-p", str(daemon)], capture_output=True,
                        text=True).stdout
    assert ps.strip() == title, ps
    pattern = f"erofs_fuse snapshotter --root {s.root}"  # the tests run python -m erofs_fuse
    matched = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    assert str(daemon) not in matched.split() and str(s.snapshotter.pid) in matched.split()
    # the daemon outlives the snapshotter without holding the root's lock
    s.stop_snapshotter()
    s.start_snapshotter()
    info = stub.Stat(pb.StatSnapshotRequest(key="ns/2/b"), wait_for_ready=True, timeout=30).info
    assert info.parent == "ns/1/c"
    assert chain_daemon(mountpoint) == daemon  # adopted


def test_root_or_address_not_a_directory(scratch: Path) -> None:
    root = scratch / "file"
    root.write_text("x")
    code, err = run_snapshotter(root, scratch / "s.sock")
    assert code == 2 and err == f"erofs-fuse: --root {root}: not a directory\n", (code, err)
    code, err = run_snapshotter(scratch / "root", root / "s.sock")
    assert code == 2 and err == f"erofs-fuse: --address {root}/s.sock: {root} is not a " \
        "directory\n", (code, err)


def test_process_title_without_room_or_environment() -> None:
    """With an empty environment setproctitle changes nothing; the title is then written
    another way (cut to the argv area if need be) and never leaves the old command line."""
    title = "erofs-fuse mount 12 /var/lib/erofs-fuse/snapshotter/mounts/12"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from erofs_fuse.snapshotter.proctitle import set_title\n"
            f"set_title({title!r})\n"
            "print(open('/proc/self/cmdline', 'rb').read().rstrip(b'\\0').decode())\n")
    script = Path(tempfile.mkdtemp(prefix="efs-title-")) / "t.py"
    try:
        script.write_text(code)
        for environment in ({}, {"A": "1"}, env()):
            shown = subprocess.run([sys.executable, str(script)], capture_output=True,
                                   text=True, env=environment, check=True).stdout.strip()
            assert title.startswith(shown) and len(shown) >= len("erofs-fuse mount 12 /v"), \
                (environment, shown)
            assert "\0" not in shown and str(script) not in shown
    finally:
        shutil.rmtree(script.parent)
