"""The tree a layer becomes: nodes with metadata, built entry by entry with tar's rules.

Rules (``erofs-writer.md`` 5.3, and what GNU tar does when it extracts the same stream):

* paths: a leading ``/`` or ``./`` is dropped, empty and ``.`` components are skipped, and a
  ``..`` component is refused (an entry must not climb out of the layer);
* a directory the stream never names is created 0755, owned by 0:0, with the build time;
* the same path again: directory over directory keeps the children and takes the new
  attributes (xattrs merged, the later value winning); anything else replaces the old entry;
* a hard link shares the node of its target; a link to a later entry is resolved when the
  stream ends, and one to a missing entry or to a directory is refused;
* overlay-form whiteouts (``--whiteouts overlay``): ``.wh.NAME`` becomes a character device
  0:0 named NAME and ``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr of its directory.
  A directory that holds whiteouts gets an empty ``trusted.overlay.origin``, as mkfs.erofs
  ``--aufs`` writes it, so that kernel overlayfs filters them even where the directory merges
  with nothing below.
"""

from __future__ import annotations

import stat
from typing import Iterator

from .errors import BadInputError, MkfsError

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OVERLAY_OPAQUE = b"trusted.overlay.opaque"
OVERLAY_ORIGIN = b"trusted.overlay.origin"
MAX_NAME = 255
MAX_DEPTH = 1024
MAX_LINK_CHAIN = 64
NO_XATTRS: dict[bytes, bytes] = {}  # never mutated: Node.set_xattr copies on first write


class FileData:
    """Where a regular file's bytes are; set by the data writer."""

    __slots__ = ()


class Node:
    """One inode. ``children`` is set for directories only, in insertion order (sorted at
    layout time)."""

    __slots__ = ("mode", "uid", "gid", "mtime", "nsec", "xattrs", "children", "target",
                 "rdev", "size", "data", "nlink", "nid", "link_target")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0, nsec: int = 0) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.nsec = nsec
        self.xattrs: dict[bytes, bytes] = NO_XATTRS  # shared until set_xattr (most have none)
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        self.target = b""          # symlink target
        self.rdev = 0              # (major, minor) as os.makedev gives it
        self.size = 0
        self.data: FileData | None = None
        self.nlink = 0
        self.nid = 0
        self.link_target: bytes | None = None  # an unresolved (forward) hard link

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def set_xattr(self, name: bytes, value: bytes) -> None:
        if self.xattrs is NO_XATTRS:
            self.xattrs = {}
        self.xattrs[name] = value

    def setdefault_xattr(self, name: bytes, value: bytes) -> None:
        if name not in self.xattrs:
            self.set_xattr(name, value)


def split_path(path: bytes, *, entry: bytes, offset: int | None) -> list[bytes]:
    """The components of a member path; ``..`` and over-long names are refused."""
    parts = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            raise BadInputError("path climbs out of the layer with '..'", entry=entry, offset=offset)
        if len(part) > MAX_NAME:
            raise BadInputError(f"a name of {len(part)} bytes (the limit is {MAX_NAME})",
                                entry=entry, offset=offset)
        parts.append(part)
    if len(parts) > MAX_DEPTH:
        raise BadInputError(f"path deeper than {MAX_DEPTH} levels", entry=entry, offset=offset)
    return parts


