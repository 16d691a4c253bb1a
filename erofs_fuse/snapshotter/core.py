"""The snapshotter's operations, free of gRPC: keys in, ``MountSpec`` lists and rows out.

Layout under the root::

    metadata.db             the store (store.py)
    snapshots/<id>/fs       an active snapshot's directory (its overlay upperdir, or the bind
                            source when it has no parent); a view's empty fs for no parent
    snapshots/<id>/work     the overlay workdir of an active snapshot with a parent
    snapshots/<id>/layer.erofs (+ .verity)   a committed snapshot: its one sealed layer
    layers/sha256-<diff_id hex>.erofs (+ .verity)   a layer a client converted (erofs-fuse
                            image pull/import), shared by every snapshot of that diff_id
    incoming/layer-*/       layers being fetched and converted for CRI's pulls (fetch.py),
                            until their Prepare takes them into layers/; emptied at start
    mounts/<id>             the erofs-fuse mount of the chain whose top is committed <id>
    cache/                  the block cache of lazy layers (lazy/cache.py), shared by mounts
    empty/                  the lowerdir of an unpack into a snapshot with no parent

Mounts handed out (the nydus pattern of containerd.md §3): no parent: a bind of ``fs``; with a
parent, active: an overlay with ``upperdir``/``workdir`` here and one ``lowerdir``, the chain's
FUSE mount; a view with a parent: a read-only bind of the chain's mount.

Layers that containerd unpacks (walking differ, then Commit) are files per snapshot. Layers
that a client converted itself come in through the remote-snapshot protocol (containerd-client.md
§3.1): a Prepare carrying ``containerd.io/snapshot.ref`` (the chain id) and our labels naming
the converted file, its diff_id and its fs-verity digest. We take the file into ``layers/``
once per diff_id, record a committed snapshot and answer ALREADY_EXISTS; containerd then finds
that snapshot with List. Every row that names a shared file counts as a user of it (the
database is the reference count): removing the last one removes the file. A Prepare for a chain
we already hold committed (another namespace, another image) is answered the same way, with no
new file. A lazy layer (erofs-fuse image pull --lazy) names no file but a layer of a pushed
image in its registry (``lazy.source``; a file we hold for its diff_id is preferred): the row's
layer is that string, no file is taken in or ever removed, and the chain's mount reads the
layer lazily (blocks cached in ``cache/``), verified against its pinned manifest.

CRI's PullImage with ``disable_snapshot_annotations = false`` sends no file, but CRI's labels
naming the image in its registry: then we fetch and convert the layers ourselves (fetch.py),
every layer at once from the image's first Prepare, each Prepare waiting, outside the lock,
for its own layer only; the answer is the same ALREADY_EXISTS, and containerd downloads nothing.
An image erofs-fuse push made is not fetched: each layer is committed lazily, as above.

Commit converts outside the lock, so a long conversion does not hold up other calls; the
snapshot being committed is marked busy meanwhile (Remove refuses it, the sweep spares it).

One module past the house's ~450 lines on purpose: remote snapshots (a client's file, a lazy
layer, a CRI fetch) are Prepare and Remove under the same lock, store rows and sweep as local
ones, and split apart each half would reach into the other's state; the fetching itself lives
in ``fetch``, the mounts in ``mounts``, the rows in ``store``, the shared layer files in
``layerfiles``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass

from ..containerd.labels import DIFF_ID_LABEL as DIFF_ID_LABEL  # declared there, for clients
from ..containerd.labels import LAYER_LABEL as LAYER_LABEL
from ..containerd.labels import LAZY_LABEL as LAZY_LABEL
from ..containerd.labels import VERITY_LABEL as VERITY_LABEL
from ..containerd.labels import XATTR_FREE_LABEL as XATTR_FREE_LABEL
from ..lazy.cache import DEFAULT_CACHE_SIZE
from ..lazy.source import LazySource, LazySourceError, is_lazy
from ..oci.image import OciError
from .fetch import Fetcher, wants_fetch
from .layerfiles import SharedLayers
from .mounts import ChainMounts, Forker
from .store import (REF_LABEL, AlreadyExists, FailedPrecondition, InvalidArgument, Kind,
                    NotFound, Snapshot, Store)

log = logging.getLogger("erofs_fuse.snapshotter")

LAYER = "layer.erofs"
# Labels of a client's Prepare through containerd (only containerd.io/snapshot/* labels reach a
# snapshotter): the converted and sealed layer file (its tree beside it, FILE.verity), the
# diff_id it was checked against, and its fs-verity digest, the mount's trusted root.
_PRIVATE_LABELS = (LAYER_LABEL,)  # a staging path: not kept on the snapshot
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: tuple[str, ...]


class Snapshotter:
    """All operations; each holds one lock (sqlite and the mount table are not concurrent)."""

    def __init__(self, root: str, forker: Forker, *, linger: float = 0.0,
                 cache_size: int = DEFAULT_CACHE_SIZE, spin_us: int | None = None) -> None:
        self.root = os.path.abspath(root)
        # seconds a chain mount outlives its last user: the next container of the same image
        # (ctr run after ctr run, or the first one after image pull warmed it) finds it mounted
        self.linger = linger
        self.lingering: dict[int, threading.Timer] = {}
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        self.empty_dir = os.path.join(self.root, "empty")
        for d in (self.snapshots_dir, self.empty_dir):
            os.makedirs(d, exist_ok=True)
        self.busy: set[int] = set()  # ids of snapshots being committed (outside the lock)
        self.store = Store(os.path.join(self.root, "metadata.db"))
        self.chains = ChainMounts(self.root, forker, os.path.join(self.root, "cache"),
                                  cache_size, spin_us)
        self.fetcher = Fetcher(self.root)  # CRI's pulls: layers we fetch ourselves
        self.lock = threading.RLock()
        self.layers = SharedLayers(self.root, self.lock)  # layers/: one file per diff_id
        with self.lock:
            self._sweep()

    def close(self) -> None:
        with self.lock:
            for timer in self.lingering.values():
                timer.cancel()  # the mounts stay: the next start releases unneeded ones
            self.lingering.clear()
        self.store.close()

    def snapshot_dir(self, snap: Snapshot) -> str:
        return os.path.join(self.snapshots_dir, str(snap.id))

    # operations ------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str],
                kind: Kind = Kind.ACTIVE) -> list[MountSpec]:
        target = labels.get(REF_LABEL)
        if target and kind == Kind.ACTIVE:
            self._answer_remote(target, parent, labels)  # AlreadyExists when we have it
        with self.lock:
            snap = self.store.create(key, parent, kind, labels)
            try:
                d = self.snapshot_dir(snap)
                os.makedirs(os.path.join(d, "fs"), exist_ok=True)
                if _has_workdir(snap):
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

    def commit(self, name: str, key: str, labels: dict[str, str], parent: str = "") -> Snapshot:
        """Convert the active snapshot's directory to its sealed layer and record it committed
        as ``name``; ``parent``: containerd 2.2's rebase (store.commit)."""
        from ..mkfs import ConvertOptions, convert_dir

        with self.lock:
            snap = self.store.get(key)
            if snap.kind != Kind.ACTIVE or snap.id in self.busy:
                raise FailedPrecondition(f"snapshot {key} is not active")
            with contextlib.suppress(NotFound):
                self.store.get(name)
                raise AlreadyExists(f"snapshot {name} already exists")
            self.busy.add(snap.id)
        try:
            d = self.snapshot_dir(snap)
            layer = os.path.join(d, LAYER)
            result = convert_dir(os.path.join(d, "fs"), layer,
                                 ConvertOptions(seal=True, sync=True))
            assert result.verity_digest is not None
            with self.lock:
                committed = self.store.commit(key, name, labels, os.path.relpath(layer, self.root),
                                              result.verity_digest, parent,
                                              xattr_free=result.shown_xattr_inodes == 0)
                log.info("committed %s as %s: %s (%d bytes, %s)", key, name, layer,
                         result.image_size, result.verity_digest)
                for sub in ("fs", "work"):
                    shutil.rmtree(os.path.join(d, sub), ignore_errors=True)
                if snap.parent_id is not None:  # an unpack's lower chain: no container's
                    self._release_if_unused(snap.parent_id, linger=False)
                if not parent:  # not containerd 2.2's rebase (its layers, ahead, unused)
                    self._mount_ahead(committed.id)
                return committed
        finally:
            with self.lock:
                self.busy.discard(snap.id)

    def remove(self, key: str) -> None:
        with self.lock:
            with contextlib.suppress(NotFound):
                if self.store.get(key).id in self.busy:
                    raise FailedPrecondition(f"snapshot {key} is being committed")
            snap = self.store.remove(key)
            if snap.kind != Kind.COMMITTED and snap.parent_id is not None:
                self._release_if_unused(snap.parent_id, linger=not _is_unpack(snap.key))
            if snap.kind == Kind.COMMITTED:
                timer = self.lingering.pop(snap.id, None)
                if timer is not None:
                    timer.cancel()
                self.chains.release(snap.id)  # its own chain mount, if any user left one
            self._remove_files(snap)
            if snap.layer is not None and self.layers.is_shared(snap.layer) \
                    and self.store.layer_users(snap.layer) == 0:
                self.layers.remove(snap.layer)
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
            if snap.layer is not None and self.layers.is_shared(snap.layer):
                return size, inodes  # a shared file is no one snapshot's own
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
        if _has_workdir(snap) and snap.parent_id is None:
            # an unpack (containerd 2.2's parallel one, or CRI's) into a snapshot with no
            # parent: the overlay form makes the applier write whiteouts as overlayfs's
            # (char 0:0, opaque xattrs) straight into upperdir, where a bind would drop them
            return [MountSpec("overlay", "overlay",
                              (f"workdir={os.path.join(d, 'work')}", f"upperdir={fs}",
                               f"lowerdir={self.empty_dir}"))]
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
        timer = self.lingering.pop(top_id, None)
        if timer is not None:
            timer.cancel()  # a user again before its time ran out
        chain = self.store.chain(self.store.get_id(top_id))
        layers = []
        # every layer known to show no xattr: the mount answers getxattr ENOSYS, and the kernel
        # sends no more (overlayfs probes each lower file and directory otherwise)
        noxattr = all(s.xattr_free for s in chain)
        for s in chain:
            if s.layer is None or s.digest is None:
                raise FailedPrecondition(f"snapshot {s.key} in the chain has no layer")
            # a lazy layer is no file: its string goes to the mount as it is
            layers.append((s.layer if is_lazy(s.layer) else os.path.join(self.root, s.layer),
                           s.digest))
        return self.chains.ensure(top_id, layers, noxattr=noxattr)

    def _mount_ahead(self, top_id: int) -> None:
        """Mount the chain just committed, in the background, lingering: the next layer of
        an unpack, or the image's first container, mounts it anyway and then finds it ready
        (``ctr images import`` then ``ctr run``: the run's first output 60-80 ms sooner). Not
        without --mount-linger (nothing would keep it)."""
        if self.linger <= 0:
            return

        def mount() -> None:
            with self.lock:
                try:
                    if top_id in self.lingering or self.store.children(top_id):
                        return  # mounted already by a user of it
                    self._chain_mount(top_id)
                    self._release_if_unused(top_id, linger=True)
                except Exception as exc:  # removed meanwhile, a store closed at shutdown
                    log.info("chain %d not mounted ahead: %s", top_id, exc)

        threading.Thread(target=mount, name=f"mount-ahead-{top_id}", daemon=True).start()

    def _release_if_unused(self, top_id: int, *, linger: bool) -> None:
        """Unmount the chain without users, now, or after ``self.linger`` when its last user
        was a container or a view (an unpack's lower chains are not wanted again)."""
        if self.store.users(top_id) != 0:
            return
        if self.linger <= 0 or not linger:
            self.chains.release(top_id)
            return
        old = self.lingering.pop(top_id, None)
        if old is not None:
            old.cancel()
        timer = threading.Timer(self.linger, self._release_lingering, (top_id,))
        timer.daemon = True
        self.lingering[top_id] = timer
        timer.start()

    def _release_lingering(self, top_id: int) -> None:
        with self.lock:
            timer = self.lingering.get(top_id)
            if timer is None or timer is not threading.current_thread():
                return  # cancelled, or replaced by a newer timer
            del self.lingering[top_id]
            try:
                in_use = self.store.users(top_id) != 0
            except Exception:  # a closed store at shutdown: leave the mount to the next start
                return
            if not in_use:
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
            if snap.id in self.busy:
                continue  # being committed: its files are in use
            if snap.kind != Kind.COMMITTED:  # a crash between the row and its directories
                os.makedirs(os.path.join(path, "fs"), exist_ok=True)
                if _has_workdir(snap):
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
        self.layers.sweep(self.store.layers())
        needed = {s.parent_id for s in snaps.values()
                  if s.kind != Kind.COMMITTED and s.parent_id is not None}
        for top_id in self.chains.existing():
            if top_id not in needed and top_id not in self.lingering:
                self.chains.release(top_id)

    # remote snapshots (layers a client converted) -------------------------------------------
    def _answer_remote(self, target: str, parent: str, labels: dict[str, str]) -> None:
        """Raise AlreadyExists if the chain ``target`` on ``parent`` is committed here, or can
        be from the layer file our labels name, or from the registry CRI's labels name; return
        to prepare as usual otherwise."""
        with self.lock:
            if self.store.committed_with_ref(target, parent) is not None:
                raise AlreadyExists(f"target snapshot {target} already exists")
        if DIFF_ID_LABEL in labels:
            self._commit_remote(target, parent, labels)
        elif not wants_fetch(labels) or not self._fetch_remote(target, parent, labels):
            return
        raise AlreadyExists(f"target snapshot {target} already exists")

    def _commit_remote(self, target: str, parent: str, labels: dict[str, str]) -> None:
        """Record ``target`` on ``parent`` committed, its layer the shared file of the labels'
        diff_id (taken in from the labels' file if we do not hold it)."""
        layer, digest, xattr_free = self._shared_layer(labels)
        kept = {k: v for k, v in labels.items() if k not in _PRIVATE_LABELS}
        kept[VERITY_LABEL] = digest
        with self.lock:
            if self.store.committed_with_ref(target, parent) is None:
                name = target
                with contextlib.suppress(NotFound):
                    self.store.get(name)  # taken: the same chain id on another parent
                    name = f"{target}@{self.store.get(parent).id if parent else 0}"
                self.store.add_committed(name, parent, kept, layer, digest,
                                         xattr_free=xattr_free)
                log.info("committed %s (%s) from %s", name, labels[DIFF_ID_LABEL], layer)

    def _fetch_remote(self, target: str, parent: str, labels: dict[str, str]) -> bool:
        """CRI's Prepare with snapshot annotations (fetch.py): wait, outside the lock, until
        this layer is converted (the first Prepare of an image starts every layer), then
        commit it. A registry that cannot tell us the image returns to a plain Prepare:
        containerd, which may have credentials or mirrors we lack, downloads and unpacks it.
        A failure after that (a blob or diff_id that does not match, a registry gone
        mid-pull) fails the Prepare, and so the pull, with its cause. An image erofs-fuse
        push made is fetched not at all: its layer is committed lazily (as image pull
        --lazy's Prepare), read from the registry by the chain's mount. True when committed."""
        try:
            source, layer = self.fetcher.layer(labels, target)
        except OciError as exc:
            log.warning("%s: not fetched by us (%s): containerd unpacks it", target, exc)
            return False
        if source.lazy:  # pushed by erofs-fuse push: the layer stays in its registry
            lazy = source.lazy[layer.index]
            own = {**labels, DIFF_ID_LABEL: layer.diff_id, VERITY_LABEL: lazy.verity,
                   LAZY_LABEL: str(lazy.source)}
            if lazy.xattr_free:  # push's annotation
                own[XATTR_FREE_LABEL] = "true"
            self._commit_remote(target, parent, own)
            return True
        with self.lock:
            held = self.layers.held_diff_ids(self.store.layers())
        fetch = self.fetcher.start(source, layer, labels, held)
        own = {**labels, DIFF_ID_LABEL: layer.diff_id}
        if fetch is None:
            self._commit_remote(target, parent, own)  # held: no file needed
            return True
        self.fetcher.wait(fetch)
        with fetch.claim:  # a second waiter finds it held, and needs the file no more
            self.fetcher.check(fetch)
            own.update({VERITY_LABEL: fetch.verity, LAYER_LABEL: fetch.out})
            if fetch.xattr_free:
                own[XATTR_FREE_LABEL] = "true"
            self._commit_remote(target, parent, own)
            self.fetcher.taken(fetch)
        return True

    def _shared_layer(self, labels: dict[str, str]) -> tuple[str, str, bool]:
        """The shared layer file of the labels' diff_id (relative to the root), its
        fs-verity digest and whether it is known to show no xattr: the one we hold, else the
        labels' file taken in (xattr-free if the labels say so)."""
        diff_id = _sha256_label(labels, DIFF_ID_LABEL)
        layer = self.layers.name_of(diff_id)
        said_free = labels.get(XATTR_FREE_LABEL) == "true"
        with self.lock:
            held = self.store.layer_digest(layer)
        if held is not None:
            return layer, held[0], held[1] or said_free
        digest = _sha256_label(labels, VERITY_LABEL)
        if LAZY_LABEL in labels:
            try:
                return str(LazySource.parse(labels[LAZY_LABEL])), digest, said_free
            except LazySourceError as exc:
                raise InvalidArgument(f"{LAZY_LABEL}: {exc}") from None
        source = labels.get(LAYER_LABEL, "")
        if not os.path.isabs(source) or not os.path.isfile(source) \
                or not os.path.isfile(source + ".verity"):
            raise InvalidArgument(f"{LAYER_LABEL}={source!r}: not a sealed layer file "
                                  "(FILE and FILE.verity)")
        self.layers.take_in(source, layer)
        return layer, digest, said_free


def _is_unpack(key: str) -> bool:
    """Whether ``key`` is an unpack's (containerd names them ``extract-<nanos>-<rand> <chain>``,
    behind its ``<namespace>/<seq>/``)."""
    return key.rpartition("/")[2].startswith("extract-")


def _has_workdir(snap: Snapshot) -> bool:
    """An active snapshot is an overlay's upper layer (with a workdir) when it has a parent, or
    when it is an unpack's (containerd names the chain it will become)."""
    return snap.kind == Kind.ACTIVE and (snap.parent_id is not None or REF_LABEL in snap.labels)


def _sha256_label(labels: dict[str, str], name: str) -> str:
    value = labels.get(name, "")
    hexpart = value.removeprefix("sha256:")
    if not value.startswith("sha256:") or len(hexpart) != 64 or not set(hexpart) <= _HEX:
        raise InvalidArgument(f"{name}={value!r}: expected sha256:<64 hex digits>")
    return value


def _du(path: str) -> tuple[int, int]:
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                size += st.st_blocks * 512
                inodes += 1
    return size, inodes
