"""The merged view of a stack of EROFS layers, as Linux overlayfs shows it.

Layers are given bottom to top (the order of an OCI manifest's ``layers``). The rules are those of
overlayfs (``fs/overlayfs/namei.c``, ``readdir.c``) mounted with ``lowerdir=TOP:...:BOTTOM`` over
the same layers converted by ``mkfs.erofs --tar=f --aufs``; OCI tar whiteouts (``.wh.`` files)
kept as they are in the image act as their converted forms would.

A name in a merged directory is resolved by looking at the layers of that directory from the top
down, and stops at the first row that says so:

==========================================  ==================================================
what the layer has at the name              effect
==========================================  ==================================================
nothing                                     look further down
a whiteout: char device 0:0 (``is_whiteout``)  the name is deleted: nothing below shows, and
                                            the whiteout itself never shows
a non-directory, nothing visible above      it is the entry; nothing below shows (a file hides
                                            a directory below it entirely)
a non-directory below a directory           ignored, and the merge stops there: a directory
                                            below it is not merged (dir over file over dir)
a directory                                 merged with the directories below it, unless ...
a directory that is opaque (``is_opaque``)  ... it is opaque: nothing below it is merged
``.wh.NAME`` (OCI whiteout) in the layer    the layer's own NAME (if any) is still used;
                                            nothing below the layer shows
==========================================  ==================================================

A directory is opaque when it has the xattr ``trusted.overlay.opaque`` or
``user.overlay.opaque`` equal to ``y`` (the aufs/overlayfs form) or holds an entry
``.wh..wh..opq`` (the OCI form). Whiteouts and opaque markers act only on lower layers, and a
whiteout in the bottom layer simply does not show. As in the kernel, the root directory is never
opaque: every layer's root is merged (checked against overlayfs: a ``trusted.overlay.opaque``
root xattr is ignored). Never visible: whiteouts, every name starting with ``.wh.``, the
xattrs ``trusted.overlay.*`` and ``user.overlay.*``, and names no directory can hold
(``is_unsafe_name``: empty, ``.``/``..`` beyond the real ones, with ``/`` or NUL), which only a
hostile image has and which are skipped with a log line.

Where we differ from a plain ``mount -t overlay``: the kernel honours ``user.overlay.opaque``
only when mounted with ``userxattr`` (and then ignores the trusted form); we honour both, since a
layer image says which form its builder used. Directory redirects and the ``x`` opaque value of
nested overlays are not interpreted (tar-made layers never hold them).

Metadata-only files (``trusted.overlay.metacopy``, composefs's and overlayfs's data-only layers;
``erofs/metacopy.py``): a regular file that carries it keeps its attributes and takes its bytes
from the object its absolute ``trusted.overlay.redirect`` names in the data dirs
(``objects.ObjectStore``, as ``lowerdir=...::DATA``); with no data dir, or no such object, its
reads fail (``MetacopyError``), never zeros. Unlike the kernel, the data is never looked for in
the ordinary layers below (composefs images never need it). Escaped xattrs, as the kernel shows
them: ``trusted.overlay.overlay.X`` of a layer is shown as ``trusted.overlay.X``.

Attributes of a merged directory are those of its topmost directory, except ``st_nlink``: the
kernel reports 1 for a directory merged from more than one layer (counting subdirectories would
cost a merge), and the real count for a directory from a single layer; so do we.

Inode numbers: the number of an entry is derived from (layer index, nid) of the inode that wins,
so it is stable across remounts and hardlinks within a layer share it. Kernel overlayfs (without
xino) instead reports the real inode number with a per-layer st_dev for non-directories and
numbers of its own for directories; only the hardlink structure can be compared.

This module is pure and synchronous: no FUSE, no trio. It is past the house's ~450 lines on
purpose: the rules, the lookup that applies them name by name and the listing that applies them
to a whole directory share the probes, the caches and the lock declared here, and must agree.
"""

from __future__ import annotations

import logging
import stat
import threading
from typing import TYPE_CHECKING, Final, Iterable, Iterator, NamedTuple, NewType, Sequence

from cachetools import LRUCache
from mypy_extensions import mypyc_attr

