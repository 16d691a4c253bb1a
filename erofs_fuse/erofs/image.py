"""One EROFS image (a "layer blob"): the facade over superblock, inodes, data, dirs and xattrs.

``Image.open(path)`` validates the superblock and the special inodes; everything else is parsed
lazily and cached in bounded LRU caches. All bytes come from ``Blob`` objects (``read(offset,
length)``), so a verifying blob can be slipped underneath without this module knowing.

The facade is past the house's ~450 lines on purpose: its caches and the lock that guards them
are shared by every lookup it offers; the parsing itself lives in the modules beside it.
"""

from __future__ import annotations

import os
import struct
import threading
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Iterable, Iterator, NoReturn, Sequence

from mypy_extensions import mypyc_attr

from . import ondisk as d
from .dirent import DirBlock, DirEntry, first_not_below, lookup_in_blocks, parse_dir_block
from .errors import (
    CorruptImageError,
    ErofsError,
    MetacopyError,
    MissingDeviceError,
    NotADirectoryErofsError,
    NotFoundError,
)
from .extent import C_RAW, S_DEVICE, ChunkMapper, FlatMapper, Mapper, Source, nblocks
from .inode import InodeInfo, parse_inode
from .lru import Lru
from .metacopy import METACOPY_XATTR, REDIRECT_XATTR, Metacopy, parse_metacopy
from .reader import DEFAULT_EXTENT_CACHE_BYTES, DataReader
from .decompress import load_codecs
from .space import BlockCachedSpace, Space
from .superblock import parse_superblock
from .xattr import XattrReader, parse_prefix_table

if TYPE_CHECKING:
    from ..blob import Blob

MAX_SYMLINK = 4095
MAX_PATH_COMPONENTS = 4096
# Exceptions that garbled bytes could still provoke in code paths we did not foresee; at the
# public boundary they become CorruptImageError so callers see one family. (The codecs' own
# errors are not listed: ``decompress`` turns them into ours, and listing them here would
# import every codec with this module.)
# EROFS_FUSE_STRICT=1 (the fuzzer sets it) lets them through, so they are found and fixed.
_STRICT = os.environ.get("EROFS_FUSE_STRICT") == "1"
_STRAY_ERRORS = (struct.error, IndexError, ValueError, OverflowError, KeyError, RecursionError,
                 MemoryError)


# Metadata read-around: a metadata block missing from our cache is read with its 64 KiB cluster
# (``space.CLUSTER_BYTES``), and the kernel is then asked (``Blob.prefetch``) to read the
# aligned window around it into its page cache. mkfs puts inodes, inline data and directories
# near their parents, so the blocks asked for next are mostly there already: a cold walk of the
# bench rootfs issued ~2300 random 4 KiB reads, one disk round trip each (0.84 s of a 1.7 s
# walk); with 256 KiB windows it took 1.1 s -> 0.89 s in-process.
READAROUND_BYTES = 256 << 10
# Windows asked for are remembered (at most this many, then forgotten all at once), so that each
# is asked for once: remembering only the last one, the python imports' reads, moving between a
# few windows, asked 239 times for 86 windows (a posix_fadvise of 3-20 µs each).
READAROUND_REMEMBERED = 4096
# Inodes about to be parsed one after the other (a directory's entries, listed) are first asked
# for all at once (``Image.prefetch_inodes``): their blocks, which need not be near each other
# (mkfs 1.5 interleaves metadata with file data), are read in parallel instead of one disk
# round trip each. Runs of blocks closer than this are asked for as one range.
PREFETCH_GAP_BLOCKS = 4
# A file's data asked for ahead (``Image.prefetch_data``) maps at most this many extents: a
# compressed file's first MiB may be hundreds of pclusters, each mapped in Python; the hint is
# worth a few, not the time of the read it hints for.
PREFETCH_MAX_EXTENTS = 16
# Directory blocks kept decoded (``DirBlock``) per image: a lookup otherwise read its blocks
# through the data path again (extent map, block cache, and on a verified layer a SHA-256 of
# each block), half the daemon CPU of a lookup in a container's python imports, most of them in
# a few ``__pycache__`` directories. Those imports touch 75 blocks of the bench stack's three
# layers. Bounded: a block keeps its bytes and the entries asked for, at worst ~45 KiB (4 KiB of
# two-byte names, every entry decoded: measured), so at most ~11 MiB per image.
DIR_BLOCK_CACHE = 256


