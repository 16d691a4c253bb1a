"""``erofs-fuse image import`` and ``image pull`` against a real containerd 1.6 with our
snapshotter (``ctrstack.py``) and a real registry on 127.0.0.1 (``registry_server.py``, images
pushed with skopeo).

The command converts every missing layer itself and hands it to the snapshotter through
containerd (remote snapshots): ``ctr run`` then finds the image unpacked, containerd applies no
diff (its debug log has no ``diff applied``), and the container's root equals the kernel's
overlayfs over GNU tar's extraction of the layers. A layer is one file under the snapshotter's
``layers/`` whatever the image or namespace that brings it. Bad input exits 2 with one line and
leaves nothing: no image record, lease, staging directory or snapshot.

The tests run in order on one containerd: import, pull, a second namespace, bad input, removal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from ctrstack import SNAPSHOTTER, Stack, containerd_stack, wait_for
from mounting import env
from ocilayout import (LayerBlob, Layout, archive, busybox_entries, directory, file,
                       many_files_tar, ref, sha256)
from registry_server import Registry, push
from rootfs import assert_rootfs_is_kernel_overlay, tree_layers

TREE = "example.com/pulltest/tree:v1"  # the archive's name for the image
OTHER_NS = "second"


@dataclass
class Env:
    stack: Stack
    registry: Registry
    layout: Layout
    tree: list[LayerBlob]  # base, top
    staging: Path

    def command(self, *args: str, ns: str = "default", staging: str = "") -> list[str]:
        """``erofs-fuse image ARGS`` on this containerd, staging under the stack."""
        action, rest = args[0], args[1:]
        return [sys.executable, "-m", "erofs_fuse", "image", action, "-a", self.stack.address,
                "-n", ns, "--staging", staging or str(self.staging), *rest]

    def image(self, *args: str, ns: str = "default",
              staging: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args, ns=ns, staging=staging), capture_output=True,
                              text=True, env=env(), timeout=120)

    def ctr(self, *args: str, ns: str = "default", check: bool = True) -> str:
        proc = subprocess.run(["ctr", "-a", self.stack.address, "-n", ns, *args],
                              capture_output=True, text=True, timeout=120)
        assert not check or proc.returncode == 0, f"ctr {args}: {proc.stderr}"
        return proc.stdout

    def layer_files(self) -> list[str]:
        layers = self.stack.root / "layers"
        return sorted(p.name for p in layers.iterdir()) if layers.exists() else []

    def snapshots(self, ns: str = "default", snapshotter: str = SNAPSHOTTER) -> list[str]:
        out = self.ctr("snapshots", "--snapshotter", snapshotter, "ls", ns=ns)
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]


@pytest.fixture(scope="module")
def env_() -> Iterator[Env]:
    with containerd_stack() as stack:
        layout = Layout(stack.tmp / "layout")
        tree = tree_layers(layout)
        registry = Registry(stack.tmp / "registry")
        try:
            yield Env(stack, registry, layout, tree, stack.tmp / "staging")
        finally:
            registry.stop()


def image_archive(e: Env, name: str, layers: list[LayerBlob], ref_name: str,
                  **image_kw: object) -> Path:
    """An OCI archive of ``layers`` whose index names the image ``ref_name``."""
    manifest = e.layout.image(layers, **image_kw)  # type: ignore[arg-type]
    e.layout.write_index([{**manifest, **ref(ref_name)}])
    return archive(e.layout.root, e.stack.tmp / f"{name}.tar")


def pushed(e: Env, layers: list[LayerBlob], repo: str) -> str:
    e.layout.write_index([{**e.layout.image(layers), **ref("push")}])
    dest = f"{e.registry.host}/{repo}"
    push(e.layout.root, "push", dest)
    return dest


def layer_tars(e: Env, layers: list[LayerBlob], name: str) -> list[Path]:
    out = []
    for k, layer in enumerate(layers):
        path = e.stack.tmp / f"{name}-layer{k}.tar"
        path.write_bytes(layer.tar)
        out.append(path)
    return out


def assert_registered(e: Env, proc: subprocess.CompletedProcess[str], name: str) -> None:
    assert proc.returncode == 0, proc.stderr
    shown, _, digest = proc.stdout.strip().rpartition(": ")
    assert shown == name and digest.startswith("sha256:"), proc.stdout
    assert proc.stderr == "", proc.stderr  # no terminal: no progress
    assert list(e.staging.iterdir()) == [], "the staging directory is removed"
    assert "erofs-fuse-" not in e.ctr("leases", "ls"), "the lease is released"


def assert_no_unpack(e: Env) -> None:
    log = e.stack.containerd_log.read_text(errors="replace")
    assert "diff applied" not in log, "containerd unpacked a layer itself"


def test_import_runs_without_unpack(env_: Env) -> None:
    e = env_
    tar = image_archive(e, "tree", e.tree, TREE)
    proc = e.image("import", "-j", "2", str(tar))
    assert_registered(e, proc, TREE)
    assert e.ctr("images", "ls", "-q").split() == [TREE]
    out = e.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, TREE, "t-cat",
                "/bin/busybox", "cat", "/etc/hello")
    assert out == "hello again\n"
    assert_no_unpack(e)
    # no layer blob was stored: only the config and the manifest
    blobs = e.ctr("content", "ls", "-q").split()
    assert len(blobs) == 2 and not {layer.descriptor["digest"] for layer in e.tree} & set(blobs)
    assert len(e.layer_files()) == 4, e.layer_files()  # two layers and their trees
    assert_rootfs_is_kernel_overlay(e.stack, TREE, layer_tars(e, e.tree, "tree"),
                                    "/bin/busybox", "sleep", "600")
    # importing again converts nothing (no staging directory needed) and changes nothing;
    # nor does the layout directory itself under another name
    assert_registered(e, e.image("import", str(tar), staging="/proc/no/staging"), TREE)
    renamed = "example.com/pulltest/renamed:1"
    assert_registered(e, e.image("import", "--name", renamed, str(e.layout.root),
                                 staging="/proc/no/staging"), renamed)
    assert sorted(e.ctr("images", "ls", "-q").split()) == sorted([TREE, renamed])
    e.ctr("images", "rm", renamed)
    assert len(e.layer_files()) == 4


def test_pull_shares_the_base_layer(env_: Env) -> None:
    """A second image on the same base, from the registry: only its own layer is converted
    (from the registry's stream); the same image in a second namespace converts nothing."""
    e = env_
    extra = e.layout.layer([directory("pulled"), file("pulled/msg", "from the registry\n")])
    layers = [e.tree[0], extra]
    name = pushed(e, layers, "test/app:v1")
    before = e.layer_files()
    assert_registered(e, e.image("pull", name), name)
    assert len(e.layer_files()) == len(before) + 2, "one new layer file and its tree"
    out = e.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-pull",
                "/bin/busybox", "cat", "/pulled/msg")
    assert out == "from the registry\n"
    assert_rootfs_is_kernel_overlay(e.stack, name, layer_tars(e, layers, "app"),
                                    "/bin/busybox", "sleep", "600")
    # another namespace: the snapshotter holds every layer already, nothing is converted (a
    # staging directory that cannot be made is never needed)
    files = e.layer_files()
    assert_registered(e, e.image("pull", name, ns=OTHER_NS, staging="/proc/no/staging"), name)
    assert e.layer_files() == files
    out = e.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-other",
                "/bin/busybox", "cat", "/pulled/msg", ns=OTHER_NS)
    assert out == "from the registry\n"
    # a name normalized as containerd's: docker.io/library/... for a bare name is not
    # testable offline; the registry's host stays as given
    assert e.ctr("images", "ls", "-q", ns=OTHER_NS).split() == [name]
    assert_no_unpack(e)


