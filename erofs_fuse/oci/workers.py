"""The worker processes of ``convert-image``: a job per layer file, ``-j N`` at a time.

Nothing partial is ever left under a final name: a worker converts into a temporary name that
holds a per-job token, checks the blob's digest, and only then links the file to its final name
(the writer itself writes via a temporary file and renames on success). A failure in one job,
or the parent's interruption, cancels the others: each gets SIGTERM, which raises ``Cancelled``
inside the conversion so the writer removes its temporary file; one that does not stop within
``CANCEL_GRACE`` seconds is killed and the parent removes the files bearing its token.

Workers are ``multiprocessing`` processes of the 'forkserver' start method (no state of the
parent is inherited; the server preloads this module and the writer once). Each reports over a
pipe of its own (the progress queue): progress, then one final message; end of file without one
is a worker that died. Workers ignore SIGINT (started with it blocked): a terminal sends Ctrl-C
to the whole process group, and the parent alone decides how to cancel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, NoReturn, Protocol

from ..mkfs import ConvertOptions, MkfsError, convert_tar
from .image import Layer, OciError, ResolvedImage, open_blob
from .layout import BlobLocation
from ..verity.sealing import SealError, seal
from .digest_record import recorded_digest, remove_record, write_record

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
CANCEL_GRACE = 10.0  # seconds a cancelled worker has to clean up before it is killed
REPORT_EVERY = 0.1  # seconds between progress messages of a worker
READ_CHUNK = 64 << 10  # the buffer in front of the blob: small, for fine-grained progress


class Cancelled(Exception):
    """Raised in a worker by SIGTERM: the parent cancels the conversion."""


class JobFailed(Exception):
    """A layer could not be converted; ``code`` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# jobs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One output file: converting ``layer`` (the first of ``indexes``, layers with the same
    diff_id) into ``out``; or, with ``convert`` false, sealing the existing ``out`` once it is
    proven to be the file a sealed conversion recorded (else converting it again)."""

    key: int
    indexes: tuple[int, ...]
    layer: Layer
    out: str
    token: str  # in every temporary name of this job
    options: ConvertOptions
    convert: bool
    work: int  # bytes the job reads: the blob, or the image it seals


@dataclass(frozen=True)
class JobResult:
    image_size: int
    verity: str | None
    warnings: tuple[str, ...] = ()
    reconverted: bool = False  # present, not proven to be what its name says: converted again
    # inodes showing an xattr in a merged tree (ConvertResult's); None: not converted here
    shown_xattr_inodes: int | None = None


def output_name(diff_id: str) -> str:
    return "sha256-" + diff_id.removeprefix("sha256:") + ".erofs"


def plan(image: ResolvedImage, outdir: str, options: ConvertOptions) -> list[Job]:
    """A job per distinct diff_id whose file is missing (or, sealing, present: its digest is
    needed, once the file is proven unchanged); layers whose file exists are left out when
    not sealing."""
    by_diff: dict[str, list[Layer]] = {}
    for layer in image.layers:
        by_diff.setdefault(layer.diff_id, []).append(layer)
    jobs: list[Job] = []
    for same in by_diff.values():
        out = os.path.join(outdir, output_name(same[0].diff_id))
        exists = os.path.exists(out)
        if exists and not options.seal:
            continue
        jobs.append(Job(len(jobs), tuple(layer.index for layer in same), same[0], out,
                        secrets.token_hex(8), options, convert=not exists,
                        work=os.path.getsize(out) if exists else same[0].size))
    return jobs


# the worker (runs in a child process) -----------------------------------------------------------
def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up must not be interrupted
    raise Cancelled()


def _work(job: Job, conn: Connection) -> None:
    """The worker's main: run ``job`` and send ("done", JobResult) or ("failed", message,
    exit status); when cancelled by SIGTERM, send nothing. SIGINT is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    message: tuple[Any, ...] | None = None
    try:
        # SIGTERM arrives blocked (see _start): one already pending raises Cancelled here
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        message = _attempt(job, conn)
        # from here on nothing cancels; a SIGTERM already received raises in this call
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    except Cancelled:
        message = None
    if message is None or message[0] != "done":
        remove_leftovers(job)
    with contextlib.suppress(OSError):
        if message is not None:
            conn.send(message)
        conn.close()