from ..erofs import ondisk as d
from ..erofs.dirent import DirEntry
from ..erofs.errors import CorruptImageError, ErofsError
from ..erofs.image import Image, Inode
from ..erofs.lru import Lru
# the xattr rules, declared with the format so that the writer can apply them too
from ..erofs.overlay_xattrs import ESCAPED_XATTR_PREFIX, SHOWN_ESCAPED_PREFIX
from ..erofs.overlay_xattrs import is_hidden_xattr as is_hidden_xattr
from ..erofs.overlay_xattrs import shown_xattr as shown_xattr
from .readahead import ObjectReadAhead

if TYPE_CHECKING:
    from ..objects import ObjectStore

log = logging.getLogger(__name__)

Ino = NewType("Ino", int)
"""A FUSE inode number of the merged tree."""
Nid = NewType("Nid", int)
"""An EROFS node id, meaningful only together with its layer."""

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")

# Inode numbers: (nid << 1 | metabox bit) << LAYER_BITS | layer, plus FIRST_INO so that 0
# (invalid) and 1 (the FUSE root) are never produced. 512 layers is above the kernel's limit of
# 500 lower layers; 53 bits of nid address inodes up to 2**58 bytes into an image.
LAYER_BITS = 9
MAX_LAYERS = 1 << LAYER_BITS
_NID_BITS = 64 - LAYER_BITS - 2
FIRST_INO = 2

DEFAULT_DIR_CACHE_ENTRIES = 1 << 18
# Layer directories remembered as holding no ``.wh.`` name at all (``MergedTree._marked``): a
# lookup in a directory merged from several layers otherwise searched each upper layer's
# directory twice, for the name and for its whiteout ``.wh.NAME``; nearly all hold none.
MARKED_CACHE_ENTRIES = 1 << 16


# the rules, named -----------------------------------------------------------------------------
def is_whiteout(inode: Inode) -> bool:
    """An overlayfs whiteout: a character device with device number 0:0."""
    return stat.S_ISCHR(inode.mode) and inode.rdev == 0


def oci_whiteout_target(name: bytes) -> bytes | None:
    """The name an OCI whiteout ``.wh.NAME`` deletes, or None (also for the opaque marker)."""
    if not name.startswith(WHITEOUT_PREFIX) or name == OPAQUE_MARKER:
        return None
    target = name[len(WHITEOUT_PREFIX):]
    return target if target and target not in (b".", b"..") else None


def is_hidden_name(name: bytes) -> bool:
    """Names that never show in the merged tree (OCI whiteouts, the opaque marker, aufs's own)."""
    return name.startswith(WHITEOUT_PREFIX)


def is_unsafe_name(name: bytes) -> bool:
    """A name no directory can hold: empty, ``.``, ``..``, or with ``/`` or NUL in it.

    Only a hostile image has one; served, it would make the kernel fail the whole listing
    (``/``, empty), show a different name (NUL ends a C string) or alias the directory itself or
    its parent (``.``, ``..``)."""
    return not name or name in (b".", b"..") or b"/" in name or b"\0" in name


def has_opaque_xattr(inode: Inode) -> bool:
    """The aufs/overlayfs form of ``MergedTree.is_opaque``: an opaque xattr equal to ``y``."""
    if not inode.info.xattr_icount:  # no xattr region: most directories, nothing to parse
        return False
    for name, value in inode.xattrs():
        if name in OPAQUE_XATTRS and value == b"y":
            return True
    return False


def make_ino(layer: int, nid: int) -> Ino:
    """The FUSE inode number of inode ``nid`` of layer ``layer``."""
    metabox = 1 if nid & d.NID_METABOX_BIT else 0
    low = nid & ~d.NID_METABOX_BIT
    if not 0 <= layer < MAX_LAYERS:
        raise ValueError(f"layer index {layer} outside 0..{MAX_LAYERS - 1}")
    if not 0 <= low < 1 << _NID_BITS:
        raise CorruptImageError(f"nid {nid} out of range", nid=nid)
    return Ino((((low << 1) | metabox) << LAYER_BITS | layer) + FIRST_INO)


def split_ino(ino: Ino) -> tuple[int, Nid]:
    """(layer, nid) of an inode number made by ``make_ino``."""
    raw = ino - FIRST_INO
    layer = raw & (MAX_LAYERS - 1)
    packed = raw >> LAYER_BITS
    nid = packed >> 1
    if packed & 1:
        nid |= d.NID_METABOX_BIT
    return layer, Nid(nid)


