"""CRI's own PullImage through our snapshotter: the snapshotter fetches and converts the layers.

containerd 1.6 with its CRI plugin (``ctrstack.containerd_stack(cri=True)``: ``snapshotter =
"erofs-fuse"``, ``disable_snapshot_annotations = false``) and a real registry on 127.0.0.1
(images pushed with skopeo). PullImage over containerd's socket (``tests/cri.py``): at the first
layer's Prepare the snapshotter resolves the manifest itself and converts every layer at once
from the registry's streams; each Prepare answers ALREADY_EXISTS, so containerd downloads no
layer blob (its content store has the manifest and config only) and applies no diff. The
container's root equals the kernel's overlay over GNU tar's extraction. A second image on the
same base converts only its own layer. A tampered blob fails the pull with the cause, leaving
no snapshot, layer file or staging directory.

The tests run in order on one containerd.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from cri import Cri
from ctrstack import CRI_NS, SNAPSHOTTER, Stack, containerd_stack, direct_snapshotter, wait_for
from erofs_fuse.containerd.api import snapshots_pb2 as spb
from erofs_fuse.containerd.labels import (CRI_IMAGE_REF, CRI_LAYER, CRI_LAYERS, CRI_MANIFEST,
                                          SNAPSHOT_REF)
from ocilayout import LayerBlob, Layout, busybox_entries, directory, file, ref
from registry_server import FaultProxy, Registry, htpasswd, push
from rootfs import assert_rootfs_is_kernel_overlay, tree_layers


@dataclass
class Env:
    stack: Stack
    registry: Registry
    layout: Layout
    cri: Cri

    def push(self, layers: list[LayerBlob], repo: str, registry: Registry | None = None,
             creds: str | None = None) -> str:
        self.layout.write_index([{**self.layout.image(layers), **ref("push")}])
        dest = f"{(registry or self.registry).host}/{repo}"
        push(self.layout.root, "push", dest, creds=creds)
        return dest

    def layer_files(self) -> list[str]:
        layers = self.stack.root / "layers"
        return sorted(p.name for p in layers.iterdir()) if layers.exists() else []

    def snapshots(self) -> list[str]:
        out = self.stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        return sorted(line.split()[0] for line in out.splitlines()[1:] if line.strip())

    def blobs(self) -> set[str]:
        return set(self.stack.ctr("content", "ls", "-q").split())

    def converted(self) -> int:
        """Layers the snapshotter converted so far (its log)."""
        return len(re.findall(r"layer \d+ \(sha256:[0-9a-f]{12}\): converted to ",
                              self.stack.log.read_text(errors="replace")))

    def xattr_free(self, layer: LayerBlob) -> bool:
        """Whether the snapshotter recorded the layer as showing no xattr (its database)."""
        name = "layers/sha256-" + layer.diff_id.removeprefix("sha256:") + ".erofs"
        db = sqlite3.connect(f"file:{self.stack.root / 'metadata.db'}?mode=ro", uri=True)
        try:
            (free,) = db.execute("SELECT max(xattr_free) FROM snapshots WHERE layer = ?",
                                 (name,)).fetchone()
        finally:
            db.close()
        assert free is not None, f"no snapshot has {name}"
        return bool(free)

    def incoming(self) -> list[str]:
        return sorted(p.name for p in (self.stack.root / "incoming").iterdir())

    def tars(self, layers: list[LayerBlob], name: str) -> list[Path]:
        out = []
        for k, layer in enumerate(layers):
            path = self.stack.tmp / f"{name}-layer{k}.tar"
            path.write_bytes(layer.tar)
            out.append(path)
        return out


@pytest.fixture(scope="module")
def env_() -> Iterator[Env]:
    with containerd_stack(cri=True) as stack:
        stack.ns = CRI_NS
        assert re.search(r"io\.containerd\.grpc\.v1 +cri .* ok", stack.ctr("plugins", "ls"))
        registry = Registry(stack.tmp / "registry")
        try:
            with Cri(stack.address) as cri:
                yield Env(stack, registry, Layout(stack.tmp / "layout"), cri)
        finally:
            registry.stop()


def assert_no_unpack(e: Env) -> None:
    log = e.stack.containerd_log.read_text(errors="replace")
    assert "diff applied" not in log, "containerd unpacked a layer itself"


def assert_failed_leaving_nothing(e: Env, name: str, layers: list[LayerBlob], expect: str,
                                  done_below: int = 0) -> None:
    """PullImage of ``name`` fails with ``expect`` in its message; no active snapshot,
    staging directory, layer blob or image record is left, and no snapshot or layer file but
    those of the ``done_below`` bottom layers (which the failure may or may not have let
    finish first: whole layers, which containerd's GC removes as no image uses them)."""
    snapshots, files = set(e.snapshots()), set(e.layer_files())
    allowed = {layers[0].diff_id} if done_below else set()  # chain id of layer 1: its diff_id
    allowed_files = {f"sha256-{layer.diff_id[7:]}.erofs{suffix}"
                     for layer in layers[:done_below] for suffix in ("", ".verity")}
    assert done_below <= 1  # (chain ids above the first are not computed here)
    with pytest.raises(grpc.RpcError) as raised:
        e.cri.pull(name)
    message = raised.value.details() or ""
    assert expect in message, message
    assert e.cri.status(name) is None
    assert set(e.snapshots()) - snapshots <= allowed
    kinds = e.stack.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
    assert "Active" not in kinds, kinds
    assert set(e.layer_files()) - files <= allowed_files
    assert e.incoming() == []
    assert not {layer.descriptor["digest"] for layer in layers} & e.blobs()
    assert_no_unpack(e)


def test_pull_image_converts_in_the_snapshotter(env_: Env) -> None:
    e = env_
    layers = tree_layers(e.layout)
    layers.append(e.layout.layer([directory("cri"), file("cri/msg", "pulled by CRI\n")]))
    name = e.push(layers, "test/cri:v1")
    image_id = e.cri.pull(name)
    assert image_id.startswith("sha256:")
    status = e.cri.status(name)
    assert status is not None and status.id == image_id and name in status.repo_tags
    # containerd fetched no layer: its content store has the manifest and the config
    blobs = e.blobs()
    assert len(blobs) == 2 and image_id in blobs, blobs
    assert not {layer.descriptor["digest"] for layer in layers} & blobs
    assert_no_unpack(e)
    assert e.converted() == 3
    assert "fetching and converting 3 layers" in e.stack.log.read_text()
    assert len(e.layer_files()) == 6, e.layer_files()  # three layers and their trees
    assert e.incoming() == [], "converted files are taken in, their directories removed"
    out = e.stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-cat",
                      "/bin/busybox", "cat", "/cri/msg", "/etc/hello")
    assert out == "pulled by CRI\nhello again\n"
    assert_rootfs_is_kernel_overlay(e.stack, name, e.tars(layers, "cri"),
                                    "/bin/busybox", "sleep", "600")
    assert_no_unpack(e)
    # the tree's layers show xattrs (security.capability, user.*), the last one none
    assert [e.xattr_free(layer) for layer in layers] == [False, False, True]


