"""Registering an image with containerd, every layer converted at once, straight from its blob.

The sequence (shared/docs/containerd-client.md 3.1 and 7 (a), (b)), all under one lease:

1. Stat each layer's chain id in the snapshotter through containerd: a chain this namespace
   has is there with every layer below it, and is skipped.
2. For the layers above, bottom up, ask whether our snapshotter already holds the layer (a
   remote-snapshot Prepare naming only its diff_id: another namespace or image brought it):
   it answers ALREADY_EXISTS and containerd records the chain; it refuses (INVALID_ARGUMENT)
   a diff_id it does not hold, and the layers from there up are converted.
3. Convert those in worker processes (``oci.workers``, ``-j N``) from the compressed stream
   (an archive member, or a registry's blob) into a fresh staging directory, sealed, each
   checked against its blob digest and its diff_id.
4. Bottom up, a remote-snapshot Prepare with the labels naming the sealed file: the
   snapshotter takes the file in and answers ALREADY_EXISTS; containerd records the chain id.
   A snapshotter that returns mounts instead is not erofs-fuse: that key is removed, we stop.
   A lazy pull (``--lazy``, an image erofs-fuse push made) converts nothing: this Prepare's
   labels name the layer in its registry (``LAZY_LABEL``: the pinned manifest and the layer's
   index) with its diff_id and fs-verity digest, and the snapshotter records it as it is.
5. Config (labelled with the top chain id, which keeps the snapshots from GC) and manifest
   (labelled with the config) into the content store; no layer blob is stored.
6. The image record, pointing at the manifest. Then the lease is deleted: the record is the
   root that keeps everything. On any failure the lease is deleted instead (and garbage
   collected at once), which removes whatever it held; the staging directory always goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TextIO

import grpc

from ..containerd import (DIFF_ID_LABEL, LAYER_LABEL, LAZY_LABEL, VERITY_LABEL,
                          XATTR_FREE_LABEL, Client, ContainerdError, Descriptor, Unavailable,
                          manifest_gc_labels, snapshot_gc_label)
from ..containerd.snapshots import Snapshots
from ..mkfs import ConvertOptions
from ..oci.image import Layer, Platform
from ..oci.progress import ProgressView
from ..oci.workers import plan, run_jobs
from ..registry import RegistryClient
from .source import SourceImage, from_archive, from_registry

DEFAULT_STAGING = "/var/lib/erofs-fuse/staging"
LEASE_TTL = timedelta(hours=24)  # should we die: containerd drops the lease's objects then
# Who holds a lease or a staging directory: "<boot id>:<pid>". A run killed outright (SIGKILL,
# power loss) cleans up nothing; the next run removes what a dead owner left.
OWNER_LABEL = "erofs-fuse/owner"
_RUN_PREFIX = "run-"


class NotOurSnapshotter(Exception):
    """The snapshotter prepared an active snapshot instead of taking our layer in."""


class SnapshotterUnavailable(ContainerdError):
    """containerd answers, but the snapshotter behind it does not."""


@dataclass(frozen=True)
class Target:
    """The containerd to register with."""

    address: str
    namespace: str = "default"
    snapshotter: str = "erofs-fuse"


@dataclass(frozen=True)
class Settings:
    jobs: int = 2
    staging: str = DEFAULT_STAGING
    quiet: bool = False


@dataclass(frozen=True)
class Registered:
    name: str
    manifest_digest: str
    converted: int  # layers converted in this run
    present: int  # layers the namespace or the snapshotter had


def import_image(path: str, target: Target, settings: Settings, *,
                 platform: Platform | None = None, name: str | None = None,
                 stderr: TextIO | None = None) -> Registered:
    """Register the image in the OCI archive or layout ``path`` (see ``source.from_archive``
    for its name)."""
    return register(lambda: from_archive(path, platform, name), target, settings, stderr)


def pull_image(reference: str, target: Target, settings: Settings, *,
               platform: Platform | None = None, plain_http: bool | None = None,
               lazy: bool = False, stderr: TextIO | None = None) -> Registered:
    """Register the image ``reference`` names in its registry, under that name; ``lazy``:
    its layers stay there, read by the snapshotter's mounts on first use."""
    with RegistryClient(plain_http=plain_http) as registry:
        return register(lambda: from_registry(registry, reference, platform, lazy=lazy,
                                              plain_http=plain_http is True),
                        target, settings, stderr)


