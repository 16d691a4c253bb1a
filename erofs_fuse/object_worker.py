"""Objects read and verified ahead in a worker process, so that hashing them takes the other core.

A read-all through a metadata layer (``tar -cf -``, ``cp -a``) opens, reads and hashes
thousands of small objects, one after another, in the daemon's one thread: measured on the
Debian base, that is about 80 µs of the daemon's time per object (40% of it hashing) that a
full layer never spends, and the daemon is what a read-all waits for. Threads cannot take it
elsewhere (the GIL: every 4 KiB hash is a call that holds it), a process can. So the objects
that the read-ahead (``fuse/readahead.py``) guesses will be read next, if they carry a digest
and are small (``WORKER_MAX_BYTES``), are given to a ``VerifyWorker``: a child process
(``python -c WORKER_MAIN``) that opens each in the same data dirs (their
descriptors, inherited), reads it whole, hashes it and checks its fs-verity digest, and sends
back only the bytes that gave the digest. The file's read then takes those bytes
(``VerifyWorker.take``), already verified, without opening the object itself.

The worker is trusted as the daemon's own code (it is); what it reads is not: an object
missing, of the wrong size, unreadable or not giving its digest is answered "not done", and the
daemon opens and checks that object itself, exactly as without a worker (its error, its log
line). A worker that dies, hangs past ``WAIT_SECONDS`` or answers garbage is stopped for good
and the daemon does everything itself. Nothing waits on the worker without a bound: requests
are written without blocking (what does not fit is not asked), replies are read only for an
object a read needs now (moved to the front of the worker's queue first), and the verified
bytes read past on the way are kept up to ``READY_BYTES``.

Frames (little-endian): a request is ``REQUEST`` (kind, sequence number, object size,
algorithm, digest length, redirect length) then the digest and the redirect; a reply is
``REPLY`` (sequence number, status, length) then, when done, the object's bytes.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Hashable, Sequence

from .erofs.errors import ErofsError
from .erofs.metacopy import DIGEST_ALGS, Metacopy
from .native import PACKAGE_DIR
from .verity.objects import verified_object

if TYPE_CHECKING:
    from .objects import FdBlob, ObjectStore

log = logging.getLogger(__name__)

# Objects up to this size go to the worker when files are read whole (up to
# ``objects.WHOLE_OBJECT_BYTES`` otherwise: past it, a file not read whole is better served
# through its stored tree, block by block). In the Debian base, 5,087 of 5,106 objects, 113 MB of
# 198.
WORKER_MAX_BYTES = 1 << 20
MAX_PENDING = 256  # objects asked of the worker and not answered yet
# verified bytes read past on the way to a wanted object, kept (and the last one read, whatever
# its size)
READY_BYTES = 32 << 20
WAIT_SECONDS = 10.0  # a worker silent this long with a read waiting on it is stopped
OPEN_AHEAD = 32  # objects the worker opens and starts reading before it reads the first
PIPE_BYTES = 1 << 20  # the reply pipe: how far the worker may run ahead of the reads
_READ_BYTES = 1 << 18
# The child's command: ``-c``, not ``-m``, since runpy cannot run a module compiled by mypyc
WORKER_MAIN = "import sys; from erofs_fuse.object_worker import main; sys.exit(main(sys.argv[1:]))"

REQUEST = struct.Struct("<BQQBBH")  # kind, seq, size, algorithm, digest length, redirect length
REPLY = struct.Struct("<QBQ")  # seq, status, length
WANT, URGENT = 1, 2
DONE, NOT_DONE = 0, 1
_ALG_CODES = {name: code for code, (name, _) in DIGEST_ALGS.items()}

Key = Hashable


class WorkerError(Exception):
    """The worker cannot be used any more (gone, silent, or talking nonsense)."""


class VerifyWorker:
    """The daemon's side: ``ask`` hands objects over, ``take`` gets one's verified bytes."""

    def __init__(self, dir_fds: Sequence[int], *, max_pending: int = MAX_PENDING,
                 ready_bytes: int = READY_BYTES, wait: float = WAIT_SECONDS) -> None:
        self._dir_fds = list(dir_fds)
        self._max_pending = max_pending
        self._max_ready = ready_bytes
        self._wait = wait
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: int = -1  # requests, written without blocking
        self._from: int = -1  # replies
        self._head = bytearray()  # the header of the reply being received
        self._frame: tuple[int, int, int] | None = None  # that header, once whole
        self._body: list[bytes] = []  # what came of its bytes
        self._got = 0
        self._seq = 0
        self._pending: dict[Key, int] = {}  # asked, not answered: key -> seq
        self._keys: dict[int, Key] = {}  # seq -> key
        self._ready: OrderedDict[Key, bytes] = OrderedDict()  # answered, read past
        self.ready_bytes = 0
        self.dead = False
        self._lock = threading.Lock()  # reads may run in threads (``--blocking-reads``)
        self.asked = 0  # objects handed over (tests, debugging)
        self.served = 0  # of which a read took the verified bytes

    # the daemon's calls ------------------------------------------------------------------------
    def ask(self, jobs: Sequence[tuple[Key, Metacopy, int]]) -> None:
        """Have the worker read and verify these objects (key, metacopy with a digest, size),
        in this order; those asked already, or past the bounds, are left out."""
        with self._lock:
            if self.dead:
                return
            try:
                self._start()
                self._drain()
                frames: list[bytes] = []
                for key, meta, size in jobs:
                    if key in self._pending or key in self._ready:
                        continue
                    if len(self._pending) >= self._max_pending:
                        break
                    assert meta.digest is not None and meta.alg is not None
                    redirect = meta.redirect or b""
                    frame = (REQUEST.pack(WANT, self._seq + 1, size, _ALG_CODES[meta.alg],
                                          len(meta.digest), len(redirect))
                             + meta.digest + redirect)
                    if len(frame) > select.PIPE_BUF:  # a redirect of kilobytes: not written
                        continue  # whole at once, so not asked
                    self._seq += 1
                    frames.append(frame)
                    self._pending[key] = self._seq
                    self._keys[self._seq] = key
                self.asked += self._send(frames)
            except WorkerError as exc:
                self._stop(str(exc))

    def take(self, key: Key) -> bytes | None:
        """The verified bytes of this object, when the worker has them or is asked for them;
        None: the caller opens and checks it itself."""
        with self._lock:
            return self._take(key)

    def _take(self, key: Key) -> bytes | None:
        data = self._ready.pop(key, None)
        if data is not None:
            self.ready_bytes -= len(data)
            self.served += 1
            return data
        seq = self._pending.get(key)
        if seq is None or self.dead:
            return None
        try:
            deadline = None
            while True:
                got = self._parsed()
                if got is None:
                    if self._pull(0.0):
                        continue
                    if deadline is None:  # not come yet: asked for next, then waited for
                        self._send([REQUEST.pack(URGENT, seq, 0, 0, 0, 0)])
                        deadline = time.monotonic() + self._wait
                    if not self._pull(deadline - time.monotonic()):
                        raise WorkerError(f"no reply in {self._wait:g} s")
                    continue
                if got[0] == seq:
                    if got[1] is None:
                        return None
                    self._ready.pop(key)  # kept by _parsed: the caller's now
                    self.ready_bytes -= len(got[1])
                    self.served += 1
                    return got[1]
        except WorkerError as exc:
            self._stop(str(exc))
        return None

    @property
    def pid(self) -> int | None:
        """The worker process, once started and until stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def pending(self) -> int:
        """Objects asked for and not answered yet."""
        return len(self._pending)

    def close(self) -> None:
        with self._lock:
            self._stop(None)

    # the pipes -------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._proc is not None:
            return
        to_r, to_w = os.pipe2(os.O_CLOEXEC)
        from_r, from_w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(from_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the system's limit is lower: the worker runs less far ahead
        # not this module's __file__: mypyc gives a module imported by another compiled one a
        # wrong one
        package = os.path.dirname(PACKAGE_DIR)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package, env.get("PYTHONPATH")]))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_MAIN, *(str(fd) for fd in self._dir_fds)],
                stdin=to_r, stdout=from_w, pass_fds=self._dir_fds, env=env,
                start_new_session=True)  # a terminal's ^C is the daemon's to handle
        except OSError as exc:
            for fd in (to_r, to_w, from_r, from_w):
                os.close(fd)
            raise WorkerError(f"cannot start: {exc}") from exc
        os.close(to_r)
        os.close(from_w)
        os.set_blocking(to_w, False)
        os.set_blocking(from_r, False)
        self._to, self._from = to_w, from_r

    def _send(self, frames: list[bytes]) -> int:
        """Write whole frames (each of at most PIPE_BUF bytes), in writes of at most PIPE_BUF
        bytes (each all or nothing); what does not fit now is not asked (taken back from the
        pending ones). How many were written."""
        k = 0
        while k < len(frames):
            chunk, n = b"", k
            while n < len(frames) and len(chunk) + len(frames[n]) <= select.PIPE_BUF:
                chunk += frames[n]
                n += 1
            try:
                os.write(self._to, chunk)
            except BlockingIOError:
                break
            except OSError as exc:
                raise WorkerError(f"cannot ask: {exc.strerror}") from exc
            k = n
        for frame in frames[k:]:
            kind, seq = REQUEST.unpack_from(frame)[:2]
            if kind == WANT:
                self._pending.pop(self._keys.pop(seq), None)
        return k

    def _drain(self) -> None:
        """Read the replies there are now (at most what the pipe holds), keeping their bytes."""
        for _ in range(2 * MAX_PENDING):
            if not self._pull(0.0):
                break
            self._parsed()

    def _pull(self, timeout: float) -> bool:
        """Read more of the reply being received (its header, then its bytes: read straight
        into the bytes served, not through a buffer), waiting at most ``timeout`` for the
        worker; False: nothing came."""
        frame = self._frame
        want = REPLY.size - len(self._head) if frame is None else frame[2] - self._got
        while True:
            try:
                got = os.read(self._from, want)
                break
            except BlockingIOError:
                if timeout <= 0 or not self._readable(timeout):
                    return False
                timeout = 0.0  # readable now: one more try
            except OSError as exc:
                raise WorkerError(f"cannot read: {exc.strerror}") from exc
        if not got:
            raise WorkerError("it exited")
        if frame is not None:
            self._body.append(got)
            self._got += len(got)
            return True
        self._head += got
        if len(self._head) == REPLY.size:
            seq, status, length = REPLY.unpack(self._head)
            if (status not in (DONE, NOT_DONE) or seq not in self._keys
                    or length > (WORKER_MAX_BYTES if status == DONE else 0)):
                raise WorkerError(f"a reply that was not asked for (seq {seq}, status "
                                  f"{status}, {length} bytes)")
            self._frame = (seq, status, length)
            self._head.clear()
            self._body, self._got = [], 0
        return True

    def _parsed(self) -> tuple[int, bytes | None] | None:
        """The reply just received whole (seq, the verified bytes or None: not done), its
        bytes kept among the ready ones; None when it is not whole yet."""
        frame = self._frame
        if frame is None or self._got < frame[2]:
            return None
        seq, status, _ = frame
        self._frame = None
        body, self._body = self._body, []
        data = None
        if status == DONE:
            data = body[0] if len(body) == 1 else b"".join(body)
        key = self._keys.pop(seq)
        del self._pending[key]
        if data is not None:
            self._ready[key] = data
            self.ready_bytes += len(data)
            while self.ready_bytes > self._max_ready and len(self._ready) > 1:
                self.ready_bytes -= len(self._ready.popitem(last=False)[1])
        return seq, data

    def _readable(self, timeout: float) -> bool:
        if self._from < 0:
            return False
        poller = select.poll()
        poller.register(self._from, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def _stop(self, why: str | None) -> None:
        if why is not None and not self.dead:
            log.warning("object worker stopped (%s): objects are verified in the daemon", why)
        self.dead = True
        for fd in (self._to, self._from):
            if fd >= 0:
                os.close(fd)
        self._to = self._from = -1
        self._frame = None
        self._head.clear()
        self._body = []
        self._pending.clear()
        self._keys.clear()
        self._ready.clear()
        self.ready_bytes = 0
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if why is not None:  # hung or confused: not waited for
            proc.kill()
        try:
            proc.wait(timeout=1.0)  # it exits at its next request: none will come
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# the worker's side ------------------------------------------------------------------------------
def serve(dir_fds: Sequence[int], requests: int, replies: int) -> None:
    """Answer requests until the daemon closes them: each object read whole from the store
    (``ObjectStore`` over the inherited ``dir_fds``) and verified, urgent ones first. The next
    ``OPEN_AHEAD`` are opened, and their reading started (``POSIX_FADV_WILLNEED``), before the
    first is read: cold, their disk reads overlap."""
    from .objects import ObjectStore  # not at the top: objects.py imports this module

    store = ObjectStore.from_fds(dir_fds)
    pending: OrderedDict[int, _Job] = OrderedDict()
    buf = bytearray()
    os.set_blocking(requests, False)
    while True:
        if not pending:
            select.select([requests], [], [])
        try:
            got = os.read(requests, 1 << 16)
            if not got:
                return  # the daemon is gone: nobody reads what is left
            buf += got
        except BlockingIOError:
            pass
        _parse(buf, pending)
        if not pending:
            continue
        for job in itertools.islice(pending.values(), OPEN_AHEAD):
            job.open(store)
        seq, job = pending.popitem(last=False)
        job.open(store)
        data = job.verified()
        head = REPLY.pack(seq, DONE if data is not None else NOT_DONE,
                          len(data) if data is not None else 0)
        _write_all(replies, [head, data] if data is not None else [head])


class _Job:
    """An object asked for: its metacopy and size, and once opened, its open file."""

    def __init__(self, meta: Metacopy, size: int) -> None:
        self.meta = meta
        self.size = size
        self.blob: FdBlob | None = None
        self._tried = False

    def open(self, store: ObjectStore) -> None:
        if self._tried:
            return
        self._tried = True
        self.blob = store.opened(self.meta, self.size)
        if self.blob is not None:
            try:
                os.posix_fadvise(self.blob.fd, 0, self.size, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # only a hint

    def verified(self) -> bytes | None:
        """Its bytes, when they give its digest (then closed); None otherwise."""
        if self.blob is None:
            return None
        meta = self.meta
        try:
            if meta.digest is None or meta.alg is None:
                return None
            return verified_object(self.blob, meta.alg, meta.digest, None, self.size)[1]
        except (ErofsError, OSError):
            return None  # the daemon's own open and check say what is wrong
        finally:
            self.blob.close()


def _parse(buf: bytearray, pending: OrderedDict[int, _Job]) -> None:
    """Take the whole request frames off the front of ``buf``."""
    while len(buf) >= REQUEST.size:
        kind, seq, size, alg, dlen, rlen = REQUEST.unpack_from(buf)
        end = REQUEST.size + dlen + rlen
        if len(buf) < end:
            return
        if kind == WANT:
            digest = bytes(buf[REQUEST.size:REQUEST.size + dlen])
            redirect = bytes(buf[REQUEST.size + dlen:end])
            pending[seq] = _Job(Metacopy(redirect, DIGEST_ALGS[alg][0], digest), size)
        elif kind == URGENT and seq in pending:
            pending.move_to_end(seq, last=False)
        del buf[:end]


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write ``parts`` whole (the object's bytes not copied to be joined to their header)."""
    views = [memoryview(part) for part in parts]
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def main(argv: Sequence[str]) -> int:
    try:
        serve([int(a) for a in argv], 0, 1)
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the daemon is gone
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