# the merged tree ------------------------------------------------------------------------------
class Node:
    """One visible object of the merged tree (never changed once made; compared by identity).

    ``inode`` (from layer ``layer``) gives the attributes and the data. A directory also carries
    the directories merged at its path, top first (``dirs[0]`` is ``(layer, inode)``) and its
    parent's number: a directory has exactly one path, so both are properties of the node.

    A plain class with slots, its fields ``Final``, rather than a frozen dataclass: one is made
    for every entry listed or looked up, and the frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) took 1.6 µs against 0.4.
    """

    __slots__ = ("ino", "layer", "inode", "dirs", "parent")

    def __init__(self, ino: Ino, layer: int, inode: Inode,
                 dirs: tuple[tuple[int, Inode], ...] = (), parent: Ino | None = None) -> None:
        self.ino: Final = ino
        self.layer: Final = layer
        self.inode: Final = inode
        self.dirs: Final = dirs
        self.parent: Final = parent

    def __repr__(self) -> str:
        return f"Node(ino={self.ino}, layer={self.layer}, nid={self.inode.nid})"

    @property
    def is_dir(self) -> bool:
        return self.inode.is_dir

    @property
    def merged(self) -> bool:
        return len(self.dirs) > 1

    @property
    def nlink(self) -> int:
        # overlayfs: "nlink=1 seems to pacify 'find' and other utilities" for merged dirs
        return 1 if self.merged else self.inode.nlink


class MergedDir(NamedTuple):
    """A merged directory listing: upper layers' entries first, each in on-disk order."""

    entries: tuple[tuple[bytes, Node], ...]
    by_name: dict[bytes, Node]


class _Probe(NamedTuple):
    """What one layer's directory holds at a name."""

    layer: int
    entry: DirEntry | None
    whited_out: bool  # the layer holds ``.wh.NAME``: nothing below it shows


class _LayerListing(NamedTuple):
    layer: int
    entries: dict[bytes, DirEntry]
    whiteouts: frozenset[bytes]


