"""Layers the snapshotter fetches and converts itself: CRI's PullImage with snapshot annotations.

With ``disable_snapshot_annotations = false``, CRI's unpacker gives each layer's Prepare the
labels ``cri.image-ref``, ``cri.manifest-digest``, ``cri.layer-digest`` and ``cri.image-layers``
(this layer's blob digest and those above it; containerd-client.md 4.2). At the first such
Prepare of an image we resolve its manifest, pinned by digest, on the registry of the reference
(HTTP on loopback, as CRI; credentials from this process's ``~/.docker/config.json``), and
convert every listed layer we do not hold, all at once, in worker processes (``oci.workers``),
each straight from the registry's stream, checked against its blob digest and diff_id, sealed,
into its own directory under ``ROOT/incoming/``. Prepare i then waits for layer i only: it is
taken in like a client's converted file (core.py) and containerd, answered ALREADY_EXISTS,
downloads no blob. An image that ``erofs-fuse push`` made (native EROFS layers with push's
verity annotations, diff_ids the blobs' digests: the check of ``image pull --lazy``,
``images.source.native_layers``) is not fetched at all: each Prepare commits its layer lazily
(core.py), as ``image pull --lazy`` registers it.

The table of fetches is keyed by diff_id, so layers shared by images, or asked for by two
pulls at once, are converted once; an entry leaves the table when its Prepare took it in, when
it failed (every waiter gets the error; the next Prepare starts again), or when nobody came for
it within ``UNCLAIMED`` seconds (containerd gave the pull up). Nothing here holds the
snapshotter's lock: conversions run in their own thread and processes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from ..containerd.labels import CRI_IMAGE_REF, CRI_LAYER, CRI_LAYERS, CRI_MANIFEST
from ..images.source import SourceImage, from_registry
from ..mkfs import ConvertOptions
from ..oci.image import Layer, OciError
from ..oci.workers import Job, JobFailed, JobResult, plan, run_jobs
from ..registry import Reference, RegistryClient
from .store import FailedPrecondition

log = logging.getLogger("erofs_fuse.snapshotter")

CRI_LABELS = (CRI_IMAGE_REF, CRI_MANIFEST, CRI_LAYER, CRI_LAYERS)
INCOMING = "incoming"
UNCLAIMED = 600.0  # seconds a converted layer waits for its Prepare before it is dropped
WAIT_LIMIT = 3600.0  # seconds a Prepare waits for its layer (the registry's timeouts come first)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
IMAGES_KEPT = 16  # resolved manifests remembered (every Prepare of an image needs its own)


class FetchFailed(FailedPrecondition):
    """The layer could not be fetched or converted: the Prepare fails with this message."""


@dataclass
class Fetch:
    """One layer being converted; ``done`` is set with ``out`` and ``verity``, or ``error``."""

    diff_id: str
    what: str
    directory: str = ""
    out: str = ""
    verity: str = ""
    xattr_free: bool = False  # the writer found no xattr the layer shows
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    claim: threading.Lock = field(default_factory=threading.Lock)  # one take-in at a time
    finished_at: float = 0.0


def wants_fetch(labels: dict[str, str]) -> bool:
    return all(labels.get(name) for name in CRI_LABELS)


class Fetcher:
    def __init__(self, root: str, workers: int = 0) -> None:
        self.incoming = os.path.join(root, INCOMING)
        shutil.rmtree(self.incoming, ignore_errors=True)  # a previous run's: nobody waits
        os.makedirs(self.incoming, mode=0o700)
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.lock = threading.Lock()
        self.running: dict[str, Fetch] = {}
        self.images: collections.OrderedDict[str, SourceImage] = collections.OrderedDict()

    def layer(self, labels: dict[str, str], target: str) -> tuple[SourceImage, Layer]:
        """The image the CRI labels name, and its layer whose chain id is ``target``; raises
        OciError (a RegistryError among them) when the registry cannot say. An image that
        erofs-fuse push made comes with its ``lazy`` layers: nothing is fetched for it."""
        manifest = labels[CRI_MANIFEST]
        if not _DIGEST.fullmatch(manifest):  # it goes into a URL
            raise OciError(f"{CRI_MANIFEST}={manifest[:80]!r}: not sha256:<64 hex digits>")
        with self.lock:
            source = self.images.get(manifest)
            if source is not None:
                self.images.move_to_end(manifest)
        if source is None:
            ref = Reference.parse(labels[CRI_IMAGE_REF]).with_digest(manifest)
            # a client of its own: credentials and tokens as they are now (the workers,
            # given its settings, make their own sessions)
            with RegistryClient() as client:
                source = from_registry(client, str(ref), None, lazy_if_native=True)
            if source.lazy:
                log.info("%s: %d layers of erofs-fuse push: committed lazily, none fetched",
                         source.name, len(source.lazy))
            with self.lock:
                self.images[manifest] = source
                while len(self.images) > IMAGES_KEPT:
                    self.images.popitem(last=False)
        for layer in source.image.layers:
            if layer.chain_id == target:
                if layer.digest != labels[CRI_LAYER]:
                    raise OciError(f"{source.name}: layer {layer.index + 1} is "
                                   f"{layer.digest}, containerd asks for {labels[CRI_LAYER]}")
                return source, layer
        raise OciError(f"{source.name}: no layer has chain id {target}")

    def start(self, source: SourceImage, layer: Layer, labels: dict[str, str],
              held: set[str]) -> Fetch | None:
        """The fetch of ``layer`` (None if ``held`` has its diff_id), after starting one for
        every layer of the ``cri.image-layers`` label that is neither held nor running."""
        listed = set(labels[CRI_LAYERS].split(","))
        new: list[tuple[Layer, Fetch]] = []
        with self.lock:
            self._expire()
            for above in source.image.layers[layer.index:]:
                if above is not layer and above.digest not in listed:
                    continue
                if above.diff_id in held or above.diff_id in self.running:
                    continue
                what = f"{labels[CRI_IMAGE_REF]} layer {above.index + 1} ({above.digest[:19]})"
                self.running[above.diff_id] = fetch = Fetch(above.diff_id, what)
                new.append((above, fetch))
            mine = self.running.get(layer.diff_id)
        if new:
            log.info("%s: fetching and converting %d layers", source.name, len(new))
            threading.Thread(target=self._run, args=(source, new), daemon=True,
                             name=f"fetch-{source.manifest.digest[7:19]}").start()
        return mine

    def wait(self, fetch: Fetch) -> None:
        if not fetch.done.wait(WAIT_LIMIT):
            raise FetchFailed(f"{fetch.what}: not converted after {WAIT_LIMIT:.0f} s")
        if fetch.error:
            raise FetchFailed(fetch.error)

    @staticmethod
    def check(fetch: Fetch) -> None:
        """Under ``fetch.claim``: raise if the fetch was dropped since it was converted."""
        if fetch.error:
            raise FetchFailed(fetch.error)

    def taken(self, fetch: Fetch) -> None:
        """The layer was taken in: forget it and remove its directory."""
        with self.lock:
            if self.running.get(fetch.diff_id) is fetch:
                del self.running[fetch.diff_id]
        shutil.rmtree(fetch.directory, ignore_errors=True)

    def _expire(self) -> None:
        now = time.monotonic()
        for diff_id, fetch in list(self.running.items()):
            if fetch.done.is_set() and now - fetch.finished_at > UNCLAIMED:
                log.info("%s: converted, but no Prepare came for it: dropped", fetch.what)
                del self.running[diff_id]
                shutil.rmtree(fetch.directory, ignore_errors=True)

    def _run(self, source: SourceImage, new: list[tuple[Layer, Fetch]]) -> None:
        """Convert ``new``, each into its own directory; set each fetch as it finishes, and
        all those left with the error when one fails (run_jobs cancels the others)."""
        jobs: list[Job] = []
        by_key: dict[int, Fetch] = {}
        try:
            for layer, fetch in new:
                fetch.directory = tempfile.mkdtemp(prefix="layer-", dir=self.incoming)
                one = dataclasses.replace(source.image, layers=(layer,))
                (job,) = plan(one, fetch.directory, ConvertOptions(seal=True))
                job = dataclasses.replace(job, key=len(jobs))
                jobs.append(job)
                by_key[job.key] = fetch
            run_jobs(jobs, min(self.workers, len(jobs)), _Observer(by_key))
        except BaseException as exc:  # one line for the Prepares: the cause, not a traceback
            message = str(exc) or type(exc).__name__
            log.error("%s: %s", source.name, message)
            # a worker's failure names its layer already
            self._drop([fetch for _, fetch in new], message if isinstance(exc, JobFailed)
                       else f"fetching {new[0][1].what}: {message}")
            if not isinstance(exc, Exception):
                raise

    def _drop(self, fetches: list[Fetch], error: str) -> None:
        """The pull failed: every fetch of it not taken in yet fails with ``error`` (a layer
        converted already goes too: containerd gives the pull up, nobody would take it)."""
        for fetch in fetches:
            with fetch.claim:  # not while a Prepare takes the file in
                with self.lock:
                    if self.running.get(fetch.diff_id) is not fetch:
                        continue  # taken in
                    del self.running[fetch.diff_id]
                fetch.error = error
                if fetch.directory:
                    shutil.rmtree(fetch.directory, ignore_errors=True)
                fetch.finished_at = time.monotonic()
                fetch.done.set()


class _Observer:
    """run_jobs' observer: a finished job sets its fetch; no progress is shown."""

    def __init__(self, by_key: dict[int, Fetch]) -> None:
        self.by_key = by_key

    def label(self, job: Job) -> str:
        return self.by_key[job.key].what

    def started(self, job: Job) -> None:
        pass

    def progress(self, job: Job, done: int) -> None:
        pass

    def note(self, line: str) -> None:
        log.info("%s", line)

    def finished(self, job: Job, result: JobResult) -> None:
        fetch = self.by_key[job.key]
        assert result.verity is not None  # sealed
        fetch.out, fetch.verity = job.out, result.verity
        fetch.xattr_free = result.shown_xattr_inodes == 0
        fetch.finished_at = time.monotonic()
        log.info("%s: converted to %s (%d bytes, %s)", fetch.what, job.out, result.image_size,
                 result.verity)
        fetch.done.set()

    def tick(self) -> None:
        pass
