"""One textual view of a tree, the format of ``fixtures/corpus/expected/*.manifest``.

A line per entry: path, mode, uid, gid, then by type size+sha256 (files), ``-> target``
(symlinks), ``rdev=M:m`` (devices), then ``mtime=NS`` (not for directories), then the xattr names
with the first 16 hex digits of each value's sha256. Hardlink groups follow. The same view is made
of a directory on disk (a kernel mount, an extraction, a FUSE mount) and of an ``Image``, so
that tests compare dictionaries, not walk orders.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field

from erofs_fuse.erofs.image import Image, Inode


@dataclass
class TreeView:
    entries: dict[str, str] = field(default_factory=dict)
    hardlinks: set[frozenset[str]] = field(default_factory=set)

    def diff(self, other: TreeView, limit: int = 20) -> list[str]:
        out = []
        for path in sorted(set(self.entries) | set(other.entries)):
            a, b = self.entries.get(path), other.entries.get(path)
            if a != b:
                out.append(f"- {a}\n+ {b}")
        if self.hardlinks != other.hardlinks:
            out.append(f"hardlinks: {sorted(map(sorted, self.hardlinks))} != "
                       f"{sorted(map(sorted, other.hardlinks))}")
        return out[:limit]


def _xattr_field(items: list[tuple[bytes, bytes]], skip: frozenset[bytes] = frozenset()) -> str:
    parts = sorted((name, hashlib.sha256(value).hexdigest()[:16]) for name, value in items
                   if name not in skip)
    return ",".join(f"{name.decode(errors='surrogateescape')}={digest}" for name, digest in parts)


def _line(path: str, mode: int, uid: int, gid: int, body: list[str], mtime_ns: int | None,
          xattrs: str) -> str:
    cols = [path, f"0o{mode:o}", str(uid), str(gid)] + body
    if mtime_ns is not None:
        cols.append(f"mtime={mtime_ns}")
    cols.append(xattrs)
    return "\t".join(cols)


def _body(mode: int, size: int, content: bytes | None, target: str | None, rdev: tuple[int, int]) -> list[str]:
    if stat.S_ISREG(mode):
        assert content is not None
        return [str(size), hashlib.sha256(content).hexdigest()]
    if stat.S_ISLNK(mode):
        return [f"-> {target}"]
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return [f"rdev={rdev[0]}:{rdev[1]}"]
    return []


def view_of_dir(root: str, *, with_mtime: bool = True, skip_xattrs: frozenset[bytes] = frozenset()) -> TreeView:
    view = TreeView()
    inodes: dict[tuple[int, int], list[str]] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        path = rel or "."
        content = target = None
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                content = f.read()
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
        names = os.listxattr(full, follow_symlinks=False)
        items = [(n.encode(errors="surrogateescape"),
                  os.getxattr(full, n, follow_symlinks=False)) for n in names]
        mt = None if stat.S_ISDIR(st.st_mode) or not with_mtime else st.st_mtime_ns
        view.entries[path] = _line(
            path, st.st_mode, st.st_uid, st.st_gid,
            _body(st.st_mode, st.st_size, content, target, (os.major(st.st_rdev), os.minor(st.st_rdev))),
            mt, _xattr_field(items, skip_xattrs),
        )
        if stat.S_ISDIR(st.st_mode):
            for name in os.listdir(full):
                todo.append(os.path.join(rel, name) if rel else name)
        elif st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    view.hardlinks = {frozenset(g) for g in inodes.values() if len(g) > 1}
    return view


def inode_line(path: str, ino: Inode, content: bytes | None, target: bytes | None,
               xattrs: list[tuple[bytes, bytes]], *, with_mtime: bool = True,
               skip_xattrs: frozenset[bytes] = frozenset()) -> str:
    """The line of ``ino`` at ``path``, given its data as read (of an image or a merged tree)."""
    mt = None if ino.is_dir or not with_mtime else ino.mtime_ns
    return _line(
        path, ino.mode, ino.uid, ino.gid,
        _body(ino.mode, ino.size, content,
              None if target is None else target.decode(errors="surrogateescape"),
              (os.major(ino.rdev), os.minor(ino.rdev))),
        mt, _xattr_field(xattrs, skip_xattrs),
    )


def view_of_image(image: Image, *, with_mtime: bool = True, skip_xattrs: frozenset[bytes] = frozenset()) -> TreeView:
    view = TreeView()
    groups: dict[int, list[str]] = {}

    def add(path: str, ino: Inode) -> None:
        content = ino.read(0, ino.size) if ino.is_reg else None
        target = ino.readlink() if ino.is_symlink else None
        view.entries[path] = inode_line(path, ino, content, target, ino.xattrs(),
                                        with_mtime=with_mtime, skip_xattrs=skip_xattrs)
        if not ino.is_dir and ino.nlink > 1:
            groups.setdefault(ino.nid, []).append(path)

    add(".", image.root)
    for raw, ino in image.walk():
        add(raw.decode(errors="surrogateescape"), ino)
    view.hardlinks = {frozenset(g) for g in groups.values() if len(g) > 1}
    return view


def parse_manifest(path: str) -> TreeView:
    view = TreeView()
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith("hardlinks\t"):
                view.hardlinks.add(frozenset(line.split("\t", 1)[1].split(",")))
                continue
            view.entries[line.split("\t", 1)[0]] = line
    return view
