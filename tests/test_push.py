"""``erofs-fuse push`` against Debian's docker-registry: native EROFS layer blobs with their
Merkle trees, checked with skopeo, our registry client, ``fsverity digest`` and a local
``convert --seal`` of the same tars; blobs already there are not sent again (counted through
the fault proxy); the trees survive ``docker-registry garbage-collect``."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from erofs_fuse.oci.image import Descriptor
from erofs_fuse.registry import NotFound, Reference, RegistryClient, RetryPolicy
from erofs_fuse.registry.push import ANNOTATIONS, LAYER_MEDIA_TYPE, TREE_MEDIA_TYPE, \
    TREES_ARTIFACT_TYPE
from helpers import require_tool
from mounting import env
from ocilayout import LayerBlob, archive
from registry_server import FaultProxy, Registry
from test_convert_image import make_image, one_line_error, read_all

CLI = [sys.executable, "-m", "erofs_fuse"]
FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.05, timeout=5, deadline=10)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env(),
                          timeout=300)


def push(*args: str) -> str:
    proc = run("push", "--plain-http", "-q", "-j", "2", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return proc.stdout


@dataclass(frozen=True)
class Pushed:
    registry: Registry
    root: Path
    image: Path  # the OCI archive
    layers: list[LayerBlob]
    ref: str
    stdout: str


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    root = tmp_path_factory.mktemp("push")
    lay, layers = make_image(root / "layout")
    image = archive(lay.root, root / "image.tar")
    registry = Registry(root / "server")
    try:
        ref = f"{registry.host}/test/app:v1"
        yield Pushed(registry, root, image, layers, ref, push(str(image), ref))
    finally:
        registry.stop()


def _client() -> RegistryClient:
    return RegistryClient(credentials=None, retry=FAST)


def _raw_manifest(ref: str, tag: str | None = None) -> bytes:
    skopeo = require_tool("skopeo")
    where = ref if tag is None else ref.rpartition(":")[0] + ":" + tag
    proc = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false",
                           f"docker://{where}"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _blob(ref: str, desc: dict[str, Any]) -> bytes:
    with _client() as client, client.open_blob(
            Reference.parse(ref), Descriptor(desc["mediaType"], desc["digest"],
                                             desc["size"])) as blob:
        return b"".join(blob.chunks())


def test_prints_the_pinned_reference_of_the_manifest(pushed: Pushed) -> None:
    raw = _raw_manifest(pushed.ref)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    assert pushed.stdout == f"{pushed.ref}@{digest}\n"
    with _client() as client:
        resolved = client.resolve(Reference.parse(pushed.stdout.strip()))
    assert resolved.manifest.data == raw
    assert [d.media_type for d in resolved.layers] == [LAYER_MEDIA_TYPE] * 3


def test_layers_are_the_sealed_local_conversions(pushed: Pushed, tmp_path: Path) -> None:
    manifest = json.loads(_raw_manifest(pushed.ref))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    fsverity = require_tool("fsverity")
    for k, (desc, layer) in enumerate(zip(manifest["layers"], pushed.layers)):
        tar = tmp_path / f"{k}.tar"
        tar.write_bytes(layer.tar)
        local = tmp_path / f"{k}.erofs"
        proc = run("convert", "--seal", str(tar), str(local))
        assert proc.returncode == 0, proc.stderr
        fetched = tmp_path / f"{k}.fetched"
        fetched.write_bytes(_blob(pushed.ref, desc))
        assert fetched.read_bytes() == local.read_bytes()
        notes = desc["annotations"]
        assert desc["mediaType"] == LAYER_MEDIA_TYPE
        out = subprocess.run([fsverity, "digest", str(fetched)], capture_output=True,
                             text=True, check=True).stdout
        assert out.split()[0] == notes[ANNOTATIONS.verity]
        assert notes[ANNOTATIONS.diff_id] == layer.diff_id
        tree_desc = {"mediaType": TREE_MEDIA_TYPE, "digest": notes[ANNOTATIONS.tree],
                     "size": int(notes[ANNOTATIONS.tree_size])}
        tree = _blob(pushed.ref, tree_desc)
        assert tree == Path(str(local) + ".verity").read_bytes()
        assert int(notes[ANNOTATIONS.tree_offset]) == 4096  # a veritysetup superblock first
    # user.* xattrs in the base and the app layer; the middle one only hides (whiteouts and an
    # opaque directory are overlayfs's own xattrs): it alone is said to show none
    assert [desc["annotations"].get(ANNOTATIONS.xattr_free) for desc in manifest["layers"]] \
        == [None, "true", None]


def test_config_names_the_erofs_blobs_as_diff_ids(pushed: Pushed) -> None:
    with _client() as client:
        resolved = client.resolve(Reference.parse(pushed.ref))
    config = resolved.config.content
    assert config["rootfs"]["diff_ids"] == [d.digest for d in resolved.layers]
    assert config["architecture"] == "amd64" and config["os"] == "linux"


def test_trees_are_an_artifact_under_the_referrers_tag(pushed: Pushed) -> None:
    raw = _raw_manifest(pushed.ref)
    manifest = json.loads(raw)
    tag = "sha256-" + hashlib.sha256(raw).hexdigest()
    index = json.loads(_raw_manifest(pushed.ref, tag))
    [entry] = index["manifests"]
    assert entry["artifactType"] == TREES_ARTIFACT_TYPE
    artifact = json.loads(_raw_manifest(pushed.ref.rpartition(":")[0] + "@" + entry["digest"]))
    assert artifact["subject"]["digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert [t["digest"] for t in artifact["layers"]] == \
        [d["annotations"][ANNOTATIONS.tree] for d in manifest["layers"]]
    assert _raw_manifest(pushed.ref, tag + ".verity") == \
        json.dumps(artifact, separators=(",", ":")).encode()


def test_a_second_push_sends_no_blob(pushed: Pushed) -> None:
    proxy = FaultProxy(pushed.registry.host, match="/nothing/")
    try:
        out = push(str(pushed.image), f"{proxy.host}/test/app:v1")
    finally:
        proxy.stop()
    assert out.partition("@")[2] == pushed.stdout.partition("@")[2]
    methods = [(s.method, s.path.partition("?")[0]) for s in proxy.seen]
    assert not [m for m in methods if "/blobs/uploads/" in m[1]], methods
    heads = [p for m, p in methods if m == "HEAD" and "/blobs/" in p]
    assert len(heads) == 3 + 3 + 2  # layers, trees, config and the empty config


def test_a_failed_upload_starts_a_new_session(pushed: Pushed) -> None:
    """The first blob's PUT answered 500: that session is cancelled, not sent into again; a
    new one carries the blob, and the push ends with the same manifest."""
    proxy = FaultProxy(pushed.registry.host, match="/blobs/uploads/", faults=["pass", "500"])
    try:
        out = push(str(pushed.image), f"{proxy.host}/other/app:v2", "-j", "1")
    finally:
        proxy.stop()
    assert out.partition("@")[2] == pushed.stdout.partition("@")[2]
    methods = [s.method for s in proxy.seen if "/blobs/uploads/" in s.path]
    assert methods[:6] == ["POST", "PUT", "DELETE", "POST", "PUT", "POST"], methods
    assert methods.count("POST") == 8 + 1  # every blob (a new repository), one restart


def _on_disk(root: Path, digest: str) -> bool:
    hexa = digest.removeprefix("sha256:")
    return (root / "server" / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" /
            hexa[:2] / hexa / "data").is_file()


@pytest.mark.parametrize("untagged", [False, True])
def test_push_from_layers_file_and_trees_survive_gc(pushed: Pushed, tmp_path: Path,
                                                    untagged: bool) -> None:
    # sealed or not: an unsealed layer is sealed by the push
    seal = ["--seal"] if untagged else []
    proc = run("convert-image", "-q", *seal, str(pushed.image), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    layers_file = proc.stdout.strip()
    registry = Registry(tmp_path / "server")
    try:
        ref = f"{registry.host}/test/fromfile:v1"
        out = push(layers_file, ref)
        assert out.partition("@")[2] == pushed.stdout.partition("@")[2]
        manifest = json.loads(_raw_manifest(ref))
    finally:
        registry.stop()
    # a stray blob nothing references: proof that the collector did run
    stray = registry_blob(tmp_path / "server", b"garbage")
    config = str(tmp_path / "server" / "config.yml")
    cmd = [require_tool("docker-registry"), "garbage-collect", config]
    if untagged:
        cmd.append("--delete-untagged")
    gc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert gc.returncode == 0, gc.stderr
    assert not _on_disk(tmp_path, stray)
    for desc in manifest["layers"]:
        assert _on_disk(tmp_path, desc["digest"])
        assert _on_disk(tmp_path, desc["annotations"][ANNOTATIONS.tree])


def registry_blob(server: Path, data: bytes) -> str:
    """Put a blob straight into a stopped registry's storage, linked from no manifest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    hexa = digest.removeprefix("sha256:")
    path = server / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexa[:2] / hexa
    path.mkdir(parents=True)
    (path / "data").write_bytes(data)
    return digest


