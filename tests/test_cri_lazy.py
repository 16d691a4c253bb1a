"""CRI's pulls of images ``erofs-fuse push`` made, taken lazily by the snapshotter, and the
snapshotter's ``--cache-size``, at the RPC level.

The Prepares are those containerd's unpacker sends for CRI with ``disable_snapshot_annotations
= false`` (containerd-client.md 3.2, 4.2): ``containerd.io/snapshot.ref`` and CRI's four labels,
bottom up, each on the chain below. They are sent here straight to a snapshotter of its own:
containerd 1.6 sends them only for layers whose media type it knows as a layer, which
``application/vnd.erofs.layer.v1`` is not (its CRI downloads such blobs itself and fails to
apply them: ``test_containerd_16_cri_does_not_label_erofs_layers``). The registry is Debian's
docker-registry behind the fault proxy, which counts the blob bytes it serves.

A pushed image is committed lazily: no layer blob is read at pull, the chain's first mount
reads trees and a little metadata, and the merged tree equals the kernel's overlayfs over GNU
tar's extraction of the same layers. An image of ordinary layers keeps the convert path. A
snapshotter given ``--cache-size 1`` evicts a lazy layer no mount uses when another chain
mounts; with the default it keeps it.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri import Cri
from ctrstack import CRI_NS, containerd_stack, direct_snapshotter
from erofs_fuse.containerd.api import snapshots_pb2 as pb
from erofs_fuse.containerd.labels import (CRI_IMAGE_REF, CRI_LAYER, CRI_LAYERS, CRI_MANIFEST,
                                          LAZY_LABEL, SNAPSHOT_REF, XATTR_FREE_LABEL)
from erofs_fuse.lazy import DEFAULT_UNIT as UNIT
from erofs_fuse.oci.image import chain_ids
from erofs_fuse.registry.push import ANNOTATIONS
from layertar import extracted
from mounting import env, kernel_overlay
from ocilayout import LayerBlob, Layout, busybox_entries, directory, file, ref
from registry_server import FaultProxy, Registry, push
from rootfs import tree_layers
from treeview import view_of_dir

CLI = [sys.executable, "-m", "erofs_fuse"]
BIG = 4 << 20  # a file of the lazy image that nothing here reads before the tree compare


@dataclass
class Pushed:
    name: str  # HOST/REPO:TAG through the proxy, as CRI names it
    manifest: str  # its digest
    layers: list[dict[str, Any]]  # the manifest's layer descriptors
    diff_ids: list[str]

    @property
    def chains(self) -> list[str]:
        return chain_ids(self.diff_ids)


@dataclass
class Env:
    registry: Registry
    proxy: FaultProxy
    layout: Layout
    blobs: list[LayerBlob]  # the lazy image's layers, as tars
    lazy: Pushed  # by erofs-fuse push
    tmp: Path


def registry_json(host: str, path: str) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{host}/v2/{path}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def pushed(registry: Registry, proxy: FaultProxy, repo: str, tag: str) -> Pushed:
    """What the registry holds for ``repo:tag``: manifest digest, layers, diff_ids."""
    req = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        digest = resp.headers["Docker-Content-Digest"]
        manifest = json.loads(resp.read())
    config = registry_json(registry.host, f"{repo}/blobs/{manifest['config']['digest']}")
    return Pushed(f"{proxy.host}/{repo}:{tag}", digest, manifest["layers"],
                  config["rootfs"]["diff_ids"])


def erofs_push(layout: Layout, layers: list[LayerBlob], dest: str) -> None:
    layout.write_index([{**layout.image(layers), **ref("example.com/pushed:1")}])
    proc = subprocess.run([*CLI, "push", "--plain-http", "-q", "-j", "2", str(layout.root),
                           dest], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def env_(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("cri-lazy")
    layout = Layout(tmp / "layout")
    blobs = tree_layers(layout)
    blobs.append(layout.layer([directory("lazy"), file("lazy/msg", "pulled lazily by CRI\n"),
                               file("lazy/big", random.Random(3).randbytes(BIG))]))
    registry = Registry(tmp / "registry")
    proxy = FaultProxy(registry.host)
    try:
        erofs_push(layout, blobs, f"{registry.host}/test/lazycri:v1")
        yield Env(registry, proxy, layout, blobs,
                  pushed(registry, proxy, "test/lazycri", "v1"), tmp)
    finally:
        proxy.stop()
        registry.stop()


def list_named(stub: Any, chain: str, parent: str) -> str:
    found = [i for r in stub.List(pb.ListSnapshotsRequest(
        filters=[f'labels."{SNAPSHOT_REF}"=={chain},parent=={parent}'])) for i in r.info]
    assert len(found) == 1 and found[0].kind == pb.COMMITTED, found
    name: str = found[0].name
    return name


def every_row(stub: Any) -> list[Any]:
    return [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]


def cri_pull(stub: Any, image: Pushed, seq: int = 1) -> str:
    """Every layer's Prepare as containerd's unpacker sends it for CRI, bottom up, each
    answered ALREADY_EXISTS; the top snapshot's name."""
    parent = ""
    digests = [layer["digest"] for layer in image.layers]
    for k, chain in enumerate(image.chains):
        labels = {SNAPSHOT_REF: chain, CRI_IMAGE_REF: image.name, CRI_MANIFEST: image.manifest,
                  CRI_LAYER: digests[k], CRI_LAYERS: ",".join(digests[k:])}
        request = pb.PrepareSnapshotRequest(key=f"{CRI_NS}/{seq}{k}/extract-{k} {chain}",
                                            parent=parent, labels=labels)
        with pytest.raises(grpc.RpcError) as info:
            stub.Prepare(request)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
        parent = list_named(stub, chain, parent)
    return parent