def register(resolve: Callable[[], SourceImage], target: Target, settings: Settings,
             stderr: TextIO | None = None) -> Registered:
    """Connect (failing at once if containerd does not answer), resolve the image, and run
    the sequence of the module docstring under one lease."""
    out = stderr or sys.stderr
    with Client(target.address, target.namespace) as client:
        client.version()
        _sweep_dead_runs(client, settings.staging)
        source = resolve()
        lease = client.leases.create(ttl=LEASE_TTL, labels={OWNER_LABEL: _owner()})
        ok = False
        try:
            try:
                result = _register(client.with_lease(lease.id), source, target, settings, out)
            except Unavailable as exc:
                raise _which_unavailable(client, target, exc) from None
            ok = True
        finally:
            with _signals_held(), contextlib.suppress(ContainerdError):
                # after a failure, wait for the collection: nothing is left when we return
                client.leases.delete(lease.id, sync=not ok)
        return result


def _which_unavailable(client: Client, target: Target, exc: Unavailable) -> ContainerdError:
    """containerd passes on the snapshotter's UNAVAILABLE (a proxy plugin whose socket is
    dead) as its own: name the snapshotter if containerd itself still answers."""
    try:
        client.version()
    except ContainerdError:
        return exc
    return SnapshotterUnavailable(
        f"containerd at {client.address} cannot reach its snapshotter {target.snapshotter!r}: "
        f"is 'erofs-fuse snapshotter' running on the socket of that proxy plugin?", exc.code)


def _register(client: Client, source: SourceImage, target: Target, settings: Settings,
              out: TextIO) -> Registered:
    sn = client.snapshots(target.snapshotter)
    layers = source.image.layers
    start = _present(sn, layers)
    start = _held_by_snapshotter(sn, layers, start)
    todo = layers[start:]
    if todo and source.lazy:
        for layer in todo:
            lazy = source.lazy[layer.index]
            labels = {DIFF_ID_LABEL: layer.diff_id, VERITY_LABEL: lazy.verity,
                      LAZY_LABEL: str(lazy.source)}
            if lazy.xattr_free:
                labels[XATTR_FREE_LABEL] = "true"
            _prepare(sn, layer, layers, labels)
    elif todo:
        _convert_and_prepare(sn, source, todo, settings, out)
    top = layers[-1].chain_id if layers else ""
    config, manifest = source.config, source.manifest
    client.content.write_blob(f"config-{config.digest}", config.data, config.digest,
                              config.size, snapshot_gc_label(target.snapshotter, top)
                              if top else None)
    client.content.write_blob(f"manifest-{manifest.digest}", manifest.data, manifest.digest,
                              manifest.size, manifest_gc_labels(config.digest))
    client.images.put(source.name, Descriptor(manifest.media_type, manifest.digest,
                                              manifest.size))
    if top:
        _warm(sn, top)
    converted = 0 if source.lazy else len({layer.diff_id for layer in todo})
    return Registered(source.name, manifest.digest, converted, len(layers) - len(todo))


def _warm(sn: Snapshots, top: str) -> None:
    """Have the snapshotter mount the image's chain now (a view, removed at once): the mount
    outlives it for the snapshotter's --mount-linger, so the first container starts without
    mounting. Best effort: a failure here is no failure of the pull."""
    key = f"erofs-fuse-warm-{secrets.token_hex(6)}"
    try:
        sn.view(key, top)
    except ContainerdError:
        return
    with contextlib.suppress(ContainerdError):
        sn.remove(key)


def _present(sn: Snapshots, layers: tuple[Layer, ...]) -> int:
    """How many layers, from the bottom, the namespace has: a chain id there has its whole
    chain below it, so the search goes from the top down."""
    for k in range(len(layers) - 1, -1, -1):
        if sn.exists(layers[k].chain_id):
            return k + 1
    return 0