class _ReadAround:
    """A blob whose reads first ask it to prefetch the window around them (if it can)."""

    def __init__(self, blob: Blob, window: int = READAROUND_BYTES) -> None:
        self._blob = blob
        self.size = blob.size  # a layer file never changes size while open
        self._prefetch = getattr(blob, "prefetch", None) if window > 0 else None
        self._bits = max(window, 1).bit_length() - 1
        self._asked: set[int] = set()  # windows asked for (READAROUND_REMEMBERED)

    def read(self, offset: int, length: int) -> bytes:
        if self._prefetch is not None:
            window = offset >> self._bits
            asked = self._asked
            if window not in asked:
                if len(asked) >= READAROUND_REMEMBERED:
                    asked.clear()
                asked.add(window)
                # the block first, then the hint: hinted first, the block would come with the
                # window's read, waiting for all 256 KiB of it (a cold lookup's inode block
                # waited 0.42 ms on average, 0.30 ms read first)
                data = self._blob.read(offset, length)
                self._prefetch(window << self._bits, 1 << self._bits)
                return data
        return self._blob.read(offset, length)


class InodeSpace:
    """The decoded data of a special inode (metabox, packed) seen as a byte space."""

    def __init__(self, image: Image, inode: Inode, *, packed: bool) -> None:
        self._image = image
        self._inode = inode
        self._packed = packed

    @property
    def size(self) -> int:
        return self._inode.size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._inode.size:
            raise CorruptImageError(
                f"read of {length} bytes at {offset} past the end of a "
                f"{self._inode.size}-byte {'packed' if self._packed else 'metabox'} stream",
                nid=self._inode.nid,
            )
        return self._image._read_data(self._inode, offset, length, packed=self._packed)


