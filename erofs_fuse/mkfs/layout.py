"""Metadata: inodes, xattrs, directories, the superblock; placed after the data and written.

Each node gets a plan (inode form, data layout, ``i_u``, xattr body, what follows the inode);
then nids are given breadth first from the root, so a directory's children sit together, and
the plans are packed with the structures of ``erofs/ondisk.py`` (the reader's own) and written.
Rules the kernel imposes (``erofs-writer.md`` 1.2, 2, 3, 9) are kept here:

* no nid 0 (``st_ino`` 0 vanishes from listings): the metadata area starts with an empty slot,
  and the root, placed first, is nid 1 (or the first slot of the next block);
* an inode's core and an inline tail never cross a block boundary;
* compact inodes only where nothing is lost: ids, nlink and size fit and the mtime equals the
  superblock's epoch to the nanosecond (older kernels ignore a compact inode's own mtime);
* directory entries sorted bytewise, ``.`` and ``..`` included, names never across blocks;
* xattr entries unique and sorted, under the short name prefixes only.

One module past the house's ~450 lines on purpose: planning and packing share the plan records
and the placement rules above, and split apart each half would restate them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..erofs import ondisk as d
from ..erofs.superblock import crc32c_raw
from ..erofs.overlay_xattrs import shows_xattrs
from ..erofs.xattr import SHORT_PREFIXES
from .data import ChunkMapData, FlatData, ImageFile, TarIndexData
from .errors import UnsupportedInputError
from .tree import Node, iter_dirs

SLOT = 1 << d.ISLOTBITS
MAX_GAPS = 16
XATTR_VALUE_MAX = 0xFFFF
XATTR_BODY_MAX = 12 + 4 * (0xFFFF - 1)


@dataclass(frozen=True, slots=True)
class SuperblockInfo:
    build_time: int
    uuid: bytes
    feature_incompat: int = 0
    lz4_max_distance: int = 0
    tar_device_blocks: int | None = None  # tar-index: blocks of extra device 1


@dataclass(slots=True)
class MetadataSummary:
    inodes: int
    image_blocks: int
    meta_blkaddr: int
    root_nid: int
    feature_incompat: int
    # inodes with an xattr a merged tree shows (not overlayfs's own): none lets a mount of the
    # layer answer getxattr "not supported" (mount -o noxattr)
    shown_xattr_inodes: int = 0


def file_type(mode: int) -> int:
    return _FILE_TYPES.get(stat.S_IFMT(mode), d.FT_UNKNOWN)


_FILE_TYPES = {stat.S_IFREG: d.FT_REG_FILE, stat.S_IFDIR: d.FT_DIR, stat.S_IFCHR: d.FT_CHRDEV,
               stat.S_IFBLK: d.FT_BLKDEV, stat.S_IFIFO: d.FT_FIFO, stat.S_IFSOCK: d.FT_SOCK,
               stat.S_IFLNK: d.FT_SYMLINK}


# xattrs ----------------------------------------------------------------------------------------
def _prefix_of(name: bytes) -> tuple[int, bytes] | None:
    """(short name index, suffix) of a full xattr name, or None when no short prefix fits."""
    for index, prefix in _PREFIXES_LONGEST_FIRST:
        if index in (d.XATTR_INDEX_POSIX_ACL_ACCESS, d.XATTR_INDEX_POSIX_ACL_DEFAULT):
            if name == prefix:
                return index, b""
        elif name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    return None


_PREFIXES_LONGEST_FIRST = sorted(SHORT_PREFIXES.items(), key=lambda kv: -len(kv[1]))


def xattr_refusal(name: bytes, fmt: int, value: bytes) -> str | None:
    """Why an xattr cannot be kept on an inode of type ``fmt`` (None when it can): the kernel
    hides names without a short prefix, Linux reads ``user.*`` on regular files and
    directories only (elsewhere it lists the name but answers ENODATA), and it interprets
    capabilities and ACLs, refusing malformed ones (as it refuses to set them)."""
    if _prefix_of(name) is None:
        return "not in a namespace EROFS stores (user, trusted, security, POSIX ACLs)"
    if name.startswith(b"user.") and fmt not in (stat.S_IFREG, stat.S_IFDIR):
        return "Linux keeps user.* xattrs on regular files and directories only"
    if name == b"security.capability" and not _valid_capability(value):
        return "not a valid capability set"
    if name in (b"system.posix_acl_access", b"system.posix_acl_default") \
            and not _valid_acl(value):
        return "not a valid POSIX ACL"
    return None


_CAP_SIZES = {0x01000000: 12, 0x02000000: 20, 0x03000000: 24}  # vfs_cap_data revisions


def _valid_capability(value: bytes) -> bool:
    if len(value) < 4:
        return False
    revision = int.from_bytes(value[:4], "little") & 0xFF000000
    return _CAP_SIZES.get(revision) == len(value)


def _valid_acl(value: bytes) -> bool:
    """posix_acl_xattr: version 2, then 8-byte entries (tag, perm, id)."""
    return len(value) >= 4 and (len(value) - 4) % 8 == 0 \
        and int.from_bytes(value[:4], "little") == 2


def pack_xattr_body(xattrs: dict[bytes, bytes]) -> bytes:
    """The inline xattr region: header and entries sorted by name (no shared ids, no filter).
    Callers drop names without a short prefix first (``storable_xattr``)."""
    if not xattrs:
        return b""
    header = d.XattrIbodyHeaderRaw(h_name_filter=0, h_shared_count=0)  # no filter, no shared
    parts = [d.XATTR_IBODY_HEADER.pack(*header)]
    for name in sorted(xattrs):
        value = xattrs[name]
        prefix = _prefix_of(name)
        assert prefix is not None, name
        index, suffix = prefix
        if len(suffix) > 255 or len(value) > XATTR_VALUE_MAX:
            raise UnsupportedInputError(f"xattr {name[:40]!r} too long for EROFS")
        head = d.XattrEntryRaw(e_name_len=len(suffix), e_name_index=index,
                               e_value_size=len(value))
        entry = d.XATTR_ENTRY.pack(*head) + suffix + value
        parts.append(entry + bytes(-len(entry) % 4))
    body = b"".join(parts)
    if len(body) > XATTR_BODY_MAX:
        raise UnsupportedInputError(f"xattrs of {len(body)} bytes exceed EROFS's inline limit")
    return body


def xattr_body_size(xattrs: dict[bytes, bytes]) -> int:
    if not xattrs:
        return 0
    size = 12
    for name, value in xattrs.items():
        prefix = _prefix_of(name)
        suffix = len(prefix[1]) if prefix else len(name)
        size += (4 + suffix + len(value) + 3) & ~3
    return size


# directories -----------------------------------------------------------------------------------
def dir_blocks(entries: list[tuple[bytes, Node]], bs: int) -> list[list[tuple[bytes, Node]]]:
    """Sorted entries cut into blocks: an entry goes where it fits whole."""
    blocks: list[list[tuple[bytes, Node]]] = [[]]
    used = 0
    for name, node in entries:
        need = d.DIRENT.size + len(name)
        if used + need > bs:
            blocks.append([])
            used = 0
        blocks[-1].append((name, node))
        used += need
    return blocks


def dir_block_used(block: list[tuple[bytes, Node]]) -> int:
    return sum(d.DIRENT.size + len(name) for name, _ in block)


def pack_dir_block(block: list[tuple[bytes, Node]]) -> bytes:
    """Dirents first, then the names; ``nameoff`` is relative to this block."""
    nameoff = d.DIRENT.size * len(block)
    heads = []
    for name, node in block:
        heads.append(d.DIRENT.pack(*d.DirentRaw(nid=node.nid, nameoff=nameoff,
                                                file_type=file_type(node.mode))))
        nameoff += len(name)
    return b"".join(heads) + b"".join(name for name, _ in block)


# plans -----------------------------------------------------------------------------------------
class _Plan:
    """How one inode is stored; ``pos`` is its byte offset in the metadata area."""

    __slots__ = ("node", "extended", "layout", "i_u", "xattrs", "after", "align", "tail_len",
                 "late_blocks", "late_start", "dir_blocks", "pos")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.extended = True
        self.layout = d.LAYOUT_FLAT_PLAIN
        self.i_u = 0
        self.xattrs = b""
        self.after = b""          # index bytes right after the inode and xattrs
        self.align = 1            # alignment of ``after`` (8 for chunk indexes)
        self.tail_len = 0         # inline tail length (must stay in one block)
        self.late_blocks = 0      # directory/symlink blocks placed before the metadata
        self.late_start = -1
        self.dir_blocks: list[list[tuple[bytes, Node]]] | None = None
        self.pos = 0

    @property
    def inode_size(self) -> int:
        return d.INODE_EXTENDED.size if self.extended else d.INODE_COMPACT.size

    def footprint(self) -> int:
        base = self.inode_size + len(self.xattrs)
        return base + (-base % self.align) + len(self.after) + self.tail_len


class MetadataWriter:
    def __init__(self, image: ImageFile, info: SuperblockInfo) -> None:
        self.image = image
        self.bs = image.bs
        self.info = info
        self.incompat = info.feature_incompat

    def write(self, root: Node) -> MetadataSummary:
        plans = self._plans(root)
        for plan in plans:
            if plan.late_blocks:
                plan.late_start = plan.i_u = self.image.reserve(plan.late_blocks)
            elif plan.layout == d.LAYOUT_FLAT_INLINE and not stat.S_ISREG(plan.node.mode):
                plan.i_u = d.NULL_ADDR_32
        meta_blkaddr = self.image.cursor
        end = self._place(plans)
        base = meta_blkaddr * self.bs
        for serial, plan in enumerate(plans, 1):
            os.pwrite(self.image.fd, self._pack(plan, serial), base + plan.pos)
            self._write_late(plan)
            plan.dir_blocks = None  # done with them: free as we go
        meta_blocks = -(-end // self.bs)
        total = meta_blkaddr + meta_blocks
        if total >= 1 << 32:
            raise UnsupportedInputError("image too large for 32-bit block addresses")
        os.ftruncate(self.image.fd, total * self.bs)
        self._write_superblock(root.nid, len(plans), total, meta_blkaddr)
        shown = sum(1 for plan in plans if plan.node.xattrs and shows_xattrs(plan.node.xattrs))
        return MetadataSummary(len(plans), total, meta_blkaddr, root.nid, self.incompat, shown)

    # planning ----------------------------------------------------------------------------
    def _plans(self, root: Node) -> list[_Plan]:
        """Every inode once: the root, then each directory's children in name order,
        directories breadth first."""
        for directory in iter_dirs(root):
            assert directory.children is not None
            for child in directory.children.values():
                child.nlink = 0
        for directory in iter_dirs(root):
            assert directory.children is not None
            for child in directory.children.values():
                child.nlink += 1
        order = [self._plan(root, root)]
        shared: set[int] = set()  # hard-linked nodes already planned
        for directory in iter_dirs(root):
            assert directory.children is not None
            for name in sorted(directory.children):
                child = directory.children[name]
                if child.nlink > 1 and not child.is_dir:
                    if id(child) in shared:
                        continue
                    shared.add(id(child))
                order.append(self._plan(child, directory))
        return order

    def _plan(self, node: Node, parent: Node) -> _Plan:
        plan = _Plan(node)
        if node.is_dir:
            assert node.children is not None
            node.nlink = 2 + sum(1 for c in node.children.values() if c.is_dir)
        plan.xattrs = pack_xattr_body(node.xattrs)
        plan.extended = not self._fits_compact(node)
        fmt = stat.S_IFMT(node.mode)
        if fmt == stat.S_IFDIR:
            self._plan_dir(plan, parent)
        elif fmt == stat.S_IFLNK:
            node.size = len(node.target)
            self._plan_tail(plan, node.size)
        elif fmt == stat.S_IFREG:
            self._plan_regular(plan)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            plan.i_u = _encode_dev(node.rdev)
        return plan

    def _fits_compact(self, node: Node) -> bool:
        return (node.uid <= 0xFFFF and node.gid <= 0xFFFF and node.nlink <= 0xFFFF
                and node.size <= 0xFFFFFFFF and node.mtime == self.info.build_time
                and node.nsec == 0)

    def _inline_room(self, plan: _Plan) -> int:
        return self.bs - plan.inode_size - len(plan.xattrs)

    def _plan_dir(self, plan: _Plan, parent: Node) -> None:
        node = plan.node
        assert node.children is not None
        entries = [(b".", node), (b"..", parent)] + list(node.children.items())
        entries.sort(key=lambda e: e[0])
        blocks = dir_blocks(entries, self.bs)
        plan.dir_blocks = blocks
        node.size = (len(blocks) - 1) * self.bs + dir_block_used(blocks[-1])
        self._plan_tail(plan, node.size)

    def _plan_tail(self, plan: _Plan, size: int) -> None:
        """Whole blocks before the metadata; the tail inline when it fits after the inode."""
        bs = self.bs
        tail_len = size % bs
        if tail_len and tail_len <= self._inline_room(plan):
            plan.layout = d.LAYOUT_FLAT_INLINE
            plan.late_blocks = size // bs
            plan.tail_len = tail_len
        else:
            plan.layout = d.LAYOUT_FLAT_PLAIN
            plan.late_blocks = -(-size // bs)

    def _tail(self, plan: _Plan) -> bytes:
        """The inline tail of a directory, symlink or regular file."""
        node = plan.node
        if plan.dir_blocks is not None:
            return pack_dir_block(plan.dir_blocks[-1])
        if isinstance(node.data, FlatData):
            return self.image.tail(node.data)
        return node.target[len(node.target) - plan.tail_len:]

    def _plan_regular(self, plan: _Plan) -> None:
        data = plan.node.data
        if data is None:
            return  # empty file: FLAT_PLAIN, i_u 0
        if isinstance(data, FlatData):
            plan.i_u = data.start if data.start >= 0 else d.NULL_ADDR_32
            if data.tail_len:
                plan.layout = d.LAYOUT_FLAT_INLINE
                plan.tail_len = data.tail_len
            else:
                plan.layout = d.LAYOUT_FLAT_PLAIN
        elif isinstance(data, ChunkMapData):
            plan.layout = d.LAYOUT_CHUNK_BASED
            plan.i_u = data.chunkbits - self.image.blkbits
            plan.after = data.entries.tobytes()
            plan.align = 4
            self.incompat |= d.INCOMPAT_CHUNKED_FILE
        elif isinstance(data, TarIndexData):
            plan.layout = d.LAYOUT_CHUNK_BASED
            plan.i_u = (data.chunkbits - self.image.blkbits) | d.CHUNK_FORMAT_INDEXES
            plan.after = d.CHUNK_INDEX.pack(*d.ChunkIndexRaw(
                startblk_hi=0, device_id=1, startblk_lo=data.device_block))
            plan.align = 8
            self.incompat |= d.INCOMPAT_CHUNKED_FILE
        else:
            packed = getattr(data, "pack_plan", None)
            assert packed is not None, type(data)
            packed(plan, self)

    # placement ---------------------------------------------------------------------------
    def _place(self, plans: list[_Plan]) -> int:
        """Give each plan a 32-byte slot; returns the end of the metadata area. Slot 0 stays
        empty so that no inode is nid 0."""
        placer = _Placer(self.bs, SLOT)
        for plan in plans:
            one_block = plan.footprint() if plan.tail_len else plan.inode_size
            plan.pos = placer.place(plan.footprint(), one_block)
            plan.node.nid = plan.pos >> d.ISLOTBITS
        return placer.end

    # packing -----------------------------------------------------------------------------
    def _pack(self, plan: _Plan, serial: int) -> bytes:
        node = plan.node
        i_format = (1 if plan.extended else 0) | plan.layout << d.I_DATALAYOUT_SHIFT
        icount = (len(plan.xattrs) - 12) // 4 + 1 if plan.xattrs else 0
        mode = node.mode & 0xFFFF
        if plan.extended:
            core = d.INODE_EXTENDED.pack(*d.InodeExtendedRaw(
                i_format=i_format, i_xattr_icount=icount, i_mode=mode, i_nb=0,
                i_size=node.size, i_u=plan.i_u, i_ino=serial & 0xFFFFFFFF, i_uid=node.uid,
                i_gid=node.gid, i_mtime=node.mtime, i_mtime_nsec=node.nsec,
                i_nlink=node.nlink, i_reserved2=bytes(16)))
        else:  # the compact i_mtime stays 0: its time is the superblock's epoch
            core = d.INODE_COMPACT.pack(*d.InodeCompactRaw(
                i_format=i_format, i_xattr_icount=icount, i_mode=mode, i_nb=node.nlink,
                i_size=node.size, i_mtime=0, i_u=plan.i_u, i_ino=serial & 0xFFFFFFFF,
                i_uid=node.uid, i_gid=node.gid, i_reserved=0))
        base = core + plan.xattrs
        tail = self._tail(plan) if plan.tail_len else b""
        return base + bytes(-len(base) % plan.align) + plan.after + tail

    def _write_late(self, plan: _Plan) -> None:
        if not plan.late_blocks:
            return
        bs = self.bs
        node = plan.node
        if plan.dir_blocks is not None:
            blocks = plan.dir_blocks[:plan.late_blocks]
            data = b"".join(pack_dir_block(b).ljust(bs, b"\0") for b in blocks)
        else:
            data = node.target[:plan.late_blocks * bs]
        os.pwrite(self.image.fd, data, plan.late_start * bs)

    def _write_superblock(self, root_nid: int, inodes: int, total_blocks: int,
                          meta_blkaddr: int) -> None:
        info = self.info
        devices = 0 if info.tar_device_blocks is None else 1
        raw = d.SuperBlockRaw(
            magic=d.MAGIC, checksum=0, feature_compat=d.COMPAT_SB_CHKSUM | d.COMPAT_MTIME,
            blkszbits=self.image.blkbits, sb_extslots=0, rootnid_2b=root_nid, inos=inodes,
            epoch=info.build_time, fixed_nsec=0, blocks_lo=total_blocks,
            meta_blkaddr=meta_blkaddr, xattr_blkaddr=0, uuid=info.uuid, volume_name=bytes(16),
            feature_incompat=self.incompat | (d.INCOMPAT_DEVICE_TABLE if devices else 0),
            available_compr_algs=info.lz4_max_distance, extra_devices=devices,
            devt_slotoff=(d.SUPERBLOCK_OFFSET + d.SUPER_BLOCK.size) // 128 if devices else 0,
            dirblkbits=0, xattr_prefix_count=0, xattr_prefix_start=0, packed_nid=0,
            xattr_filter_reserved=0, ishare_xattr_prefix_id=0, reserved=bytes(2),
            build_time=0, rootnid_8b=0, reserved2=0)
        head = bytearray(d.SUPER_BLOCK.pack(*raw))
        if devices:
            assert info.tar_device_blocks is not None
            head += d.DEVICE_SLOT.pack(*d.DeviceSlotRaw(
                tag=bytes(64), blocks_lo=info.tar_device_blocks, uniaddr_lo=total_blocks))
        bs = self.bs
        length = bs - d.SUPERBLOCK_OFFSET if bs > d.SUPERBLOCK_OFFSET else bs
        region = bytearray(os.pread(self.image.fd, length, d.SUPERBLOCK_OFFSET))
        region[:len(head)] = head
        region[4:8] = bytes(4)
        crc = crc32c_raw(bytes(region))
        region[4:8] = crc.to_bytes(4, "little")
        os.pwrite(self.image.fd, bytes(region[:len(head)]), d.SUPERBLOCK_OFFSET)


def first_data_block(block_size: int, devices: int) -> int:
    """The first block after the superblock and the device table."""
    end = d.SUPERBLOCK_OFFSET + d.SUPER_BLOCK.size + 128 * devices
    return -(-end // block_size)


def _encode_dev(rdev: int) -> int:
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


class _Placer:
    """First fit over the holes left behind, else at the end: deterministic and tight."""

    def __init__(self, bs: int, start: int) -> None:
        self.bs = bs
        self.end = start
        self.gaps: list[tuple[int, int]] = []

    def _fits(self, pos: int, one_block: int) -> bool:
        return pos % self.bs + one_block <= self.bs

    def place(self, size: int, one_block: int) -> int:
        """A 32-byte aligned offset for ``size`` bytes whose first ``one_block`` bytes must not
        cross a block boundary."""
        for k, (start, stop) in enumerate(self.gaps):
            if stop - start >= size and self._fits(start, one_block):
                new_start = (start + size + SLOT - 1) & ~(SLOT - 1)
                if new_start < stop:
                    self.gaps[k] = (new_start, stop)
                else:
                    del self.gaps[k]
                return start
        pos = self.end
        if not self._fits(pos, one_block):
            nxt = (pos // self.bs + 1) * self.bs
            self._add_gap(pos, nxt)
            pos = nxt
        self.end = (pos + size + SLOT - 1) & ~(SLOT - 1)
        return pos

    def _add_gap(self, start: int, stop: int) -> None:
        if stop - start >= SLOT:
            self.gaps.append((start, stop))
            if len(self.gaps) > MAX_GAPS:
                self.gaps.pop(0)
