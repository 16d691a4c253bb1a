"""Mutants of EROFS images for ``scripts/fuzz --mode lib|mount``: a function of ``(seed, index)``.

Made from real fixture images, aimed at the structures the reader parses, found by parsing the
intact original with the library (``find_regions``): superblock and inode fields, inline xattr
regions, directory blocks, compression indexes and compressed data; plus truncation,
extension, random words and stacks of several mutations.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from typing import Iterator

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.extent import Source
from erofs_fuse.erofs.image import Image, Inode
from erofs_fuse.erofs.superblock import crc32c_raw

from devtools import ROOT

CORPUS = ROOT / "fixtures" / "corpus"
DEFAULT_IMAGES = [
    "plain.erofs", "compact.erofs", "chunked.erofs", "b512.erofs", "plain-48bit.erofs",
    "xattr-prefix.erofs", "dot-omitted.erofs", "lz4.erofs", "lz4-legacy.erofs",
    "lz4-bigpcluster.erofs", "lz4-ztailpacking.erofs", "lz4-fragments.erofs",
    "lz4-dedupe.erofs", "lzma.erofs", "deflate.erofs", "zstd.erofs", "zstd-extents.erofs",
    "metabox.erofs", "old-ztail.erofs", "b1024-lz4.erofs", "xattr-digest.erofs",
    "layer-upper-aufs.erofs", "layer-lower-aufs.erofs", "layer-upper-oci.erofs",
    "layer-upper-aufs-lz4.erofs",
]
# A mutated layer is mounted with its intact partner: (partner, the mutant is the upper one).
PARTNERS = {
    "layer-upper-aufs.erofs": ("layer-lower-aufs.erofs", True),
    "layer-upper-aufs-lz4.erofs": ("layer-lower-aufs-lz4.erofs", True),
    "layer-upper-oci.erofs": ("layer-lower-oci.erofs", True),
    "layer-lower-aufs.erofs": ("layer-upper-aufs.erofs", False),
}

# the structures of an intact image ------------------------------------------------------------
@dataclass
class DirBlock:
    start: int  # byte position in the image file
    length: int  # valid bytes
    nid: int  # the directory's own nid
    ancestors: tuple[int, ...]  # parent first, root last


@dataclass
class Regions:
    """Byte ranges of an image by what they hold, found by parsing the intact image."""

    size: int
    block_size: int
    meta_base: int
    inodes: list[tuple[int, int]] = field(default_factory=list)  # (pos, isize)
    xattrs: list[tuple[int, int]] = field(default_factory=list)  # inline regions
    dirs: list[DirBlock] = field(default_factory=list)
    zindex: list[tuple[int, int]] = field(default_factory=list)
    zdata: list[tuple[int, int]] = field(default_factory=list)
    nids: list[int] = field(default_factory=list)


def _data_spans(image: Image, node: Inode) -> Iterator[tuple[Source, int, int]]:
    """(source, physical position, length) of the first extents of ``node``'s data."""
    info = node.info
    if not info.has_data or info.size == 0:
        return
    mapper = image._mapper(node)
    pos = 0
    for _ in range(64):
        if pos >= info.size:
            return
        ext = mapper.map(pos)
        if ext.source == Source.DEVICE and ext.device == 0:
            yield ext.source, ext.pa, min(ext.plen or ext.llen, 1 << 20)
        elif ext.source == Source.META:
            yield ext.source, ext.pa, ext.plen or ext.llen
        pos = ext.end


