"""Object stores: where metadata-only files (``erofs/metacopy.py``) get their bytes.

An object store ("data dir") is a directory like an overlayfs data-only lower layer
(``lowerdir=L1:L2::DATA1::DATA2``) or composefs's ``objects/`` directory: a metadata-only file
whose ``trusted.overlay.redirect`` is ``/ab/cdef...`` takes its bytes from ``DATA/ab/cdef...``
of the first data dir holding that object, while its attributes stay those of the layer.
``object_name`` is the one spelling of that name from a digest (the writer's, ``mkfs/objects.py``);
the reader follows whatever absolute redirect a file carries.

Lookup is as safe as the kernel's ``LOOKUP_BENEATH | LOOKUP_NO_SYMLINKS``: each component is
opened relative to the descriptor of its parent (the data dir's, opened once) with
``O_NOFOLLOW``, ``.``/``..`` and empty components are refused before any lookup, and only a
regular file is an object. An object whose size differs from the file's is refused.

Verification: when the metacopy xattr carries an fs-verity digest, every read is checked block
by block against the object's Merkle tree by a ``VerifiedBlob`` (the layers' verifier): a block
that does not match gives EIO, the other blocks are still served. The tree comes from beside
the object when the store has it (``ab/cdef....verity``, ``tree_name``: what ``convert
--objects`` writes; the raw fs-verity tree, or ``seal``'s veritysetup form): it is read whole
(1/128 of the object), its upper levels rebuilt from its leaves, and its root with the object's
size must give the digest, so a tree changed in any byte is caught before it is used, and the
object itself is not read before its first read. A tree that is missing (mkcomposefs writes
none), malformed or does not give the digest is not used: the object is then hashed whole on
first open (about 1.2 s per GB) and its root checked against the digest; an object changed
before that open fails it and no block of it is served, since no trusted tree exists to tell
good blocks from bad ones; up to ``PASS_KEPT_BYTES`` that pass is one read, and the verified
bytes are kept (bounded) to serve the reads that follow, so the object is read and hashed once.
Trees live in memory, in an LRU bounded by bytes (a tree is about
1/128 of its object: 64 MiB of trees cover about 8 GiB of open objects); an evicted object
gets its tree again on its next open. An object of at most ``WHOLE_OBJECT_BYTES`` has no
stored tree: it is read whole at open (one pread), hashed, checked, and the read that opened it
is served from those bytes. The checks themselves are in ``verity/objects.py``.

Opening is cheap: a data dir's directories stay open (``MAX_DIR_FDS``), so an object is one
``openat`` away. When a tree is read in listing order (``fuse/readahead.py`` decides),
``prefetch`` hands the small objects with a digest of the next files to a worker process that
reads and verifies them (``object_worker.py``; the read takes the verified bytes), and opens
the others before their reads and has the kernel start reading them (``object_prefetch.py``;
the read takes its object from there and checks it as if it had opened it).

One module of about 520 lines: finding, opening and verifying an object share the store's
descriptors and its byte-bounded caches, and the worker's objects (``object_worker.py``) are
taken into the same cache; what can live apart does (the read-ahead in ``object_prefetch.py``,
the worker's pipes and process in ``object_worker.py``, the digest and tree checks in
``verity/objects.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Sequence

from cachetools import LRUCache
from mypy_extensions import mypyc_attr

from .blob import BlobIOError, BytesBlob
from .object_prefetch import DEFAULT_AHEAD, Prefetcher
from .object_worker import WORKER_MAX_BYTES, VerifyWorker
from .erofs.errors import CorruptImageError, ErofsError, MetacopyError
from .erofs.metacopy import Metacopy, redirect_components
from .verity.objects import verified_object

if TYPE_CHECKING:
    from .blob import Blob
    from .erofs.image import Inode

log = logging.getLogger(__name__)

DEFAULT_OBJECT_CACHE_BYTES = 64 << 20  # trees of open verified objects
DEFAULT_OPEN_OBJECTS = 256  # descriptors kept open
# Directories of a data dir kept open (composefs's layout has 256: ``00`` to ``ff``), so that
# opening an object is one openat relative to its directory's descriptor, not an openat and a
# close of the directory as well. They are never closed before the store is (a descriptor still
# in use by another thread could otherwise be reused for something else); past this many, a
# directory is opened and closed for each object as before.
MAX_DIR_FDS = 512
TREE_SUFFIX = ".verity"  # an object's Merkle tree, beside it: ab/cdef....verity
# A verified object up to this size is read whole when opened (one pread, the bytes hashed as
# they arrive) and the read that opened it is served from those bytes: at most one FUSE read
# (32 pages), so it is read and hashed once, with no stored tree. Bigger ones get their tree
# from beside them (the writer stores trees only for them).
WHOLE_OBJECT_BYTES = 128 << 10
# What of an object opened ahead (``prefetch``) the kernel is asked to read: what its first read
# takes, or, when files are being read whole (a read-all), up to this much of it. A read-all of
# the Debian base cold, in-process: 1.0-1.2 s with 128 KiB, 0.92-1.05 s with 4 MiB (19 of its
# objects are over 1 MiB, 84 MB of its 198).
PREFETCH_WHOLE_BYTES = 8 << 20
# An object with a digest but no usable stored tree (mkcomposefs's stores) is hashed whole at
# its first open; up to this size that pass is one read whose verified bytes are kept (at most
# DEFAULT_KEPT_BYTES of them, least recently used dropped first) and serve the reads that follow,
# instead of every block being read and hashed a second time through its tree.
PASS_KEPT_BYTES = 8 << 20
DEFAULT_KEPT_BYTES = 16 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_FD_COST = 4096  # what an open object without a tree weighs in the cache of open objects
# the object is not in this data dir: try the next one (ELOOP: a symlink, refused, as the
# kernel's LOOKUP_NO_SYMLINKS refuses it)
_NOT_HERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


def object_name(digest: bytes) -> str:
    """The name of the object with this fs-verity digest in a store, relative to it:
    ``ab/cdef...`` (the digest in hex, split after two digits: composefs's layout)."""
    hexd = digest.hex()
    return f"{hexd[:2]}/{hexd[2:]}"


def tree_name(digest: bytes) -> str:
    """Where the writer keeps the Merkle tree of the object ``object_name(digest)``."""
    return object_name(digest) + TREE_SUFFIX


class FdBlob:
    """An open object read with ``os.pread`` (the ``Blob`` protocol); closed when dropped."""

    def __init__(self, fd: int, size: int, name: str,
                 identity: tuple[int, ...] | None = None) -> None:
        self._fd = fd
        self._size = size
        self.name = name
        self._identity = identity  # as it was opened (the fstat made then), if known

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise CorruptImageError(f"read of {length} bytes past the end of the object "
                                    f"({self._size} bytes)", image=self.name, offset=offset)
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise BlobIOError(str(exc), image=self.name, offset=offset) from exc
        if len(data) != length:
            raise MetacopyError(f"short read: {len(data)} of {length} bytes (object truncated?)",
                                image=self.name, offset=offset)
        return data

    def identity(self) -> tuple[int, ...]:
        """What changes when the file is replaced or written: device, inode, size, times
        (as opened, when known)."""
        if self._identity is not None:
            return self._identity
        return _identity(os.fstat(self._fd))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


@mypyc_attr(allow_interpreted_subclasses=True)  # tests record what the store is asked in a subclass
class ObjectStore:
    """The data dirs of a mount (or of ``cat``/``extract``), searched in order."""

    def __init__(self, dirs: Sequence[str], *, require_verity: bool = False,
                 cache_bytes: int = DEFAULT_OBJECT_CACHE_BYTES,
                 open_objects: int = DEFAULT_OPEN_OBJECTS,
                 prefetch_ahead: int = DEFAULT_AHEAD,
                 kept_bytes: int = DEFAULT_KEPT_BYTES,
                 worker: bool | Callable[[Sequence[int]], VerifyWorker] = False) -> None:
        self.dirs = list(dirs)
        self.require_verity = require_verity
        # objects read ahead are verified in a worker process (``object_worker``), made at the
        # first use; with ``worker`` only (a mount's daemon: not a one-off ``cat``), by it
        # when it is a callable (tests: other bounds)
        self._use_worker = bool(worker)
        self._make_worker: Callable[[Sequence[int]], VerifyWorker] = (
            worker if callable(worker) else VerifyWorker)
        self.worker: VerifyWorker | None = None
        self._fds: list[int] = []
        self._lock = threading.Lock()
        # (index of the data dir, directory components) -> descriptor (``MAX_DIR_FDS``)
        self._dir_fds: dict[tuple[int, tuple[str, ...]], int] = {}
        # objects opened ahead of their reads (``prefetch``), made at the first use
        self.prefetcher: Prefetcher[tuple[bytes, bytes | None], tuple[Metacopy, int]] | None \
            = None
        self._prefetch_ahead = prefetch_ahead  # at most this many open ahead, not yet read
        # verified bytes of objects hashed whole for want of a stored tree (PASS_KEPT_BYTES)
        self._kept: OrderedDict[tuple[bytes, bytes | None], bytes] = OrderedDict()
        self.kept_bytes = 0
        self._max_kept = kept_bytes
        # (redirect, digest) -> open object, least recently used first, at most
        # ``open_objects`` of them weighing at most ``cache_bytes`` (an object weighs its tree's
        # bytes plus one block: ``_FD_COST``). An OrderedDict, not a cachetools LRUCache: a hit is
        # one C call instead of a few Python ones, on every read.
        self._open: OrderedDict[tuple[bytes, bytes | None], Blob] = OrderedDict()
        self.open_bytes = 0  # what the open objects weigh
        self._cache_bytes = cache_bytes
        self._max_open = open_objects
        # objects that failed their digest at open, by key: (identity of the file then, the
        # error); the same file is refused again without being hashed again
        self._failed: LRUCache[tuple[bytes, bytes | None],
                               tuple[tuple[int, ...], ErofsError]] = LRUCache(maxsize=1024)
        # last: a data dir that cannot be opened closes the ones before it (close() needs
        # everything above)
        try:
            for path in self.dirs:
                self._fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_fds(cls, fds: Sequence[int]) -> ObjectStore:
        """A store over data dirs already open (the worker's, inherited), now its own."""
        store = cls([])
        store._fds = list(fds)
        store.dirs = [f"data dir {k + 1}" for k in range(len(fds))]
        return store

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        with self._lock:
            dir_fds, self._dir_fds = self._dir_fds, {}
        for fd in dir_fds.values():
            os.close(fd)
        self._open.clear()
        self.open_bytes = 0
        self._kept.clear()
        self.kept_bytes = 0

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reading ----------------------------------------------------------------------------------
    def read(self, inode: Inode, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the metadata-only file ``inode`` (shorter at
        EOF), from its object; ``MetacopyError`` (or ``IntegrityError``) otherwise."""
        try:
            if offset < 0 or size < 0:
                raise CorruptImageError(f"bad read range {offset}+{size}")
            if offset >= inode.size or size == 0:
                return b""
            blob, whole = self._object(inode)
            length = min(size, inode.size - offset)
            if whole is not None:  # read whole and verified (just now, or kept): no second read
                return whole[offset:offset + length]
            return blob.read(offset, length)
        except Exception as exc:
            if isinstance(exc, ErofsError) and exc.image not in (None, inode.image.name):
                # raised about the object (a block failing verification): name the file too
                exc.message += f" (the object of {inode.image.name} inode {inode.nid})"
            inode.image.reraise(exc, inode.nid)

    def object_of(self, inode: Inode) -> Blob:
        """The open (and, with a digest, verifying) object of a metadata-only file."""
        return self._object(inode)[0]

    def _object(self, inode: Inode) -> tuple[Blob, bytes | None]:
        """The open object, and its verified bytes when it was just opened by reading it
        whole (``WHOLE_OBJECT_BYTES``) or they are kept (``PASS_KEPT_BYTES``)."""
        meta = inode.metacopy()
        if meta is None:
            raise MetacopyError("not a metadata-only file")
        key = (meta.redirect or b"", meta.digest)
        with self._lock:
            blob = self._open.get(key)
            if blob is not None:
                self._open.move_to_end(key)
        if blob is not None and blob.size == inode.size:
            return blob, self._kept.get(key) if self._kept else None
        if self.worker is not None:  # read and verified ahead, in the worker
            whole = self.worker.take(key)
            if whole is not None and len(whole) == inode.size:
                blob = BytesBlob(whole, _shown(meta))  # weighs its bytes in the cache
                self._keep(key, blob)
                return blob, whole
        blob, whole = self._open_object(key, meta, inode.size)
        self._keep(key, blob)
        if whole is not None and len(whole) > WHOLE_OBJECT_BYTES:
            self._keep_bytes(key, whole)
        return blob, whole

    def _keep_bytes(self, key: tuple[bytes, bytes | None], whole: bytes) -> None:
        """Keep the verified bytes of an object hashed whole (``PASS_KEPT_BYTES``)."""
        if len(whole) > self._max_kept:
            return
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self.kept_bytes -= len(old)
            while self._kept and self.kept_bytes + len(whole) > self._max_kept:
                self.kept_bytes -= len(self._kept.popitem(last=False)[1])
            self._kept[key] = whole
            self.kept_bytes += len(whole)

    def _keep(self, key: tuple[bytes, bytes | None], blob: Blob) -> None:
        """Remember an object just opened, dropping the least recently used ones over the
        bounds (dropped, an object is closed when the last read using it returns)."""
        cost = getattr(blob, "cost", _FD_COST)
        if cost > self._cache_bytes:
            return
        with self._lock:
            opened = self._open
            old = opened.pop(key, None)
            if old is not None:
                self.open_bytes -= getattr(old, "cost", _FD_COST)
            while opened and (len(opened) >= self._max_open
                              or self.open_bytes + cost > self._cache_bytes):
                self.open_bytes -= getattr(opened.popitem(last=False)[1], "cost", _FD_COST)
            opened[key] = blob
            self.open_bytes += cost

    def _open_object(self, key: tuple[bytes, bytes | None], meta: Metacopy,
                     size: int) -> tuple[Blob, bytes | None]:
        if meta.digest is None and self.require_verity:
            raise MetacopyError(f"object {_shown(meta)} has no fs-verity digest in its metacopy "
                                "xattr, and object verity is required")
        if not self._fds:
            raise MetacopyError(f"object {_shown(meta)}: no data dir given")
        # opened ahead (``prefetch``): found by the same search, checked below as if opened here
        found = self.prefetcher.take(key) if self.prefetcher is not None else None
        if found is None:
            found = self._find(meta, size, quiet=False)
        if found is None:
            raise MetacopyError(f"object {_shown(meta)} is in none of the data dirs "
                                f"({', '.join(self.dirs)})")
        blob, tree_file = found
        if blob.size != size:
            if tree_file is not None:
                tree_file.close()
            raise MetacopyError(f"object {blob.name} has {blob.size} bytes, the file {size}")
        if meta.digest is None:
            return blob, None
        identity = blob.identity()
        failed = None
        if self._failed:  # usually empty: no lookup (and lock) per object opened
            with self._lock:
                failed = self._failed.get(key)
        if failed is not None and failed[0] == identity:
            raise failed[1]  # unchanged since it failed: not hashed again
        try:
            assert meta.alg is not None
            return verified_object(blob, meta.alg, meta.digest, tree_file, WHOLE_OBJECT_BYTES,
                                   min(PASS_KEPT_BYTES, self._max_kept))
        except ErofsError as exc:
            with self._lock:
                self._failed[key] = (identity, exc)
            raise

    def opened(self, meta: Metacopy, size: int) -> FdBlob | None:
        """The object of ``meta`` open, when some data dir holds it with ``size`` bytes; None
        otherwise, quietly (the worker's: the daemon then opens it itself, and says why)."""
        try:
            found = self._find(meta, size, quiet=True, trees=False)
        except (ErofsError, OSError):
            return None
        if found is not None and found[0].size == size:
            return found[0]
        if found is not None:
            found[0].close()
        return None

    def _find(self, meta: Metacopy, size: int, *, quiet: bool,
              trees: bool = True) -> tuple[FdBlob, FdBlob | None] | None:
        """The object (and, when it has a digest and is big, its stored tree, unless not
        ``trees``) in the first data dir holding it; None when none does. ``quiet``: no log
        line (opened ahead)."""
        parts = redirect_components(meta.redirect)
        rel = "/".join(parts)  # the path under a data dir (validated: no empty, . or ..)
        with_tree = trees and meta.digest is not None and size > WHOLE_OBJECT_BYTES
        for index, root in enumerate(self.dirs):
            found = self._open_in(index, parts, f"{root.rstrip('/')}/{rel}",
                                  with_tree=with_tree, quiet=quiet)
            if found is not None:
                return found
        return None

    # read-ahead -------------------------------------------------------------------------------
    def prefetch(self, inodes: Sequence[Inode], *, whole: bool = False) -> None:
        """Have the objects of these metadata-only files (about to be read, in this order)
        opened now (``object_prefetch.Prefetcher``) and the kernel start reading their first
        bytes (``whole``: files are being read whole: up to ``PREFETCH_WHOLE_BYTES``), without
        waiting for them. Nothing is checked or served there: each file's read
        takes its object as if it had opened it, and checks and verifies it the same way."""
        if not self._fds:
            return
        jobs = []
        verify = []  # for the worker: read whole and verified there
        most = WORKER_MAX_BYTES if whole else WHOLE_OBJECT_BYTES
        for inode in inodes:
            try:
                meta = inode.metacopy()
            except ErofsError:
                continue  # its read says why
            if meta is None or (meta.digest is None and self.require_verity):
                continue
            key = (meta.redirect or b"", meta.digest)
            if key in self._open:
                continue
            if self._use_worker and meta.digest is not None and 0 < inode.size <= most:
                verify.append((key, meta, inode.size))
            else:
                jobs.append((key, (meta, inode.size)))
        if verify:
            if self.worker is None:
                self.worker = self._make_worker(self._fds)
            self.worker.ask(verify)
            if self.worker.dead:  # it could not start, or stopped: opened ahead here instead
                self._use_worker = False
                jobs += [(key, (meta, size)) for key, meta, size in verify]
        if not jobs:
            return
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(self._open_ahead, ahead=self._prefetch_ahead)
        self.prefetcher.want(jobs, PREFETCH_WHOLE_BYTES if whole else WHOLE_OBJECT_BYTES,
                             WHOLE_OBJECT_BYTES)

    def _open_ahead(self, job: tuple[Metacopy, int]) -> tuple[FdBlob, FdBlob | None] | None:
        """What ``_open_object`` would find for this object, quietly (its read logs)."""
        return self._find(*job, quiet=True)

    def _open_in(self, index: int, parts: list[str], name: str, *, with_tree: bool,
                 quiet: bool = False) -> tuple[FdBlob, FdBlob | None] | None:
        """The object ``parts`` beneath data dir ``index`` and, ``with_tree``, its stored tree
        (None when there is none); None when this dir has no such object. ``quiet``: no log
        line (opened ahead: the read logs)."""
        try:
            fd, kept = self._dir_of(index, parts)
        except OSError as exc:
            if exc.errno in _NOT_HERE:  # a directory on the way is missing (or a symlink)
                if exc.errno == errno.ELOOP and not quiet:
                    log.warning("%s: a symlink on the way to an object: refused", name)
                return None
            raise MetacopyError(f"object {name}: {exc.strerror}") from exc
        try:
            obj = _regular_file(parts[-1], fd, name, quiet)
            if obj is None:
                return None
            tree = (_regular_file(parts[-1] + TREE_SUFFIX, fd, name, quiet) if with_tree
                    else None)
            return obj, tree
        except OSError as exc:
            raise MetacopyError(f"object {name}: {exc.strerror}") from exc
        finally:
            if not kept:
                os.close(fd)

    def _dir_of(self, index: int, parts: list[str]) -> tuple[int, bool]:
        """A descriptor of the directory holding the object ``parts`` of data dir ``index``,
        each component opened relative to its parent without following a symlink; and whether
        it is kept open (``MAX_DIR_FDS``) rather than the caller's to close."""
        root_fd = self._fds[index]
        if len(parts) == 1:
            return root_fd, True
        key = (index, tuple(parts[:-1]))
        fd = self._dir_fds.get(key)  # one dict lookup: atomic under the GIL
        if fd is not None:
            return fd, True
        fd = root_fd
        try:
            for part in parts[:-1]:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != root_fd:
                    os.close(fd)
                fd = sub
        except BaseException:
            if fd != root_fd:
                os.close(fd)
            raise
        with self._lock:
            if len(self._dir_fds) >= MAX_DIR_FDS or not self._fds:
                return fd, False
            held = self._dir_fds.setdefault(key, fd)
        if held != fd:  # another thread opened it meanwhile: keep one
            os.close(fd)
        return held, True


def _regular_file(part: str, dir_fd: int, name: str, quiet: bool = False) -> FdBlob | None:
    """The regular file ``part`` in ``dir_fd``, opened without following a symlink; None when
    there is none (or a symlink, refused as the kernel's ``LOOKUP_NO_SYMLINKS`` refuses it).
    Other errors (EACCES, EIO) are raised: the object may be there, unreadable."""
    try:
        fd = os.open(part, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _NOT_HERE:
            if exc.errno == errno.ELOOP and not quiet:
                log.warning("%s: a symlink on the way to an object: refused", name)
            return None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None  # only a regular file is an object (as in the kernel)
    return FdBlob(fd, st.st_size, name if not part.endswith(TREE_SUFFIX) else name + TREE_SUFFIX,
                  _identity(st))


def _shown(meta: Metacopy) -> str:
    return (meta.redirect or b"").decode(errors="replace")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
