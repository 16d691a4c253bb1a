"""The registry client (erofs_fuse/registry) against Debian's docker-registry, with skopeo
pushing the images and a fault proxy (tests/registry_server.py) corrupting, cutting short or
refusing replies, and asking for Bearer tokens."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import multiprocessing
import pickle
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from erofs_fuse.oci.image import Descriptor, Platform, host_platform
from erofs_fuse.registry import (AuthError, BadResponse, Credentials, DigestMismatch,
                                 DockerConfig, IncompleteBody, NotFound, Reference,
                                 RegistryClient, RegistryError, RetryPolicy, Unreachable)
from erofs_fuse.registry import client as client_module
from erofs_fuse.registry.auth import may_send_credentials, parse_challenges
from ocilayout import DOCKER_CONFIG, DOCKER_LIST, DOCKER_MANIFEST, Layout, directory, file, ref
from registry_server import FaultProxy, Registry, htpasswd, push

FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, max_retry_after=0.2,
                   timeout=5, deadline=10)


@dataclass(frozen=True)
class Pushed:
    registry: Registry
    manifest: dict[str, Any]  # the amd64 image's manifest descriptor
    index: dict[str, Any]  # of the two-platform index
    arm64: dict[str, Any]
    big: bytes  # the big layer's blob
    big_digest: str
    layout: Layout


def _blob(layout: Layout, desc: dict[str, Any]) -> bytes:
    return layout.blob_path(desc["digest"]).read_bytes()


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    root = tmp_path_factory.mktemp("registry")
    layout = Layout(root / "layout")
    noise = random.Random(7).randbytes(3 << 20)  # gzip cannot shrink it: a 3 MiB blob
    base = layout.layer([directory("etc"), file("etc/hello", "hello\n")])
    big = layout.layer([file("noise", noise)])
    host = host_platform()
    amd = layout.image([base, big], os_="linux", arch=host.architecture, platform=True)
    arm = layout.image([base], os_="linux", arch="arm64", variant="v8", platform=True)
    index = layout.index([amd, arm])
    layout.write_index([{**amd, **ref("one")}, {**index, **ref("multi")}])
    registry = Registry(root / "server")
    try:
        push(layout.root, "one", f"{registry.host}/test/app:v1")
        push(layout.root, "multi", f"{registry.host}/test/multi:v1", all_images=True)
        push(layout.root, "multi", f"{registry.host}/test/docker:v1", all_images=True,
             docker=True)
        yield Pushed(registry, amd, index, arm, _blob(layout, big.descriptor),
                     big.descriptor["digest"], layout)
    finally:
        registry.stop()


@pytest.fixture
def proxy(pushed: Pushed) -> Iterator[FaultProxy]:
    p = FaultProxy(pushed.registry.host)
    yield p
    p.stop()


def _client(**kw: Any) -> RegistryClient:
    kw.setdefault("retry", FAST)
    kw.setdefault("credentials", None)
    return RegistryClient(**kw)


def _desc(d: dict[str, Any]) -> Descriptor:
    return Descriptor(d["mediaType"], d["digest"], d["size"])


# references and challenges ----------------------------------------------------------------
@pytest.mark.parametrize("text, host, repo, tag, digest", [
    ("debian", "docker.io", "library/debian", "latest", None),
    ("debian:12", "docker.io", "library/debian", "12", None),
    ("docker.io/user/app", "docker.io", "user/app", "latest", None),
    ("index.docker.io/debian", "docker.io", "library/debian", "latest", None),
    ("localhost/app:v1", "localhost", "app", "v1", None),
    ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
    ("127.0.0.1:5000/team/app", "127.0.0.1:5000", "team/app", "latest", None),
    ("[::1]:5000/app:t", "[::1]:5000", "app", "t", None),
    ("ghcr.io/o/r@sha256:" + "a" * 64, "ghcr.io", "o/r", None, "sha256:" + "a" * 64),
    ("ghcr.io/o/r:v2@sha256:" + "b" * 64, "ghcr.io", "o/r", "v2", "sha256:" + "b" * 64),
])
def test_reference_parse(text: str, host: str, repo: str, tag: str | None,
                         digest: str | None) -> None:
    r = Reference.parse(text)
    assert (r.host, r.repository, r.tag, r.digest) == (host, repo, tag, digest)
    assert r.reference == (digest or tag)
    assert Reference.parse(str(r)) == r


@pytest.mark.parametrize("text", [
    "", "Upper/Case", "app:", "app@sha256:short", "app@md5:" + "a" * 32, "a//b", "a:b:c",
    "host:99999999/x", " app", "app:" + "t" * 129,
])
def test_reference_refused(text: str) -> None:
    with pytest.raises(RegistryError):
        Reference.parse(text)


def test_docker_hub_api_host() -> None:
    assert Reference.parse("debian").api_host == "registry-1.docker.io"
    assert Reference.parse("quay.io/a/b").api_host == "quay.io"


def test_parse_challenges() -> None:
    header = ('Bearer realm="https://auth.example/token",service="registry.example",'
              'scope="repository:a/b:pull,push", Basic realm="x\\"y"')
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "bearer" and bearer.realm == "https://auth.example/token"
    assert bearer.params["service"] == "registry.example"
    assert bearer.params["scope"] == "repository:a/b:pull,push"
    assert basic.scheme == "basic" and basic.realm == 'x"y'
    assert parse_challenges("Basic realm=test") == [parse_challenges('basic realm="test"')[0]]
    assert parse_challenges("") == [] and parse_challenges("=== garbage") == []


def test_docker_config_lookup(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    hub = base64.b64encode(b"hubuser:pa:ss").decode()
    path.write_text(json.dumps({"credsStore": "desktop", "auths": {
        "https://index.docker.io/v1/": {"auth": hub},
        "reg.example:5000": {"username": "u", "password": "p"},
        "token.example": {"identitytoken": "x"},
        "bad.example": {"auth": "not base64!"}}}))
    config = DockerConfig(str(path))
    assert config("docker.io") == Credentials("hubuser", "pa:ss")
    assert config("reg.example:5000") == Credentials("u", "p")
    assert config("reg.example") is None and config("token.example") is None
    assert "pa:ss" not in repr(config("docker.io"))
    with pytest.raises(AuthError, match="bad.example"):
        config("bad.example")
    assert pickle.loads(pickle.dumps(config))("docker.io") == Credentials("hubuser", "pa:ss")
    assert DockerConfig(str(tmp_path / "missing.json"))("docker.io") is None
    path.write_text("{")
    with pytest.raises(AuthError, match="not valid JSON"):
        config("docker.io")
    # credentials travel only over HTTPS or to this machine
    assert may_send_credentials("https", "reg.example")
    assert may_send_credentials("http", "127.0.0.1:5000")
    assert may_send_credentials("http", "[::1]:5000")
    assert not may_send_credentials("http", "reg.example:5000")


# pulling ----------------------------------------------------------------------------------
def test_pull_by_tag_and_by_digest(pushed: Pushed) -> None:
    with _client() as client:
        image = client.resolve(f"{pushed.registry.host}/test/app:v1")
        assert image.index is None
        assert image.manifest_digest == pushed.manifest["digest"]
        assert image.manifest.data == _blob(pushed.layout, pushed.manifest)
        assert [d.digest for d in image.layers][1] == pushed.big_digest
        assert image.config.content["rootfs"]["type"] == "layers"
        assert image.platform == Platform("linux", host_platform().architecture)
        again = client.resolve(image.pinned)
        assert again.manifest.data == image.manifest.data
        assert again.config.data == image.config.data
        with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
            client.resolve(f"{pushed.registry.host}/test/app:nope")
        with pytest.raises(NotFound):
            client.resolve(f"{pushed.registry.host}/test/app@sha256:" + "0" * 64)


def test_index_resolves_to_one_platform(pushed: Pushed) -> None:
    name = f"{pushed.registry.host}/test/multi:v1"
    with _client() as client:
        mine = client.resolve(name)
        assert mine.index is not None and mine.index.descriptor.digest == pushed.index["digest"]
        assert mine.manifest_digest == pushed.manifest["digest"]
        arm = client.resolve(name, Platform.parse("linux/arm64"))
        assert arm.manifest_digest == pushed.arm64["digest"]
        assert arm.platform == Platform("linux", "arm64", "v8") and len(arm.layers) == 1
        with pytest.raises(NotFound, match="no image for linux/s390x"):
            client.resolve(name, Platform.parse("linux/s390x"))


def test_docker_schema2(pushed: Pushed) -> None:
    name = f"{pushed.registry.host}/test/docker:v1"
    with _client() as client:
        image = client.resolve(name, Platform.parse("linux/arm64"))
        assert image.index is not None
        assert image.index.descriptor.media_type == DOCKER_LIST
        assert image.manifest.descriptor.media_type == DOCKER_MANIFEST
        assert image.config.descriptor.media_type == DOCKER_CONFIG
        assert image.platform == Platform("linux", "arm64", "v8")
        with client.open_blob(image.reference, image.layers[0]) as blob:
            assert gzip.decompress(b"".join(blob.chunks()))[:5] == b"etc/\0"


def test_blob_streams_verified(pushed: Pushed) -> None:
    ref = Reference.parse(f"{pushed.registry.host}/test/app:v1")
    desc = Descriptor("application/octet-stream", pushed.big_digest, len(pushed.big))
    seen: list[int] = []
    with _client() as client:
        with client.open_blob(ref, desc, on_read=seen.append) as blob:
            chunks = list(blob.chunks())
            assert blob.verified
        assert b"".join(chunks) == pushed.big and seen[-1] == len(pushed.big)
        with client.open_blob(ref, desc) as blob:  # as a file: read to the end verifies
            assert io.BufferedReader(blob, 65536).read() == pushed.big
            assert blob.verified
        with pytest.raises(DigestMismatch, match="its descriptor says"):  # a wrong size
            client.open_blob(ref, Descriptor(desc.media_type, desc.digest, desc.size - 1))


def test_read_range(pushed: Pushed, proxy: FaultProxy,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    ref = Reference.parse(f"{pushed.registry.host}/test/app:v1")
    desc = Descriptor("application/octet-stream", pushed.big_digest, len(pushed.big))
    size = len(pushed.big)
    with _client() as client:
        for offset, length in [(0, 1), (4096, 4096), (size - 10, 10), (1, size - 1)]:
            assert client.read_range(ref, desc, offset, length) == \
                pushed.big[offset:offset + length]
        with pytest.raises(ValueError):
            client.read_range(ref, desc, size - 1, 2)
        via = Reference.parse(f"{proxy.host}/test/app:v1")
        proxy.faults = ["ignore-range"]  # a 200 with the whole blob: read and drop
        assert client.read_range(via, desc, 8192, 100) == pushed.big[8192:8292]
        proxy.faults = ["bad-range"]
        with pytest.raises(BadResponse, match="Content-Range"):
            client.read_range(via, desc, 8192, 100)
        monkeypatch.setattr(client_module, "MAX_RANGE_DISCARD", 4096)
        proxy.faults = ["ignore-range"]
        with pytest.raises(BadResponse, match="ignores Range"):
            client.read_range(via, desc, 8192, 100)


# faults -----------------------------------------------------------------------------------
def _via(proxy: FaultProxy) -> Reference:
    return Reference.parse(f"{proxy.host}/test/app:v1")


@pytest.mark.parametrize("fault, error", [
    ("flip", DigestMismatch), ("truncate", IncompleteBody), ("short", IncompleteBody),
    ("eof", IncompleteBody)])
def test_corrupt_blob_refused(pushed: Pushed, proxy: FaultProxy, fault: str,
                              error: type[Exception]) -> None:
    """Refused by the end of the body at the latest ("short" at once, by its length)."""
    desc = Descriptor("application/octet-stream", pushed.big_digest, len(pushed.big))
    proxy.faults = [fault]
    with _client() as client, pytest.raises(error):
        with client.open_blob(_via(proxy), desc) as blob:
            io.BufferedReader(blob).read()


@pytest.mark.parametrize("fault", ["flip", "short", "huge"])
def test_corrupt_manifest_refused(pushed: Pushed, proxy: FaultProxy, fault: str) -> None:
    proxy.match = "/manifests/"
    with _client() as client:
        proxy.faults = [fault]  # by tag: the registry's Docker-Content-Digest disagrees
        with pytest.raises((DigestMismatch, BadResponse)):
            client.resolve(_via(proxy))
        proxy.faults = [fault]  # by digest
        with pytest.raises((DigestMismatch, BadResponse)):
            client.resolve(_via(proxy).with_digest(pushed.manifest["digest"]))


def test_server_errors_retried_then_bounded(pushed: Pushed, proxy: FaultProxy) -> None:
    desc = Descriptor("application/octet-stream", pushed.big_digest, len(pushed.big))
    with _client() as client:
        proxy.faults = ["500", "500"]
        with client.open_blob(_via(proxy), desc) as blob:
            assert b"".join(blob.chunks()) == pushed.big
        assert len(proxy.paths("/blobs/")) == 3
        proxy.seen.clear()
        proxy.faults = ["500"] * 10
        with pytest.raises(Unreachable, match="500 .* 3 times"):
            client.open_blob(_via(proxy), desc)
        assert len(proxy.paths("/blobs/")) == FAST.attempts
        proxy.seen.clear()
        proxy.faults = ["429", "429"]  # Retry-After: 30, capped at 0.2 s
        start = time.monotonic()
        with client.open_blob(_via(proxy), desc) as blob:
            blob.finish()
        assert time.monotonic() - start < 5
        proxy.seen.clear()
        proxy.faults = ["400", "400"]  # final at once
        with pytest.raises(BadResponse, match="400"):
            client.open_blob(_via(proxy), desc)
        assert len(proxy.paths("/blobs/")) == 1


def test_stalls_are_bounded(pushed: Pushed, proxy: FaultProxy) -> None:
    desc = Descriptor("application/octet-stream", pushed.big_digest, len(pushed.big))
    quick = RetryPolicy(attempts=3, backoff=0.01, timeout=0.3, deadline=5)
    proxy.stall = 1.0
    with RegistryClient(credentials=None, retry=quick) as client:
        proxy.faults = ["stall"]  # no answer in time: tried again
        with client.open_blob(_via(proxy), desc) as blob:
            blob.finish()
        proxy.faults = ["stall-body"]  # the body stops coming: refused, not waited for
        start = time.monotonic()
        with pytest.raises(IncompleteBody, match="ReadTimeout"):
            with client.open_blob(_via(proxy), desc) as blob:
                blob.finish()
        assert time.monotonic() - start < 1
        proxy.match = "/manifests/"  # a small reply that stops coming is fetched again
        proxy.faults = ["stall-body"]
        assert client.resolve(_via(proxy)).manifest_digest == pushed.manifest["digest"]


def test_redirect_keeps_credentials_home(pushed: Pushed, proxy: FaultProxy) -> None:
    storage = FaultProxy(pushed.registry.host)  # another origin, like a blob store
    try:
        proxy.bearer, proxy.redirect_to, proxy.faults = "tok", storage.host, ["redirect"]
        with _client() as client:
            image = client.resolve(_via(proxy))
            with client.open_blob(image.reference, image.layers[1]) as blob:
                blob.finish()
        assert any("/blobs/" in s.path and s.headers.get("Authorization") == "Bearer tok"
                   for s in proxy.seen)
        assert storage.paths("/blobs/")
        assert not any("Authorization" in s.headers for s in storage.seen)
    finally:
        storage.stop()


def test_https_to_plain_http_registry(pushed: Pushed) -> None:
    start = time.monotonic()
    with RegistryClient(plain_http=False, credentials=None) as client:
        with pytest.raises(Unreachable, match="TLS failed .* needs plain_http"):
            client.resolve(f"{pushed.registry.host}/test/app:v1")
    assert time.monotonic() - start < 1  # not retried


def test_registry_down_fails_fast() -> None:
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with RegistryClient(credentials=None) as client:  # the default retry policy
        with pytest.raises(Unreachable, match="4 tries"):
            client.resolve(f"127.0.0.1:{port}/x/y:z")
    assert time.monotonic() - start < 5


# authentication ---------------------------------------------------------------------------
def _docker_config(directory: Path, host: str, entry: dict[str, str]) -> DockerConfig:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"auths": {host: entry}}))
    return DockerConfig()


def test_basic_auth_from_docker_config(pushed: Pushed, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    server = Registry(tmp_path / "server", htpasswd(tmp_path / "htpasswd", "alice", "s3cret"))
    try:
        push(pushed.layout.root, "one", f"{server.host}/test/app:v1", creds="alice:s3cret")
        name = f"{server.host}/test/app:v1"
        with _client() as client, pytest.raises(AuthError, match="user name and password"):
            client.resolve(name)
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        auth = base64.b64encode(b"alice:s3cret").decode()
        creds = _docker_config(tmp_path / "docker", f"http://{server.host}/v2/", {"auth": auth})
        with _client(credentials=creds) as client:
            image = client.resolve(name)
            assert image.manifest_digest == pushed.manifest["digest"]
            with client.open_blob(image.reference, image.layers[1]) as blob:
                blob.finish()
        _docker_config(tmp_path / "docker", server.host,
                       {"username": "alice", "password": "wrong"})
        with _client(credentials=DockerConfig()) as client, \
                pytest.raises(AuthError, match="401"):
            client.resolve(name)
    finally:
        server.stop()


def test_bearer_token_flow(pushed: Pushed, proxy: FaultProxy, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.bearer = "tok-123"
    with _client() as client:  # anonymous token
        image = client.resolve(_via(proxy))
        with client.open_blob(image.reference, image.layers[1]) as blob:
            blob.finish()
    tokens = [s for s in proxy.seen if s.path.startswith("/token")]
    assert len(tokens) == 1  # cached for the scope, and asked before being told
    assert "scope=repository%3Atest%2Fapp%3Apull" in tokens[0].path
    assert "service=test-proxy" in tokens[0].path and "Authorization" not in tokens[0].headers
    proxy.token_user = ("bob", "pw")
    with _client() as client, pytest.raises(AuthError, match="anonymous access"):
        client.resolve(_via(proxy))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    creds = _docker_config(tmp_path / "docker", proxy.host, {"username": "bob", "password": "pw"})
    with _client(credentials=creds) as client:
        assert client.resolve(_via(proxy)).manifest_digest == pushed.manifest["digest"]
    proxy.bearer = "tok-456"  # the registry stops taking the old token: a new one, once
    proxy.token_user = None
    with _client(credentials=creds) as client:
        client.resolve(_via(proxy))


# concurrency ------------------------------------------------------------------------------
def _hash_blob(pickled: bytes, ref: str, desc: Descriptor) -> str:
    client = pickle.loads(pickled)
    with client, client.open_blob(Reference.parse(ref), desc) as blob:
        h = hashlib.sha256()
        for chunk in blob.chunks():
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def test_threads_and_worker_processes(pushed: Pushed) -> None:
    name = f"{pushed.registry.host}/test/app:v1"
    desc = Descriptor("application/octet-stream", pushed.big_digest, len(pushed.big))
    with _client() as client:
        client.resolve(name)  # the parent's pool is in use when the workers fork
        with ThreadPoolExecutor(4) as pool:
            digests = list(pool.map(lambda _: _hash_blob(pickle.dumps(client), name, desc),
                                    range(4)))
            ranges = list(pool.map(lambda k: client.read_range(Reference.parse(name), desc,
                                                               k * 4096, 4096), range(8)))
        assert digests == [pushed.big_digest] * 4
        assert b"".join(ranges) == pushed.big[:8 * 4096]
        with multiprocessing.get_context("fork").Pool(2) as procs:
            out = procs.starmap(_hash_blob, [(pickle.dumps(client), name, desc)] * 2)
        assert out == [pushed.big_digest] * 2
