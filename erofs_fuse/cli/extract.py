"""``erofs-fuse extract``: write an image's tree to a directory, like ``fsck.erofs --extract``.

Every entry is created relative to an open descriptor of its parent directory, with O_NOFOLLOW
and O_EXCL, and every name is checked before use, so nothing a hostile image contains can make
a write land outside the destination.

What the destination cannot take is skipped with a warning naming it, as tar does, and the rest
of the tree is still written: device nodes for a user who is not root, xattrs the filesystem or
the user may not set. Existing entries: without ``merge`` the destination must be new or empty;
with it, directories present in both are merged (they take the image's owner, mode and times)
and any other existing entry is replaced by the image's (a directory where the image has a
non-directory is removed with its contents, as applying a layer does). Whiteouts are written as
the image stores them, not applied. A metadata-only file (``trusted.overlay.metacopy``) is
written from its object in the data dirs (without its metacopy and redirect xattrs: it is an
ordinary file now); without a data dir or its object it is skipped with a warning.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..erofs.errors import CorruptImageError, ErofsError
from ..erofs.image import Image, Inode
from ..erofs.metacopy import METACOPY_XATTR, REDIRECT_XATTR

if TYPE_CHECKING:
    from ..objects import ObjectStore

CHUNK = 1 << 20
MAX_DEPTH = 800  # below Python's recursion limit; deeper trees are refused as corrupt
# Creating an entry fails for these because of the destination or the user (not the image):
# the entry is skipped with a warning. Any other error (ENOSPC, EIO, ...) ends the extraction.
SKIPPABLE = frozenset({errno.EPERM, errno.EACCES, errno.EEXIST, errno.ENOTSUP, errno.EOPNOTSUPP,
                       errno.EINVAL, errno.ENAMETOOLONG, errno.EMLINK})
_METACOPY_XATTRS = (METACOPY_XATTR, REDIRECT_XATTR)
_KIND = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
         stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


class UnsafeNameError(CorruptImageError):
    """A directory entry name that could escape the destination."""


class _ObjectSkipped(Exception):
    """A metadata-only file whose bytes cannot be had (no data dir, no object, an object that
    fails verification): skipped with a warning, as an entry the destination cannot take."""


class DestinationError(ErofsError, FileExistsError):
    """The destination holds entries and merging was not asked for."""

    kind = "not extracted"


@dataclass
class ExtractStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    hardlinks: int = 0
    bytes: int = 0
    skipped: int = 0  # entries (with what they hold) not created
    warnings: list[str] = field(default_factory=list)


def check_name(name: bytes, nid: int) -> str:
    """The entry name as a str safe to create inside a directory, or UnsafeNameError."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafeNameError(f"unsafe entry name {name!r}", nid=nid)
    return os.fsdecode(name)


def _write_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, pos)
        view = view[done:]
        pos += done


def _is_dir_at(fd: int, name: str) -> bool | None:
    """Whether ``name`` in ``fd`` is a directory (symlinks not followed); None if absent."""
    try:
        return stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode)
    except FileNotFoundError:
        return None


