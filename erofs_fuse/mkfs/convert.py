"""Convert a layer tar (plain, gzip or zstd) or a directory into one EROFS image.

The output is written to a temporary file beside ``out`` and renamed into place only when
everything succeeded (the diff_id checked, the image complete, the sidecar written), so a
failure leaves nothing behind. The same input and options give the same bytes: nothing reads
the clock, the process ids or the order of a directory listing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator

from .data import ImageFile, hole_data, tar_index_data
from .errors import BadInputError, MkfsError
from .layout import (MetadataWriter, SuperblockInfo, first_data_block, xattr_body_size,
                     xattr_refusal)
from .objects import (INLINE_LIMIT, METACOPY, REDIRECT, ObjectWriter, metacopy_value,
                      redirect_value)
from .source import InputStream
from .tar import (BLOCKDEV, CHARDEV, DIRECTORY, FIFO, HARDLINK, REGULAR, SYMLINK, TarMember,
                  TarReader)
from .tree import Node, Tree

BLOCK_SIZES = tuple(1 << b for b in range(9, 17))
DEFAULT_BLOCK_SIZE = 4096
TAR_INDEX_BLOCK_SIZE = 512  # tar data sits at 512-byte offsets
LZ4HC_LEVELS = range(1, 13)  # LZ4HC_CLEVEL_MIN..LZ4HC_CLEVEL_MAX of liblz4
Progress = Callable[[int], None]


@dataclass(frozen=True)
class ConvertOptions:
    block_size: int | None = None       # None: 4096, or 512 with tar_index (``image_block_size``)
    whiteouts: str = "overlay"          # "overlay" or "oci"
    tar_index: bool = False
    compress: str | None = None         # None, "lz4", "lz4hc"
    compress_level: int | None = None
    build_time: int = 0
    uuid: bytes = bytes(16)
    seal: bool = False
    expected_diff_id: str | None = None
    sync: bool = False                  # fsync the image before renaming it into place
    objects: str | None = None          # an object store: file bytes there, metadata here

    @property
    def image_block_size(self) -> int:
        """The block size the image is written with."""
        if self.block_size is not None:
            return self.block_size
        return TAR_INDEX_BLOCK_SIZE if self.tar_index else DEFAULT_BLOCK_SIZE

    def check(self) -> None:
        """``MkfsError`` naming the first option that cannot be written."""
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise MkfsError(f"block size {self.block_size} is not a power of two in 512..65536")
        if self.tar_index and self.image_block_size != TAR_INDEX_BLOCK_SIZE:
            # file data points into the appended tar, whose members start at 512-byte offsets
            raise MkfsError(f"--tar-index writes 512-byte blocks (tar's data is 512-aligned), "
                            f"not {self.block_size}")
        if self.whiteouts not in ("overlay", "oci"):
            raise MkfsError(f"unknown whiteout form {self.whiteouts!r}")
        if self.compress not in (None, "lz4", "lz4hc"):
            raise MkfsError(f"unknown compression {self.compress!r}")
        if self.compress_level is not None and self.compress != "lz4hc":
            raise MkfsError(f"{self.compress or 'no compression'} takes no level "
                            "(only lz4hc does: 1-12)")
        if self.compress_level is not None and self.compress_level not in LZ4HC_LEVELS:
            raise MkfsError(f"bad compression level {self.compress_level} (lz4hc takes 1-12)")
        if self.tar_index and self.compress:
            raise MkfsError("a tar index holds no data to compress")
        if self.objects and (self.tar_index or self.compress):
            raise MkfsError("--objects stores file data outside the image: no --tar-index "
                            "or --compress with it")
        if len(self.uuid) != 16:
            raise MkfsError("a UUID is 16 bytes")


@dataclass(frozen=True)
class ConvertResult:
    path: str
    diff_id: str | None
    image_size: int
    inodes: int
    verity_digest: str | None
    data_bytes: int = 0
    files: int = 0
    warnings: tuple[str, ...] = field(default=())
    objects_stored: int = 0             # with --objects: new objects, and their bytes
    objects_shared: int = 0             # contents the store already held
    object_bytes: int = 0
    # inodes with an xattr a merged tree shows (overlayfs's own, trusted.overlay.*, are
    # hidden): 0 means a mount of this layer alone shows no xattr at all (mount -o noxattr)
    shown_xattr_inodes: int = 0


# output ---------------------------------------------------------------------------------------
class _Output:
    """The temporary image beside ``out``, and the spools; removed unless ``commit``ed."""

    def __init__(self, out: str) -> None:
        self.out = out
        directory = os.path.dirname(os.path.abspath(out))
        try:
            fd, self.tmp = tempfile.mkstemp(dir=directory,
                                            prefix="." + os.path.basename(out) + ".",
                                            suffix=".tmp")
        except OSError as exc:
            raise MkfsError(f"cannot write {out}: {exc.strerror} ({directory})") from exc
        self.fd = fd
        self.spool = tempfile.TemporaryFile(dir=directory, prefix=".erofs-spool-")
        self.committed = False

    def commit(self, sync: bool) -> None:
        if sync:
            os.fsync(self.fd)
        os.fchmod(self.fd, 0o644)
        os.rename(self.tmp, self.out)
        self.committed = True

    def close(self) -> None:
        os.close(self.fd)
        self.spool.close()
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


@contextlib.contextmanager
def _output(out: str) -> Iterator[_Output]:
    output = _Output(out)
    try:
        yield output
    finally:
        output.close()


def _seal(tmp: str, out: str) -> str:
    from ..verity import seal

    sidecar = out + ".verity"
    result = seal(tmp, sidecar)
    return result.digest


# tar input -------------------------------------------------------------------------------------
def convert_tar(source: str | BinaryIO, out: str, options: ConvertOptions,
                progress: Progress | None = None) -> ConvertResult:
    """Convert a layer tar (a path or a binary stream) into the image ``out``."""
    options.check()
    with contextlib.ExitStack() as stack:
        if isinstance(source, str):
            try:
                raw: BinaryIO = stack.enter_context(open(source, "rb"))
            except OSError as exc:
                raise MkfsError(f"{source}: {exc.strerror}") from exc
        else:
            raw = source
        output = stack.enter_context(_output(out))
        conversion = _TarConversion(raw, output, options, progress)
        stack.callback(conversion.stream.close)  # first out: no read-ahead past a failure
        return conversion.run()


class _TarConversion:
    def __init__(self, raw: BinaryIO, output: _Output, options: ConvertOptions,
                 progress: Progress | None) -> None:
        self.raw = raw
        self.output = output
        self.options = options
        self.raw_start = _position(raw)  # where the tar starts, for copying it (tar index)
        self.stream = InputStream(raw, progress=progress)
        try:
            self._setup(output, options)
        except BaseException:
            self.stream.close()
            raise

    def _setup(self, output: _Output, options: ConvertOptions) -> None:
        self.bs = options.image_block_size
        devices = 1 if options.tar_index else 0
        self.image = ImageFile(output.fd, output.spool.fileno(), self.bs,
                               first_data_block(self.bs, devices))
        self.tree = Tree(build_time=options.build_time,
                         overlay_whiteouts=options.whiteouts == "overlay")
        self.warnings: list[str] = []
        self.tee: BinaryIO | None = None
        self.compressor = None
        if options.compress:
            from .compress import Compressor

            self.compressor = Compressor(self.image, options.compress, options.compress_level)
        self.store = object_store(options)

    def run(self) -> ConvertResult:
        if self.options.tar_index and not self._source_is_plain_file():
            self.tee = tempfile.TemporaryFile(dir=os.path.dirname(self.output.tmp),
                                              prefix=".erofs-tar-")
            self.stream.tee = self.tee
        reader = TarReader(self.stream)
        for member in reader:
            self._add(member, reader)
        reader.finish_data()
        self.stream.drain()
        self.tree.finish()
        diff_id = self.stream.diff_id()
        want = self.options.expected_diff_id
        if want is not None and want != diff_id:
            raise BadInputError(f"diff_id mismatch: the layer is {diff_id}, {want} was expected")
        tar_size = self.stream.pos
        info = SuperblockInfo(
            build_time=self.options.build_time, uuid=self.options.uuid,
            feature_incompat=self.compressor.incompat if self.compressor else 0,
            lz4_max_distance=self.compressor.max_distance if self.compressor else 0,
            tar_device_blocks=-(-tar_size // TAR_INDEX_BLOCK_SIZE) if self.options.tar_index
            else None)
        summary = MetadataWriter(self.image, info).write(self.tree.root)
        size = summary.image_blocks * self.bs
        if self.options.tar_index:
            size = self._append_tar(size, tar_size)
        digest = _seal(self.output.tmp, self.output.out) if self.options.seal else None
        self.output.commit(self.options.sync)
        return ConvertResult(self.output.out, diff_id, size, summary.inodes, digest,
                             self.image.stats.data_bytes, self.image.stats.files,
                             tuple(self.warnings), *store_counts(self.store),
                             shown_xattr_inodes=summary.shown_xattr_inodes)

    def _source_is_plain_file(self) -> bool:
        if self.stream.compression != "none" or self.raw_start is None:
            return False
        try:
            return stat.S_ISREG(os.fstat(self.raw.fileno()).st_mode) and self.raw.seekable()
        except (OSError, ValueError, AttributeError):
            return False

    def _append_tar(self, at: int, tar_size: int) -> int:
        """Put the uncompressed tar behind the image (extra device 1, at ``uniaddr``)."""
        if self.tee is not None:
            self.tee.flush()
            src = self.tee.fileno()
            start = 0
        else:
            src = self.raw.fileno()
            assert self.raw_start is not None
            start = self.raw_start
        _copy_range(src, start, self.output.fd, at, tar_size)
        end = at + tar_size
        padded = end + (-end % TAR_INDEX_BLOCK_SIZE)
        os.ftruncate(self.output.fd, padded)
        return padded

    # entries -----------------------------------------------------------------------------
    def _add(self, member: TarMember, reader: TarReader) -> None:
        if member.unknown_type is not None:
            self._warn(member, f"unknown type {member.unknown_type!r} stored as a regular file")
        if member.kind == HARDLINK:
            self.tree.add_hardlink(member.path, member.linkname, offset=member.header_offset)
            return
        node = self._node(member)
        if member.kind == REGULAR:
            self._data(member, node)
        self.tree.add(member.path, node, offset=member.header_offset)

    def _warn(self, member: TarMember, message: str) -> None:
        name = member.path.decode("utf-8", "backslashreplace")
        self.warnings.append(f"{name} (at byte {member.header_offset}): {message}")

    def _node(self, member: TarMember) -> Node:
        kind = member.kind
        fmt = _TAR_FORMATS[kind]
        perms = 0o777 if kind == SYMLINK else member.mode  # Linux shows every symlink 0777
        sec, nsec = divmod(member.mtime_ns, 1_000_000_000)
        node = Node(fmt | perms, member.uid, member.gid, sec, nsec)
        for name, value in member.xattrs.items():
            why = xattr_refusal(name, fmt, value)
            if why is None:
                node.set_xattr(name, value)
            else:
                self._warn(member, f"xattr {name.decode(errors='replace')!r} dropped: {why}")
        if kind == SYMLINK:
            node.target = member.linkname
        elif kind in (CHARDEV, BLOCKDEV):
            if not (0 <= member.devmajor < 1 << 12 and 0 <= member.devminor < 1 << 20):
                raise BadInputError(f"device {member.devmajor}:{member.devminor} out of range",
                                    entry=member.path, offset=member.header_offset)
            node.rdev = os.makedev(member.devmajor, member.devminor)
        return node

    def _data(self, member: TarMember, node: Node) -> None:
        node.size = member.size
        if member.size == 0 and not member.sparse:
            return
        image = self.image
        pieces = self.stream.pieces(member.stored_size)
        entry, offset = member.path, member.header_offset
        if member.sparse is not None:
            node.data = image.write_sparse(pieces, member.size, member.sparse, entry=entry,
                                           offset=offset)
        elif self.options.tar_index:
            if self.stream.skip(member.stored_size) != member.stored_size:
                raise BadInputError(f"tar truncated: {member.stored_size} bytes of data "
                                    "declared", entry=entry, offset=offset)
            node.data = tar_index_data(member.size, member.data_offset, self.bs)
        elif self.store is not None and member.size > INLINE_LIMIT:
            store_object(self.store, node, pieces, member.size, image.blkbits, entry=entry,
                         offset=offset)
        elif self.compressor is not None:
            room = self._inline_room(node)
            node.data = self.compressor.write(pieces, member.size, room, entry=entry,
                                              offset=offset)
        else:
            node.data = image.write_flat(pieces, member.size, self._inline_room(node),
                                         entry=entry, offset=offset)

    def _inline_room(self, node: Node) -> int:
        """Tail bytes that fit after the inode (taken as extended) and its xattrs."""
        return self.bs - 64 - xattr_body_size(node.xattrs)


def object_store(options: ConvertOptions) -> ObjectWriter | None:
    return ObjectWriter(options.objects) if options.objects else None


def store_object(store: ObjectWriter, node: Node, pieces: Iterable[memoryview | bytes],
                 size: int, blkbits: int, *, entry: bytes, offset: int) -> None:
    """The file's bytes into the store; the image keeps a hole of its size and the two xattrs
    that send overlayfs (and erofs-fuse with ``--data-dir``) to the object."""
    digest = store.put(pieces, size, entry=entry, offset=offset)
    node.set_xattr(METACOPY, metacopy_value(digest))
    node.set_xattr(REDIRECT, redirect_value(digest))
    node.data = hole_data(size, blkbits)


def store_counts(store: ObjectWriter | None) -> tuple[int, int, int]:
    if store is None:
        return 0, 0, 0
    return store.stored, store.deduplicated, store.bytes_written


def _position(raw: BinaryIO) -> int | None:
    try:
        return raw.tell() if raw.seekable() else None
    except (OSError, ValueError, AttributeError):
        return None


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    """In-kernel copy (reflink where the filesystem can), falling back to read/write."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    while done < length:
        chunk = os.pread(src, min(1 << 20, length - done), src_off + done)
        if not chunk:
            raise MkfsError("the tar shrank while it was being converted")
        os.pwrite(dst, chunk, dst_off + done)
        done += len(chunk)


_TAR_FORMATS = {REGULAR: stat.S_IFREG, DIRECTORY: stat.S_IFDIR, SYMLINK: stat.S_IFLNK,
                CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}