def test_second_image_converts_only_its_own_layer(env_: Env) -> None:
    e = env_
    base = tree_layers(e.layout)[0]  # the same bytes as the first image's base
    layers = [base, e.layout.layer([file("second.txt", "the second image\n")])]
    name = e.push(layers, "test/second:v1")
    before, files = e.converted(), e.layer_files()
    e.cri.pull(name)
    assert e.converted() == before + 1
    assert len(e.layer_files()) == len(files) + 2
    out = e.stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-second",
                      "/bin/busybox", "cat", "/second.txt")
    assert out == "the second image\n"
    # pulled again: nothing to do
    e.cri.pull(name)
    assert e.converted() == before + 1
    assert_no_unpack(e)


def test_concurrent_pulls_share_a_conversion(env_: Env) -> None:
    """Two images on different bases with the same top layer, pulled at once: the top layer
    (another chain in each) is converted once; both images run."""
    e = env_
    shared = e.layout.layer([file("shared.txt", "one conversion\n")])
    images = []
    for tag in ("a", "b"):
        base = e.layout.layer(busybox_entries() + [file(f"base-{tag}", f"{tag}\n")])
        images.append(e.push([base, shared], f"test/concurrent-{tag}:v1"))
    before, files = e.converted(), e.layer_files()
    with ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(e.cri.pull, images))
    assert len(set(ids)) == 2
    assert e.converted() == before + 3
    assert len(e.layer_files()) == len(files) + 6
    assert e.incoming() == []
    for k, name in enumerate(images):
        out = e.stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, f"t-conc{k}",
                          "/bin/busybox", "cat", "/shared.txt")
        assert out == "one conversion\n"
    assert_no_unpack(e)
    assert e.xattr_free(shared)  # converted by the snapshotter: its chains mount -o noxattr


def test_tampered_blob_fails_the_pull(env_: Env) -> None:
    """The registry serves a layer blob whose bytes are not its digest's: PullImage fails with
    the snapshotter's message, and nothing of the image is left."""
    e = env_
    layers = [e.layout.layer(busybox_entries() + [file("tampered", "x\n")]),
              e.layout.layer([file("top.txt", "top\n")])]
    name = e.push(layers, "test/tampered:v1")
    hexd = layers[0].descriptor["digest"].removeprefix("sha256:")
    stored = (e.registry.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd
              / "data")
    data = bytearray(stored.read_bytes())
    data[9] ^= 0x01  # the gzip header's OS byte (RFC 1952): no decompressor checks it
    stored.write_bytes(bytes(data))
    assert_failed_leaving_nothing(e, name, layers, f"blob sha256:{hexd} hashes to")


