"""``erofs_fuse.containerd``, the containerd client, against a real containerd 1.6 with our
snapshotter (``ctrstack.py``: a containerd of its own, temporary config, root and socket).

What the client wrote is checked with ``ctr``, containerd's own client: blobs (``content get``,
``content ls``), image records (``images ls``), leases (``leases ls``), ingests (``content
active``) and snapshots (``snapshots --snapshotter erofs-fuse ls``). One containerd serves the
module; each test uses names of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from ctrstack import NS, SNAPSHOTTER, Stack, containerd_stack
from erofs_fuse.containerd import (
    GC_EXPIRE,
    AlreadyExists,
    Client,
    ContainerdError,
    Descriptor,
    FailedPrecondition,
    Mount,
    NotFound,
    Unavailable,
    index_gc_labels,
    manifest_gc_labels,
    snapshot_gc_label,
)
from erofs_fuse.containerd.content import CHUNK
from erofs_fuse.oci.image import chain_ids
from ocilayout import Layout, busybox_entries, file

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with containerd_stack() as s:
        yield s


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.address, NS) as c:
        yield c


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ctr(stack: Stack, *args: str, ns: str = NS, check: bool = True) -> str:
    proc = subprocess.run(["ctr", "-a", stack.address, "-n", ns, *args],
                          capture_output=True, timeout=60)
    if check:
        assert proc.returncode == 0, f"ctr {' '.join(args)}: {proc.stderr.decode()}"
    return proc.stdout.decode(errors="replace")


def ctr_bytes(stack: Stack, *args: str, ns: str = NS) -> bytes:
    proc = subprocess.run(["ctr", "-a", stack.address, "-n", ns, *args],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def content_digests(stack: Stack, ns: str = NS) -> set[str]:
    return {line.split()[0] for line in ctr(stack, "content", "ls", "-q", ns=ns).splitlines()
            if line.strip()}


def our_leases(stack: Stack) -> list[str]:
    return [line for line in ctr(stack, "leases", "ls").splitlines()[1:]
            if "erofs-fuse-" in line]


def test_write_blob_and_read_back(stack: Stack, client: Client) -> None:
    small = b"a small blob\n"
    big = bytes(range(256)) * ((CHUNK * 5 // 2) // 256)  # three WRITEs
    with client.lease() as leased:
        assert leased.content.write_blob(f"test-{digest(small)}", small, digest(small),
                                         len(small), {"example.org/a": "1"})
        stream = io.BytesIO(big)
        assert leased.content.write_blob(f"test-{digest(big)}", stream, digest(big), len(big))
        # idempotent: the blob exists, its labels are still set
        assert not leased.content.write_blob(f"test-{digest(small)}", small, digest(small),
                                             len(small), {"example.org/b": "2"})
        assert our_leases(stack), "the lease exists during the block"
        collect_garbage(client)  # the lease header put the blobs in the lease: they stay
        assert {digest(small), digest(big)} <= content_digests(stack)
        # the lease's expiry label is set
        assert GC_EXPIRE in ctr(stack, "leases", "ls")
        info = leased.content.info(digest(small))
        assert (info.size, info.labels) == (len(small),
                                             {"example.org/a": "1", "example.org/b": "2"})
        assert leased.content.update_labels(digest(small), {"example.org/a": None}).labels == {
            "example.org/b": "2"}
        assert ctr_bytes(stack, "content", "get", digest(small)) == small
        client.images.put("test/keep-blobs:1", Descriptor(MANIFEST, digest(big), len(big)))
    assert our_leases(stack) == [], "the lease is deleted after the block"
    assert ctr_bytes(stack, "content", "get", digest(big)) == big
    assert client.content.read(digest(big)) == big
    assert client.content.read(digest(big), offset=CHUNK + 3, size=10) == big[CHUNK + 3:][:10]
    # the small blob is in no image: gone once the lease is and GC ran; the image keeps big
    collect_garbage(client)
    assert digest(small) not in content_digests(stack)
    assert digest(big) in content_digests(stack)
    client.images.delete("test/keep-blobs:1", sync=True)
    assert digest(big) not in content_digests(stack)


def test_parallel_writes_share_one_client(stack: Stack, client: Client) -> None:
    """Layers are converted at once: their blobs are written from several threads through one
    client (one channel), each on a stream of its own."""
    blobs = [bytes([k]) * (CHUNK + 1000 * k) for k in range(6)]
    with client.lease() as leased:
        def write(data: bytes) -> bool:
            return leased.content.write_blob(f"layer-{digest(data)}", io.BytesIO(data),
                                             digest(data), len(data))
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(write, blobs))
        for data in blobs:
            assert leased.content.read(digest(data)) == data
    collect_garbage(client)
    assert not {digest(b) for b in blobs} & content_digests(stack)


def test_namespace_header(stack: Stack, client: Client) -> None:
    data = b"only in one namespace\n"
    d = digest(data)
    with client.lease() as leased:
        leased.content.write_blob(f"test-{d}", data, d, len(data))
        client.images.put("test/ns:1", Descriptor(MANIFEST, d, len(data)))
    assert d in content_digests(stack)
    assert d not in content_digests(stack, ns="other")
    assert "test/ns:1" not in ctr(stack, "images", "ls", "-q", ns="other")
    with Client(stack.address, "other") as other:
        with pytest.raises(NotFound, match=d):
            other.content.info(d)
        # containerd shares the bytes between namespaces: the write in "other" only commits
        with other.lease() as leased:
            assert leased.content.write_blob(f"test-{d}", data, d, len(data))
            assert other.content.info(d).size == len(data)
    client.images.delete("test/ns:1", sync=True)


def test_image_record_with_gc_labels(stack: Stack, client: Client) -> None:
    layer = b"not really a tar, never read\n"
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [digest(layer)]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config),
        "size": len(config)}, "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer),
            "size": len(layer)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [{
        "mediaType": MANIFEST, "digest": digest(manifest), "size": len(manifest)}]}).encode()
    name = "example.com/test/gc:1"
    with client.lease() as leased:
        cs = leased.content
        cs.write_blob(f"layer-{digest(layer)}", layer, digest(layer), len(layer))
        cs.write_blob(f"config-{digest(config)}", config, digest(config), len(config),
                      snapshot_gc_label(SNAPSHOTTER, digest(layer)))
        cs.write_blob(f"manifest-{digest(manifest)}", manifest, digest(manifest),
                      len(manifest), manifest_gc_labels(digest(config), [digest(layer)]))
        cs.write_blob(f"index-{digest(index)}", index, digest(index), len(index),
                      index_gc_labels([digest(manifest)]))
        record = leased.images.put(name, Descriptor(INDEX, digest(index), len(index)),
                                   {"example.org/by": "test"})
        assert record.target.digest == digest(index)
    listed = ctr(stack, "images", "ls")
    assert name in listed and digest(index) in listed, listed
    got = client.images.get(name)
    assert (got.target.media_type, got.target.size, got.labels) == (
        INDEX, len(index), {"example.org/by": "test"})
    labels = client.content.info(digest(manifest)).labels
    assert labels == {"containerd.io/gc.ref.content.config": digest(config),
                      "containerd.io/gc.ref.content.l.0": digest(layer)}
    assert client.content.info(digest(config)).labels == {
        f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}": digest(layer)}
    # the record alone keeps all four blobs through a GC pass
    ctr(stack, "content", "rm", digest(b"nothing"), check=False)
    collect_garbage(client)
    blobs = {digest(b) for b in (layer, config, manifest, index)}
    assert blobs <= content_digests(stack)
    # an update: the record now points at the manifest; other labels stay
    again = client.images.put(name, Descriptor(MANIFEST, digest(manifest), len(manifest)),
                              {"example.org/more": "yes"})
    assert again.target.digest == digest(manifest)
    assert again.labels == {"example.org/by": "test", "example.org/more": "yes"}
    collect_garbage(client)
    assert digest(index) not in content_digests(stack)
    assert blobs - {digest(index)} <= content_digests(stack)
    client.images.delete(name, sync=True)
    assert not blobs & content_digests(stack)
    with pytest.raises(NotFound, match="gc:1"):
        client.images.get(name)


def collect_garbage(client: Client) -> None:
    """Make containerd run its garbage collector now, and wait for it: deleting anything
    schedules a pass, and a synchronous lease deletion waits for it."""
    lease = client.leases.create(ttl=None)
    client.leases.delete(lease.id, sync=True)


def test_lease_released_when_a_write_fails(stack: Stack, client: Client) -> None:
    data = b"these bytes are not what the digest says\n"
    wrong = digest(b"something else")
    with pytest.raises(FailedPrecondition) as caught:
        with client.lease(sync=True) as leased:
            leased.content.write_blob("test-wrong-digest", data, wrong, len(data))
    message = str(caught.value)
    assert "\n" not in message and wrong in message, message
    assert our_leases(stack) == []
    assert "test-wrong-digest" not in ctr(stack, "content", "active")
    assert digest(data) not in content_digests(stack) and wrong not in content_digests(stack)
    # a stream shorter than the size given: refused before COMMIT, the ingest aborted too
    with pytest.raises(ContainerdError, match="expected 100"):
        with client.lease(sync=True) as leased:
            leased.content.write_blob("test-short", io.BytesIO(data), digest(data), 100)
    assert our_leases(stack) == []
    assert "test-short" not in ctr(stack, "content", "active")
    assert digest(data) not in content_digests(stack)
    # without a lease containerd would keep a failed ingest for 24 h: the client aborts it
    with pytest.raises(FailedPrecondition):
        client.content.write_blob("test-unleased", data, wrong, len(data))
    assert "test-unleased" not in ctr(stack, "content", "active")


def test_snapshots_through_containerd(stack: Stack, client: Client) -> None:
    bottom = digest(b"chain 1")
    top = digest(b"chain 2")
    with client.lease() as leased:
        sn = leased.snapshots(SNAPSHOTTER)
        first = sn.prepare_remote(bottom, labels={"containerd.io/snapshot/test": "x"})
        # our snapshotter does not hold this layer: it prepared an active snapshot
        assert not first.committed and first.key.startswith("extract-")
        assert first.key.endswith(" " + bottom) and first.mounts
        listed = ctr(stack, "snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        assert first.key.split()[0] in listed and "Active" in listed, listed
        info = sn.stat(first.key)
        assert info.kind == "active"
        assert info.labels["containerd.io/snapshot.ref"] == bottom
        assert first.key in stack.snapshotter_log()  # the backend's key: <ns>/<seq>/<key>
        sn.commit(bottom, first.key, {"containerd.io/snapshot/test": "x"})
        assert sn.stat(bottom).kind == "committed"
        # now present: no Prepare at all; a Prepare naming it as target is AlreadyExists
        assert sn.prepare_remote(bottom).committed
        # the same answered by Prepare: containerd's ALREADY_EXISTS, then a Stat that finds it
        assert sn.prepare_remote(bottom, stat_first=False).committed
        with pytest.raises(AlreadyExists, match="already exists"):
            sn.prepare("another-key", labels={"containerd.io/snapshot.ref": bottom})
        second = sn.prepare_remote(top, parent=bottom)
        assert not second.committed
        assert sn.stat(second.key).parent == bottom
        sn.commit(top, second.key)
        assert [s.name for s in sn.list() if s.name in (bottom, top)] == sorted([bottom, top])
        with client.lease() as inner:
            with pytest.raises(NotFound, match="does not exist"):
                inner.snapshots(SNAPSHOTTER).prepare_remote(digest(b"c3"), parent="sha256:00")
        listed = ctr(stack, "snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        assert bottom in listed and top in listed and "Committed" in listed
        sn.remove(top)
        sn.remove(bottom)
        with pytest.raises(NotFound):
            sn.stat(bottom)


def test_unavailable_names_the_socket_quickly(tmp_path: Path) -> None:
    missing = tmp_path / "no.sock"
    refusing = tmp_path / "refusing.sock"
    with socket.socket(socket.AF_UNIX) as bound:  # bound, never listening: refused
        bound.bind(str(refusing))
        for path in (missing, refusing):
            start = time.monotonic()
            with Client(str(path), "default") as c:
                with pytest.raises(Unavailable) as caught:
                    c.version()
                with pytest.raises(Unavailable):
                    c.content.info(digest(b""))
            assert time.monotonic() - start < 5
            message = str(caught.value)
            assert str(path) in message and "\n" not in message, message
            assert caught.value.kind == "unavailable"


def test_version_and_bad_namespace(stack: Stack, client: Client) -> None:
    version, _ = client.version()
    assert version.startswith("1.")
    with pytest.raises(ContainerdError, match="namespace"):
        Client(stack.address, "bad namespace")


def test_registered_image_runs_without_unpack(stack: Stack, client: Client,
                                              tmp_path: Path) -> None:
    """The sequence ``image import`` will follow: config and manifest into the content store
    (no layer blob), each layer's snapshot through containerd with ``containerd.io/snapshot.ref``
    bottom up, the config's snapshot GC label, the image record, all under one lease. Our
    snapshotter does not hold the layers beforehand, so each Prepare gives an active snapshot
    that the test fills with ``tar -x`` and commits as the chain id. ``ctr run`` then finds the
    image unpacked: with no layer blob in the store, any unpack would fail."""
    layout = Layout(tmp_path / "layout")
    layers = [layout.layer(busybox_entries(), compression=None),
              layout.layer([file("msg", "registered by the client\n")], compression=None)]
    manifest_desc = layout.image(layers)
    manifest = layout.blob_path(manifest_desc["digest"]).read_bytes()
    config_desc = json.loads(manifest)["config"]
    config = layout.blob_path(config_desc["digest"]).read_bytes()
    chains = chain_ids([layer.diff_id for layer in layers])
    name = "example.com/test/registered:1"
    with client.lease() as leased:
        cs = leased.content
        cs.write_blob(f"config-{config_desc['digest']}", config, config_desc["digest"],
                      len(config))
        cs.write_blob(f"manifest-{manifest_desc['digest']}", manifest, manifest_desc["digest"],
                      len(manifest), manifest_gc_labels(config_desc["digest"]))
        sn = leased.snapshots(SNAPSHOTTER)
        for k, (layer, chain) in enumerate(zip(layers, chains)):
            got = sn.prepare_remote(chain, chains[k - 1] if k else "")
            assert not got.committed
            fill(got.mounts, layer.tar, tmp_path / f"m{k}")
            sn.commit(chain, got.key)
        cs.update_labels(config_desc["digest"], snapshot_gc_label(SNAPSHOTTER, chains[-1]))
        leased.images.put(name, Descriptor(manifest_desc["mediaType"], manifest_desc["digest"],
                                           manifest_desc["size"]))
    collect_garbage(client)  # the image record keeps config, manifest and the whole chain
    assert set(chains) <= set(ctr(stack, "snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                                  ).split())
    out = ctr(stack, "run", "--rm", "--snapshotter", SNAPSHOTTER, name, "t-registered",
              "/bin/busybox", "cat", "/msg")
    assert out == "registered by the client\n"
    assert layers[0].descriptor["digest"] not in content_digests(stack)  # never unpacked
    client.images.delete(name, sync=True)
    assert not set(chains) & set(ctr(stack, "snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                                     ).split())


def fill(mounts: tuple[Mount, ...], tar: bytes, target: Path) -> None:
    """Extract a layer tar into an active snapshot, through its mounts."""
    assert len(mounts) == 1, mounts
    target.mkdir()
    m = mounts[0]
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)],
                   check=True)
    try:
        subprocess.run(["tar", "-x", "-C", str(target)], input=tar, check=True)
    finally:
        subprocess.run(["umount", str(target)], check=True)