@contextlib.contextmanager
def viewed(stub: Any, key: str, parent: str) -> Iterator[Path]:
    """A view of ``parent``: the directory of the chain's mount (its bind's source)."""
    reply = stub.View(pb.ViewSnapshotRequest(key=key, parent=parent))
    (mount,) = reply.mounts
    assert mount.type == "bind", mount
    try:
        yield Path(mount.source)
    finally:
        stub.Remove(pb.RemoveSnapshotRequest(key=key))


def layer_blob_gets(proxy: FaultProxy, image: Pushed) -> int:
    """GETs of the image's layer blobs (whole or ranges) the proxy served."""
    total = 0
    for seen in proxy.seen:
        if seen.method == "GET" and any(seen.path.endswith(layer["digest"])
                                        for layer in image.layers):
            total += 1
    return total


def test_cri_pull_of_a_pushed_image_is_lazy(env_: Env) -> None:
    e = env_
    trees = sum(int(layer["annotations"][ANNOTATIONS.tree_size]) for layer in e.lazy.layers)
    with direct_snapshotter("efs-crilazy-") as (stub, stack):
        e.proxy.blob_bytes, e.proxy.seen = 0, []
        start = time.monotonic()
        top = cri_pull(stub, e.lazy)
        pulled = time.monotonic() - start
        at_pull = e.proxy.blob_bytes
        assert layer_blob_gets(e.proxy, e.lazy) == 0, "no layer blob read at pull"
        log = stack.log.read_text(errors="replace")
        assert "converted to" not in log and "fetching and converting" not in log, log
        assert log.count(f"{e.lazy.name}@{e.lazy.manifest}: 3 layers of erofs-fuse push: "
                         "committed lazily, none fetched") == 1, log
        assert list((stack.root / "layers").iterdir()) == [], "no layer file taken in"
        assert list((stack.root / "incoming").iterdir()) == []
        lazy = sorted(i.labels[LAZY_LABEL] for i in every_row(stub) if LAZY_LABEL in i.labels)
        repo = e.lazy.name.rpartition(":")[0]
        assert lazy == [f"lazy:{repo}@{e.lazy.manifest}#{k}" for k in range(len(e.blobs))]
        # push's annotation: the tree's layers show xattrs, the last one none
        free = {i.labels[LAZY_LABEL].rpartition("#")[2]: i.labels.get(XATTR_FREE_LABEL)
                for i in every_row(stub) if LAZY_LABEL in i.labels}
        assert free == {"0": None, "1": None, "2": "true"}, free
        for k, chain in enumerate(e.lazy.chains):
            assert re.search(rf"committed \S*{chain[7:]}\S* \({e.lazy.diff_ids[k]}\) from "
                             rf"lazy:\S+@{e.lazy.manifest}#{k}", log), log
        with viewed(stub, f"{CRI_NS}/90/view", top) as root:
            first_mount = e.proxy.blob_bytes - at_pull
            assert (root / "lazy/msg").read_text() == "pulled lazily by CRI\n"
            small = e.proxy.blob_bytes - at_pull
            print(f"\nCRI pull of {len(e.lazy.layers)} pushed layers "
                  f"({sum(layer['size'] for layer in e.lazy.layers)} bytes, trees {trees}): "
                  f"{pulled:.2f} s, {at_pull} blob bytes at pull (the config), first mount "
                  f"{first_mount}, "
                  f"after reading /lazy/msg {small}")
            # the trees, and the blocks the first mount reads: a fetch unit or two per layer
            assert first_mount <= trees + 2 * len(e.lazy.layers) * UNIT, first_mount
            assert small < BIG // 2, "the large file is not fetched to read a small one"
            tars = []
            for k, blob in enumerate(e.blobs):
                path = e.tmp / f"layer{k}.tar"
                path.write_bytes(blob.tar)
                tars.append(str(path))
            with contextlib.ExitStack() as es:
                lowers = [es.enter_context(extracted(tar)) for tar in tars]
                kernel = view_of_dir(es.enter_context(kernel_overlay(lowers[::-1])))
            ours = view_of_dir(str(root))
        diff = kernel.diff(ours)
        assert not diff, "the lazy chain differs from the kernel's overlay:\n" + "\n".join(diff)
        # a layer shows xattrs: the chain is not mounted -o noxattr
        assert re.search(r"mounted chain \d+ \(3 layers\) at ", stack.log.read_text())
        assert stack.chain_mounts() == [], "the view's chain goes with it (no linger)"


