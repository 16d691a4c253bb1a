"""Snapshots through containerd's snapshots service (not the snapshotter's own socket):
containerd's metadata store records each snapshot per namespace, adds it to the caller's lease
and calls the snapshotter named in ``snapshotter`` (our proxy plugin).

``prepare_remote`` is the remote-snapshot sequence of containerd's 1.6 unpacker for one layer
(shared/docs/containerd-client.md 3.1, 3.2): Stat the chain id; if absent, Prepare an
``extract-…`` key with the parent chain and the label ``containerd.io/snapshot.ref`` = chain id.
A snapshotter that already holds that layer committed answers ALREADY_EXISTS, and containerd
then records the snapshot under the chain id itself: nothing to unpack, nothing to commit.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import grpc

from .api import snapshots_pb2 as pb
from .errors import AlreadyExists, NotFound
from .labels import SNAPSHOT_REF
from .records import Mount, SnapshotInfo

if TYPE_CHECKING:
    from .client import Client

PREPARE_TRIES = 3  # as containerd's unpacker: a new key after an AlreadyExists that Stat denies


@dataclass(frozen=True, slots=True)
class RemotePrepare:
    """The outcome of ``prepare_remote`` for one layer. ``committed``: the chain id exists (it
    did, or the snapshotter had it). Otherwise the snapshotter prepared an active snapshot
    ``key`` with ``mounts``: the caller fills it and commits it as ``chain_id``, or removes it."""

    chain_id: str
    committed: bool
    key: str = ""
    mounts: tuple[Mount, ...] = ()


class Snapshots:
    def __init__(self, client: Client, snapshotter: str) -> None:
        self._c = client
        self.snapshotter = snapshotter

    def prepare(self, key: str, parent: str = "",
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        """An active snapshot ``key`` on top of committed ``parent``. Only labels starting
        ``containerd.io/snapshot/`` (and ``containerd.io/snapshot.ref``) reach the snapshotter."""
        r = self._c.call(self._c.stubs.snapshots.Prepare, pb.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {})),
            f"prepare {self.snapshotter} snapshot", key)
        return [Mount.from_pb(m) for m in r.mounts]

    def view(self, key: str, parent: str,
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        """A read-only view ``key`` of committed ``parent``."""
        r = self._c.call(self._c.stubs.snapshots.View, pb.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {})),
            f"view {self.snapshotter} snapshot", key)
        return [Mount.from_pb(m) for m in r.mounts]

    def mounts(self, key: str) -> list[Mount]:
        r = self._c.call(self._c.stubs.snapshots.Mounts, pb.MountsRequest(
            snapshotter=self.snapshotter, key=key),
            f"get mounts of {self.snapshotter} snapshot", key)
        return [Mount.from_pb(m) for m in r.mounts]

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Commit active snapshot ``key`` as ``name`` (a chain id, for a layer)."""
        self._c.call(self._c.stubs.snapshots.Commit, pb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {})),
            f"commit {self.snapshotter} snapshot", f"{key} as {name}")

    def stat(self, key: str) -> SnapshotInfo:
        r = self._c.call(self._c.stubs.snapshots.Stat, pb.StatSnapshotRequest(
            snapshotter=self.snapshotter, key=key),
            f"stat {self.snapshotter} snapshot", key)
        return SnapshotInfo.from_pb(r.info)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def remove(self, key: str) -> None:
        self._c.call(self._c.stubs.snapshots.Remove, pb.RemoveSnapshotRequest(
            snapshotter=self.snapshotter, key=key),
            f"remove {self.snapshotter} snapshot", key)

    def list(self, *filters: str) -> list[SnapshotInfo]:
        call = self._c.stubs.snapshots.List(pb.ListSnapshotsRequest(
            snapshotter=self.snapshotter, filters=list(filters)), metadata=self._c.metadata,
            timeout=self._c.timeout)
        try:
            return [SnapshotInfo.from_pb(i) for r in call for i in r.info]
        except grpc.RpcError as exc:
            raise self._c.error(exc, f"list {self.snapshotter} snapshots") from None

    def prepare_remote(self, chain_id: str, parent: str = "",
                       labels: Mapping[str, str] | None = None, *,
                       stat_first: bool = True) -> RemotePrepare:
        """One layer of the remote-snapshot sequence: ``chain_id`` on top of the chain
        ``parent`` (the previous layer's chain id, "" for the bottom layer), telling the
        snapshotter the target through ``containerd.io/snapshot.ref``; ``labels`` (keys
        ``containerd.io/snapshot/…``) go along to it. Layers must go bottom up: the parent must
        exist. See RemotePrepare for the outcome. ``stat_first=False`` skips the first Stat,
        as containerd 2.x does: a chain id containerd knows is then answered by Prepare."""
        if stat_first and self.exists(chain_id):
            return RemotePrepare(chain_id, True)
        all_labels = {**(labels or {}), SNAPSHOT_REF: chain_id}
        for _ in range(PREPARE_TRIES):
            key = unpack_key(chain_id)
            try:
                mounts = self.prepare(key, parent, all_labels)
            except AlreadyExists:
                if self.exists(chain_id):
                    return RemotePrepare(chain_id, True)
                continue  # the key itself was taken: a new one
            return RemotePrepare(chain_id, False, key, tuple(mounts))
        raise AlreadyExists(f"containerd prepare {self.snapshotter} snapshot {chain_id}: "
                            f"{PREPARE_TRIES} keys taken, chain id not found")


def unpack_key(chain_id: str) -> str:
    """A fresh active key as containerd's unpacker names them (``extract-<nanos>-<rand>
    <chain id>``, snapshots.UnpackKeyFormat), so GC and ``ctr snapshots ls`` treat ours alike."""
    rand = base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()
    return f"extract-{time.time_ns() % 1_000_000_000}-{rand} {chain_id}"