class Tree:
    """The layer being built. ``overlay_whiteouts`` turns OCI whiteouts into overlay form."""

    def __init__(self, *, build_time: int, overlay_whiteouts: bool) -> None:
        self.build_time = build_time
        self.overlay_whiteouts = overlay_whiteouts
        self.root = Node(stat.S_IFDIR | 0o755, mtime=build_time)
        self._forward_links: list[tuple[Node, bytes, int | None]] = []

    # lookups -----------------------------------------------------------------------------
    def _directory(self, parts: list[bytes], *, entry: bytes, offset: int | None) -> Node:
        """The directory at ``parts``, creating missing ones."""
        node = self.root
        for part in parts:
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = Node(stat.S_IFDIR | 0o755, mtime=self.build_time)
                node.children[part] = child
            elif not child.is_dir:
                raise BadInputError(f"'{part.decode(errors='replace')}' on the path is not a "
                                    "directory", entry=entry, offset=offset)
            node = child
        return node

    def find(self, parts: list[bytes]) -> Node | None:
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    # changes -----------------------------------------------------------------------------
    def add(self, path: bytes, node: Node, *, offset: int | None = None) -> None:
        """Put ``node`` at ``path`` (tar's replacement rules), converting whiteouts."""
        parts = split_path(path, entry=path, offset=offset)
        if not parts:
            self._set_root(node, path, offset)
            return
        parent = self._directory(parts[:-1], entry=path, offset=offset)
        name = parts[-1]
        if self.overlay_whiteouts and name.startswith(WHITEOUT_PREFIX):
            self._add_whiteout(parent, name, node, path, offset)
            return
        self._place(parent, name, node)

    def _place(self, parent: Node, name: bytes, node: Node) -> None:
        assert parent.children is not None
        old = parent.children.get(name)
        if old is not None and old.is_dir and node.is_dir:
            _update_dir(old, node)
        else:
            parent.children[name] = node

    def _set_root(self, node: Node, path: bytes, offset: int | None) -> None:
        if not node.is_dir:
            raise BadInputError("the root entry is not a directory", entry=path, offset=offset)
        _update_dir(self.root, node)

    def _add_whiteout(self, parent: Node, name: bytes, node: Node, path: bytes,
                      offset: int | None) -> None:
        if name == OPAQUE_MARKER:
            parent.set_xattr(OVERLAY_OPAQUE, b"y")
            return
        hidden = name[len(WHITEOUT_PREFIX):]
        if hidden in (b"", b".", b".."):
            raise BadInputError("whiteout of no name", entry=path, offset=offset)
        whiteout = Node(stat.S_IFCHR, node.uid, node.gid, node.mtime, node.nsec)
        parent.setdefault_xattr(OVERLAY_ORIGIN, b"")
        self._place(parent, hidden, whiteout)

    def add_hardlink(self, path: bytes, target: bytes, *, offset: int | None = None) -> None:
        """A hard link at ``path`` to the entry at ``target`` (now, or when the stream ends)."""
        parts = split_path(path, entry=path, offset=offset)
        tparts = split_path(target, entry=path, offset=offset)
        if not parts:
            raise BadInputError("a hard link cannot be the root", entry=path, offset=offset)
        if parts == tparts:
            if self.find(parts) is None:
                raise BadInputError("hard link to itself", entry=path, offset=offset)
            return
        existing = self.find(tparts)
        if existing is not None and existing.link_target is None:
            if existing.is_dir:
                raise BadInputError("hard link to a directory", entry=path, offset=offset)
            node = existing
        else:
            node = Node(stat.S_IFREG)
            node.link_target = target
            self._forward_links.append((node, path, offset))
        parent = self._directory(parts[:-1], entry=path, offset=offset)
        name = parts[-1]
        if self.overlay_whiteouts and name.startswith(WHITEOUT_PREFIX):
            raise BadInputError("a whiteout cannot be a hard link", entry=path, offset=offset)
        self._place(parent, name, node)

    def finish(self) -> None:
        """Resolve hard links to later entries; refuse those whose target never came."""
        if not self._forward_links:
            return
        resolved: dict[int, Node] = {}
        for node, path, offset in self._forward_links:
            resolved[id(node)] = self._resolve(node, path, offset)
        self._replace_placeholders(self.root, resolved)

    def _resolve(self, node: Node, path: bytes, offset: int | None) -> Node:
        seen = 0
        while node.link_target is not None:
            seen += 1
            target = self.find(split_path(node.link_target, entry=path, offset=offset))
            if target is None or seen > MAX_LINK_CHAIN:
                raise BadInputError(f"hard link to a missing entry "
                                    f"'{node.link_target.decode(errors='replace')}'",
                                    entry=path, offset=offset)
            if target.is_dir:
                raise BadInputError("hard link to a directory", entry=path, offset=offset)
            node = target
        return node

    def _replace_placeholders(self, root: Node, resolved: dict[int, Node]) -> None:
        for directory in iter_dirs(root):
            assert directory.children is not None
            for name, child in directory.children.items():
                if child.link_target is not None:
                    directory.children[name] = resolved[id(child)]


def _update_dir(old: Node, new: Node) -> None:
    old.mode, old.uid, old.gid, old.mtime, old.nsec = new.mode, new.uid, new.gid, new.mtime, new.nsec
    for name, value in new.xattrs.items():
        old.set_xattr(name, value)


def iter_dirs(root: Node) -> Iterator[Node]:
    """Every directory, root first (breadth first); each directory node once."""
    todo = [root]
    seen = {id(root)}
    k = 0
    while k < len(todo):
        directory = todo[k]
        k += 1
        yield directory
        assert directory.children is not None
        for child in directory.children.values():
            if child.is_dir and id(child) not in seen:
                seen.add(id(child))
                todo.append(child)