def fresh_layers(e: Env, tag: str) -> list[LayerBlob]:
    """busybox and a layer no other test has (so that it must be converted)."""
    return [e.layout.layer(busybox_entries()),
            e.layout.layer([file(f"{tag}.txt", f"only in {tag}\n")])]


def tampered_archive(e: Env) -> Path:
    """An archive whose top layer blob is not the one its digest names, though it holds the
    same tar: the gzip header's OS byte is changed, which no decompressor checks."""
    layers = fresh_layers(e, "tampered")
    tar = image_archive(e, "tampered", layers, "example.com/bad/tampered:1")
    digest = layers[1].descriptor["digest"].removeprefix("sha256:")
    with tarfile.open(tar) as t:
        offset = t.getmember(f"blobs/sha256/{digest}").offset_data + 9  # RFC 1952: OS
    with open(tar, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    return tar


BAD = ["unknown-tag", "corrupt-blob", "wrong-diff-id", "no-containerd", "no-snapshotter",
       "unknown-snapshotter", "not-our-snapshotter", "no-name"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_leaves_nothing(env_: Env, case: str) -> None:
    e = env_
    before = {ns: e.snapshots(ns) for ns in ("default", OTHER_NS)}
    images = e.ctr("images", "ls", "-q").split()
    files = e.layer_files()
    args: tuple[str, ...]
    if case == "unknown-tag":
        args = ("pull", f"{e.registry.host}/test/app:nope")
        expect = "nope"
    elif case == "corrupt-blob":
        args = ("import", str(tampered_archive(e)))
        expect = "hashes to"
    elif case == "wrong-diff-id":
        layers = fresh_layers(e, "lying")
        tar = image_archive(e, "lying", layers, "example.com/bad/lying:1",
                            diff_ids=[layers[0].diff_id, sha256(b"not this layer")])
        args = ("import", str(tar))
        expect = "diff_id"
    elif case == "no-containerd":
        args = ("import", "-a", str(e.stack.tmp / "nothing.sock"),
                str(image_archive(e, "nocd", fresh_layers(e, "nocd"), "example.com/bad/x:1")))
        expect = "nothing.sock"
    elif case == "no-snapshotter":
        e.stack.stop_snapshotter()
        args = ("import", str(image_archive(e, "nosn", fresh_layers(e, "nosn"),
                                            "example.com/bad/nosn:1")))
        expect = "cannot reach its snapshotter 'erofs-fuse'"
    elif case == "unknown-snapshotter":
        args = ("import", "--snapshotter", "nosuch",
                str(image_archive(e, "nosuch", fresh_layers(e, "nosuch"), "example.com/bad/n:1")))
        expect = "nosuch"
    elif case == "not-our-snapshotter":
        args = ("import", "--snapshotter", "overlayfs",
                str(image_archive(e, "ovl", fresh_layers(e, "ovl"), "example.com/bad/ovl:1")))
        expect = "not erofs-fuse"
    else:
        args = ("import", str(image_archive(e, "noname", fresh_layers(e, "noname"), "v1")))
        expect = "--name"
    try:
        proc = e.image(*args)
    finally:
        if e.stack.snapshotter is None:
            e.stack.start_snapshotter()
            e.stack.wait_reachable()
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert proc.stdout == ""
    assert e.ctr("images", "ls", "-q").split() == images
    assert "erofs-fuse-" not in e.ctr("leases", "ls")
    assert not e.staging.exists() or list(e.staging.iterdir()) == []
    assert {ns: e.snapshots(ns) for ns in ("default", OTHER_NS)} == before
    assert e.snapshots(snapshotter="overlayfs") == []
    wait_for(lambda: e.layer_files() == files, 10, "the layer files to be as before")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_leaves_nothing(env_: Env, sig: signal.Signals) -> None:
    """Ctrl-C or SIGTERM while the layers are converted: the workers are cancelled, and
    nothing is registered or left behind; the exit status is 128 + the signal."""
    e = env_
    layers = [e.layout.layer(busybox_entries()),
              e.layout.layer(many_files_tar(40000, 16) + f"{sig}".encode().ljust(512, b"\0"))]
    tar = image_archive(e, f"big-{sig}", layers, f"example.com/big/interrupted:{int(sig)}")
    before = e.snapshots()
    proc = subprocess.Popen(e.command("import", str(tar)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    try:
        def converting() -> bool:
            return any(run.is_dir() and any(run.iterdir()) for run in e.staging.iterdir()) \
                if e.staging.exists() else False
        wait_for(converting, 30, "the conversion to start")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, (out, err)
    assert len(err.splitlines()) == 1 and "interrupted" in err, err
    assert out == ""
    assert "interrupted" not in e.ctr("images", "ls", "-q")
    assert "erofs-fuse-" not in e.ctr("leases", "ls")
    assert list(e.staging.iterdir()) == []
    assert e.snapshots() == before


def test_killed_run_is_cleaned_by_the_next(env_: Env) -> None:
    """SIGKILL of ``image import`` while it converts leaves its lease and staging directory;
    the next run removes both (their owner is dead) and registers the image."""
    e = env_
    layers = [e.layout.layer(busybox_entries()),
              e.layout.layer(many_files_tar(40000, 16) + b"killed".ljust(512, b"\0"))]
    name = "example.com/big/killed:1"
    tar = image_archive(e, "killed", layers, name)
    proc = subprocess.Popen(e.command("import", str(tar)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env())
    try:
        def converting() -> bool:
            return any(run.is_dir() and any(run.iterdir()) for run in e.staging.iterdir()) \
                if e.staging.exists() else False
        wait_for(converting, 30, "the conversion to start")
    finally:
        proc.kill()
        proc.wait()
    # its workers die with it or finish their layer; either way the lease and the directory stay
    assert "erofs-fuse-" in e.ctr("leases", "ls")
    assert [p.name for p in e.staging.iterdir()]
    assert_registered(e, e.image("import", str(tar)), name)


def test_containerd_logs_its_own_unpacks(env_: Env) -> None:
    """The control for assert_no_unpack: ``ctr images import`` unpacks through containerd's
    differ, and its debug log says so."""
    e = env_
    tar = image_archive(e, "ctr", fresh_layers(e, "ctr"), "example.com/control/ctr:1")
    e.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(tar))
    assert "diff applied" in e.stack.containerd_log.read_text(errors="replace")


def test_removal_leaves_nothing(env_: Env) -> None:
    """``ctr images rm`` in both namespaces: garbage collection removes every snapshot, and
    with the last one each layer file."""
    e = env_
    e.stack.wait_reachable()
    for ns in ("default", OTHER_NS):
        names = e.ctr("images", "ls", "-q", ns=ns).split()
        e.ctr("images", "rm", "--sync", *names, ns=ns)

    def empty() -> bool:
        return not e.snapshots() and not e.snapshots(OTHER_NS) and not e.layer_files()

    wait_for(empty, 30, "garbage collection of every snapshot and layer file")
    assert e.stack.chain_mounts() == []