def find_regions(path: str) -> Regions:
    with Image.open(path) as image:
        sb = image.superblock
        r = Regions(os.path.getsize(path), sb.block_size, sb.meta_base)
        stack: list[tuple[Inode, tuple[int, ...]]] = [(image.root, ())]
        seen = {image.root.nid}
        nodes: list[tuple[Inode, tuple[int, ...]]] = []
        while stack:
            node, ancestors = stack.pop()
            nodes.append((node, ancestors))
            if node.is_dir:
                for entry in node.readdir():
                    if entry.nid in seen:
                        continue
                    seen.add(entry.nid)
                    stack.append((image.inode(entry.nid), (node.nid, *ancestors)))
        for node, ancestors in nodes:
            info = node.info
            if info.in_metabox:
                continue
            r.nids.append(info.nid)
            r.inodes.append((info.pos, info.isize))
            if info.xattr_isize:
                r.xattrs.append((info.pos + info.isize, info.xattr_isize))
            if info.is_compressed:
                start = (info.after + 7) & ~7
                r.zindex.append((start, min(8 + 8 * (info.size // sb.block_size + 2), 4096)))
            for source, pa, length in _data_spans(image, node):
                if info.is_dir and not info.is_compressed:
                    # a directory's data, block by block (the inline tail is one short block)
                    for k in range(0, length, sb.block_size):
                        r.dirs.append(DirBlock(pa + k, min(sb.block_size, length - k),
                                               info.nid, ancestors))
                elif info.is_compressed and source == Source.DEVICE:
                    r.zdata.append((pa, length))
    return r


def reseal(data: bytearray) -> None:
    """Recompute the superblock checksum, so that mutants reach the checks behind it."""
    bits = data[1024 + 12]
    bs = 1 << bits if 9 <= bits <= 16 else 4096
    length = bs - 1024 if bs > 1024 else bs
    if len(data) < 1024 + length:
        return
    block = bytearray(data[1024 : 1024 + length])
    block[4:8] = bytes(4)
    struct.pack_into("<I", data, 1028, crc32c_raw(bytes(block)))


# mutations ------------------------------------------------------------------------------------
def _fields(fmt: str) -> list[tuple[int, int]]:
    """(offset, width) of the integer fields of a struct format (byte strings skipped)."""
    out, pos = [], 0
    for count, code in _codes(fmt):
        if code == "s":
            pos += count
            continue
        width = struct.calcsize("<" + code)
        for _ in range(count):
            out.append((pos, width))
            pos += width
    return out


def _codes(fmt: str) -> Iterator[tuple[int, str]]:
    num = ""
    for ch in fmt.lstrip("<"):
        if ch.isdigit():
            num += ch
        else:
            yield (int(num) if num else 1), ch
            num = ""


SB_FIELDS = [(1024 + off, w) for off, w in _fields(d.SUPER_BLOCK.format)] + [(1024 + 128, 8)]
COMPACT_FIELDS = _fields(d.INODE_COMPACT.format)
EXTENDED_FIELDS = _fields(d.INODE_EXTENDED.format)
BOUNDARY_WORDS = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE]


def _boundary(rnd: random.Random, orig: int, width: int) -> int:
    """A boundary value for a field of ``width`` bytes that held ``orig``."""
    top = (1 << (8 * width)) - 1
    value = rnd.choice([
        0, 1, top, top - 1, top >> 1, (top >> 1) + 1, orig - 1, orig + 1, orig * 2, orig >> 1,
        orig ^ (1 << rnd.randrange(8 * width)), rnd.getrandbits(8 * width),
        rnd.choice(BOUNDARY_WORDS),
    ])
    return value & top


def _set_field(out: bytearray, pos: int, width: int, rnd: random.Random) -> str:
    if pos + width > len(out):
        return "skip"
    orig = int.from_bytes(out[pos : pos + width], "little")
    value = _boundary(rnd, orig, width)
    out[pos : pos + width] = value.to_bytes(width, "little")
    return f"{pos}:{width}={value:#x}"


def _flip_bits(out: bytearray, spans: list[tuple[int, int]], rnd: random.Random) -> str:
    for _ in range(rnd.randint(1, 4)):
        if spans:
            start, length = rnd.choice(spans)
            pos = start + rnd.randrange(max(length, 1))
        else:
            pos = rnd.randrange(1024, len(out))
        if pos < len(out):
            out[pos] ^= 1 << rnd.randrange(8)
    return "flips"


def _dirents(out: bytearray, blk: DirBlock) -> list[tuple[int, int]]:
    """(position, nameoff) of the entries of a directory block, as far as they parse."""
    if blk.start + 12 > len(out):
        return []
    (nameoff0,) = struct.unpack_from("<H", out, blk.start + 8)
    count = min(nameoff0 // 12, blk.length // 12)
    return [(blk.start + 12 * k, struct.unpack_from("<H", out, blk.start + 12 * k + 8)[0])
            for k in range(count)]


def _mutate_dirent(out: bytearray, r: Regions, rnd: random.Random, kind: str) -> str:
    if not r.dirs:
        return "skip"
    blk = rnd.choice(r.dirs)
    entries = _dirents(out, blk)
    if not entries:
        return "skip"
    k = rnd.randrange(len(entries))
    pos, nameoff = entries[k]
    if kind == "dirent-nid":
        past = (r.size - r.meta_base) // 32
        target = rnd.choice([
            blk.nid, blk.nid, *blk.ancestors[:3], rnd.choice(r.nids), blk.nid + 1, past,
            past + 1, past - 1, 0, 1 << 53, d.NID_METABOX_BIT | blk.nid, (1 << 64) - 1,
        ])
        struct.pack_into("<Q", out, pos, target)
        return f"entry {k} nid={target}"
    if kind == "dirent-nameoff":
        nxt = entries[k + 1][1] if k + 1 < len(entries) else nameoff
        value = rnd.choice([0, 11, 12, nameoff - 1, nameoff + 1, nxt, blk.length - 1,
                            blk.length, r.block_size, 0xFFFF]) & 0xFFFF
        struct.pack_into("<H", out, pos + 8, value)
        return f"entry {k} nameoff={value}"
    if kind == "dirent-ftype":
        value = rnd.choice([0, 1, 2, 3, 7, 8, 9, 0xFF])
        out[pos + 10] = value
        return f"entry {k} ftype={value}"
    # dirent-name: make the name hostile
    end = entries[k + 1][1] if k + 1 < len(entries) else blk.length
    name_pos = blk.start + nameoff
    if not 0 < nameoff < blk.length or end <= nameoff or name_pos >= len(out):
        return "skip"
    how = rnd.choice(["slash", "nul", "dot", "dotdot", "empty", "slash-only"])
    if how == "empty" and k + 1 < len(entries):
        struct.pack_into("<H", out, entries[k + 1][0] + 8, nameoff)  # next name starts here
    elif how in ("dot", "dotdot", "slash-only"):
        text = {"dot": b".", "dotdot": b"..", "slash-only": b"/"}[how]
        length = min(end, blk.length) - nameoff
        if k + 1 < len(entries) and length > len(text):
            # shorten the name by moving the next one's start: that one gains the bytes
            struct.pack_into("<H", out, entries[k + 1][0] + 8, nameoff + len(text))
        out[name_pos : name_pos + len(text)] = text
        if k + 1 == len(entries) and length > len(text):
            out[name_pos + len(text)] = 0  # the last name ends at a NUL
    else:
        i = name_pos + rnd.randrange(end - nameoff)
        if i < len(out):
            out[i] = ord("/") if how == "slash" else 0
    return f"entry {k} name {how}"


def _mutate_xattr(out: bytearray, r: Regions, rnd: random.Random) -> str:
    if not r.xattrs:
        return "skip"
    start, length = rnd.choice(r.xattrs)
    target = rnd.choice(["shared_count", "shared_id", "entry"])
    if target == "shared_count":
        out[start + 4] = rnd.choice([0, 1, 2, 0x7F, 0x80, 0xFF, out[start + 4] + 1 & 0xFF])
        return f"xattr {start} h_shared_count={out[start + 4]}"
    if target == "shared_id" and out[start + 4]:
        return "xattr shared id " + _set_field(out, start + 12, 4, rnd)
    # the first inline entry after the shared ids: e_name_len, e_name_index, e_value_size
    epos = start + 12 + 4 * out[start + 4]
    if epos + 4 > start + length:
        return _set_field(out, start + 4, 1, rnd)
    which = rnd.choice([(0, 1), (1, 1), (2, 2)])
    return "xattr entry " + _set_field(out, epos + which[0], which[1], rnd)


def _truncate(out: bytearray, r: Regions, rnd: random.Random) -> str:
    size = len(out)
    anchors = [rnd.randrange(1024 + 128, size)]
    anchors += [p for p, _ in rnd.sample(r.inodes, min(3, len(r.inodes)))]
    anchors += [b.start for b in rnd.sample(r.dirs, min(2, len(r.dirs)))]
    anchors += [p for p, _ in rnd.sample(r.zdata, min(2, len(r.zdata)))]
    at = rnd.choice(anchors)
    at = max(1024 + 128, at + rnd.choice([-1, 0, 1, 8, r.block_size // 2]))
    at = min(at, size - 1)
    del out[at:]
    return f"truncate at {at}"


KINDS = [
    "sb-field", "inode-field", "inode-field", "inode-bits", "dir-bits", "dirent-nid",
    "dirent-nid", "dirent-nameoff", "dirent-name", "dirent-name", "dirent-ftype", "xattr-field",
    "xattr-bits", "zindex-bits", "zindex-word", "zdata-bits", "zdata-bytes", "truncate",
    "extend", "random-words", "stack",
]


def apply_mutation(out: bytearray, kind: str, r: Regions, rnd: random.Random) -> str:
    size = len(out)
    if kind == "sb-field":
        pos, width = rnd.choice(SB_FIELDS)
        return _set_field(out, pos, width, rnd)
    if kind == "inode-field" and r.inodes:
        pos, isize = rnd.choice(r.inodes)
        off, width = rnd.choice(COMPACT_FIELDS if isize == 32 else EXTENDED_FIELDS)
        return _set_field(out, pos + off, width, rnd)
    if kind in ("dirent-nid", "dirent-nameoff", "dirent-name", "dirent-ftype"):
        return _mutate_dirent(out, r, rnd, kind)
    if kind == "xattr-field":
        return _mutate_xattr(out, r, rnd)
    if kind == "zindex-word" and r.zindex:
        start, length = rnd.choice(r.zindex)
        pos = (start + rnd.randrange(length)) & ~1
        if pos + 2 <= size:
            value = rnd.choice([0, 1, 0x7FF, 0x800, 0x801, 0xFFFF, 0x8000, 0x3000, 0xC000])
            out[pos : pos + 2] = value.to_bytes(2, "little")
        return f"zindex word at {pos}"
    if kind == "zdata-bytes" and r.zdata:
        start, length = rnd.choice(r.zdata)
        pos = start + rnd.randrange(length)
        n = rnd.choice([1, 4, 16, 64])
        fill = rnd.choice([b"\0", b"\xff", bytes([rnd.getrandbits(8)])])
        out[pos : pos + n] = (fill * n)[: max(0, min(n, size - pos))]
        return f"zdata {n} bytes at {pos}"
    if kind == "truncate":
        return _truncate(out, r, rnd)
    if kind == "extend":
        n = rnd.choice([1, 511, 4096, 65536])
        out += bytes(n)
        return f"extend {n}"
    if kind == "random-words":
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randrange(1024, size - 4)
            out[pos : pos + 4] = rnd.choice(BOUNDARY_WORDS + [rnd.getrandbits(32)]).to_bytes(4, "little")
        return "words"
    spans = {
        "inode-bits": [(p, n) for p, n in r.inodes], "dir-bits": [(b.start, b.length) for b in r.dirs],
        "xattr-bits": r.xattrs, "zindex-bits": r.zindex, "zdata-bits": r.zdata,
    }.get(kind, [])
    return _flip_bits(out, spans, rnd)


def mutate(data: bytes, regions: Regions, rnd: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    kind = rnd.choice(KINDS)
    if kind == "stack":
        kinds = [rnd.choice(KINDS[:-1]) for _ in range(rnd.randint(2, 3))]
        # cutting the file last keeps the other mutations in range
        kinds.sort(key=lambda k: k == "truncate")
        for k in kinds:
            apply_mutation(out, k, regions, rnd)
        kind = "stack:" + "+".join(kinds)
    else:
        apply_mutation(out, kind, regions, rnd)
    # usually keep the checksum right, so mutants get past it; sometimes test the check itself
    if rnd.random() < 0.9:
        reseal(out)
    return bytes(out), kind


class Corpus:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.data = {n: (CORPUS / n).read_bytes() for n in names}
        self.regions = {n: find_regions(str(CORPUS / n)) for n in names}

    def mutant(self, seed: int, index: int) -> tuple[str, str, bytes]:
        rnd = random.Random(f"{seed}:{index}")
        name = rnd.choice(self.names)
        data, kind = mutate(self.data[name], self.regions[name], rnd)
        return name, kind, data


def stack_for(name: str, mutant_path: str) -> list[str]:
    """The layers to mount, bottom to top, with the mutant in its place."""
    if name not in PARTNERS:
        return [mutant_path]
    partner, mutant_on_top = PARTNERS[name]
    other = str(CORPUS / partner)
    return [other, mutant_path] if mutant_on_top else [mutant_path, other]