def _held_by_snapshotter(sn: Snapshots, layers: tuple[Layer, ...], start: int) -> int:
    """Register layers from ``start`` up that the snapshotter holds already, naming their
    diff_id alone; the index of the first it does not hold."""
    for k in range(start, len(layers)):
        layer = layers[k]
        try:
            _prepare(sn, layer, layers, {DIFF_ID_LABEL: layer.diff_id})
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                return k  # it wants the file: this layer is to be converted
            raise
    return len(layers)


def _convert_and_prepare(sn: Snapshots, source: SourceImage, todo: tuple[Layer, ...],
                         settings: Settings, out: TextIO) -> None:
    """Convert ``todo`` into a fresh staging directory, then register each layer, bottom up;
    the staging directory is removed whatever happens (the snapshotter has its own links)."""
    os.makedirs(settings.staging, mode=0o700, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{_owner().replace(':', '-')}-",
                               dir=settings.staging)
    try:
        jobs = plan(dataclasses.replace(source.image, layers=todo), staging,
                    ConvertOptions(seal=True))
        view = ProgressView(out, len(source.image.layers), jobs,
                            quiet=settings.quiet or not out.isatty())
        view.note(f"{source.name}: {len(source.image.layers)} layers, {len(jobs)} to convert")
        try:
            results = run_jobs(jobs, min(settings.jobs, max(len(jobs), 1)), view)
        finally:
            view.close()
        files: dict[str, dict[str, str]] = {}
        for job in jobs:
            result = results[job.key]
            assert result.verity is not None  # sealed
            files[job.layer.diff_id] = {VERITY_LABEL: result.verity, LAYER_LABEL: job.out}
            if result.shown_xattr_inodes == 0:  # the chain may be mounted -o noxattr
                files[job.layer.diff_id][XATTR_FREE_LABEL] = "true"
        for layer in todo:
            _prepare(sn, layer, source.image.layers,
                     {DIFF_ID_LABEL: layer.diff_id, **files[layer.diff_id]})
    finally:
        with _signals_held():
            shutil.rmtree(staging, ignore_errors=True)


def _prepare(sn: Snapshots, layer: Layer, layers: tuple[Layer, ...],
             labels: dict[str, str]) -> None:
    """The remote-snapshot Prepare of ``layer`` on the chain below it; it must come back
    committed."""
    parent = layers[layer.index - 1].chain_id if layer.index else ""
    got = sn.prepare_remote(layer.chain_id, parent, labels, stat_first=False)
    if got.committed:
        return
    with contextlib.suppress(ContainerdError):
        sn.remove(got.key)
    raise NotOurSnapshotter(
        f"snapshotter {sn.snapshotter!r} prepared a snapshot for layer {layer.index + 1} "
        f"instead of taking the converted layer in: it is not erofs-fuse (give the name of "
        f"our proxy plugin with --snapshotter)")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Clean-up that Ctrl-C or SIGTERM must not cut short: they are delivered after it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# what a killed run left -------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


def _owner() -> str:
    return f"{_boot_id()}:{os.getpid()}"


def _owner_alive(owner: str) -> bool:
    """Whether the run that wrote ``owner`` may still be running (unknown forms count as
    alive: never remove what might be someone's)."""
    boot, _, pid = owner.rpartition(":")
    if not pid.isdigit() or not boot:
        return True
    if boot != _boot_id():
        return False  # a run before the last boot
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_dead_runs(client: Client, staging: str) -> None:
    """Remove the leases (and so, at the next collection, what they held) and the staging
    directories of runs that died without cleaning up."""
    with contextlib.suppress(ContainerdError):
        for lease in client.leases.list(f'labels."{OWNER_LABEL}"'):
            if not _owner_alive(lease.labels.get(OWNER_LABEL, "")):
                client.leases.delete(lease.id)
    with contextlib.suppress(OSError):
        for name in os.listdir(staging):
            if not name.startswith(_RUN_PREFIX):
                continue
            owner = name[len(_RUN_PREFIX):].rsplit("-", 1)[0]  # <boot>-<pid>, then mkdtemp's
            boot, _, pid = owner.rpartition("-")
            if boot and not _owner_alive(f"{boot}:{pid}"):
                shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
