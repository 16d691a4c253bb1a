"""``erofs-fuse extract``: write an image's tree to a directory, like ``fsck.erofs --extract``.

Every entry is created relative to an open descriptor of its parent directory, with O_NOFOLLOW
and O_EXCL, and every name is checked before use, so nothing a hostile image contains can make
a write land outside the destination.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass, field

from .erofs.errors import CorruptImageError
from .erofs.image import Image, Inode

CHUNK = 1 << 20
MAX_DEPTH = 800  # below Python's recursion limit; deeper trees are refused as corrupt


class UnsafeNameError(CorruptImageError):
    """A directory entry name that could escape the destination."""


@dataclass
class ExtractStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    hardlinks: int = 0
    bytes: int = 0
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


class Extractor:
    def __init__(self, image: Image, *, owners: bool | None = None, xattrs: bool = True) -> None:
        self.image = image
        self.owners = os.geteuid() == 0 if owners is None else owners
        self.xattrs = xattrs
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
            self._extract_dir(self.image.root, self._dest_fd, "", 0)
        finally:
            os.close(self._dest_fd)
        return self.stats

    def _extract_dir(self, node: Inode, fd: int, rel: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CorruptImageError(f"directory depth over {MAX_DEPTH}", nid=node.nid)
        self.stats.dirs += 1
        for entry in node.readdir():
            name = check_name(entry.name, node.nid)
            child = self.image.inode(entry.nid)
            child_rel = f"{rel}/{name}" if rel else name
            if child.is_dir:
                if entry.nid in self._dirs_seen:
                    raise CorruptImageError("directory reached twice (a loop)", nid=entry.nid)
                self._dirs_seen.add(entry.nid)
                os.mkdir(name, 0o700, dir_fd=fd)
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    self._extract_dir(child, sub, child_rel, depth + 1)
                finally:
                    os.close(sub)
            else:
                self._extract_leaf(child, fd, name, child_rel)
        self._apply_metadata(node, fd, None, rel or ".")

    def _extract_leaf(self, node: Inode, fd: int, name: str, rel: str) -> None:
        if node.nlink > 1:
            first = self._links.get(node.nid)
            if first is not None:
                os.link(first, name, src_dir_fd=self._dest_fd, dst_dir_fd=fd, follow_symlinks=False)
                self.stats.hardlinks += 1
                return
            self._links[node.nid] = rel
        mode = node.mode
        if stat.S_ISREG(mode):
            self._write_file(node, fd, name)
            self.stats.files += 1
        elif stat.S_ISLNK(mode):
            os.symlink(node.readlink(), name, dir_fd=fd)
            self.stats.symlinks += 1
        else:
            os.mknod(name, stat.S_IFMT(mode) | 0o600, node.rdev, dir_fd=fd)
            self.stats.specials += 1
        self._apply_metadata(node, fd, name, rel)

    def _write_file(self, node: Inode, fd: int, name: str) -> None:
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

    def _apply_metadata(self, node: Inode, fd: int, name: str | None, rel: str) -> None:
        """Owner, xattrs, mode, then times: chown clears setuid bits and ACLs change the mode."""
        target: int | str = fd if name is None else name
        kw = {} if name is None else {"dir_fd": fd, "follow_symlinks": False}
        symlink = stat.S_ISLNK(node.mode)
        if self.owners:
            os.chown(target, node.uid, node.gid, **kw)  # type: ignore[arg-type]
        if self.xattrs:
            for key, value in node.xattrs():
                self._set_xattr(fd, name, key, value, rel)
        if not symlink:
            os.chmod(target, stat.S_IMODE(node.mode), **({} if name is None else {"dir_fd": fd}))  # type: ignore[arg-type]
        try:
            os.utime(target, ns=(node.mtime_ns, node.mtime_ns), **kw)  # type: ignore[arg-type]
        except OverflowError:
            # a time the image may hold (64-bit seconds) beyond nanosecond range: whole seconds
            try:
                os.utime(target, (node.mtime, node.mtime), **kw)  # type: ignore[arg-type]
            except (OverflowError, OSError) as exc:
                self.stats.warnings.append(f"{rel}: mtime {node.mtime} not set: {exc}")

    def _set_xattr(self, fd: int, name: str | None, key: bytes, value: bytes, rel: str) -> None:
        try:
            if name is None:
                os.setxattr(fd, key, value)
            else:
                # xattr calls have no dir_fd form: go through /proc/self/fd of the parent
                os.setxattr(f"/proc/self/fd/{fd}/{name}", key, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                self.stats.warnings.append(f"{rel}: xattr {key.decode(errors='replace')}: {exc.strerror}")
            else:
                raise


def extract(image: Image, dest: str, *, owners: bool | None = None) -> ExtractStats:
    stats = Extractor(image, owners=owners).extract(dest)
    for warning in stats.warnings:
        print(f"erofs-fuse: warning: {warning}", file=sys.stderr)
    return stats