def test_a_changed_layer_file_is_refused(pushed: Pushed, tmp_path: Path) -> None:
    proc = run("convert-image", "-q", "--seal", str(pushed.image), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(Path(proc.stdout.strip()).read_text())
    victim = tmp_path / "out" / doc["layers"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    bad = run("push", "-q", proc.stdout.strip(), f"{pushed.registry.host}/test/bad:v1")
    assert "changed since it was converted" in one_line_error(bad)


@pytest.mark.parametrize("source, ref, message", [
    ("missing.tar", "{host}/test/x:v1", "missing.tar"),
    ("{image}", "{host}/Bad Name", "image reference"),
    ("{image}", "{host}/test/x@sha256:" + "a" * 64, "not a digest"),
    ("{image}", "127.0.0.1:1/test/x:v1", "127.0.0.1:1"),
])
def test_bad_input_is_one_line_and_exit_2(pushed: Pushed, source: str, ref: str,
                                          message: str) -> None:
    proc = run("push", "-q", source.format(image=pushed.image),
               ref.format(host=pushed.registry.host))
    assert message in one_line_error(proc)


def test_bearer_token_is_asked_for_pull_and_push(pushed: Pushed) -> None:
    proxy = FaultProxy(pushed.registry.host, bearer="push-token", match="/nothing/")
    try:
        out = push(str(pushed.image), f"{proxy.host}/test/app:v1")
    finally:
        proxy.stop()
    assert out.partition("@")[2] == pushed.stdout.partition("@")[2]
    scopes = {s.path.partition("scope=")[2] for s in proxy.seen if s.path.startswith("/token")}
    assert scopes == {"repository%3Atest%2Fapp%3Apull%2Cpush"}, scopes
    unauthorized = [s for s in proxy.seen if not s.path.startswith("/token")
                    and s.headers.get("Authorization") != "Bearer push-token"]
    assert 1 <= len(unauthorized) <= 2  # the first (one per -j 2 thread): challenged


def test_cross_repository_mount(pushed: Pushed) -> None:
    manifest = json.loads(_raw_manifest(pushed.ref))
    digest = manifest["layers"][0]["digest"]
    target = Reference.parse(f"{pushed.registry.host}/test/mounted:v1")
    with _client() as client:
        assert not client.blob_exists(target, digest)
        assert client.mount_blob(target, digest, "test/app")
        assert client.blob_exists(target, digest)
        assert not client.mount_blob(target, "sha256:" + "0" * 64, "test/app")


def test_progress_on_a_terminal(pushed: Pushed) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        proc = subprocess.Popen([*CLI, "push", "-j", "1", str(pushed.image),
                                 f"{pushed.registry.host}/test/tty:v1"],
                                stdout=subprocess.PIPE, stderr=slave, env=env())
        os.close(slave)
        slave = -1
        shown = read_all(master, proc)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, shown
    assert proc.stdout is not None
    assert proc.stdout.read().decode().partition("@")[2] == pushed.stdout.partition("@")[2]
    assert "\x1b[" in shown and "converted" in shown and "Traceback" not in shown
    assert "[####################] sent" in shown and "tree: pushed" in shown


def test_bad_layers_files_are_one_line_and_exit_2(pushed: Pushed, tmp_path: Path) -> None:
    target = f"{pushed.registry.host}/test/bad:v1"
    garbled = tmp_path / "garbled.layers"
    garbled.write_text("{not json")
    assert "not a layers file" in one_line_error(run("push", "-q", str(garbled), target))
    proc = run("convert-image", "-q", str(pushed.image), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    listed = Path(proc.stdout.strip())
    doc = json.loads(listed.read_text())
    doc["image"] = str(tmp_path / "gone.tar")  # the image it came from, needed for its config
    listed.write_text(json.dumps(doc))
    assert "its image's config is needed" in one_line_error(run("push", "-q", str(listed),
                                                                target))


def test_interrupted_push_leaves_no_tag(pushed: Pushed) -> None:
    proxy = FaultProxy(pushed.registry.host, match="/blobs/uploads/", faults=["stall"] * 8,
                       stall=3.0)
    try:
        proc = subprocess.Popen([*CLI, "push", "-q", "-j", "2", str(pushed.image),
                                 f"{proxy.host}/test/interrupted:v1"], env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 60
        while not proxy.paths("/blobs/uploads/") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.stop()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert out == "" and err.count("\n") == 1 and "interrupted" in err, err
    with _client() as client, pytest.raises(NotFound):
        client.fetch_manifest(Reference.parse(f"{pushed.registry.host}/test/interrupted:v1"))


def test_skopeo_copies_the_pushed_image_unchanged(pushed: Pushed, tmp_path: Path) -> None:
    """Other tools take the EROFS layers as they are: skopeo copies the image into a layout
    with its manifest's digest kept (it would refuse to, rather than change it)."""
    proc = subprocess.run([require_tool("skopeo"), "--insecure-policy", "copy", "--quiet",
                           "--src-tls-verify=false", "--preserve-digests",
                           f"docker://{pushed.ref}", f"oci:{tmp_path / 'copy'}:t"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "copy" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed.stdout.strip().partition("@")[2]


def test_metadata_only_layers_are_refused(pushed: Pushed, tmp_path: Path) -> None:
    proc = run("convert-image", "-q", "--objects", str(tmp_path / "objects"),
               str(pushed.image), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    bad = run("push", "-q", proc.stdout.strip(), f"{pushed.registry.host}/test/meta:v1")
    assert "metadata-only" in one_line_error(bad)


def test_compressed_push_with_blobs_mounted_from_another_repository(
        pushed: Pushed, tmp_path: Path) -> None:
    """--compress gives the layers a local ``convert --seal --compress`` gives; the trees
    and config already pushed to test/lz4 are linked, not sent, with --mount-from."""
    target = f"{pushed.registry.host}/test/lz4:v1"
    first = push("--compress", "lz4hc,9", str(pushed.image), target)
    manifest = json.loads(_raw_manifest(target))
    tar = tmp_path / "0.tar"
    tar.write_bytes(pushed.layers[0].tar)
    proc = run("convert", "--seal", "--compress", "lz4hc,9", str(tar), str(tmp_path / "0.erofs"))
    assert proc.returncode == 0, proc.stderr
    assert _blob(target, manifest["layers"][0]) == (tmp_path / "0.erofs").read_bytes()
    assert manifest["layers"] != json.loads(_raw_manifest(pushed.ref))["layers"]
    proxy = FaultProxy(pushed.registry.host, match="/nothing/")
    try:
        again = push("--compress", "lz4hc,9", "--mount-from", "test/lz4", str(pushed.image),
                     f"{proxy.host}/test/lz4-mounted:v1")
    finally:
        proxy.stop()
    assert again.partition("@")[2] == first.partition("@")[2]
    uploads = [s for s in proxy.seen if "/blobs/uploads/" in s.path]
    assert uploads and all("mount=" in s.path for s in uploads)  # only mounts, no PUT


def test_refused_credentials_are_one_line_and_exit_2(pushed: Pushed, tmp_path: Path) -> None:
    proxy = FaultProxy(pushed.registry.host, bearer="t", token_user=("user", "secret"),
                       match="/nothing/")
    try:
        proc = subprocess.run([*CLI, "push", "-q", str(pushed.image),
                               f"{proxy.host}/test/app:v1"], capture_output=True, text=True,
                              env={**env(), "DOCKER_CONFIG": str(tmp_path)}, timeout=120)
    finally:
        proxy.stop()
    assert "refused anonymous access" in one_line_error(proc)
    assert not [s for s in proxy.seen if s.method in ("POST", "PUT")]
