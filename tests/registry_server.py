"""A real registry for tests, and a fault-injecting proxy in front of it.

``Registry(root)`` runs Debian's ``docker-registry`` (distribution 2.8.2) on 127.0.0.1 with a
port the kernel picks (read back from its "listening on" log line), its storage under ``root``
and, with ``htpasswd``, Basic authentication. ``push()`` copies an OCI layout into it with
skopeo. ``FaultProxy(upstream)`` is a small http.server on 127.0.0.1 that passes requests on
and, for the requests it is told to, flips a byte, cuts the body short, answers an error,
ignores Range or wants a Bearer token from its own token endpoint (``/token``). Nothing listens
beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from helpers import require_tool

CONFIG = """\
version: 0.1
log:
  level: info
  accesslog: {{disabled: true}}
storage:
  filesystem: {{rootdirectory: {root}}}
  delete: {{enabled: true}}
  maintenance: {{uploadpurging: {{enabled: false}}}}
http:
  addr: 127.0.0.1:0
  secret: test-only-secret
"""
AUTH = """\
auth:
  htpasswd: {{realm: test-realm, path: {path}}}
"""


class Registry:
    def __init__(self, root: Path, htpasswd: Path | None = None) -> None:
        binary = require_tool("docker-registry")
        self.root = root  # blobs are under data/docker/registry/v2/blobs
        (root / "data").mkdir(parents=True, exist_ok=True)  # a restart keeps its blobs
        config = CONFIG.format(root=root / "data")
        if htpasswd is not None:
            config += AUTH.format(path=htpasswd)
        (root / "config.yml").write_text(config)
        self.log = root / "registry.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, "serve", str(root / "config.yml")],
                                         stdout=log, stderr=log)
        self.host = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = re.search(r"listening on (127\.0\.0\.1:[0-9]+)", self.log.read_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def htpasswd(path: Path, user: str, password: str) -> Path:
    """An htpasswd file with one bcrypt entry (docker-registry accepts only bcrypt)."""
    tool = require_tool("htpasswd")
    proc = subprocess.run([tool, "-nbB", user, password], capture_output=True, text=True,
                          check=True)
    path.write_text(proc.stdout.strip() + "\n")
    return path


def push(layout: Path, tag: str, dest: str, *, creds: str | None = None,
         all_images: bool = False, docker: bool = False) -> None:
    """``skopeo copy`` of the image tagged ``tag`` in ``layout`` to ``docker://dest``, its
    manifests kept byte for byte, or with ``docker`` converted to Docker's schema 2."""
    skopeo = require_tool("skopeo")
    cmd = [skopeo, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
    cmd += ["--format", "v2s2"] if docker else ["--preserve-digests"]
    if creds:
        cmd += ["--dest-creds", creds]
    if all_images:
        cmd.append("--all")
    cmd += [f"oci:{layout}:{tag}", f"docker://{dest}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"skopeo copy failed: {proc.stderr}"


# the proxy ------------------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FaultProxy:
    """Faults are taken one per request whose path holds ``match``, in order; "pass" lets one
    through. Kinds: "flip" (a byte of the body), "truncate" (close the connection halfway
    through the announced body), "short" (announce and send half the body), "eof" (send half
    the body without a length, then close), "500", "429"
    (with Retry-After: 30), "400", "ignore-range" (forward without Range: the registry answers
    200), "bad-range" (a 206 with another Content-Range), "huge" (a 5 MiB body), "stall"
    (wait before answering), "stall-body" (headers, then wait and close), "redirect" (a 307 to
    the same path on ``redirect_to``)."""

    upstream: str
    faults: list[str] = field(default_factory=list)
    match: str = "/blobs/"
    bearer: str | None = None  # a token to require (its endpoint is /token)
    token_user: tuple[str, str] | None = None  # Basic credentials /token insists on
    redirect_to: str = ""  # host:port a "redirect" fault sends the client to
    stall: float = 2.0  # seconds a "stall" or "stall-body" fault waits
    seen: list[Seen] = field(default_factory=list)
    blob_bytes: int = 0  # body bytes of blob GETs answered in full (faults aside)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.handle(self)

            def do_HEAD(self) -> None:
                proxy.handle(self)

            # pushes pass through too (counted; faults apply to them as to the others)
            def do_POST(self) -> None:
                proxy.handle(self)

            def do_PUT(self) -> None:
                proxy.handle(self)

            def do_PATCH(self) -> None:
                proxy.handle(self)

            def do_DELETE(self) -> None:
                proxy.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # type: ignore[method-assign]  # resets
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self, part: str) -> list[str]:
        return [s.path for s in self.seen if part in s.path]

    def _take(self, path: str) -> str:
        with self.lock:
            if self.match in path and self.faults:
                return self.faults.pop(0)
        return "pass"

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        headers = {k: v for k, v in req.headers.items()}
        length = int(headers.get("Content-Length") or 0)
        sent = req.rfile.read(length) if length else None  # read before any early reply
        with self.lock:
            self.seen.append(Seen(req.command, req.path, headers))
        if req.path.startswith("/token"):
            return self._token(req, headers)
        if self.bearer is not None and headers.get("Authorization") != f"Bearer {self.bearer}":
            realm = f"http://{self.host}/token"
            scope = ""
            m = re.match(r"/v2/(.+)/(?:manifests|blobs)/", req.path)
            if m:
                scope = f',scope="repository:{m.group(1)}:pull"'
            return self._reply(req, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                "WWW-Authenticate": f'Bearer realm="{realm}",service="test-proxy"{scope}'})
        fault = self._take(req.path)
        if fault == "stall":
            time.sleep(self.stall)
        if fault == "redirect":
            return self._reply(req, 307, b"", {"Location": f"http://{self.redirect_to}{req.path}"})
        if fault in ("500", "429", "400"):
            extra = {"Retry-After": "30"} if fault == "429" else {}
            return self._reply(req, int(fault), b"{}", extra)
        if fault == "huge":
            return self._reply(req, 200, b" " * (5 << 20), {"Content-Type":
                               "application/vnd.oci.image.manifest.v1+json"})
        forward = {k: v for k, v in headers.items()
                   if k.lower() not in ("host", "authorization", "connection")}
        if fault == "ignore-range":
            forward = {k: v for k, v in forward.items() if k.lower() != "range"}
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.request(req.command, req.path, body=sent, headers=forward)
            resp = conn.getresponse()
            body = resp.read()
            status, out = resp.status, {k: v for k, v in resp.getheaders()
                                        if k.lower() not in ("transfer-encoding", "connection",
                                                             "content-length")}
            if req.command == "HEAD":  # the length of the body a GET would get
                out["Content-Length"] = resp.getheader("Content-Length", "0")
        finally:
            conn.close()
        if "Location" in out:  # an upload's next step comes back through the proxy
            out["Location"] = out["Location"].replace(f"//{self.upstream}/", f"//{self.host}/")
        if fault == "flip" and body:
            flipped = bytearray(body)
            flipped[len(body) // 2] ^= 0x40
            body = bytes(flipped)
        if fault == "bad-range":
            out["Content-Range"] = "bytes 0-0/1"
        if fault == "truncate" and req.command == "GET":
            req.send_response(status)
            for k, v in out.items():
                req.send_header(k, v)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body[:len(body) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        if fault == "short":
            body = body[:len(body) // 2]
        if fault == "stall-body" and req.command == "GET":  # headers, then nothing
            req.send_response(status)
            for k, v in out.items():
                req.send_header(k, v)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.flush()
            time.sleep(self.stall)
            req.close_connection = True
            return
        if fault == "eof" and req.command == "GET":  # no length: the body ends at the close
            req.send_response(status)
            for k, v in out.items():
                req.send_header(k, v)
            req.send_header("Connection", "close")
            req.end_headers()
            req.wfile.write(body[:len(body) // 2])
            req.close_connection = True
            return
        self._reply(req, status, body, out)

    def _token(self, req: BaseHTTPRequestHandler, headers: dict[str, str]) -> None:
        if self.token_user is not None:
            want = "Basic " + base64.b64encode(":".join(self.token_user).encode()).decode()
            if headers.get("Authorization") != want:
                return self._reply(req, 401, b'{"details":"bad credentials"}', {})
        doc = {"token": self.bearer, "expires_in": 300}
        self._reply(req, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _reply(self, req: BaseHTTPRequestHandler, status: int, body: bytes,
               headers: dict[str, str]) -> None:
        if req.command == "GET" and "/blobs/" in req.path:
            with self.lock:
                self.blob_bytes += len(body)
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        if "Content-Length" not in headers:
            req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(body)
