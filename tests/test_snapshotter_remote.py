"""The snapshotter's remote-snapshot side and containerd 2.2's rebase, at the RPC level.

A client (``erofs-fuse image pull/import``) converts layers itself and registers each through
containerd with a Prepare carrying ``containerd.io/snapshot.ref`` and our labels naming the
sealed file: the snapshotter takes the file in once per diff_id, records a committed snapshot
and answers ALREADY_EXISTS (containerd-client.md §3.1). containerd 2.2's parallel unpack
prepares every layer with no parent and names the parent at Commit (§6.2). Both are driven
here on a snapshotter of its own, through its gRPC API, as containerd would call it.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ctrstack import chain_daemon, direct_snapshotter, mounts_under
from erofs_fuse.mkfs import ConvertOptions, convert_tar
from erofs_fuse.containerd.api import snapshots_pb2 as pb
from erofs_fuse.snapshotter.core import DIFF_ID_LABEL, LAYER_LABEL, VERITY_LABEL
from mounting import states_after_lookups
from ocilayout import Entry, directory, file, many_files_tar, tar_bytes, whiteout

REF = "containerd.io/snapshot.ref"
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS


@pytest.fixture
def api() -> Iterator[tuple[Any, Path]]:
    with direct_snapshotter("efs-remote-") as (stub, stack):
        yield stub, stack.tmp


def sealed_layer(tmp: Path, name: str, entries: list[Entry]) -> dict[str, str]:
    """Convert a layer tar as the client does; the labels of its Prepare."""
    out = tmp / "staging" / f"{name}.erofs"
    out.parent.mkdir(exist_ok=True)
    result = convert_tar(io.BytesIO(tar_bytes(entries)), str(out), ConvertOptions(seal=True))
    assert result.diff_id is not None and result.verity_digest is not None
    return {DIFF_ID_LABEL: result.diff_id, VERITY_LABEL: result.verity_digest,
            LAYER_LABEL: str(out)}


def code_of(call: Any, request: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    status: grpc.StatusCode = info.value.code()
    return status


def listed(stub: Any, *filters: str) -> list[Any]:
    return [i for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info]


def lowerdir(mount: Any) -> Path:
    return Path(next(o for o in mount.options if o.startswith("lowerdir="))[len("lowerdir="):])


def remote_prepare(stub: Any, key: str, parent: str, chain: str, labels: dict[str, str]) -> str:
    """Prepare as containerd's metadata layer forwards it; the name of the committed snapshot
    containerd then finds with List (§3.1 step 5)."""
    request = pb.PrepareSnapshotRequest(key=key, parent=parent, labels={REF: chain, **labels})
    assert code_of(stub.Prepare, request) == ALREADY_EXISTS
    found = listed(stub, f'labels."{REF}"=={chain},parent=={parent}')
    assert len(found) == 1 and found[0].kind == pb.COMMITTED and found[0].parent == parent
    name: str = found[0].name
    return name


def test_remote_layers_are_taken_in_once_per_diff_id(api: tuple[Any, Path]) -> None:
    stub, tmp = api
    root = tmp / "snapshotter"
    base = sealed_layer(tmp, "base", [directory("etc"), file("etc/hello", "base\n"),
                                      file("gone", "x\n")])
    top = sealed_layer(tmp, "top", [file("etc/hello", "top\n"), whiteout("gone")])
    c1 = remote_prepare(stub, "ns1/1/extract-1 sha256:c1", "", "sha256:c1", base)
    c2 = remote_prepare(stub, "ns1/2/extract-2 sha256:c2", c1, "sha256:c2", top)
    shared = sorted(os.listdir(root / "layers"))
    assert shared == sorted(f"sha256-{d[DIFF_ID_LABEL][7:]}.erofs{s}"
                            for d in (base, top) for s in ("", ".verity"))
    info = stub.Stat(pb.StatSnapshotRequest(key=c2)).info
    assert info.parent == c1 and LAYER_LABEL not in info.labels
    assert info.labels[VERITY_LABEL] == top[VERITY_LABEL]
    # the staging files may go: the snapshotter has its own links
    shutil.rmtree(tmp / "staging")
    # a container on top sees both layers merged, verified
    r = stub.Prepare(pb.PrepareSnapshotRequest(key="ns1/3/ctr", parent=c2))
    assert r.mounts[0].type == "overlay"
    lower = lowerdir(r.mounts[0])
    assert (lower / "etc/hello").read_text() == "top\n" and not (lower / "gone").exists()
    # another namespace asks for the same chain: answered from what we hold, no new file
    assert remote_prepare(stub, "ns2/1/extract-3 sha256:c1", "", "sha256:c1", base) == c1
    # the same base layer under another image's chain: a new snapshot, the same file
    again = sealed_layer(tmp, "again", [directory("etc"), file("etc/hello", "base\n"),
                                        file("gone", "x\n")])
    assert again[DIFF_ID_LABEL] == base[DIFF_ID_LABEL]
    other = remote_prepare(stub, "ns2/2/extract-4 sha256:d2", c2, "sha256:d2", again)
    assert sorted(os.listdir(root / "layers")) == shared
    # removal: the file goes with its last user
    for key in ("ns1/3/ctr", other, c2):
        stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert mounts_under(str(root)) == []
    assert sorted(os.listdir(root / "layers")) == sorted(
        f"sha256-{base[DIFF_ID_LABEL][7:]}.erofs{s}" for s in ("", ".verity"))
    stub.Remove(pb.RemoveSnapshotRequest(key=c1))
    stub.Cleanup(pb.CleanupRequest())
    assert os.listdir(root / "layers") == [] and listed(stub) == []


def test_remote_prepare_refuses_bad_labels(api: tuple[Any, Path]) -> None:
    stub, tmp = api
    good = sealed_layer(tmp, "l", [file("a", "a\n")])
    for bad in ({**good, DIFF_ID_LABEL: "sha256:12"},
                {**good, VERITY_LABEL: "md5:00"},
                {**good, LAYER_LABEL: "relative.erofs"},
                {**good, LAYER_LABEL: str(tmp / "missing.erofs")}):
        request = pb.PrepareSnapshotRequest(key="ns/1/k", labels={REF: "sha256:c", **bad})
        assert code_of(stub.Prepare, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert listed(stub) == [] and os.listdir(tmp / "snapshotter" / "layers") == []


def test_rebase_commit_names_the_parent(api: tuple[Any, Path]) -> None:
    """containerd 2.2's parallel unpack: every layer prepared with no parent, in the overlay
    form (whiteouts written as overlayfs's), the parent given at Commit."""
    stub, tmp = api
    keys = ["ns/1/extract-1 sha256:c1", "ns/2/extract-2 sha256:c2"]
    uppers = []
    for key, chain in zip(keys, ("sha256:c1", "sha256:c2")):
        r = stub.Prepare(pb.PrepareSnapshotRequest(key=key, labels={REF: chain}))
        assert r.mounts[0].type == "overlay"
        options = dict(o.split("=", 1) for o in r.mounts[0].options)
        assert os.listdir(options["lowerdir"]) == [] and Path(options["workdir"]).is_dir()
        uppers.append(Path(options["upperdir"]))
    (uppers[0] / "keep").write_text("kept\n")
    (uppers[0] / "gone").write_text("removed above\n")
    (uppers[1] / "new").write_text("new\n")
    os.mknod(uppers[1] / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # the applier's form
    # bottom half, in layer order
    stub.Commit(pb.CommitSnapshotRequest(name="ns/1/sha256:c1", key=keys[0]))
    assert code_of(stub.Commit, pb.CommitSnapshotRequest(
        name="ns/2/sha256:c2", key=keys[1], parent="ns/9/missing")) == grpc.StatusCode.NOT_FOUND
    stub.Commit(pb.CommitSnapshotRequest(name="ns/2/sha256:c2", key=keys[1],
                                         parent="ns/1/sha256:c1"))
    assert stub.Stat(pb.StatSnapshotRequest(key="ns/2/sha256:c2")).info.parent == \
        "ns/1/sha256:c1"
    r = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/3/ctr", parent="ns/2/sha256:c2"))
    lower = lowerdir(r.mounts[0])
    assert sorted(os.listdir(lower)) == ["keep", "new"]
    # a snapshot prepared on a parent cannot be committed onto another one
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/4/x", parent="ns/1/sha256:c1"))
    assert code_of(stub.Commit, pb.CommitSnapshotRequest(
        name="ns/4/y", key="ns/4/x", parent="ns/2/sha256:c2")) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # without the unpack label, a snapshot with no parent is a plain bind, as before
    plain = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/5/plain"))
    assert plain.mounts[0].type == "bind"


def test_commit_does_not_hold_up_other_calls(api: tuple[Any, Path]) -> None:
    stub, tmp = api
    r = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/big"))
    upper = Path(r.mounts[0].source)
    for k in range(30000):  # a conversion that takes a while
        (upper / f"f{k:05d}").write_bytes(b"x")
    stub.Prepare(pb.PrepareSnapshotRequest(key="ns/1/other"))
    done = threading.Event()

    def commit() -> None:
        stub.Commit(pb.CommitSnapshotRequest(name="ns/1/committed", key="ns/1/big"))
        done.set()

    thread = threading.Thread(target=commit)
    thread.start()
    try:
        # Commit only marks the snapshot busy before converting: meanwhile other calls answer,
        # and a Remove of the snapshot being committed is refused, not half done
        answered = [i.name for i in listed(stub)]
        stub.Stat(pb.StatSnapshotRequest(key="ns/1/other"))
        busy = None if done.is_set() else code_of(
            stub.Remove, pb.RemoveSnapshotRequest(key="ns/1/big"))
        answered_while_busy = not done.is_set()
    finally:
        thread.join()
    assert "ns/1/big" in answered
    assert answered_while_busy, "the 30,000-file commit ended before the other calls answered"
    assert busy in (None, grpc.StatusCode.FAILED_PRECONDITION)
    assert stub.Stat(pb.StatSnapshotRequest(key="ns/1/committed")).info.kind == pb.COMMITTED


def test_many_files_layer_round_trip(api: tuple[Any, Path]) -> None:
    """A remote layer with many entries mounts with every entry."""
    stub, tmp = api
    out = tmp / "many.erofs"
    result = convert_tar(io.BytesIO(many_files_tar(500)), str(out), ConvertOptions(seal=True))
    assert result.diff_id and result.verity_digest
    labels = {DIFF_ID_LABEL: result.diff_id, VERITY_LABEL: result.verity_digest,
              LAYER_LABEL: str(out)}
    name = remote_prepare(stub, "ns/1/extract sha256:m", "", "sha256:m", labels)
    v = stub.View(pb.ViewSnapshotRequest(key="ns/2/view", parent=name))
    assert sum(len(files) for _, _, files in os.walk(v.mounts[0].source)) == 500


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_a_dead_fork_server_is_replaced(api: tuple[Any, Path]) -> None:
    stub, tmp = api
    root = tmp / "snapshotter"
    snapshotter = int((root / "lock").read_text().split()[0])
    forker, = children_of(snapshotter)
    name = remote_prepare(stub, "ns/1/extract sha256:f", "", "sha256:f",
                          sealed_layer(tmp, "l", [file("a", "from the layer\n")]))
    os.kill(forker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{forker}") and open(f"/proc/{forker}/stat").read().split()[2] \
            != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    # the next chain mount needs a forker: a new one is started, the mount is made
    v = stub.View(pb.ViewSnapshotRequest(key="ns/2/view", parent=name))
    assert (Path(v.mounts[0].source) / "a").read_text() == "from the layer\n"
    assert forker not in children_of(snapshotter)
    log = (tmp / "snapshotter.log").read_text()
    assert f"the mount fork server (pid {forker}) is gone; starting another" in log


def test_chain_mount_lingers_after_its_last_user() -> None:
    """--mount-linger: the chain's mount outlives its last user for that long, so the next
    container of the image starts without mounting; removing the chain unmounts at once."""
    with direct_snapshotter("efs-linger-", linger=3.0) as (stub_obj, stack):
        stub: Any = stub_obj
        name = remote_prepare(stub, "ns/1/extract sha256:g", "", "sha256:g",
                              sealed_layer(stack.tmp, "l", [file("a", "a\n")]))
        log = stack.tmp / "snapshotter.log"
        stub.View(pb.ViewSnapshotRequest(key="ns/2/v1", parent=name))
        stub.Remove(pb.RemoveSnapshotRequest(key="ns/2/v1"))
        assert len(stack.chain_mounts()) == 1, "kept for the next user"
        stub.View(pb.ViewSnapshotRequest(key="ns/2/v2", parent=name))
        assert log.read_text().count("mounted chain") == 1, "the lingering mount was reused"
        stub.Remove(pb.RemoveSnapshotRequest(key="ns/2/v2"))
        deadline = time.monotonic() + 30
        while stack.chain_mounts() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stack.chain_mounts() == [], "unmounted once the linger ran out"
        # an unpack's lower chain is no container's: unmounted as soon as the unpack is done
        stub.Prepare(pb.PrepareSnapshotRequest(key="ns/3/extract-9 sha256:h", parent=name))
        assert len(stack.chain_mounts()) == 1
        stub.Remove(pb.RemoveSnapshotRequest(key="ns/3/extract-9 sha256:h"))
        assert stack.chain_mounts() == []
        # a chain removed while its mount lingers is unmounted at once
        stub.View(pb.ViewSnapshotRequest(key="ns/2/v3", parent=name))
        stub.Remove(pb.RemoveSnapshotRequest(key="ns/2/v3"))
        assert len(stack.chain_mounts()) == 1
        stub.Remove(pb.RemoveSnapshotRequest(key=name))
        assert stack.chain_mounts() == []


def test_mount_spin_reaches_the_chain_mounts() -> None:
    """--mount-spin: each chain mount gets it as its --spin (50 ms here: the daemon is still
    polling 2 ms after answering, where mount's default 200 µs has let it sleep)."""
    with direct_snapshotter("efs-spin-", args=("--mount-spin", "50000")) as (stub_obj, stack):
        stub: Any = stub_obj
        name = remote_prepare(stub, "ns/1/extract sha256:s", "", "sha256:s",
                              sealed_layer(stack.tmp, "l", [file("a", "a\n")]))
        stub.View(pb.ViewSnapshotRequest(key="ns/2/v", parent=name))
        (mountpoint,) = stack.chain_mounts()
        assert ", spin 50000 us) at " + mountpoint in (stack.tmp / "snapshotter.log").read_text()
        states = states_after_lookups(chain_daemon(mountpoint), mountpoint, 30)
        assert states.count("R") >= 20, states
        stub.Remove(pb.RemoveSnapshotRequest(key="ns/2/v"))


def test_a_committed_chain_is_mounted_ahead_and_lingers() -> None:
    """With --mount-linger, Commit mounts the chain it made in the background: the unpack's
    next layer and the image's first container find it mounted; without, nothing is mounted
    ahead (the api fixture's linger is 0, and its tests see no mount after a Commit)."""
    with direct_snapshotter("efs-ahead-", linger=30.0) as (stub_obj, stack):
        stub: Any = stub_obj
        log = stack.tmp / "snapshotter.log"
        names = []
        parent = ""
        for n in range(2):  # a two-layer unpack, as the walking differ does it
            key = f"ns/{n}/extract-{n} sha256:u{n}"
            r = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent))
            upper = Path(r.mounts[0].source if r.mounts[0].type == "bind"
                         else dict(o.split("=", 1) for o in r.mounts[0].options)["upperdir"])
            (upper / f"f{n}").write_text(f"{n}\n")
            parent = f"ns/{n}/sha256:u{n}"
            stub.Commit(pb.CommitSnapshotRequest(name=parent, key=key))
            names.append(parent)
            deadline = time.monotonic() + 30
            while len(stack.chain_mounts()) != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(stack.chain_mounts()) == 1, "the new chain only, the lower one released"
        r = stub.Prepare(pb.PrepareSnapshotRequest(key="ns/9/ctr", parent=names[-1]))
        assert sorted(os.listdir(lowerdir(r.mounts[0]))) == ["f0", "f1"]
        assert log.read_text().count(": mounted chain") == 2, "each chain mounted once, ahead"
        stub.Remove(pb.RemoveSnapshotRequest(key="ns/9/ctr"))
        stub.Remove(pb.RemoveSnapshotRequest(key=names[-1]))
        assert stack.chain_mounts() == []