def _attempt(job: Job, conn: Connection) -> tuple[Any, ...]:
    try:
        return ("done", run_job(job, _Reporter(conn)))
    except (MkfsError, OciError) as exc:
        return ("failed", str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        return ("failed", f"{exc.filename + ': ' if exc.filename else ''}"
                f"{exc.strerror or exc}", EXIT_FAILURE)
    except SealError as exc:  # an existing layer file that cannot be sealed
        return ("failed", str(exc), EXIT_FAILURE)
    except Exception as exc:  # a bug: still one line, and the others are cancelled
        if isinstance(exc, Cancelled):
            raise
        return ("failed", f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILURE)


class _Reporter:
    """Sends the bytes read so far, at most every REPORT_EVERY seconds."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._last = 0.0

    def __call__(self, done: int, total: int = 0) -> None:
        now = time.monotonic()
        if now - self._last >= REPORT_EVERY:
            self._last = now
            self._conn.send(("progress", done))

    def note(self, line: str) -> None:
        self._conn.send(("note", line))


def run_job(job: Job, report: _Reporter) -> JobResult:
    if not job.convert:
        proven = _seal_if_proven(job, report)
        if proven is not None:
            return proven
    directory, base = os.path.split(job.out)
    tmp = os.path.join(directory, f".{base}.{job.token}.tmp")
    options = dataclasses.replace(job.options, expected_diff_id=job.layer.diff_id, sync=True)
    with open_blob(job.layer, on_read=report) as blob:
        result = convert_tar(io.BufferedReader(blob, READ_CHUNK), tmp, options)
        blob.finish()  # the blob's own digest, before anything gets a final name
    if not _publish(tmp, job.out, options.seal):
        return JobResult(os.path.getsize(job.out), None)
    if result.verity_digest is not None:
        write_record(job.out, job.layer.diff_id, result.verity_digest)
    return JobResult(result.image_size, result.verity_digest, result.warnings,
                     reconverted=not job.convert, shown_xattr_inodes=result.shown_xattr_inodes)


def _publish(tmp: str, out: str, sealed: bool) -> bool:
    """Give ``tmp`` (and its sidecar) the final name; False if another run made ``out``
    meanwhile and we are not sealing (ours is dropped: an unsealed file is never replaced
    under a reader). A sealed file replaces whatever is there, atomically: ours is the one
    whose digest we know (a reader of the old file keeps reading the old file)."""
    if sealed:
        remove_record(out)  # the old file's, if any: never paired with our file
        os.replace(tmp, out)
        os.replace(tmp + ".verity", out + ".verity")
        return True
    try:
        os.link(tmp, out)
    except FileExistsError:
        remove_quietly(tmp)
        return False
    os.unlink(tmp)
    return True


def _seal_if_proven(job: Job, report: _Reporter) -> JobResult | None:
    """Seal the existing ``job.out`` when its fs-verity digest is the one recorded when it
    was converted (oci/digest_record.py); None, after a note saying why, when it is not
    proven, and the layer is to be converted again."""
    recorded = recorded_digest(job.out, job.layer.diff_id)
    if recorded is None:
        report.note("present without a recorded digest: converting it again to seal it")
        return None
    directory, base = os.path.split(job.out)
    sidecar = os.path.join(directory, f".{base}.{job.token}.verity")
    result = seal(job.out, sidecar, progress=report)
    if result.digest != recorded:
        remove_quietly(sidecar)
        report.note(f"present but changed since it was converted (fs-verity digest "
                    f"{result.digest}, recorded {recorded}): converting it again")
        return None
    os.replace(sidecar, job.out + ".verity")
    return JobResult(result.data_size, result.digest)


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_leftovers(job: Job) -> None:
    """Every file of the job's directory bearing its token (its temporary names, the
    writer's and the sidecar's, which all start from ours)."""
    directory = os.path.dirname(job.out) or "."
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if job.token in entry.name:
                remove_quietly(entry.path)


# the pool (the parent) ----------------------------------------------------------------------------
class Observer(Protocol):
    """What the pool tells about its jobs (convert_progress.ProgressView)."""

    def label(self, job: Job) -> str: ...
    def started(self, job: Job) -> None: ...
    def progress(self, job: Job, done: int) -> None: ...
    def note(self, line: str) -> None: ...
    def finished(self, job: Job, result: JobResult) -> None: ...
    def tick(self) -> None: ...


@dataclass
class _Running:
    job: Job
    proc: BaseProcess
    finished: bool = False


def _context(jobs: list[Job]) -> ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, ForkServerContext)
    preload = [__name__]  # this module imports the writer
    if any(not isinstance(job.layer.location, BlobLocation) for job in jobs):
        # blobs streamed from a registry: its client (httpx, httpcore) imported once in the
        # server, not once per worker (about 0.25 s each, measured by scripts/bench-pull)
        preload.append("erofs_fuse.registry")
    ctx.set_forkserver_preload(preload)
    return ctx


def _start(ctx: ForkServerContext, job: Job, running: dict[Connection, _Running]) -> None:
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_work, args=(job, sender), name=f"convert-{job.key}", daemon=True)
    # Started with SIGINT and SIGTERM blocked (the forkserver too, and so every worker it
    # forks): no Ctrl-C reaches a worker before it ignores SIGINT, no SIGTERM before its
    # handler is in place; and the parent registers the worker before it can be interrupted.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        try:
            proc.start()
        finally:
            sender.close()
        running[receiver] = _Running(job, proc)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run_jobs(jobs: list[Job], workers: int, view: Observer) -> dict[int, JobResult]:
    """Run ``jobs``, ``workers`` at a time; on any failure or interruption cancel the rest
    and raise."""
    ctx = _context(jobs)
    pending = list(jobs)
    running: dict[Connection, _Running] = {}
    results: dict[int, JobResult] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                view.started(job)
                _start(ctx, job, running)
            for conn in multiprocessing.connection.wait(list(running), timeout=0.2):
                assert isinstance(conn, Connection)
                _receive(conn, running, results, view)
            view.tick()
    except BaseException:
        _cancel(running)
        raise
    return results


def _receive(conn: Connection, running: dict[Connection, _Running],
             results: dict[int, JobResult], view: Observer) -> None:
    run = running[conn]
    try:
        message = conn.recv()
    except EOFError:
        del running[conn]
        conn.close()
        run.proc.join()
        if run.job.key not in results:
            raise JobFailed(f"{view.label(run.job)}: the worker died (exit status "
                            f"{run.proc.exitcode})", EXIT_FAILURE) from None
        return
    if message[0] == "progress":
        view.progress(run.job, message[1])
    elif message[0] == "note":
        view.note(f"{view.label(run.job)}: {message[1]}")
    elif message[0] == "done":
        results[run.job.key] = message[1]
        view.finished(run.job, message[1])
    else:
        raise JobFailed(f"{view.label(run.job)}: {message[1]}", message[2])


def _cancel(running: dict[Connection, _Running]) -> None:
    """SIGTERM every worker, wait CANCEL_GRACE seconds, kill what is left, remove what the
    killed ones leave. Ctrl-C is held off meanwhile: a second one must not cut this short."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for run in running.values():
            if run.proc.is_alive():
                run.proc.terminate()
        deadline = time.monotonic() + CANCEL_GRACE
        for conn, run in running.items():
            run.proc.join(max(0.0, deadline - time.monotonic()))
            if run.proc.is_alive():
                run.proc.kill()
                run.proc.join()
            remove_leftovers(run.job)
            conn.close()
        running.clear()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
