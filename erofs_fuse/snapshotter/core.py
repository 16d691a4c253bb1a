"""The snapshotter's operations, free of gRPC: keys in, ``MountSpec`` lists and rows out.

Layout under the root::

    metadata.db             the store (store.py)
    snapshots/<id>/fs       an active snapshot's directory (its overlay upperdir, or the bind
                            source when it has no parent); a view's empty fs for no parent
    snapshots/<id>/work     the overlay workdir of an active snapshot with a parent
    snapshots/<id>/layer.erofs (+ .verity)   a committed snapshot: its one sealed layer
    mounts/<id>             the erofs-fuse mount of the chain whose top is committed <id>

Mounts handed out (the nydus pattern of containerd.md §3): no parent: a bind of ``fs``; with a
parent, active: an overlay with ``upperdir``/``workdir`` here and one ``lowerdir``, the chain's
FUSE mount; a view with a parent: a read-only bind of the chain's mount.

Layer files are per snapshot, not shared by chain id across namespaces: a second namespace's
unpack makes its own files (simple, and removal needs no reference counts on files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass

from .mounts import ChainMounts, Forker
from .store import (AlreadyExists, FailedPrecondition, InvalidArgument, Kind, NotFound,
                    Snapshot, Store)

log = logging.getLogger("erofs_fuse.snapshotter")

LAYER = "layer.erofs"


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: tuple[str, ...]


class Snapshotter:
    """All operations; each holds one lock (sqlite and the mount table are not concurrent)."""

    def __init__(self, root: str, forker: Forker) -> None:
        self.root = os.path.abspath(root)
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        os.makedirs(self.snapshots_dir, exist_ok=True)
        self.store = Store(os.path.join(self.root, "metadata.db"))
        self.chains = ChainMounts(self.root, forker)
        self.lock = threading.RLock()
        with self.lock:
            self._sweep()

    def close(self) -> None:
        self.store.close()

    def snapshot_dir(self, snap: Snapshot) -> str:
        return os.path.join(self.snapshots_dir, str(snap.id))

    # operations ------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str],
                kind: Kind = Kind.ACTIVE) -> list[MountSpec]:
        with self.lock:
            snap = self.store.create(key, parent, kind, labels)
            try:
                d = self.snapshot_dir(snap)
                os.makedirs(os.path.join(d, "fs"), exist_ok=True)
                if kind == Kind.ACTIVE and snap.parent_id is not None:
                    os.makedirs(os.path.join(d, "work"), exist_ok=True)
                return self._mounts(snap)
            except BaseException:
                self.store.remove(key)
                self._remove_files(snap)
                raise

    def mounts(self, key: str) -> list[MountSpec]:
        with self.lock:
            snap = self.store.get(key)
            if snap.kind == Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key} is committed: it has no mounts")
            return self._mounts(snap)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        from ..mkfs import ConvertOptions, convert_dir

        with self.lock:
            snap = self.store.get(key)
            if snap.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active")
            with contextlib.suppress(NotFound):
                self.store.get(name)
                raise AlreadyExists(f"snapshot {name} already exists")
            d = self.snapshot_dir(snap)
            layer = os.path.join(d, LAYER)
            result = convert_dir(os.path.join(d, "fs"), layer,
                                 ConvertOptions(seal=True, sync=True))
            assert result.verity_digest is not None
            committed = self.store.commit(key, name, labels, os.path.relpath(layer, self.root),
                                          result.verity_digest)
            log.info("committed %s as %s: %s (%d bytes, %s)", key, name, layer,
                     result.image_size, result.verity_digest)
            for sub in ("fs", "work"):
                shutil.rmtree(os.path.join(d, sub), ignore_errors=True)
            if snap.parent_id is not None:
                self._release_if_unused(snap.parent_id)
            return committed

    def remove(self, key: str) -> None:
        with self.lock:
            snap = self.store.remove(key)
            if snap.kind != Kind.COMMITTED and snap.parent_id is not None:
                self._release_if_unused(snap.parent_id)
            if snap.kind == Kind.COMMITTED:
                self.chains.release(snap.id)  # its own chain mount, if any user left one
            self._remove_files(snap)
            log.info("removed %s", key)

    def stat(self, key: str) -> Snapshot:
        with self.lock:
            return self.store.get(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        for path in paths:
            if path in ("name", "parent", "kind", "created_at"):
                raise InvalidArgument(f"snapshot field {path!r} cannot be changed")
        with self.lock:
            return self.store.update_labels(key, labels, paths)

    def list_all(self) -> list[Snapshot]:
        with self.lock:
            return self.store.all()

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes) used by the snapshot's own files."""
        with self.lock:
            snap = self.store.get(key)
        d = self.snapshot_dir(snap)
        if snap.kind == Kind.COMMITTED:
            size = inodes = 0
            for name in (LAYER, LAYER + ".verity"):
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(d, name)).st_blocks * 512
                    inodes += 1
            return size, inodes
        return _du(os.path.join(d, "fs"))

    def cleanup(self) -> None:
        with self.lock:
            self._sweep()

    # helpers ---------------------------------------------------------------------------------
    def _mounts(self, snap: Snapshot) -> list[MountSpec]:
        d = self.snapshot_dir(snap)
        fs = os.path.join(d, "fs")
        if snap.parent_id is None:
            mode = "rw" if snap.kind == Kind.ACTIVE else "ro"
            return [MountSpec("bind", fs, (mode, "rbind"))]
        lower = self._chain_mount(snap.parent_id)
        if snap.kind == Kind.VIEW:
            return [MountSpec("bind", lower, ("ro", "rbind"))]
        return [MountSpec("overlay", "overlay",
                          (f"workdir={os.path.join(d, 'work')}", f"upperdir={fs}",
                           f"lowerdir={lower}"))]

    def _chain_mount(self, top_id: int) -> str:
        chain = self.store.chain(self.store.get_id(top_id))
        layers = []
        for s in chain:
            if s.layer is None or s.digest is None:
                raise FailedPrecondition(f"snapshot {s.key} in the chain has no layer")
            layers.append((os.path.join(self.root, s.layer), s.digest))
        return self.chains.ensure(top_id, layers)

    def _release_if_unused(self, top_id: int) -> None:
        if self.store.users(top_id) == 0:
            self.chains.release(top_id)

    def _remove_files(self, snap: Snapshot) -> None:
        shutil.rmtree(self.snapshot_dir(snap), ignore_errors=True)

    def _sweep(self) -> None:
        """Make the files follow the database: remove directories no row names, the staging
        directories of committed snapshots, stray temporary files, and unused chain mounts."""
        snaps = {s.id: s for s in self.store.all()}
        for live in snaps.values():
            if live.kind != Kind.COMMITTED:
                os.makedirs(self.snapshot_dir(live), exist_ok=True)
        for name in os.listdir(self.snapshots_dir):
            path = os.path.join(self.snapshots_dir, name)
            snap = snaps.get(int(name)) if name.isdigit() else None
            if snap is None:
                log.info("removing %s: no snapshot owns it", path)
                shutil.rmtree(path, ignore_errors=True)
                continue
            if snap.kind != Kind.COMMITTED:  # a crash between the row and its directories
                os.makedirs(os.path.join(path, "fs"), exist_ok=True)
                if snap.kind == Kind.ACTIVE and snap.parent_id is not None:
                    os.makedirs(os.path.join(path, "work"), exist_ok=True)
            for entry in os.listdir(path):
                stray = entry.endswith(".tmp") or entry.startswith(".erofs-spool-")
                staging = snap.kind == Kind.COMMITTED and entry in ("fs", "work")
                if stray or staging:
                    p = os.path.join(path, entry)
                    log.info("removing %s: left over", p)
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(p)
        needed = {s.parent_id for s in snaps.values()
                  if s.kind != Kind.COMMITTED and s.parent_id is not None}
        for top_id in self.chains.existing():
            if top_id not in needed:
                self.chains.release(top_id)


def _du(path: str) -> tuple[int, int]:
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                size += st.st_blocks * 512
                inodes += 1
    return size, inodes