class Inode:
    """An inode of an image: attributes plus data, directory and xattr access."""

    __slots__ = ("image", "info", "space", "_mapper", "_is_metacopy", "_metacopy")

    def __init__(self, image: Image, info: InodeInfo, space: Space) -> None:
        self.image = image
        self.info = info
        self.space = space
        self._mapper: Mapper | None = None
        self._is_metacopy: bool | None = None
        self._metacopy: Metacopy | None = None

    # attributes -------------------------------------------------------------------------------
    @property
    def nid(self) -> int:
        return self.info.nid

    @property
    def mode(self) -> int:
        return self.info.mode

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def uid(self) -> int:
        return self.info.uid

    @property
    def gid(self) -> int:
        return self.info.gid

    @property
    def nlink(self) -> int:
        return self.info.nlink

    @property
    def mtime(self) -> int:
        return self.info.mtime

    @property
    def mtime_nsec(self) -> int:
        return self.info.mtime_nsec

    @property
    def mtime_ns(self) -> int:
        return self.info.mtime * 1_000_000_000 + self.info.mtime_nsec

    @property
    def rdev(self) -> int:
        return self.info.rdev

    @property
    def is_dir(self) -> bool:
        return self.info.is_dir

    @property
    def is_reg(self) -> bool:
        return self.info.is_reg

    @property
    def is_symlink(self) -> bool:
        return self.info.is_symlink

    @property
    def st_blocks(self) -> int:
        return self.info.st_blocks(self.image.superblock.blkszbits)

    # metadata-only files (erofs/metacopy.py) -----------------------------------------------------
    @property
    def is_metacopy(self) -> bool:
        """A regular file with ``trusted.overlay.metacopy``: its bytes are not in this image
        (they are in the object its ``redirect`` names), so ``read`` refuses it."""
        flag = self._is_metacopy
        if flag is None:
            flag = False
            if self.info.is_reg and self.info.xattr_icount > 0:
                found = dict(self.xattrs())  # one parse for both xattrs, not one per name
                value = found.get(METACOPY_XATTR)
                flag = value is not None
                if value is not None:
                    with suppress(MetacopyError):  # metacopy() raises it when asked
                        self._metacopy = parse_metacopy(value, found.get(REDIRECT_XATTR))
            self._is_metacopy = flag
        return flag

    def metacopy(self) -> Metacopy | None:
        """Where a metadata-only file's bytes are (None for any other inode);
        ``MetacopyError`` when its xattrs are malformed."""
        if not self.is_metacopy:
            return None
        meta = self._metacopy
        if meta is None:
            with self.image.context(self.nid):
                value = self.getxattr(METACOPY_XATTR)
                assert value is not None
                meta = parse_metacopy(value, self.getxattr(REDIRECT_XATTR))
            self._metacopy = meta  # parsed once per cached inode, not per read
        return meta

    def _refuse_metacopy(self) -> NoReturn:
        redirect = self.getxattr(REDIRECT_XATTR)
        named = f" (object {redirect.decode(errors='replace')})" if redirect else ""
        raise MetacopyError(
            f"metadata-only file{named}: its data is in an object store (give a data dir)",
            image=self.image.name, nid=self.nid)

    # data -------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """File bytes ``[offset, offset + size)``, shorter at EOF. ``MetacopyError`` for a
        metadata-only file (``is_metacopy``), whose bytes this image does not hold."""
        try:
            if self.is_metacopy:
                self._refuse_metacopy()
            return self.image._read_data(self, offset, size)
        except Exception as exc:
            self.image.reraise(exc, self.nid)

    def hole_end(self, offset: int) -> int:
        """Where the hole holding byte ``offset`` ends (``offset`` itself if it holds data).

        Lets a copy skip a sparse region in one step: a hostile inode may claim terabytes of
        hole, which reading as zeros would take days to copy."""
        try:
            if self.is_metacopy:
                self._refuse_metacopy()
            return self.image._hole_end(self, offset)
        except Exception as exc:
            self.image.reraise(exc, self.nid)

    def readlink(self) -> bytes:
        with self.image.context(self.nid):
            if not self.is_symlink:
                raise CorruptImageError("not a symlink")
            if not 0 < self.size <= MAX_SYMLINK:
                raise CorruptImageError(f"symlink target of {self.size} bytes")
            target = self.image._read_data(self, 0, self.size)
            if b"\0" in target:
                raise CorruptImageError("NUL byte in symlink target")
            return target

    # directories ------------------------------------------------------------------------------
    def readdir(self, *, dots: bool = False) -> Iterator[DirEntry]:
        """Entries in on-disk order; ``.`` and ``..`` only with ``dots`` (``.`` synthesized
        after the stored entries for dot-omitted directories, as the kernel does)."""
        return self.image.readdir(self, dots=dots)

    def lookup(self, name: bytes) -> DirEntry | None:
        return self.image.lookup_entry(self, name)

    def has_name_prefixed(self, prefix: bytes) -> bool:
        """Whether any entry's name starts with ``prefix`` (one search of the sorted names)."""
        entry = self.image.first_entry_from(self, prefix)
        return entry is not None and entry.name.startswith(prefix)

    # xattrs -----------------------------------------------------------------------------------
    def xattrs(self) -> list[tuple[bytes, bytes]]:
        info = self.info
        try:  # not image.context(): once per metadata-only file opened, a hot path
            return self.image._xattrs.items(self.space.read, info.pos + info.isize,
                                            info.xattr_isize)
        except Exception as exc:
            self.image.reraise(exc, self.nid)

    def listxattr(self) -> list[bytes]:
        return [name for name, _ in self.xattrs()]

    def getxattr(self, name: bytes) -> bytes | None:
        for key, value in self.xattrs():
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<Inode {self.nid} mode={self.mode:#o} size={self.size}>"


@mypyc_attr(allow_interpreted_subclasses=True)  # tests count searches in a subclass
class Image:
    """A read-only EROFS image. Thread-safe for concurrent reads."""

    def __init__(
        self,
        blob: Blob,
        devices: Sequence[Blob] = (),
        *,
        name: str | None = None,
        inode_cache: int = 65536,
        extent_cache_bytes: int = DEFAULT_EXTENT_CACHE_BYTES,
        readaround_bytes: int = READAROUND_BYTES,
    ) -> None:
        self.blob = blob
        self.name = name if name is not None else blob.name
        self.device_blobs = list(devices)
        # what the image's files hold: no directory can be larger (``_require_dir``)
        self._stored_bytes = blob.size + sum(b.size for b in self.device_blobs)
        self._lock = threading.Lock()
        self._inodes: Lru[int, Inode] = Lru(inode_cache)
        self._dir_blocks: Lru[tuple[int, int], DirBlock] = Lru(DIR_BLOCK_CACHE)
        self._packed: Inode | None = None
        self._metabox_space: Space | None = None
        with self.context(None):
            self.superblock = parse_superblock(blob.read, blob.size, self.name)
            self._meta: Space = BlockCachedSpace(_ReadAround(blob, readaround_bytes),
                                                 self.superblock.block_size)
            self._check_devices()
            self._reader = DataReader(
                self.superblock, self._read_device, self._read_packed, extent_cache_bytes
            )
            sb = self.superblock
            if sb.metabox_nid is not None:
                metabox = self._load_inode(sb.metabox_nid)
                self._metabox_space = InodeSpace(self, metabox, packed=False)
            if sb.packed_nid is not None:
                self._packed = self._load_inode(sb.packed_nid)
                if not self._packed.is_reg:
                    raise CorruptImageError("packed inode is not a regular file", nid=sb.packed_nid)
            self._xattrs = self._make_xattr_reader()
            self.root = self.inode(sb.root_nid)
            if not self.root.is_dir:
                raise CorruptImageError("root inode is not a directory", nid=sb.root_nid)

    @classmethod
    def open(cls, path: str, devices: Sequence[str] = (), *, name: str | None = None) -> Image:
        """Open the image file at ``path``; ``devices`` are the extra device files in order."""
        from ..blob import FileBlob

        blob = FileBlob(path, name)
        dev_blobs = []
        try:
            for dev in devices:
                dev_blobs.append(FileBlob(dev))
            return cls(blob, dev_blobs, name=name)
        except BaseException:
            blob.close()
            for b in dev_blobs:
                b.close()
            raise

    def close(self) -> None:
        self.blob.close()
        for b in self.device_blobs:
            b.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reraise(self, exc: Exception, nid: int | None) -> NoReturn:
        """Raise ``exc`` with image and nid attached; a stray exception as CorruptImageError.

        Called from ``except Exception`` clauses (cheaper than a context manager on hot paths);
        exceptions that are neither ours nor stray ones pass unchanged."""
        if isinstance(exc, ErofsError):
            raise exc.with_context(image=self.name, nid=nid)
        if isinstance(exc, _STRAY_ERRORS) and not _STRICT:
            raise CorruptImageError(
                f"{type(exc).__name__}: {exc}", image=self.name, nid=nid
            ) from exc
        raise exc

    @contextmanager
    def context(self, nid: int | None) -> Iterator[None]:
        """Attach image and nid to errors raised inside; turn stray exceptions into ours."""
        try:
            yield
        except Exception as exc:
            self.reraise(exc, nid)

    # devices ----------------------------------------------------------------------------------
    def _check_devices(self) -> None:
        """Device files given must match the table; without them, the devices must follow the
        image in its file ("flattened", as the kernel reads an image mounted with no
        ``device=``). A table entry's ``blocks`` may be 0: mkfs.erofs 1.5 (Debian 12) writes
        none for ``--blobdev``, and the kernel uses it only for statfs."""
        sb = self.superblock
        bs = sb.block_size
        if self.device_blobs:
            if len(self.device_blobs) != len(sb.devices):
                raise MissingDeviceError(
                    f"image has {len(sb.devices)} extra devices, {len(self.device_blobs)} given"
                )
            for k, (dev, blob) in enumerate(zip(sb.devices, self.device_blobs)):
                if blob.size < dev.blocks * bs:
                    raise CorruptImageError(
                        f"device {k + 1} ({blob.name}) has {blob.size} bytes, "
                        f"the image needs {dev.blocks * bs}"
                    )
            return
        for k, dev in enumerate(sb.devices):
            if dev.uniaddr == 0:  # block 0 holds the superblock: not a flattened device
                raise MissingDeviceError(
                    f"image keeps data in extra device {k + 1}, a file of its own "
                    "(mkfs.erofs --blobdev): give its file as a device"
                )
            if self.blob.size < (dev.uniaddr + dev.blocks) * bs:
                raise MissingDeviceError(
                    f"image keeps data in extra device {k + 1} ({dev.blocks} blocks from block "
                    f"{dev.uniaddr}), which the image's {self.blob.size} bytes do not hold: "
                    "give its file as a device"
                )

    def _read_device(self, device_id: int, pa: int, length: int) -> bytes:
        blob, offset = self._device_blob(device_id, pa)
        return blob.read(offset, length)

    def _device_blob(self, device_id: int, pa: int) -> tuple[Blob, int]:
        """The blob holding byte ``pa`` of device ``device_id`` and that byte's offset in it."""
        sb = self.superblock
        bs = sb.block_size
        if device_id > 0:
            if device_id > len(sb.devices):
                raise CorruptImageError(f"device id {device_id} beyond the device table", offset=pa)
            dev = sb.devices[device_id - 1]
            # No bound from the table's block count (the kernel's erofs_map_dev has none, and
            # mkfs.erofs 1.5 writes 0): the device file, or in flattened form the image's
            # file, ends the read.
            if self.device_blobs:
                return self.device_blobs[device_id - 1], pa
            return self.blob, pa + dev.uniaddr * bs
        for k, dev in enumerate(sb.devices):
            base = dev.uniaddr * bs
            if dev.uniaddr and base <= pa < base + dev.blocks * bs:
                if self.device_blobs:
                    return self.device_blobs[k], pa - base
                break
        return self.blob, pa

    # inodes -----------------------------------------------------------------------------------
    def _space_of(self, nid: int) -> Space:
        if nid & d.NID_METABOX_BIT:
            if self._metabox_space is None:
                raise CorruptImageError("nid refers into a metabox the image does not have", nid=nid)
            return self._metabox_space
        return self._meta

    def _load_inode(self, nid: int) -> Inode:
        space = self._space_of(nid)
        try:
            info = parse_inode(self.superblock, space, nid)
        except ErofsError as exc:
            raise exc.with_context(nid=nid)
        return Inode(self, info, space)

    def inode(self, nid: int) -> Inode:
        """The inode ``nid`` (cached)."""
        with self._lock:
            hit = self._inodes.get(nid)
        if hit is not None:
            return hit
        try:
            ino = self._load_inode(nid)
        except Exception as exc:
            self.reraise(exc, nid)
        with self._lock:
            self._inodes.put(nid, ino)
        return ino

    def prefetch_inodes(self, nids: Iterable[int]) -> None:
        """Have the blob start reading the blocks of the inodes ``nids`` (a hint: nothing is
        parsed or checked here, and inodes or blocks already cached are not asked for).

        Parsing a listed directory's entries takes one block read each that misses; asked for
        together, the reads overlap. Only the primary space's inodes: a metabox is file data."""
        prefetch = getattr(self.blob, "prefetch", None)
        meta = self._meta
        if prefetch is None or not isinstance(meta, BlockCachedSpace):
            return
        base, size = self.superblock.meta_base, meta.size
        with self._lock:
            cached = self._inodes
            offsets = [base + (nid << d.ISLOTBITS) for nid in nids
                       if not nid & d.NID_METABOX_BIT and nid not in cached]
        blocks = meta.missing(o for o in offsets if 0 <= o < size)
        if not blocks:
            return
        bits = meta.block_bits
        start = prev = blocks[0]
        for block in blocks[1:]:
            if block - prev > PREFETCH_GAP_BLOCKS:
                prefetch(start << bits, (prev + 1 - start) << bits)
                start = block
            prev = block
        prefetch(start << bits, (prev + 1 - start) << bits)

    def prefetch_data(self, inode: Inode, offset: int, length: int) -> None:
        """Have the blobs start reading what bytes ``[offset, offset + length)`` of file
        ``inode`` are stored in: its blocks, or its compressed pclusters (a hint, as
        ``prefetch_inodes``: nothing is read or checked here, and what cannot be mapped is left
        to the read, which reports it). At most ``PREFETCH_MAX_EXTENTS`` extents are mapped."""
        info = inode.info
        end = min(offset + length, info.size)
        if not info.has_data or offset < 0 or offset >= end:
            return
        runs: list[tuple[Blob, int, int]] = []
        try:
            extents = self._mapper(inode).extents(offset, end)
            pos = offset
            for _ in range(PREFETCH_MAX_EXTENTS):
                ext = next(extents, None)
                if ext is None or not ext.la <= pos < ext.la + ext.llen:
                    break  # the end, or a bad map: the read will say which
                if ext.source == S_DEVICE:
                    if ext.codec == C_RAW:
                        start, count = ext.pa + pos - ext.la, min(end, ext.end) - pos
                    else:  # a pcluster the read would refuse is not asked for
                        start, count = ext.pa, min(ext.plen, d.Z_PCLUSTER_MAX_SIZE)
                    blob, at = self._device_blob(ext.device, start)
                    last = runs[-1] if runs else None
                    if last is not None and last[0] is blob and last[1] + last[2] == at:
                        runs[-1] = (blob, last[1], last[2] + count)
                    else:
                        runs.append((blob, at, count))
                pos = ext.end
                if pos >= end:
                    break
        except ErofsError:
            pass  # what a read of these bytes would raise: it will, and say so
        except _STRAY_ERRORS:
            if _STRICT:  # as ``reraise``: the fuzzer is to see them
                raise
        for blob, at, count in runs:
            prefetch = getattr(blob, "prefetch", None)
            if prefetch is not None and 0 <= at < blob.size:
                prefetch(at, min(count, blob.size - at))

    def load_decoders(self) -> None:
        """Import now what reading this image's compressed files needs (the compressed
        mappers, the codecs of its algorithms), not at its first compressed read; nothing for
        an image whose superblock shows no compression (no 0-padding, no configurations)."""
        if not self.superblock.has_incompat(d.INCOMPAT_ZERO_PADDING | d.INCOMPAT_COMPR_CFGS):
            return
        from . import zmap  # noqa: F401  # as _mapper imports it at the first compressed file

        load_codecs(self.superblock.available_algorithms)

    def _mapper(self, inode: Inode) -> Mapper:
        mapper = inode._mapper
        if mapper is None:
            info = inode.info
            if info.layout in (d.LAYOUT_FLAT_PLAIN, d.LAYOUT_FLAT_INLINE):
                mapper = FlatMapper(self.superblock, info, inode.space)
            elif info.layout == d.LAYOUT_CHUNK_BASED:
                mapper = ChunkMapper(self.superblock, info, inode.space)
            else:
                from .zmap import compressed_mapper

                mapper = compressed_mapper(self.superblock, info, inode.space)
            inode._mapper = mapper
        return mapper

    def _read_data(self, inode: Inode, offset: int, length: int, *, packed: bool = False) -> bytes:
        if offset < 0 or length < 0:
            raise CorruptImageError(f"bad read range {offset}+{length}")
        if not inode.info.has_data or offset >= inode.size or length == 0:
            return b""
        return self._reader.read(
            self._mapper(inode), inode.size, inode.space, offset, length, packed=packed
        )

    def _hole_end(self, inode: Inode, offset: int) -> int:
        if not inode.info.has_data or not 0 <= offset < inode.size:
            return offset
        ext = self._mapper(inode).map(offset)
        if ext.source != Source.HOLE or not ext.la <= offset < ext.end:
            return offset
        return min(ext.end, inode.size)

    def _read_packed(self, offset: int, length: int) -> bytes:
        if self._packed is None:
            raise CorruptImageError("fragment without a packed inode")
        packed = self._packed
        if offset < 0 or offset + length > packed.size:
            raise CorruptImageError(
                f"fragment {offset}+{length} past the end of the {packed.size}-byte packed inode",
                offset=offset,
            )
        return self._read_data(packed, offset, length, packed=True)

    # directories ------------------------------------------------------------------------------
    def _dir_block_bytes(self, inode: Inode, index: int) -> tuple[bytes, int]:
        bs = self.superblock.block_size
        start = index * bs
        return self._read_data(inode, start, min(bs, inode.size - start)), start

    def _dir_block(self, inode: Inode, index: int) -> list[DirEntry]:
        block, start = self._dir_block_bytes(inode, index)
        return parse_dir_block(block, inode.nid, start)

    def _dir_block_lazy(self, inode: Inode, index: int) -> DirBlock:
        key = (inode.nid, index)
        with self._lock:
            hit = self._dir_blocks.get(key)
        if hit is not None:
            return hit
        block, start = self._dir_block_bytes(inode, index)
        decoded = DirBlock(block, inode.nid, start)
        with self._lock:
            self._dir_blocks.put(key, decoded)
        return decoded

    def _require_dir(self, inode: Inode) -> None:
        if not inode.is_dir:
            raise NotADirectoryErofsError("not a directory", image=self.name, nid=inode.nid)
        # Directory blocks are stored, never made up: a directory cannot hold more bytes than the
        # image's files. Without this bound, a few chunk records all naming one block make a
        # 1 MB image hold a directory of a million blocks, minutes of work for one listing.
        limit = self._stored_bytes
        if inode.size > limit:
            raise CorruptImageError(
                f"directory of {inode.size} bytes in an image of {limit} bytes",
                image=self.name, nid=inode.nid,
            )

    def readdir(self, inode: Inode, *, dots: bool = False) -> Iterator[DirEntry]:
        """Entries of directory ``inode`` in on-disk order."""
        self._require_dir(inode)
        count = nblocks(inode.size, self.superblock.blkszbits)
        for index in range(count):
            with self.context(inode.nid):
                entries = self._dir_block(inode, index)
            for entry in entries:
                if dots or entry.name not in (b".", b".."):
                    yield entry
        if dots and inode.info.dot_omitted:
            yield DirEntry(b".", inode.nid, d.FT_DIR)

    def lookup_entry(self, inode: Inode, name: bytes) -> DirEntry | None:
        """The entry called ``name`` in directory ``inode``, or None."""
        self._require_dir(inode)
        if not name or len(name) > d.MAX_NAME_LEN:
            return None
        if name == b"." and inode.info.dot_omitted:
            return DirEntry(b".", inode.nid, d.FT_DIR)
        try:  # not self.context(): a lookup is a hot path
            count = nblocks(inode.size, self.superblock.blkszbits)
            return lookup_in_blocks(count, lambda i: self._dir_block_lazy(inode, i), name)
        except Exception as exc:
            self.reraise(exc, inode.nid)

    def first_entry_from(self, inode: Inode, key: bytes) -> DirEntry | None:
        """The first entry of directory ``inode`` whose name is ``key`` or sorts after it, or
        None (``dirent.first_not_below``); ``.`` and ``..`` count as stored entries."""
        self._require_dir(inode)
        try:
            count = nblocks(inode.size, self.superblock.blkszbits)
            return first_not_below(count, lambda i: self._dir_block_lazy(inode, i), key)
        except Exception as exc:
            self.reraise(exc, inode.nid)

    def lookup(self, path: str | bytes) -> Inode:
        """The inode at ``path`` (absolute or relative to the root); symlinks are not followed."""
        raw = path.encode() if isinstance(path, str) else path
        parts = [p for p in raw.split(b"/") if p and p != b"."]
        if len(parts) > MAX_PATH_COMPONENTS:
            raise NotFoundError("path too long", image=self.name)
        node = self.root
        for part in parts:
            if not node.is_dir:
                raise NotADirectoryErofsError(
                    f"{part.decode(errors='replace')}: parent is not a directory",
                    image=self.name, nid=node.nid,
                )
            entry = self.lookup_entry(node, part)
            if entry is None:
                raise NotFoundError(f"{raw.decode(errors='replace')}: no such entry", image=self.name)
            node = self.inode(entry.nid)
        return node

    # xattrs -----------------------------------------------------------------------------------
    def _make_xattr_reader(self) -> XattrReader:
        sb = self.superblock
        shared_space: Space = self._meta
        if sb.has_compat(d.COMPAT_SHARED_EA_IN_METABOX) and self._metabox_space is not None:
            shared_space = self._metabox_space
        prefixes = []
        if sb.has_incompat(d.INCOMPAT_XATTR_PREFIXES) and sb.raw.xattr_prefix_count:
            space: Space = self._meta
            if sb.has_compat(d.COMPAT_PLAIN_XATTR_PFX):
                space = self._meta
            elif self._metabox_space is not None:
                space = self._metabox_space
            elif self._packed is not None:
                space = InodeSpace(self, self._packed, packed=True)
            prefixes = parse_prefix_table(
                space.read, space.size, sb.raw.xattr_prefix_start * 4, sb.raw.xattr_prefix_count
            )
        return XattrReader(
            prefixes,
            shared_space.read,
            sb.raw.xattr_blkaddr << sb.blkszbits,
            shared_space.size,
        )

    # walking ----------------------------------------------------------------------------------
    def walk(self, top: Inode | None = None, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
        """Every (path, inode) below ``top`` depth-first, each directory visited once."""
        start = top if top is not None else self.root
        seen: set[int] = {start.nid}
        stack: list[tuple[bytes, Inode]] = [(prefix, start)]
        while stack:
            path, node = stack.pop()
            children = []
            for entry in self.readdir(node):
                child = self.inode(entry.nid)
                child_path = path + b"/" + entry.name if path else entry.name
                if child.is_dir:
                    if child.nid in seen:
                        raise CorruptImageError(
                            "directory cycle: directory reached twice", image=self.name, nid=child.nid
                        )
                    seen.add(child.nid)
                    children.append((child_path, child))
                yield child_path, child
            stack.extend(reversed(children))