def test_an_ordinary_image_keeps_the_convert_path(env_: Env) -> None:
    """An image of gzip tar layers (skopeo's push): converted by the snapshotter as before."""
    e = env_
    layers = [e.layout.layer(busybox_entries() + [file("plain", "converted\n")])]
    e.layout.write_index([{**e.layout.image(layers), **ref("plain")}])
    push(e.layout.root, "plain", f"{e.registry.host}/test/plaincri:v1")
    image = pushed(e.registry, e.proxy, "test/plaincri", "v1")
    with direct_snapshotter("efs-crilazy-") as (stub, stack):
        top = cri_pull(stub, image)
        log = stack.log.read_text(errors="replace")
        assert "fetching and converting 1 layers" in log, log
        files = sorted(p.name for p in (stack.root / "layers").iterdir())
        assert files == [f"sha256-{layers[0].diff_id[7:]}.erofs{s}" for s in ("", ".verity")]
        with viewed(stub, f"{CRI_NS}/90/view", top) as root:
            assert (root / "plain").read_text() == "converted\n"


def cache_entries(root: Path) -> list[str]:
    cache = root / "cache"
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) \
        if cache.exists() else []


@pytest.mark.parametrize("size", ["1", None])
def test_cache_size_reaches_the_chain_mounts(env_: Env, size: str | None) -> None:
    """Two lazy images, mounted one after the other: with ``--cache-size 1`` the second mount
    evicts the first image's layers (no mount uses them any more); with the default (10G)
    they stay."""
    e = env_
    other = [e.layout.layer([file("other", "another image\n")])]
    erofs_push(e.layout, other, f"{e.registry.host}/test/othercri:v1")
    second = pushed(e.registry, e.proxy, "test/othercri", "v1")
    args = ("--cache-size", size) if size else ()
    with direct_snapshotter("efs-crilazy-", args=args) as (stub, stack):
        first_top = cri_pull(stub, e.lazy, 1)
        with viewed(stub, f"{CRI_NS}/90/v1", first_top) as root:
            assert (root / "lazy/msg").read_text() == "pulled lazily by CRI\n"
        first = cache_entries(stack.root)
        assert len(first) == len(e.lazy.layers), first
        second_top = cri_pull(stub, second, 2)
        with viewed(stub, f"{CRI_NS}/91/v2", second_top) as root:
            assert (root / "other").read_text() == "another image\n"
            now = cache_entries(stack.root)
        if size:
            assert not set(first) & set(now), f"--cache-size 1 evicts unused layers: {now}"
            assert len(now) == 1, now
        else:
            assert set(first) < set(now), now


def test_containerd_16_cri_does_not_label_erofs_layers(env_: Env) -> None:
    """Why the Prepares above are sent by hand: containerd 1.6's CRI does not take
    ``application/vnd.erofs.layer.v1`` for a layer (``images.IsLayerType``), so it gives such
    layers no CRI labels, downloads their blobs itself and fails to apply them. When this
    fails, containerd has learnt the media type: drive the lazy pull through CRI instead."""
    e = env_
    with containerd_stack(cri=True) as stack, Cri(stack.address) as cri:
        e.proxy.blob_bytes = 0
        with pytest.raises(grpc.RpcError) as info:
            cri.pull(e.lazy.name)
        assert "no processor for media-type" in (info.value.details() or "")
        assert e.proxy.blob_bytes >= sum(layer["size"] for layer in e.lazy.layers)
        # its fallback unpack's Prepare carried no label at all (not even the snapshot.ref
        # that gets the overlay form): the snapshotter had nothing to resolve
        log = stack.log.read_text(errors="replace")
        assert re.search(r"<- Prepare key='k8s\.io/\d+/extract-[^']*': ok, mounts bind", log), log
        assert "not fetched by us" not in log and "committed" not in log, log


def test_cache_size_is_checked() -> None:
    proc = subprocess.run([*CLI, "snapshotter", "--cache-size", "12Q", "--root",
                           "/nonexistent/never-made"], capture_output=True, text=True,
                          env=env(), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        "erofs-fuse: snapshotter: --cache-size 12Q: expected a size such as 512M or 10G"