@mypyc_attr(allow_interpreted_subclasses=True)  # tests plant faults in a subclass
class MergedTree:
    """The overlay of ``images`` (bottom to top); thread-safe."""

    def __init__(
        self, images: Sequence[Image], *, dir_cache_entries: int = DEFAULT_DIR_CACHE_ENTRIES,
        objects: ObjectStore | None = None,
    ) -> None:
        if not images:
            raise ValueError("at least one layer is needed")
        if len(images) > MAX_LAYERS:
            raise ValueError(f"{len(images)} layers; at most {MAX_LAYERS} are supported")
        self.images = list(images)
        self.objects = objects  # where metadata-only files get their bytes
        # which objects to open ahead of their reads (a read-all, cold, waits on each)
        self.readahead = (ObjectReadAhead(objects, lister=self._listing) if objects is not None
                          else None)
        self._lock = threading.Lock()
        self._marked: Lru[tuple[int, int], bool] = Lru(MARKED_CACHE_ENTRIES)
        self._dirs: LRUCache[Ino, MergedDir] = LRUCache(
            maxsize=dir_cache_entries, getsizeof=lambda m: len(m.entries) + 1
        )
        top = len(images) - 1
        roots = tuple((k, images[k].root) for k in range(top, -1, -1))
        ino = make_ino(top, images[top].root.nid)
        self.root = Node(ino, top, images[top].root, roots, ino)

    def layer_name(self, layer: int) -> str:
        return self.images[layer].name

    def _inode(self, layer: int, nid: int) -> Inode:
        return self.images[layer].inode(nid)

    # resolution -------------------------------------------------------------------------------
    def _resolve(self, parent: Node, probes: Iterable[_Probe]) -> Node | None:
        """Apply the table of the module docstring to one name, probes from the top down."""
        dirs: list[tuple[int, Inode]] = []
        for probe in probes:
            if probe.entry is not None:
                if dirs and self.is_opaque(*dirs[-1]):
                    break
                inode = self._inode(probe.layer, probe.entry.nid)
                if is_whiteout(inode):
                    break
                if not inode.is_dir:
                    if not dirs:
                        return Node(make_ino(probe.layer, inode.nid), probe.layer, inode)
                    break
                dirs.append((probe.layer, inode))
            if probe.whited_out:
                break
        if not dirs:
            return None
        layer, top = dirs[0]
        return Node(make_ino(layer, top.nid), layer, top, tuple(dirs), parent.ino)

    def _lookup_probes(self, parent: Node, name: bytes) -> Iterator[_Probe]:
        wh_name = WHITEOUT_PREFIX + name
        check_wh = len(wh_name) <= d.MAX_NAME_LEN
        last = len(parent.dirs) - 1
        for k, (layer, dinode) in enumerate(parent.dirs):
            entry = dinode.lookup(name)
            # the bottom layer's .wh.NAME would hide nothing: not looked for (half the
            # directory searches of a lookup in a directory of one layer)
            whited_out = (check_wh and k < last and self._marked_dir(layer, dinode)
                          and dinode.lookup(wh_name) is not None)
            yield _Probe(layer, entry, whited_out)

    def _marked_dir(self, layer: int, dinode: Inode) -> bool:
        """Whether a layer's directory holds any ``.wh.`` name (OCI whiteouts, the opaque
        marker); remembered, as most hold none."""
        key = (layer, dinode.nid)
        with self._lock:
            known = self._marked.get(key)
        if known is None:
            known = dinode.has_name_prefixed(WHITEOUT_PREFIX)
            with self._lock:
                self._marked.put(key, known)
        return known

    def is_opaque(self, layer: int, dinode: Inode) -> bool:
        """Whether directory ``dinode`` of layer ``layer`` hides the directories below it:
        either xattr form, or the OCI marker (searched for only in a directory that holds
        ``.wh.`` names)."""
        return has_opaque_xattr(dinode) or (
            self._marked_dir(layer, dinode) and dinode.lookup(OPAQUE_MARKER) is not None)

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """The visible entry ``name`` of directory ``parent``, or None."""
        if not parent.is_dir or not name or name in (b".", b"..") or b"/" in name:
            return None
        if is_hidden_name(name) or len(name) > d.MAX_NAME_LEN:
            return None
        with self._lock:
            cached = self._dirs.get(parent.ino)
        if cached is not None:
            return cached.by_name.get(name)
        return self._resolve(parent, self._lookup_probes(parent, name))

    # listing ----------------------------------------------------------------------------------
    def _layer_listing(self, layer: int, dinode: Inode) -> _LayerListing:
        entries: dict[bytes, DirEntry] = {}
        whiteouts: set[bytes] = set()
        for entry in dinode.readdir():
            if is_unsafe_name(entry.name):
                log.warning("%s: directory inode %d: entry %r skipped: not a valid name",
                            self.layer_name(layer), dinode.nid, entry.name)
                continue
            target = oci_whiteout_target(entry.name)
            if target is not None:
                whiteouts.add(target)
            elif not is_hidden_name(entry.name):
                entries[entry.name] = entry
        return _LayerListing(layer, entries, frozenset(whiteouts))

    def _single(self, node: Node) -> MergedDir:
        """The listing of a directory found in one layer only (most directories of an image
        stack): the table's rows reduce to "a whiteout does not show", without the probing."""
        ((layer, dinode),) = node.dirs
        image = self.images[layer]
        entries = self._layer_listing(layer, dinode).entries
        # their inodes are parsed one by one below: asked for together first, the cold blocks
        # are read in parallel (the python imports' listings: 74 -> 4 waits on a block read)
        image.prefetch_inodes(entry.nid for entry in entries.values())
        out: list[tuple[bytes, Node]] = []
        for name, entry in entries.items():
            inode = image.inode(entry.nid)
            if inode.is_dir:
                child = Node(make_ino(layer, inode.nid), layer, inode, ((layer, inode),), node.ino)
            elif is_whiteout(inode):
                continue
            else:
                child = Node(make_ino(layer, inode.nid), layer, inode)
            out.append((name, child))
        return MergedDir(tuple(out), dict(out))

    def _merge(self, node: Node) -> MergedDir:
        return self._single(node) if len(node.dirs) == 1 else self._probed(node)

    def _probed(self, node: Node) -> MergedDir:
        """The listing of a directory merged from several layers: each name through the table
        (``_resolve``), from the top layer's names down."""
        listings = [self._layer_listing(layer, dinode) for layer, dinode in node.dirs]
        for listing in listings:
            self.images[listing.layer].prefetch_inodes(e.nid for e in listing.entries.values())
        out: list[tuple[bytes, Node]] = []
        seen: set[bytes] = set()
        for listing in listings:
            for name in listing.entries:
                if name in seen:
                    continue
                seen.add(name)
                probes = (_Probe(li.layer, li.entries.get(name), name in li.whiteouts)
                          for li in listings)
                child = self._resolve(node, probes)
                if child is not None:
                    out.append((name, child))
        return MergedDir(tuple(out), dict(out))

    def listdir(self, node: Node) -> MergedDir:
        """The merged listing of directory ``node`` (cached, bounded)."""
        with self._lock:
            cached = self._dirs.get(node.ino)
        if cached is not None:
            return cached
        if not node.is_dir:
            raise NotADirectoryError(f"inode {node.ino} is not a directory")
        merged = self._merge(node)
        if self.readahead is not None:
            self.readahead.listed(node.ino, merged.entries)
        if len(merged.entries) < self._dirs.maxsize:  # a bigger one would not fit at all
            with self._lock:
                self._dirs[node.ino] = merged
        return merged

    def _listing(self, node: Node) -> tuple[tuple[bytes, Node], ...]:
        return self.listdir(node).entries

    # contents ---------------------------------------------------------------------------------
    def read(self, node: Node, offset: int, size: int) -> bytes:
        inode = node.inode
        if self.objects is not None and inode.is_metacopy:
            readahead = self.readahead
            if readahead is not None:
                if offset == 0:
                    readahead.started(node)
                if offset + size >= inode.size:
                    readahead.finished(node)
            return self.objects.read(inode, offset, size)
        return inode.read(offset, size)  # a metadata-only file: MetacopyError

    def prefetch(self, node: Node, offset: int, length: int) -> None:
        """Have the kernel start reading the layer bytes of ``node``'s ``[offset, offset +
        length)`` (a hint; see ``Image.prefetch_data``). Not for a metadata-only file: its
        object store reads ahead by itself (``readahead``)."""
        inode = node.inode
        try:
            if not inode.info.is_reg or inode.is_metacopy:
                return
        except ErofsError:  # unreadable xattrs: the read will report them, a hint never does
            return
        inode.image.prefetch_data(inode, offset, length)

    def readlink(self, node: Node) -> bytes:
        return node.inode.readlink()

    def xattrs(self, node: Node) -> list[tuple[bytes, bytes]]:
        """The visible xattrs: the winning inode's, without the overlay's own."""
        if not node.inode.info.xattr_icount:  # no xattr region: most inodes, nothing to parse
            return []
        out = []
        for name, value in node.inode.xattrs():
            shown = shown_xattr(name)
            if shown is not None:
                out.append((shown, value))
        return out

    def listxattr(self, node: Node) -> list[bytes]:
        return [name for name, _ in self.xattrs(node)]

    def getxattr(self, node: Node, name: bytes) -> bytes | None:
        # the kernel asks for ACLs and security labels of inodes that have no xattrs at all:
        # answered without parsing (daemon CPU per getxattr request 83 -> 72 us)
        if not node.inode.info.xattr_icount:
            return None
        if name.startswith(SHOWN_ESCAPED_PREFIX):  # only an escaped one shows under this name
            return node.inode.getxattr(ESCAPED_XATTR_PREFIX + name[len(SHOWN_ESCAPED_PREFIX):])
        if is_hidden_xattr(name):
            return None
        return node.inode.getxattr(name)

    def load_decoders(self) -> None:
        """Load what reading the layers' compressed files needs (``Image.load_decoders``)."""
        for image in self.images:
            image.load_decoders()

    # whole tree -------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.images[-1].superblock.block_size

    def total_bytes(self) -> int:
        return sum(im.superblock.total_blocks * im.superblock.block_size for im in self.images)

    def total_inodes(self) -> int:
        return sum(im.superblock.raw.inos for im in self.images)

    def walk(self, top: Node | None = None, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
        """Every (path, node) below ``top`` (default the root), depth first."""
        start = top if top is not None else self.root
        seen = {start.ino}
        stack = [(prefix, start)]
        while stack:
            path, dnode = stack.pop()
            for name, child in self.listdir(dnode).entries:
                child_path = path + b"/" + name if path else name
                yield child_path, child
                if child.is_dir:
                    if child.ino in seen:  # only a corrupt image links a directory twice
                        raise CorruptImageError("directory reached twice", image=self.layer_name(
                            child.layer), nid=child.inode.nid)
                    seen.add(child.ino)
                    stack.append((child_path, child))
