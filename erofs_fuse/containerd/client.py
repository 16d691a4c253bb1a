"""A connection to containerd's gRPC socket, scoped to one namespace (and optionally a lease).

Every call carries the ``containerd-namespace`` metadata header, and ``containerd-lease`` when
the client was made for a lease (``with_lease``, ``lease()``): containerd then adds every blob,
ingest and snapshot the call creates to that lease (shared/docs/containerd-client.md 1.7).

Calls fail fast: none waits for the socket to come up (gRPC's ``wait_for_ready`` is off), so a
missing socket or a refused connection is an ``Unavailable`` error at once, naming the socket;
unary calls also have a deadline (``timeout``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from datetime import timedelta
from typing import Any, Iterator

import grpc

from .api import (content_pb2_grpc, images_pb2_grpc, leases_pb2_grpc, snapshots_pb2_grpc,
                  version_pb2_grpc)
from .content import Content
from .errors import ContainerdError, error_from_rpc
from .images import Images
from .leases import Leases
from .snapshots import Snapshots

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
MAX_MESSAGE = 16 << 20  # containerd's gRPC limit each way (defaults/defaults.go)
_NAMESPACE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")  # identifiers/validate.go


class _Channel:
    """The gRPC channel and its stubs, shared by a client and the leased clients made from it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(f"unix:{address}", options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            # after a refusal, retry the socket soon rather than after gRPC's 120 s backoff
            ("grpc.max_reconnect_backoff_ms", 2000),
        ])
        self.content = _stub(content_pb2_grpc.ContentStub, self.channel)
        self.images = _stub(images_pb2_grpc.ImagesStub, self.channel)
        self.leases = _stub(leases_pb2_grpc.LeasesStub, self.channel)
        self.snapshots = _stub(snapshots_pb2_grpc.SnapshotsStub, self.channel)
        self.version = _stub(version_pb2_grpc.VersionStub, self.channel)


def _stub(cls: Any, channel: Any) -> Any:
    return cls(channel)  # the generated stubs are untyped


class Client:
    """containerd at ``address`` (a unix socket path), namespace ``namespace``.

    ``client.content``, ``client.images``, ``client.leases`` and ``client.snapshots(name)``
    are the services; ``client.lease()`` runs a block under a fresh lease. Close it (or use it
    as a context manager) to close the channel.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = "default", *,
                 timeout: float | None = 120.0, _channel: _Channel | None = None,
                 _lease: str = "") -> None:
        if not _NAMESPACE.match(namespace) or len(namespace) > 76:
            raise ContainerdError(f"invalid containerd namespace {namespace!r}: letters and "
                                  f"digits, single '.', '_' or '-' between, at most 76")
        address = address.removeprefix("unix://")
        self.address = os.path.abspath(address)
        self.namespace = namespace
        self.lease_id = _lease
        self.timeout = timeout  # seconds, for each unary call
        self._owner = _channel is None
        self._ch = _channel or _Channel(self.address)
        self.metadata: tuple[tuple[str, str], ...] = ((NAMESPACE_HEADER, namespace),) + (
            ((LEASE_HEADER, _lease),) if _lease else ())
        self.content = Content(self)
        self.images = Images(self)
        self.leases = Leases(self)

    def snapshots(self, snapshotter: str) -> Snapshots:
        """containerd's snapshots service for the snapshotter named ``snapshotter`` (the proxy
        plugin's name in config.toml, e.g. ``erofs-fuse``)."""
        return Snapshots(self, snapshotter)

    @property
    def stubs(self) -> _Channel:
        return self._ch

    def with_lease(self, lease_id: str) -> Client:
        """A client on the same channel whose calls are made under lease ``lease_id``."""
        return Client(self.address, self.namespace, timeout=self.timeout, _channel=self._ch,
                      _lease=lease_id)

    @contextlib.contextmanager
    def lease(self, ttl: timedelta = timedelta(hours=24), *, sync: bool = False,
              labels: dict[str, str] | None = None) -> Iterator[Client]:
        """Run a block under a new lease (expiring after ``ttl`` should we die) and delete the
        lease afterwards, also when the block fails, so what it made is collected unless
        something else refers to it by then (create the image record inside the block).
        ``sync`` waits for the garbage collection the deletion starts."""
        lease = self.leases.create(ttl=ttl, labels=labels)
        try:
            yield self.with_lease(lease.id)
        except BaseException:
            with contextlib.suppress(ContainerdError):  # the lease expires anyway
                self.leases.delete(lease.id, sync=sync)
            raise
        self.leases.delete(lease.id, sync=sync)

    def version(self) -> tuple[str, str]:
        """containerd's (version, revision); a cheap check that it answers."""
        from google.protobuf import empty_pb2
        r = self.call(self._ch.version.Version, empty_pb2.Empty(), "version")
        return r.version, r.revision

    def call(self, method: Any, request: Any, what: str, subject: str = "", *,
             timeout: float | None = None) -> Any:
        """One unary call with our headers and deadline; gRPC errors become ContainerdError
        (``what``: the call, e.g. ``get image``; ``subject``: the name it was about)."""
        try:
            return method(request, metadata=self.metadata,
                          timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc, what, subject) from None

    def error(self, exc: grpc.RpcError, what: str, subject: str = "") -> ContainerdError:
        return error_from_rpc(exc, self.address, what, subject)

    def close(self) -> None:
        if self._owner:
            self._ch.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_lease_id() -> str:
    """Our leases' ids: recognisable in ``ctr leases ls``, unique per call."""
    return f"erofs-fuse-{time.time_ns()}-{secrets.token_hex(3)}"
