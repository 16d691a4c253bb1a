"""One view of a converted tree, the same from our reader and from a kernel mount: a line per
path (type, mode, owners, times, size or content digest, link target, device, xattrs, link
count), so that ``scripts/fuzz --mode convert`` can compare modes and the kernel with our reader.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Callable, TypeVar

from erofs_fuse.erofs.image import Image, Inode

FILE_CAP = 1 << 20  # bytes of a file hashed from its start (then its last 4 KiB)
ENTRY_CAP = 5000
T = TypeVar("T")


def _line(mode: int, uid: int, gid: int, mtime_ns: int, nlink: int, size: int, body: str,
          xattrs: list[tuple[bytes, bytes]]) -> str:
    xs = ",".join(f"{n.decode(errors='backslashreplace')}={hashlib.sha256(v).hexdigest()[:12]}"
                  for n, v in sorted(xattrs))
    links = "" if stat.S_ISDIR(mode) else f" nlink={nlink}"
    return f"{mode:o} {uid}:{gid} {mtime_ns}{links} {body} [{xs}]"


def _digest(read: Callable[[int, int], bytes], size: int) -> str:
    h = hashlib.sha256()
    pos = 0
    want = min(size, FILE_CAP)
    while pos < want:
        chunk = read(pos, min(1 << 18, want - pos))
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    if size > FILE_CAP:
        h.update(read(size - 4096, 4096))
    return f"{pos}/{size}:{h.hexdigest()[:16]}"


def _body(mode: int, size: int, read: Callable[[int, int], bytes] | None, target: bytes | None,
          rdev: int) -> str:
    if stat.S_ISREG(mode):
        assert read is not None
        return "file " + _digest(read, size)
    if stat.S_ISLNK(mode):
        return f"-> {target!r}"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return f"rdev={os.major(rdev)}:{os.minor(rdev)}"
    return f"size={size}" if not stat.S_ISDIR(mode) else "dir"


def reader_view(path: str) -> dict[str, str]:
    """Our reader's view of the image at ``path`` (a tar-index image holds its tar)."""
    def line(node: Inode) -> str:
        read = node.read if node.is_reg else None
        target = node.readlink() if node.is_symlink else None
        return _line(node.mode, node.uid, node.gid, node.mtime_ns, node.nlink, node.size,
                     _body(node.mode, node.size, read, target, node.rdev), node.xattrs())

    with Image.open(path) as image:
        view = {".": line(image.root)}
        for k, (raw, node) in enumerate(image.walk()):
            if k >= ENTRY_CAP:
                break
            view[raw.decode(errors="surrogateescape")] = line(node)
    return view


class KernelError(Exception):
    """An operation on the kernel's mount failed: what, where, and the errno's text."""


def _op(what: str, path: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except OSError as exc:
        raise KernelError(f"{what} {path!r}: {exc.strerror}") from exc


def dir_view(root: str) -> dict[str, str]:
    """The same view of a mounted tree (``KernelError`` names the operation that failed)."""
    view: dict[str, str] = {}
    todo = [""]
    while todo and len(view) <= ENTRY_CAP:
        rel = todo.pop()
        full = os.path.join(root, rel) if rel else root
        st = _op("lstat", rel, lambda: os.lstat(full))
        if stat.S_ISREG(st.st_mode):
            fd = _op("open", rel, lambda: os.open(full, os.O_RDONLY | os.O_NOFOLLOW))
            try:
                body = _body(st.st_mode, st.st_size,
                             lambda off, n: _op("read", rel, lambda: os.pread(fd, n, off)),
                             None, st.st_rdev)
            finally:
                os.close(fd)
        else:
            target = _op("readlink", rel, lambda: os.readlink(os.fsencode(full))) \
                if stat.S_ISLNK(st.st_mode) else None
            body = _body(st.st_mode, st.st_size, None, target, st.st_rdev)
        names = _op("listxattr", rel, lambda: os.listxattr(full, follow_symlinks=False))
        xattrs = [(n.encode(errors="surrogateescape"),
                   _op(f"getxattr {n}", rel, lambda n=n: os.getxattr(full, n, follow_symlinks=False)))  # type: ignore[misc]
                  for n in names]
        view[rel or "."] = _line(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink,
                                 st.st_size, body, xattrs)
        if stat.S_ISDIR(st.st_mode):
            todo += [os.path.join(rel, n) if rel else n
                     for n in _op("listdir", rel, lambda: os.listdir(full))]
    return view


def view_diff(a: dict[str, str], b: dict[str, str], limit: int = 6) -> list[str]:
    out = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            out.append(f"{path!r}: {a.get(path)} != {b.get(path)}")
    return out[:limit]