def test_registry_gone_mid_blob_fails_the_pull(env_: Env) -> None:
    """The connection breaks halfway through a layer blob, every time (a registry gone
    mid-pull), through a proxy that cuts only that blob's replies: the pull fails with that
    cause. (Cut once, the blob is fetched again by its own Prepare when the failure came
    before that Prepare waited for it, and the pull succeeds: hence a fault per fetch.)"""
    e = env_
    layers = [e.layout.layer(busybox_entries() + [file("cut", "x\n")]),
              e.layout.layer([file("top.txt", "top of the cut image\n")])]
    e.push(layers, "test/cut:v1")
    hexd = layers[1].descriptor["digest"].removeprefix("sha256:")
    proxy = FaultProxy(e.registry.host, ["truncate"] * 4, match=hexd)
    try:
        assert_failed_leaving_nothing(e, f"{proxy.host}/test/cut:v1", layers,
                                      "reply broke off", done_below=1)
        assert proxy.paths(hexd), "the layer was fetched through the proxy"
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def auth_registry(env_: Env) -> Iterator[Registry]:
    root = env_.stack.tmp / "auth-registry"
    root.mkdir()
    registry = Registry(root, htpasswd(root / "htpasswd", "puller", "s3cret"))
    try:
        yield registry
    finally:
        registry.stop()


def test_credentials_from_the_snapshotters_docker_config(env_: Env,
                                                         auth_registry: Registry) -> None:
    """A registry that wants a password: the snapshotter sends its own credentials
    (``~/.docker/config.json``, here ``$DOCKER_CONFIG``); CRI's never reach it."""
    e = env_
    layers = [e.layout.layer(busybox_entries() + [file("auth", "with credentials\n")])]
    name = e.push(layers, "test/auth:v1", auth_registry, creds="puller:s3cret")
    e.stack.docker_config.mkdir(exist_ok=True)
    token = base64.b64encode(b"puller:s3cret").decode()
    (e.stack.docker_config / "config.json").write_text(
        json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    try:
        before = e.converted()
        e.cri.pull(name, auth=("puller", "s3cret"))
    finally:
        (e.stack.docker_config / "config.json").unlink()
    assert e.converted() == before + 1
    out = e.stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-auth",
                      "/bin/busybox", "cat", "/auth")
    assert out == "with credentials\n"
    assert_no_unpack(e)


def test_without_credentials_containerd_unpacks(env_: Env, auth_registry: Registry) -> None:
    """The snapshotter cannot read the image (no credentials of its own): it answers the
    Prepares as usual, and containerd, with CRI's credentials, downloads and applies the
    layers. The last test that pulls: containerd's log has unpacks from here on."""
    e = env_
    layers = [e.layout.layer(busybox_entries() + [file("fallback", "unpacked by containerd\n")])]
    name = e.push(layers, "test/fallback:v1", auth_registry, creds="puller:s3cret")
    before = e.converted()
    e.cri.pull(name, auth=("puller", "s3cret"))
    assert e.converted() == before
    assert "not fetched by us" in e.stack.log.read_text(errors="replace")
    assert "diff applied" in e.stack.containerd_log.read_text(errors="replace")
    out = e.stack.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-fallback",
                      "/bin/busybox", "cat", "/fallback")
    assert out == "unpacked by containerd\n"


def test_remove_image_removes_everything(env_: Env) -> None:
    """RemoveImage of every image: garbage collection removes the snapshots, and with the
    last user of each layer file the file."""
    e = env_
    for image in e.cri.list():
        e.cri.remove(image.id)
    assert e.cri.list() == []

    def empty() -> bool:
        return not e.snapshots() and not e.layer_files()

    wait_for(empty, 30, "garbage collection of every snapshot and layer file")
    assert e.stack.chain_mounts() == []


@pytest.mark.parametrize("case", ["no-registry", "bad-manifest-label"])
def test_unresolvable_image_gets_a_plain_prepare(case: str) -> None:
    """At the RPC level, as containerd calls it: CRI's labels naming a registry that does not
    answer, or a manifest digest that is not one, get an active snapshot's mounts (containerd
    then downloads and applies the layer), not an error."""
    digest = "sha256:" + "ab" * 32
    labels = {SNAPSHOT_REF: digest, CRI_IMAGE_REF: "127.0.0.1:1/test/none:v1",
              CRI_MANIFEST: digest, CRI_LAYER: digest, CRI_LAYERS: digest}
    reason = "127.0.0.1:1"
    if case == "bad-manifest-label":
        labels[CRI_MANIFEST] = "sha256:../../etc"
        reason = "not sha256:<64 hex digits>"  # refused before any request
    with direct_snapshotter("efs-cri-") as (stub, stack):
        reply = stub.Prepare(spb.PrepareSnapshotRequest(key="k8s.io/1/extract-1 x",
                                                        labels=labels))
        assert [m.type for m in reply.mounts] == ["overlay"]
        log = stack.snapshotter_log()
        assert "not fetched by us" in log and reason in log, log
        assert list((stack.root / "incoming").iterdir()) == []
