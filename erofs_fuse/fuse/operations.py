"""The FUSE operations of a merged layer tree: translate requests, never parse.

Every handler passes through one errno boundary (``_boundary``): a reader error
(``ErofsError``) becomes ``EIO`` and one log line naming the operation, the inode, the layer
image, the nid and the offset; any other exception (a bug) becomes ``EIO`` with a traceback.
pyfuse3 stops its main loop on anything but ``FUSEError``, so nothing else may escape: one bad
block of one layer must not take the mount down.

The tree is immutable, so entries and attributes are given long kernel timeouts, negative
lookups are cached too, and files keep their page cache across opens: warm access never reaches
us. With the patched pyfuse3 (``STATELESS_OPEN``) opens are handle-less: the kernel sends no
open, opendir, release or releasedir, caches listings and symlink targets, and read and readdir
name the inode as their handle.

Inode numbers: the kernel's are ``MergedTree`` numbers, except the root, which FUSE fixes at
``pyfuse3.ROOT_INODE``. The kernel may use a number only between a reply that hands it out
(lookup, readdirplus) and the ``forget`` that returns it, so the table of known nodes follows
those lookup counts and directories keep their merge stack while the kernel knows them.

One module past the house's ~450 lines on purpose: every handler shares the errno boundary, the
attribute and entry building, the inline/threaded read dispatch and the read-ahead hints put off
until the reply (``after_reply``) declared here; the parsing and merging they translate live in
``overlay`` and ``erofs``.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Coroutine, ParamSpec, Sequence, \
    TypeVar

import pyfuse3

from ..blob import WouldBlock, nonblocking
from ..erofs.errors import ErofsError
from .idmap import ACL_XATTRS, IDENTITY, IdMap
from .overlay import Ino, MergedTree, Node

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

# One day: the tree never changes while mounted, so the kernel may trust what it has.
DEFAULT_TIMEOUT = 86400.0
# pyfuse3 runs up to this many request tasks. Our handlers never wait (but for reads sent to
# worker threads), so more tasks only add a trio lock hand-off per request: read-all of the bench
# rootfs (scripts/bench) took 4.95 s of daemon CPU with 99 tasks, 4.05 s with one.
SERIAL_TASKS = 1
CONCURRENT_TASKS = 99
# pyfuse3 built with third_party/pyfuse3's patches hands read() and readdir() the inode when the
# kernel sent no open/opendir. Then open and opendir answer ENOSYS, after which the kernel sends
# no open, opendir, release or releasedir at all (two of the four requests per file of a tree
# read) and caches directory listings itself (it sets FOPEN_CACHE_DIR on handle-less opens).
STATELESS_OPEN: bool = getattr(pyfuse3, "STATELESS_OPEN", False)
# The patched pyfuse3 (06-after-reply.patch) calls Operations.after_reply() once each reply is
# sent. The read-ahead hints of lookup and read wait for it: a hint's posix_fadvise allocates the
# pages and submits the reads before it returns (210 µs for a first read's 8 MiB), time the
# caller would wait for its reply. After the reply they overlap the caller's wake-up, and still
# come before the next request is read, so a read never comes ahead of its hint. Cold read-all
# in a container's root, paired over 21 interleaved rounds: 5.6% faster (python imports: the
# same, 1.004 over 61 rounds; a lookup's reply comes sooner, its file's read waits longer).
AFTER_REPLY: bool = getattr(pyfuse3, "AFTER_REPLY", False)
# Hints kept for after_reply at most: a request makes at most one, so more means that nothing
# calls after_reply (stock pyfuse3 or a test): they are given at once instead.
MAX_DEFERRED_HINTS = 16
# Reads at least this large of compressed files may go to worker threads (see ``Operations``).
THREAD_MIN_BYTES = 64 * 1024
# Measured on lz4hc layers (2 CPUs): 40 MB read in 0.22 s inline, 0.45 s through 2 or 4 worker
# threads; three files in parallel 0.62-0.72 s inline, 1.35-1.70 s threaded. The reader's own
# Python work holds the GIL, so threads only add hand-offs: off unless asked for (--threads),
# e.g. for lzma layers on machines with many cores.
DEFAULT_READ_THREADS = 0
# How long (µs) the one request task polls for the next request without sleeping, before it
# sleeps in poll(2) (patched pyfuse3 only: Operations.inline_spin_us). Waking a sleeping thread
# costs tens of µs on a virtual machine whose idle CPUs halt: on this project's 2-CPU VM a
# pipe round trip between two processes took 52-56 µs, 8-9 µs with the guest polling before it
# halts. In a container's overlay over a chain mount, read-all took 1.31 s instead of 1.85 s
# with 200 µs, for 16% more daemon CPU (1.19 s against 1.03 s); 500 and 1000 µs gained no
# more in wall time and cost more CPU.
DEFAULT_SPIN_US = 200
# A file looked up is usually read next (an import, an exec, a library's open): the kernel is
# asked to start reading its first LOOKUP_PREFETCH_BYTES from the layer while the reply goes
# back, and after its first read the rest, up to FIRST_READ_PREFETCH_BYTES (a library: ld.so
# reads its header, then maps it and faults pages in, a 1 MiB request each). A container's
# cold python imports over a chain mount of its sealed layers, A/B of 21 interleaved rounds:
# 6.6% and 8.1% faster with the first hint (1 MiB, 256 KiB), 4.7-5.7% more with the second,
# 11.3% with both; read-all of those layers 1.4% faster, and of the bench stack mounted
# directly 2.7% (its imports 2.7%, its walk the same). A read-ahead only: it moves no bytes to
# us and verifies nothing; the reads do.
LOOKUP_PREFETCH_BYTES = 1 << 20
FIRST_READ_PREFETCH_BYTES = 8 << 20
# Reads in flight at once when layers are remote (``blocking_reads``): each may wait for a fetch.
BLOCKING_READ_THREADS = 8

P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[Concatenate["Operations", P], Coroutine[Any, Any, R]]


def _describe(args: tuple[object, ...]) -> str:
    """The request arguments worth a log line: numbers and names, not contexts or tokens."""
    shown = [repr(a) for a in args if isinstance(a, (int, bytes)) and not isinstance(a, bool)]
    return "(" + ", ".join(shown) + ")"


def _boundary(op: Handler[P, R]) -> Handler[P, R]:
    """The one place where errors become errnos (see the module docstring)."""
    name = op.__name__.rpartition(".")[2]  # compiled by mypyc, it is "Operations.lookup"

    async def handler(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.after_init is not None:
            self._run_after_init()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%s", name, _describe(args))
        try:
            return await op(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ErofsError as exc:
            log.error("%s%s: %s", name, _describe(args), exc)
        except Exception:
            log.exception("%s%s: internal error", name, _describe(args))
        raise pyfuse3.FUSEError(errno.EIO)

    functools.update_wrapper(handler, op)
    return handler


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a ``MergedTree``; read-only.

    ``read_threads``: how many reads may run in worker threads at once (0, the default: all
    reads run in the event loop; see DEFAULT_READ_THREADS for why). Only reads of compressed
    files of at least ``THREAD_MIN_BYTES`` would go there; a plain read is one ``pread``,
    cheaper than the trip to a thread.
    """

    # Without export support the kernel never looks up "." or ".." by itself, and never asks
    # for an inode it has forgotten (which, for a directory, we could not rebuild).
    supports_dot_lookup = False
    # The kernel enforces ACLs from the system.posix_acl_* xattrs, as on a kernel erofs mount.
    enable_acl = True
    # Symlinks never change: the kernel may keep their targets (patched pyfuse3 only).
    enable_symlink_cache = True
    # With one request task, wait for the next request with poll(2) for up to 1 ms before
    # parking in trio (patched pyfuse3 only): a trivial request (getxattr, one after another)
    # then costs 12-23 µs of daemon user CPU instead of 87, and a tar of the bench stack 2.0-2.5 s
    # of daemon CPU instead of 3.0-3.2 s.
    inline_poll_ms = 1

    def __init__(
        self,
        tree: MergedTree,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        read_threads: int = DEFAULT_READ_THREADS,
        idmap: IdMap = IDENTITY,
        stateless_open: bool = STATELESS_OPEN,
        blocking_reads: bool = False,
        noxattr: bool = False,
        spin_us: int = DEFAULT_SPIN_US,
        defer_hints: bool = AFTER_REPLY,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.idmap = idmap  # the owners and groups reported (fuse/idmap.py)
        self.timeout = timeout
        # handles are inode numbers and open/opendir answer ENOSYS (see STATELESS_OPEN)
        self.stateless_open = stateless_open
        # the tree shows no xattr (mount -o noxattr): getxattr answers ENOSYS, after which the
        # kernel sends no GETXATTR at all on this connection (fs/fuse/xattr.c no_getxattr) and
        # answers EOPNOTSUPP itself, which overlayfs takes as "no such xattr" (its metacopy and
        # origin probes: one request per lower file and directory otherwise) and ACL lookups
        # as "no ACL" (fs/fuse/acl.c)
        self.noxattr = noxattr
        # read by pyfuse3's request loop (see DEFAULT_SPIN_US); only with one request task
        self.inline_spin_us = spin_us
        # read-ahead hints wait for after_reply (see AFTER_REPLY)
        self.defer_hints = defer_hints
        self._hints: list[tuple[Node, int, int]] = []
        self.initialized = False  # the kernel's INIT request has been served
        # run by the first request served (the kernel has taken the INIT reply by then): what
        # must follow that reply, such as raising the read-ahead it sets (daemon.serve)
        self.after_init: Callable[[], None] | None = None
        # layers whose reads may wait on a network (lazy layers): every read goes to a thread,
        # so that a fetch in progress holds up neither cached reads nor other requests
        self.blocking_reads = blocking_reads
        if blocking_reads and read_threads <= 0:
            read_threads = BLOCKING_READ_THREADS
        self.read_threads = read_threads
        # made by the first read sent to a thread: trio is not loaded before the mount is made
        # (daemon.serve imports it after pyfuse3.init, so the mount command returns sooner)
        self._limiter: trio.CapacityLimiter | None = None
        # for pyfuse3.main(): a read waiting for a thread must not hold up other requests
        self.max_tasks = CONCURRENT_TASKS if read_threads > 0 else SERIAL_TASKS
        # the attributes of every node the kernel holds (built once: the tree never changes)
        self._attrs: dict[Ino, pyfuse3.EntryAttributes] = {}
        self._nodes: dict[Ino, Node] = {tree.root.ino: tree.root}
        self._lookups: dict[Ino, int] = {}
        self._handles = itertools.count(1)
        self._files: dict[int, Node] = {}
        self._dirs: dict[int, tuple[Node, tuple[tuple[bytes, Node], ...]]] = {}

    def init(self) -> None:
        # called while the kernel's INIT request is served: the mount answers from now on
        self.initialized = True

    def _run_after_init(self) -> None:
        hook, self.after_init = self.after_init, None
        try:
            if hook is not None:
                hook()
        except Exception:  # the request it precedes is still served
            log.exception("after the INIT reply")

    # read-ahead hints --------------------------------------------------------------------------
    def _hint(self, node: Node, offset: int, length: int) -> None:
        """Have the layers start reading ``node``'s bytes ``[offset, offset + length)`` into the
        page cache: after this request's reply if ``defer_hints``, else now."""
        if self.defer_hints and len(self._hints) < MAX_DEFERRED_HINTS:
            self._hints.append((node, offset, length))
        else:
            self.tree.prefetch(node, offset, length)

    def after_reply(self) -> None:
        """Called by the patched pyfuse3 once a reply is sent: the hints put off till then."""
        if not self._hints:
            return
        hints, self._hints = self._hints, []
        for node, offset, length in hints:
            try:
                self.tree.prefetch(node, offset, length)
            except Exception:  # a hint only: its read will report what is wrong
                log.debug("read-ahead hint for inode %d", node.ino, exc_info=True)

    # inode numbers ----------------------------------------------------------------------------
    def _to_fuse(self, ino: Ino) -> int:
        return pyfuse3.ROOT_INODE if ino == self.tree.root.ino else int(ino)

    def _node(self, inode: int) -> Node:
        key = self.tree.root.ino if inode == pyfuse3.ROOT_INODE else Ino(inode)
        node = self._nodes.get(key)
        if node is None:
            log.error("request for inode %d, which the kernel was never given", inode)
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _remember(self, node: Node) -> None:
        """The kernel got one more reference to ``node`` (a lookup or readdirplus entry)."""
        if node.ino == self.tree.root.ino:
            return
        self._nodes.setdefault(node.ino, node)
        self._lookups[node.ino] = self._lookups.get(node.ino, 0) + 1

    def known_inodes(self) -> int:
        """How many inodes the kernel holds references to (for tests and debugging)."""
        return len(self._lookups)

    def lookup_count(self, inode: int) -> int:
        return self._lookups.get(Ino(inode), 0)

    # attributes -------------------------------------------------------------------------------
    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        """The attributes of ``node`` (cached while the kernel knows it; never modify them)."""
        attr = self._attrs.get(node.ino)
        if attr is None:
            attr = self._make_attributes(node)
            self._attrs[node.ino] = attr
        return attr

    def _make_attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        # built once per node the kernel learns of (every readdirplus entry): plain locals, no
        # property chains (7976 entries of the bench rootfs: 17 -> 12 ms in-process)
        info = node.inode.info
        mode = info.mode
        sb = node.inode.image.superblock
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self._to_fuse(node.ino)
        attr.generation = 0
        attr.entry_timeout = attr.attr_timeout = self.timeout
        attr.st_mode = mode
        attr.st_nlink = 1 if len(node.dirs) > 1 else info.nlink  # as Node.nlink
        attr.st_uid = self.idmap.uid(info.uid)
        attr.st_gid = self.idmap.gid(info.gid)
        attr.st_rdev = info.rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        attr.st_size = info.size
        attr.st_blksize = sb.block_size
        attr.st_blocks = info.st_blocks(sb.blkszbits)
        # EROFS keeps one timestamp; the kernel reports it as atime, mtime and ctime
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = (
            info.mtime * 1_000_000_000 + info.mtime_nsec)
        return attr

    def _negative(self) -> pyfuse3.EntryAttributes:
        """A cacheable "no such entry" (st_ino 0)."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = self.timeout
        return attr

    def _dir_node(self, inode: int) -> Node:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _parent_of(self, node: Node) -> Node:
        # the kernel holds every ancestor of a directory it knows, so the parent is in the table
        parent = self._nodes.get(node.parent) if node.parent is not None else None
        return parent if parent is not None else node

    async def _call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args)`` for a request. With ``blocking_reads`` it is tried inline first, as
        every request is otherwise, with the layers told not to wait (``nonblocking``): what
        needs a fetch raises ``WouldBlock`` and runs again in a worker thread, so cached reads
        stay in the loop (a thread per read doubled a warm read-all: 3.1 s against 1.5)."""
        if not self.blocking_reads:
            return fn(*args, **kwargs)
        try:
            with nonblocking():
                return fn(*args, **kwargs)
        except WouldBlock:
            pass
        return await self._in_thread(functools.partial(fn, *args, **kwargs))

    async def _in_thread(self, call: Callable[[], R]) -> R:
        """``call()`` in a worker thread, at most ``read_threads`` of them at once."""
        import trio  # loaded already: this runs inside trio.run

        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.read_threads)
        result: R = await trio.to_thread.run_sync(call, limiter=self._limiter)
        return result

    # metadata ---------------------------------------------------------------------------------
    @_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir_node(parent_inode)
        if name == b".":
            node: Node | None = parent
        elif name == b"..":
            node = self._parent_of(parent)
        else:
            node = await self._call(self.tree.lookup, parent, name)
        if node is None:
            return self._negative()
        self._remember(node)
        if not self.blocking_reads:  # a remote layer has no page cache to fill
            self._hint(node, 0, LOOKUP_PREFETCH_BYTES)
        return self.attributes(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # must not raise: it answers no request
        for inode, nlookup in inode_list:
            key = Ino(inode)
            left = self._lookups.get(key, 0) - nlookup
            if left > 0:
                self._lookups[key] = left
            else:
                self._lookups.pop(key, None)
                if key != self.tree.root.ino:
                    self._nodes.pop(key, None)
                    self._attrs.pop(key, None)

    @_boundary
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self.attributes(self._node(inode))

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.inode.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await self._call(self.tree.readlink, node)

    @_boundary
    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        if self.noxattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        value = await self._call(self.tree.getxattr, self._node(inode), name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return self.idmap.acl(value) if name in ACL_XATTRS else value

    @_boundary
    async def listxattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> Sequence[bytes]:
        if self.noxattr:
            return []  # consistent with getxattr: the mount shows no xattr
        return await self._call(self.tree.listxattr, self._node(inode))

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        bs = self.tree.block_size
        data.f_bsize = data.f_frsize = bs
        data.f_blocks = -(-self.tree.total_bytes() // bs)
        data.f_bfree = data.f_bavail = 0
        data.f_files = self.tree.total_inodes()
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # directories ------------------------------------------------------------------------------
    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if self.stateless_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._dir_node(inode)
        listing = (await self._call(self.tree.listdir, node)).entries
        fh = next(self._handles)
        self._dirs[fh] = (node, listing)
        return fh

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if self.stateless_open:
            # the listing is rebuilt (or taken from the tree's cache) per call: the same tree
            # gives the same order, so start_id means the same entry on every call
            node = self._dir_node(fh)
            listing = (await self._call(self.tree.listdir, node)).entries
        else:
            node, listing = self._dirs[fh]
        # "." and ".." first, as the kernel's own filesystems list them; they carry no lookup
        # reference (the kernel ignores their attributes), the other entries do
        reply = pyfuse3.readdir_reply
        if start_id < 2:
            dots = ((b".", node), (b"..", self._parent_of(node)))
            for index in range(start_id, 2):
                name, child = dots[index]
                attr = self.attributes(child)
                if index == 1 and node.parent is not None and child.ino != node.parent:
                    attr = self._make_attributes(child)  # a copy: the cached one stays right
                    attr.st_ino = self._to_fuse(node.parent)
                if not reply(token, name, attr, index + 1):
                    return
            start_id = 2
        # the loop the kernel's listing of a cold directory spends its time in: the cache
        # lookups and the lookup count inlined (attributes, _remember)
        attrs, nodes, lookups, root = self._attrs, self._nodes, self._lookups, self.tree.root.ino
        for index in range(start_id, len(listing) + 2):
            name, child = listing[index - 2]
            ino = child.ino
            entry_attr = attrs.get(ino)
            if entry_attr is None:
                entry_attr = attrs[ino] = self._make_attributes(child)
            if not reply(token, name, entry_attr, index + 1):
                return
            if ino != root:  # as _remember: the root is never counted (only a bad image lists it)
                if ino not in nodes:
                    nodes[ino] = child
                lookups[ino] = lookups.get(ino, 0) + 1

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # files ------------------------------------------------------------------------------------
    @_boundary
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if self.stateless_open:
            # the mount is read-only, so the VFS has refused writing opens before this point
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = next(self._handles)
        self._files[fh] = node
        # keep_cache: pages cached by an earlier open are still right (the tree never changes)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh) if self.stateless_open else self._files[fh]
        inode = node.inode
        if self.blocking_reads:
            return await self._call(self.tree.read, node, off, size)
        if (self.read_threads > 0 and size >= THREAD_MIN_BYTES
                and inode.info.is_compressed and off < inode.size):
            return await self._in_thread(functools.partial(self.tree.read, node, off, size))
        data = self.tree.read(node, off, size)
        if off == 0 and inode.size > size:
            self._hint(node, size, FIRST_READ_PREFETCH_BYTES - size)
        return data

    @_boundary
    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # everything that would change the tree: refused as by any read-only filesystem -------------
    # (the mount is also "ro", so the VFS refuses most of these before they reach us)
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)
