"""Convert a directory tree (a staged layer: containerd's applier output) into an image.

The tree is taken as it is: overlay-form whiteouts (char 0:0 devices, ``trusted.overlay.opaque``)
are already in it. Entries are visited in bytewise name order, so the output does not depend on
the order of directory listings; hard links are found by (device, inode); sparse files keep
their holes (``SEEK_DATA``/``SEEK_HOLE``). Nothing outside the directory is followed: symlinks
are stored as links and files are opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterator

from .convert import (ConvertOptions, ConvertResult, _output, _seal, object_store, store_counts,
                      store_object)
from .objects import INLINE_LIMIT
from .data import ImageFile
from .errors import MkfsError
from .layout import (MetadataWriter, SuperblockInfo, first_data_block, xattr_body_size,
                     xattr_refusal)
from .tree import Node

PIECE = 1 << 20


def convert_dir(source: str, out: str, options: ConvertOptions) -> ConvertResult:
    """Convert the directory ``source`` into the image ``out``."""
    options.check()
    if options.tar_index:
        raise MkfsError("--tar-index needs a tar source")
    try:
        st = os.lstat(source)
    except OSError as exc:
        raise MkfsError(f"{source}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise MkfsError(f"{source}: not a directory")
    with _output(out) as output:
        bs = options.image_block_size
        image = ImageFile(output.fd, output.spool.fileno(), bs, first_data_block(bs, 0))
        walker = _Walker(image, options)
        root = walker.node(source, st)
        walker.fill(source, root)
        compressor = walker.compressor
        info = SuperblockInfo(build_time=options.build_time, uuid=options.uuid,
                              feature_incompat=compressor.incompat if compressor else 0,
                              lz4_max_distance=compressor.max_distance if compressor else 0)
        summary = MetadataWriter(image, info).write(root)
        digest = _seal(output.tmp, out) if options.seal else None
        output.commit(options.sync)
        return ConvertResult(out, None, summary.image_blocks * bs,
                             summary.inodes, digest, image.stats.data_bytes, image.stats.files,
                             tuple(walker.warnings), *store_counts(walker.store),
                             shown_xattr_inodes=summary.shown_xattr_inodes)


class _Walker:
    def __init__(self, image: ImageFile, options: ConvertOptions) -> None:
        self.image = image
        self.options = options
        self.links: dict[tuple[int, int], Node] = {}
        self.warnings: list[str] = []
        self.compressor = None
        if options.compress:
            from .compress import Compressor

            self.compressor = Compressor(image, options.compress, options.compress_level)
        self.store = object_store(options)

    def node(self, path: str, st: os.stat_result) -> Node:
        sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        node = Node(st.st_mode, st.st_uid, st.st_gid, sec, nsec)
        for name, value in _xattrs(path):
            why = xattr_refusal(name, stat.S_IFMT(st.st_mode), value)
            if why is None:
                node.set_xattr(name, value)
            else:
                self.warnings.append(f"{path}: xattr {name.decode(errors='replace')!r} "
                                     f"dropped: {why}")
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFLNK:
            node.target = os.fsencode(os.readlink(path))
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = st.st_rdev
        elif fmt == stat.S_IFREG:
            self._data(path, st, node)
        return node

    def fill(self, path: str, directory: Node) -> None:
        """Add the entries under ``path`` (depth first, names in byte order)."""
        todo = [(path, directory)]
        while todo:
            dpath, dnode = todo.pop()
            assert dnode.children is not None
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(dpath))
            except OSError as exc:
                raise MkfsError(f"{dpath}: {exc.strerror}") from exc
            subdirs = []
            for name in names:
                cpath = os.path.join(dpath, os.fsdecode(name))
                try:
                    st = os.lstat(cpath)
                except OSError as exc:
                    raise MkfsError(f"{cpath}: {exc.strerror}") from exc
                key = (st.st_dev, st.st_ino)
                shared = self.links.get(key) if not stat.S_ISDIR(st.st_mode) else None
                child = shared if shared is not None else self.node(cpath, st)
                if shared is None and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    self.links[key] = child
                dnode.children[name] = child
                if child.is_dir:
                    subdirs.append((cpath, child))
            todo.extend(reversed(subdirs))

    def _data(self, path: str, st: os.stat_result, node: Node) -> None:
        node.size = st.st_size
        if st.st_size == 0:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise MkfsError(f"{path}: {exc.strerror}") from exc
        entry = os.fsencode(path)
        try:
            regions = _data_regions(fd, st) if st.st_blocks * 512 < st.st_size else None
            if regions is not None:
                pieces: Iterator[bytes] = (piece for off, n in regions
                                           for piece in _read_pieces(fd, off, n))
                node.data = self.image.write_sparse(pieces, st.st_size, regions, entry=entry,
                                                    offset=0)
                return
            room = self.image.bs - 64 - xattr_body_size(node.xattrs)
            pieces = _read_pieces(fd, 0, st.st_size)
            if self.store is not None and st.st_size > INLINE_LIMIT:
                store_object(self.store, node, pieces, st.st_size, self.image.blkbits,
                             entry=entry, offset=0)
            elif self.compressor is not None:
                node.data = self.compressor.write(pieces, st.st_size, room, entry=entry, offset=0)
            else:
                node.data = self.image.write_flat(pieces, st.st_size, room, entry=entry, offset=0)
        except MkfsError as exc:
            raise MkfsError(f"{path}: changed while it was read ({exc.message})") from exc
        finally:
            os.close(fd)


def _read_pieces(fd: int, offset: int, length: int) -> Iterator[bytes]:
    end = offset + length
    while offset < end:
        piece = os.pread(fd, min(PIECE, end - offset), offset)
        if not piece:
            return
        offset += len(piece)
        yield piece


def _data_regions(fd: int, st: os.stat_result) -> list[tuple[int, int]] | None:
    """The data regions of a file with holes, or None where the filesystem cannot say."""
    regions = []
    pos = 0
    try:
        while pos < st.st_size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), st.st_size)
            regions.append((start, end - start))
            pos = end
    except OSError:
        return None
    return regions


def _xattrs(path: str) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise MkfsError(f"{path}: {exc.strerror}") from exc
    out = []
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise MkfsError(f"{path}: xattr {name}: {exc.strerror}") from exc
        out.append((os.fsencode(name), value))
    return out