class Extractor:
    def __init__(self, image: Image, *, owners: bool | None = None, xattrs: bool = True,
                 merge: bool = False, objects: ObjectStore | None = None) -> None:
        self.image = image
        self.objects = objects  # where metadata-only files' bytes are (objects.py)
        self.owners = os.geteuid() == 0 if owners is None else owners
        self.xattrs = xattrs
        self.merge = merge
        self.stats = ExtractStats()
        # nid -> (parent fd path is not stable, so keep the first path relative to dest)
        self._links: dict[int, str] = {}
        # directories cannot be hardlinked: one reached twice is a loop (or a corrupt image)
        self._dirs_seen: set[int] = {image.root.nid}
        self._dest_fd = -1

    def extract(self, dest: str) -> ExtractStats:
        os.makedirs(dest, exist_ok=True)
        self._dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not self.merge and os.listdir(self._dest_fd):
                raise DestinationError(
                    f"{dest} is not empty: extract writes into a new or empty directory "
                    "(--merge extracts over what is there)")
            self._extract_dir(self.image.root, self._dest_fd, "", 0)
        except ErofsError as exc:
            raise exc.with_context(image=self.image.name)
        finally:
            os.close(self._dest_fd)
        return self.stats

    def _warn(self, rel: str, what: str, exc: OSError) -> None:
        self.stats.warnings.append(f"{rel or '.'}: {what}: {exc.strerror or exc}")

    def _skip(self, rel: str, what: str, exc: OSError) -> None:
        if exc.errno not in SKIPPABLE:
            raise OSError(exc.errno, f"{what}: {exc.strerror}", rel) from exc
        self._warn(rel, f"cannot create {what}, skipped", exc)
        self.stats.skipped += 1

    def _extract_dir(self, node: Inode, fd: int, rel: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CorruptImageError(f"directory depth over {MAX_DEPTH}", nid=node.nid)
        self.stats.dirs += 1
        try:
            for entry in node.readdir():
                name = check_name(entry.name, node.nid)
                child = self.image.inode(entry.nid)
                child_rel = f"{rel}/{name}" if rel else name
                if child.is_dir:
                    if entry.nid in self._dirs_seen:
                        raise CorruptImageError("directory reached twice (a loop)", nid=entry.nid)
                    self._dirs_seen.add(entry.nid)
                    self._extract_subdir(child, fd, name, child_rel, depth)
                else:
                    self._extract_leaf(child, fd, name, child_rel)
        except BaseException:
            # a directory is made 0700 and gets its mode after its entries: on the way out of
            # a failed extraction still give it, rather than leave private directories behind
            try:
                self._apply_metadata(node, fd, None, rel)
            except (OSError, ErofsError):
                pass  # the error being raised is the one to report
            raise
        self._apply_metadata(node, fd, None, rel)

    def _extract_subdir(self, node: Inode, fd: int, name: str, rel: str, depth: int) -> None:
        try:
            existing = _is_dir_at(fd, name) if self.merge else None
            if existing is False:
                os.unlink(name, dir_fd=fd)  # a file or symlink the image replaces
            if not existing:
                os.mkdir(name, 0o700, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
        except OSError as exc:
            self._skip(rel, "directory", exc)
            return
        try:
            self._extract_dir(node, sub, rel, depth + 1)
        finally:
            os.close(sub)

    def _extract_leaf(self, node: Inode, fd: int, name: str, rel: str) -> None:
        mode = node.mode
        what = ("file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode)
                else _KIND.get(stat.S_IFMT(mode), "special file"))
        try:
            if self.merge:
                self._clear(fd, name)
            if self._link_known(node, fd, name, rel):
                return
            if stat.S_ISREG(mode):
                self._write_file(node, fd, name)
                self.stats.files += 1
            elif stat.S_ISLNK(mode):
                os.symlink(node.readlink(), name, dir_fd=fd)
                self.stats.symlinks += 1
            else:
                os.mknod(name, stat.S_IFMT(mode) | 0o600, node.rdev, dir_fd=fd)
                self.stats.specials += 1
        except (OSError, _ObjectSkipped) as exc:
            if self._links.get(node.nid) == rel:
                del self._links[node.nid]  # not written: a later link of it will be instead
            if isinstance(exc, _ObjectSkipped):
                self.stats.warnings.append(f"{rel}: metadata-only file not extracted, "
                                           f"skipped: {exc}")
                self.stats.skipped += 1
            else:
                self._skip(rel, what, exc)
            return
        self._apply_metadata(node, fd, name, rel)

    def _clear(self, fd: int, name: str) -> None:
        """Remove an existing entry the image replaces (merge): a directory with its tree."""
        existing = _is_dir_at(fd, name)
        if existing:
            shutil.rmtree(name, dir_fd=fd)  # fd-relative, never follows symlinks
        elif existing is False:
            os.unlink(name, dir_fd=fd)

    def _link_known(self, node: Inode, fd: int, name: str, rel: str) -> bool:
        """Hardlink a node already written; remember the first path of a multiply linked one."""
        if node.nlink <= 1:
            return False
        first = self._links.get(node.nid)
        if first is None:
            self._links[node.nid] = rel
            return False
        os.link(first, name, src_dir_fd=self._dest_fd, dst_dir_fd=fd, follow_symlinks=False)
        self.stats.hardlinks += 1
        return True

    def _write_file(self, node: Inode, fd: int, name: str) -> None:
        if node.is_metacopy:
            self._write_object(node, fd, name)
            return
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=fd)
        try:
            pos = 0
            while pos < node.size:
                hole_end = node.hole_end(pos)
                if hole_end > pos:  # a whole hole in one step: it may claim terabytes
                    pos = hole_end
                    continue
                data = node.read(pos, CHUNK)
                if not data:
                    raise CorruptImageError("file data ended early", nid=node.nid, offset=pos)
                if not (len(data) >= 4096 and data[0] == 0 and data[-1] == 0
                        and data.count(0) == len(data)):  # zeros stay a hole
                    _write_all(out, data, pos)
                pos += len(data)
            os.ftruncate(out, node.size)
            self.stats.bytes += node.size
        finally:
            os.close(out)

    def _write_object(self, node: Inode, fd: int, name: str) -> None:
        """A metadata-only file, from its object (checked before the file is created); a
        failure on the way (a block that fails verification) removes the partial file."""
        if self.objects is None:
            raise _ObjectSkipped("its data is in an object store (give --data-dir)")
        try:
            self.objects.object_of(node)
        except ErofsError as exc:
            raise _ObjectSkipped(exc.message) from exc
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=fd)
        try:
            pos = 0
            while pos < node.size:
                data = self.objects.read(node, pos, CHUNK)
                if not data:
                    raise CorruptImageError("object data ended early", nid=node.nid, offset=pos)
                _write_all(out, data, pos)
                pos += len(data)
            self.stats.bytes += node.size
        except ErofsError as exc:
            os.close(out)
            out = -1
            os.unlink(name, dir_fd=fd)
            raise _ObjectSkipped(str(exc)) from exc
        finally:
            if out >= 0:
                os.close(out)

    def _apply_metadata(self, node: Inode, fd: int, name: str | None, rel: str) -> None:
        """Owner, xattrs, mode, then times: chown clears setuid bits and ACLs change the mode."""
        target: int | str = fd if name is None else name
        kw = {} if name is None else {"dir_fd": fd, "follow_symlinks": False}
        symlink = stat.S_ISLNK(node.mode)
        if self.owners:
            self._try(rel, "owner", os.chown, target, node.uid, node.gid, **kw)
        if self.xattrs:
            # a metadata-only file written from its object is an ordinary file now
            drop = _METACOPY_XATTRS if node.is_metacopy else ()
            for key, value in node.xattrs():
                if key not in drop:
                    self._set_xattr(fd, name, key, value, rel)
        if not symlink:
            self._try(rel, "mode", os.chmod, target, stat.S_IMODE(node.mode),
                      **({} if name is None else {"dir_fd": fd}))
        try:
            self._try(rel, "mtime", os.utime, target, ns=(node.mtime_ns, node.mtime_ns), **kw)
        except OverflowError:
            # a time the image may hold (64-bit seconds) beyond nanosecond range: whole seconds
            try:
                os.utime(target, (node.mtime, node.mtime), **kw)  # type: ignore[arg-type]
            except (OverflowError, OSError) as exc:
                self.stats.warnings.append(f"{rel or '.'}: mtime {node.mtime} not set: {exc}")

    def _try(self, rel: str, what: str, call: Callable[..., None], *args: Any,
             **kw: Any) -> None:
        """Set one piece of metadata; one the user may not set (an existing directory of
        another owner, when merging; owners without privileges) is a warning, as in tar."""
        try:
            call(*args, **kw)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self._warn(rel, f"{what} not set", exc)

    def _set_xattr(self, fd: int, name: str | None, key: bytes, value: bytes, rel: str) -> None:
        try:
            if name is None:
                os.setxattr(fd, key, value)
            else:
                # xattr calls have no dir_fd form: go through /proc/self/fd of the parent
                os.setxattr(f"/proc/self/fd/{fd}/{name}", key, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                self._warn(rel, f"xattr {key.decode(errors='replace')} not set", exc)
            else:
                raise


def extract(image: Image, dest: str, *, owners: bool | None = None,
            merge: bool = False, objects: ObjectStore | None = None) -> ExtractStats:
    """Write the tree of ``image`` into ``dest``; warnings are in the returned stats.
    Metadata-only files take their bytes from ``objects``; without it (or their object) they
    are skipped with a warning."""
    return Extractor(image, owners=owners, merge=merge, objects=objects).extract(dest)
