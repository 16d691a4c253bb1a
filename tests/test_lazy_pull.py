"""``erofs-fuse image pull --lazy`` against a real containerd 1.6 with our snapshotter
(``ctrstack.py``) and Debian's docker-registry behind the fault proxy, which counts the blob
bytes it serves (``registry_server.py``).

An image ``erofs-fuse push`` made (busybox, then a layer with a small and a large file) is
registered with no layer downloaded: only Merkle trees and the metadata the warm mount reads
come through. ``ctr run`` starts on the snapshotter's lazy mount, and the large file's bytes
never cross the proxy. Removal and GC leave no snapshot, no layer file and no mount. An image
of ordinary layers is refused with one line, leaving nothing. ``mount --layers`` takes a lazy
layer under a local file, ``--require-verity`` still holding for the local one.

The tests run in order on one containerd.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from erofs_fuse.lazy import DEFAULT_UNIT as UNIT
from erofs_fuse.registry.push import ANNOTATIONS

from ctrstack import SNAPSHOTTER, Stack, containerd_stack, wait_for
from mounting import env, force_unmount, is_mounted
from ocilayout import LayerBlob, Layout, busybox_entries, directory, file, ref
from registry_server import FaultProxy, Registry, push

CLI = [sys.executable, "-m", "erofs_fuse"]
BIG = 8 << 20  # bytes of the large file: never to be fetched
SMALL = "a small file, read through a lazy layer\n"
NAME = "lazyctr:v1"


@dataclass
class Env:
    stack: Stack
    registry: Registry
    proxy: FaultProxy
    layout: Layout
    blobs: list[LayerBlob]
    pushed: str  # REPO:TAG@sha256:... on the registry itself
    image_bytes: int  # the pushed EROFS layer blobs
    tree_bytes: int  # their Merkle tree blobs
    staging: Path

    def image(self, *args: str) -> subprocess.CompletedProcess[str]:
        action, rest = args[0], args[1:]
        return subprocess.run([*CLI, "image", action, "-a", self.stack.address,
                               "--staging", str(self.staging), *rest],
                              capture_output=True, text=True, env=env(), timeout=120)

    def ctr(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["ctr", "-a", self.stack.address, *args], capture_output=True,
                              text=True, timeout=120)
        assert not check or proc.returncode == 0, f"ctr {args}: {proc.stderr}"
        return proc.stdout

    def snapshots(self) -> list[str]:
        out = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]

    def layer_files(self) -> list[str]:
        layers = self.stack.root / "layers"
        return sorted(p.name for p in layers.iterdir()) if layers.exists() else []


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env(), timeout=300)


@pytest.fixture(scope="module")
def env_() -> Iterator[Env]:
    with containerd_stack() as stack:
        layout = Layout(stack.tmp / "layout")
        big = random.Random(7).randbytes(BIG)
        blobs = [layout.layer(busybox_entries()),
                 layout.layer([directory("data"), file("small", SMALL),
                               file("data/large", big)])]
        layout.write_index([{**layout.image(blobs), **ref("example.com/lazyctr:1")}])
        registry = Registry(stack.tmp / "registry")
        proxy = FaultProxy(registry.host)
        try:
            proc = run("push", "--plain-http", "-q", "-j", "2", str(layout.root),
                       f"{registry.host}/test/{NAME}")
            assert proc.returncode == 0, proc.stderr
            pushed = proc.stdout.strip()
            digest = pushed.rpartition("@")[2]
            manifest = registry_json(registry.host, f"test/lazyctr/manifests/{digest}")
            size = sum(layer["size"] for layer in manifest["layers"])
            trees = sum(int(layer["annotations"][ANNOTATIONS.tree_size])
                        for layer in manifest["layers"])
            yield Env(stack, registry, proxy, layout, blobs, pushed, size, trees,
                      stack.tmp / "staging")
        finally:
            proxy.stop()
            registry.stop()


def registry_json(host: str, path: str) -> dict:  # type: ignore[type-arg]
    import json
    import urllib.request

    req = urllib.request.Request(f"http://{host}/v2/{path}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_lazy_pull_then_run_fetches_no_large_file(env_: Env) -> None:
    e = env_
    name = f"{e.proxy.host}/test/{NAME}"
    e.proxy.blob_bytes = 0
    start = time.monotonic()
    proc = e.image("pull", "--lazy", name)
    pulled = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{name}: {e.pushed.rpartition('@')[2]}", proc.stdout
    at_pull = e.proxy.blob_bytes
    assert e.layer_files() == [], "a lazy pull takes no layer file in"
    assert e.ctr("images", "ls", "-q").split() == [name]
    assert len(e.snapshots()) == 2
    start = time.monotonic()
    out = e.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-lazy",
                "/bin/busybox", "cat", "/small")
    ran = time.monotonic() - start
    assert out == SMALL
    # push found no xattr in either layer and said so: the lazy chain is mounted -o noxattr
    assert re.search(r"mounted chain \d+ \(2 layers, noxattr\) at ", e.stack.log.read_text())
    fetched = e.proxy.blob_bytes
    print(f"\nimage {e.image_bytes} bytes (large file {BIG}); image pull --lazy "
          f"{pulled:.2f} s, {at_pull} blob bytes; ctr run ... cat /small {ran:.2f} s; "
          f"{fetched} blob bytes fetched in all (trees {e.tree_bytes})")
    # the trees, and the blocks the warm mount reads (superblock, root directory): a fetch
    # unit or two per layer
    assert at_pull <= e.tree_bytes + 2 * len(e.blobs) * UNIT, "trees and metadata only"
    assert fetched < BIG // 2, "the large file is never fetched"
    log = e.stack.containerd_log.read_text(errors="replace")
    assert "diff applied" not in log, "containerd unpacked a layer itself"
    # the container's reads went through the mount: its large file reads right, lazily
    out = e.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-lazy2",
                "/bin/busybox", "sha256sum", "/data/large")
    import hashlib
    big = random.Random(7).randbytes(BIG)
    assert out.split()[0] == hashlib.sha256(big).hexdigest()


def test_a_committed_layer_on_a_lazy_chain(env_: Env, tmp_path: Path) -> None:
    """A snapshot committed on the lazy image (as a build step would): the chain's mount
    holds lazy layers under a local one, which the snapshotter's --require-verity still
    covers (its --verity digest is passed; the lazy ones get none)."""
    e = env_
    rows = [line.split() for line in e.ctr("snapshots", "--snapshotter", SNAPSHOTTER,
                                           "ls").splitlines()[1:]]
    parents = {row[1] for row in rows if len(row) == 3}
    top = next(row[0] for row in rows if row[0] not in parents)
    sn = ["snapshots", "--snapshotter", SNAPSHOTTER]
    upper = tmp_path / "upper"
    upper.mkdir()
    e.ctr(*sn, "prepare", "step", top)
    cmd = e.ctr(*sn, "mounts", str(upper), "step").strip()
    subprocess.run(cmd, shell=True, check=True)
    try:
        (upper / "built").write_text("built on a lazy image\n")
    finally:
        subprocess.run(["umount", str(upper)], check=True)
    e.ctr(*sn, "commit", "built", "step")
    view = tmp_path / "view"
    view.mkdir()
    e.ctr(*sn, "view", "look", "built")
    subprocess.run(e.ctr(*sn, "mounts", str(view), "look").strip(), shell=True, check=True)
    try:
        assert (view / "built").read_text() == "built on a lazy image\n"
        assert (view / "small").read_text() == SMALL
    finally:
        subprocess.run(["umount", str(view)], check=True)
    e.ctr(*sn, "rm", "look", "built")


def test_pulling_again_changes_nothing(env_: Env) -> None:
    e = env_
    name = f"{e.proxy.host}/test/{NAME}"
    before = e.snapshots()
    proc = e.image("pull", "--lazy", name)
    assert proc.returncode == 0, proc.stderr
    assert e.snapshots() == before


def test_an_image_of_ordinary_layers_is_refused(env_: Env) -> None:
    e = env_
    e.layout.write_index([{**e.layout.image(e.blobs[:1]), **ref("plain")}])
    push(e.layout.root, "plain", f"{e.registry.host}/test/plain:v1")
    before = e.snapshots()
    proc = e.image("pull", "--lazy", f"{e.proxy.host}/test/plain:v1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a native EROFS layer" in lines[0], proc.stderr
    assert "without --lazy" in lines[0], proc.stderr
    assert "plain" not in e.ctr("images", "ls", "-q")
    assert e.snapshots() == before
    assert "erofs-fuse-" not in e.ctr("leases", "ls"), "the lease is released"


def test_mount_takes_a_lazy_layer_under_a_local_one(env_: Env, tmp_path: Path) -> None:
    """--layers lazy:...#0,LOCAL: the lazy layer verified by its manifest, the local one by
    --verity (with --require-verity, a local one without a digest is refused)."""
    e = env_
    top = tmp_path / "top.tar"
    top.write_bytes(e.layout.layer([directory("etc"), file("etc/top", "local top\n")],
                                   None).tar)
    proc = run("convert", "--seal", str(top), str(tmp_path / "top.erofs"))
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.split()[0]
    lazy = f"lazy:{e.proxy.host}/test/lazyctr@{e.pushed.rpartition('@')[2]}#0"
    layers = f"{lazy},{tmp_path / 'top.erofs'}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = str(tmp_path / "cache")
    refused = run("mount", "--layers", layers, "--require-verity", "--cache", cache, str(mnt))
    assert refused.returncode != 0 and not is_mounted(str(mnt))
    proc = run("mount", "--layers", layers, "--require-verity", "--verity", f"1={digest}",
               "--cache", cache, str(mnt))
    assert proc.returncode == 0, proc.stderr
    try:
        assert (mnt / "etc/top").read_text() == "local top\n"
        assert (mnt / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        assert not (mnt / "small").exists(), "layer 0 only"
    finally:
        force_unmount(str(mnt))
    bad = run("mount", "--layers", f"{lazy},{tmp_path / 'top.erofs'}", "--verity",
              f"0={digest}", "--cache", cache, str(mnt))
    assert bad.returncode == 2 and "lazy layer" in bad.stderr, bad.stderr


def test_removal_leaves_nothing(env_: Env) -> None:
    e = env_
    e.stack.wait_reachable()
    names = e.ctr("images", "ls", "-q").split()
    e.ctr("images", "rm", "--sync", *names)

    def empty() -> bool:
        return not e.snapshots() and not e.layer_files()

    wait_for(empty, 30, "garbage collection of every snapshot")
    assert e.stack.chain_mounts() == []
