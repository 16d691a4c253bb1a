#!/usr/bin/env python3
"""Mutation fuzzing of the EROFS reader (``--mode lib``), of the mounted daemon (``--mode mount``)
and of the tar converter (``--mode convert``).

Mutants are made from real fixture images, deterministically from ``(seed, index)`` (the same
pair always gives the same bytes, whatever ran before it), aimed at the structures the reader
parses, found by parsing the intact original with the library: superblock fields, inode fields,
inline xattr regions, directory blocks (entry nids pointing at themselves, their ancestors, the
middle of an inode or past the end; name offsets; names made '/', NUL, '.', '..' or empty; file
types), compression indexes and compressed data; plus truncation, extension, random words and
stacks of several mutations. Numeric fields are set to 0, their maximum, the original +-1 and
other boundaries.

Each mutant is opened and everything in it is walked and read:

- ``lib``: in a worker process, through ``Image`` (walk, read, readlink, xattrs, path lookup),
  through ``MergedTree`` (the daemon's code path) and, every ``--extract-every`` mutants,
  through ``extract`` into a sandbox that must hold nothing else afterwards.
- ``mount``: a worker process that has imported the daemon forks one erofs-fuse daemon per
  mutant (``mount -f``, the real entry point, so no interpreter start per mutant), waits for the
  mount, walks it (scandir, lstat, listxattr, getxattr, readlink, open and read every file),
  stops the daemon with SIGTERM and checks that it unmounted and exited 0. A watchdog thread
  ends a stuck FUSE connection when one operation exceeds ``--timeout``: the daemon's Python
  stack is dumped to its log (SIGUSR1/faulthandler), the connection aborted
  (``/sys/fs/fuse/connections/N/abort``, if fusectl is mounted) and the daemon killed.
  Layers named ``layer-*`` are mounted over (or under) their intact partner, so that the merge
  code sees hostile whiteouts and opaque directories.

Recorded per mutant: ``ok`` (opened, read, errors only from the project's error family, i.e.
``ErofsError`` in lib mode, errnos in mount mode), ``refused`` (the image was rejected when
opened: ``ErofsError`` or ``erofs-fuse mount`` exiting 2 with one line), ``crash`` (any other
exception, a dead worker, a daemon that exited or logged an internal error or a traceback, an
unclean unmount), ``hang`` (one operation over ``--timeout`` seconds). Peak RSS is the worker's
(lib) or each daemon's ``VmHWM`` (mount). Exit status 1 on any crash or hang.

``convert`` (``scripts/fuzz_convert.py``; mutations in ``fuzz_tar.py``, seed tars in
``fuzz_tar_seeds.py``): mutated layer tars (headers, sizes, PAX records, sparse maps, members,
gzip and zstd bytes) through ``convert_tar`` in every mode (full, tar-index, lz4, OCI
whiteouts), each in a forked child with ``--timeout`` and ``--memory``; the image written must
read back (our reader; every ``--kernel-every``-th mutant the kernel too), an ``MkfsError`` must
be one line and leave nothing behind. Besides ``crash`` and ``hang`` it records ``memory``,
``bad-image``, ``differs``, ``leftover`` and ``bad-message`` (all bugs; exit status 1), and
``split`` (some modes refused, some did not). Inputs that found a bug are saved to
``--crashes DIR``.

``EROFS_FUSE_STRICT=1`` is set, so the reader's safety net (turning stray ``IndexError`` and
the like into ``CorruptImageError``) does not hide bugs from the fuzzer.

    scripts/fuzz.py --mode lib --count 10000 --seed 1 --jobs 2
    scripts/fuzz.py --mode mount --count 10000 --seed 1 --jobs 2 --every 2
    scripts/fuzz.py --mode mount --only 1234 --save /tmp        # reproduce one mutant
    scripts/fuzz.py --mode convert --count 10000 --seed 1 --crashes /tmp/crashes
    scripts/fuzz.py --mode convert --only 1234 --save /tmp      # the mutant tar, to convert
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import hashlib
import json
import logging
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Coroutine, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# stray exceptions (IndexError, struct.error, ...) are bugs to find, not to hide
os.environ["EROFS_FUSE_STRICT"] = "1"

from erofs_fuse.erofs import ondisk as d  # noqa: E402
from erofs_fuse.erofs.errors import ErofsError  # noqa: E402
from erofs_fuse.erofs.extent import Source  # noqa: E402
from erofs_fuse.erofs.image import Image, Inode  # noqa: E402
from erofs_fuse.erofs.superblock import crc32c_raw  # noqa: E402

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
READ_CAP = 64 << 20  # bytes read per mutant at most: a mutant may claim huge (sparse) files
FILE_CAP = 16 << 20  # ... and per file
ENTRY_CAP = 20000  # directory entries visited per mutant at most
CHUNK = 1 << 20
MUTANT_BUDGET = 240.0  # seconds a whole mutant may take before the worker is killed (a hang)
# what a mutant's status may be that is a bug (convert mode has more than crashes and hangs)
BUG_STATUSES = ("crash", "hang", "memory", "bad-image", "differs", "leftover", "bad-message")


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


# injected faults: prove that the harness sees crashes and hangs --------------------------------
def inject(fault: str | None) -> None:
    if not fault:
        return
    original = Image._read_data

    def faulty(self: Image, inode: Inode, offset: int, length: int, *, packed: bool = False) -> bytes:
        if inode.is_reg and inode.size > 4096 and offset == 0:
            if fault == "crash":
                raise IndexError("injected fault")
            if fault == "exit":
                os._exit(1)
            time.sleep(3600)
        return original(self, inode, offset, length, packed=packed)

    Image._read_data = faulty  # type: ignore[method-assign]


# library mode ---------------------------------------------------------------------------------
class Timer:
    """Times single operations; a watchdog thread dumps the stack of one that runs too long."""

    def __init__(self, timeout: float, dump: object, on_hang: Callable[[str], None]) -> None:
        self.timeout = timeout
        self.dump = dump
        self.on_hang = on_hang
        self.slowest = 0.0
        self.slowest_op = ""
        self.errors = 0
        self._op_start: float | None = None
        self._op = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            start = self._op_start
            if start is not None and time.monotonic() - start > self.timeout:
                faulthandler.dump_traceback(file=self.dump, all_threads=True)  # type: ignore[arg-type]
                self.on_hang(f"{self._op}: over {self.timeout:g} s")  # does not return

    def close(self) -> None:
        self._done.set()
        self._thread.join()

    def run(self, what: str, fn: Callable[[], object]) -> object:
        self._op = what
        start = self._op_start = time.monotonic()
        try:
            return fn()
        except ErofsError:
            self.errors += 1
            return None
        finally:
            self._op_start = None
            took = time.monotonic() - start
            if took > self.slowest:
                self.slowest, self.slowest_op = took, what


def lib_read_everything(image: Image, timer: Timer) -> None:
    """Walk the image and read everything through the library."""
    budget = [READ_CAP]

    def read_all(node: Inode) -> None:
        want = min(node.size, FILE_CAP, budget[0])
        budget[0] -= want
        pos = 0
        while pos < want:
            chunk = node.read(pos, min(CHUNK, want - pos))
            if not chunk:
                break
            pos += len(chunk)

    walker = image.walk()
    paths: list[bytes] = []
    for _ in range(ENTRY_CAP):
        item = timer.run("walk", lambda: next(walker, None))
        if item is None:
            break
        path, node = item  # type: ignore[misc]
        paths.append(path)
        if node.is_reg:
            timer.run(f"read {path!r}", lambda node=node: read_all(node))
        elif node.is_symlink:
            timer.run(f"readlink {path!r}", node.readlink)
        timer.run(f"xattrs {path!r}", node.xattrs)
    for path in paths[:: max(1, len(paths) // 100)]:  # lookups of ~100 paths
        timer.run(f"lookup {path!r}", lambda path=path: image.lookup(path))


def _drive(coro: Coroutine[object, object, object]) -> object:
    """Run a coroutine that never suspends (the FUSE handlers over an in-memory tree)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the handler suspended")


def lib_merged(images: list[Image], timer: Timer) -> None:
    """The daemon's code path: merged listings, lookups, reads, readlink, xattrs, and the FUSE
    attributes and statfs replies made from them (in-process, no mount)."""
    import pyfuse3

    from erofs_fuse.fuse.operations import Operations
    from erofs_fuse.fuse.overlay import MergedTree, Node

    tree = MergedTree(images)
    ops = Operations(tree)
    try:
        _drive(ops.statfs())
    except pyfuse3.FUSEError:
        timer.errors += 1
    budget = READ_CAP
    visited = 0
    seen = {tree.root.ino}
    stack: list[Node] = [tree.root]
    while stack and visited < ENTRY_CAP:
        parent = stack.pop()
        listing = timer.run(f"merged listdir {parent.ino}", lambda parent=parent: tree.listdir(parent))
        for name, node in listing.entries if listing is not None else ():  # type: ignore[attr-defined]
            visited += 1
            timer.run(f"merged lookup {name!r}",
                      lambda name=name, parent=parent: tree.lookup(parent, name))
            timer.run(f"attributes {name!r}", lambda node=node: ops.attributes(node))
            if node.is_dir and node.ino not in seen:
                seen.add(node.ino)
                stack.append(node)
            elif node.inode.is_reg and budget > 0:
                want = min(node.inode.size, 1 << 20, budget)
                budget -= want
                timer.run(f"merged read {name!r}", lambda node=node, want=want: tree.read(node, 0, want))
            elif node.inode.is_symlink:
                timer.run(f"merged readlink {name!r}", lambda node=node: tree.readlink(node))
            timer.run(f"merged xattrs {name!r}", lambda node=node: tree.listxattr(node))


def lib_extract(image: Image, workdir: str, timer: Timer) -> str | None:
    """Extract into a sandbox; a problem description if anything landed outside it."""
    from erofs_fuse.cli.extract import Extractor

    box = os.path.join(workdir, "box")
    shutil.rmtree(box, ignore_errors=True)
    dest = os.path.join(box, "dest")
    os.makedirs(dest)

    def run() -> None:
        try:
            Extractor(image, owners=False, xattrs=False).extract(dest)
        except OSError:
            timer.errors += 1  # e.g. two entries of one name: refused by O_EXCL, reported

    timer.run("extract", run)
    escaped = sorted(set(os.listdir(box)) - {"dest"})
    shutil.rmtree(box, ignore_errors=True)
    return f"extract wrote outside the destination: {escaped}" if escaped else None


class InternalErrors(logging.Handler):
    """Collects the FUSE layer's "internal error" log records (a bug behind an EIO)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "internal error" in record.getMessage():
            self.seen.append(self.format(record)[-2000:])


INTERNAL = InternalErrors()


def run_lib_mutant(path: str, name: str, index: int, args: argparse.Namespace, workdir: str,
                   dump: object, on_hang: Callable[[str], None]) -> dict[str, object]:
    start = time.monotonic()
    INTERNAL.seen.clear()
    timer = Timer(args.timeout, dump, on_hang)
    result: dict[str, object] = {"status": "ok"}
    images: list[Image] = []
    try:
        image = Image.open(path)
        images.append(image)
        lib_read_everything(image, timer)
        stack = [Image.open(p) if p != path else image for p in stack_for(name, path)]
        images += [im for im in stack if im is not image]
        lib_merged(stack, timer)
        if args.extract_every and index % args.extract_every == 0:
            problem = lib_extract(image, workdir, timer)
            if problem:
                result.update(status="crash", error=problem)
        result.update(errors=timer.errors, slowest=round(timer.slowest, 3))
        if INTERNAL.seen:
            result.update(status="crash", error="internal error in a FUSE handler",
                          trace=INTERNAL.seen[0])
        if timer.slowest > args.timeout:
            result.update(status="hang", error=f"{timer.slowest_op}: {timer.slowest:.1f} s")
    except ErofsError as exc:
        result.update(status="refused", error=str(exc)[:200])
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer is looking for
        result.update(status="crash", error=f"{type(exc).__name__}: {exc}"[:300],
                      trace=traceback.format_exc()[-3000:])
    finally:
        timer.close()
        for im in images:
            im.close()
    result["seconds"] = round(time.monotonic() - start, 3)
    result["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result


# mount mode -----------------------------------------------------------------------------------
def mount_info(path: str) -> tuple[int, str] | None:
    """(FUSE connection number, filesystem type) of the mount at ``path``, or None.

    Read from mountinfo: touching a hung FUSE mountpoint would hang the caller."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == path:
                major, minor = (int(x) for x in fields[2].split(":"))
                fstype = line.partition(" - ")[2].split(" ", 1)[0]
                return (major << 20) | minor, fstype
    return None


def abort_connection(conn: int) -> None:
    try:
        with open(f"/sys/fs/fuse/connections/{conn}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass


def force_unmount(mnt: str) -> None:
    for _ in range(3):
        info = mount_info(mnt)
        if info is None:
            return
        if info[1].startswith("fuse"):
            abort_connection(info[0])
        subprocess.run(["umount", "-l", mnt], capture_output=True)


class Watchdog(threading.Thread):
    """Aborts the FUSE connection when one operation of the walker runs over ``timeout``."""

    def __init__(self, conn: int, timeout: float, daemon_pid: int) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.timeout = timeout
        self.daemon_pid = daemon_pid
        self.op: str | None = None
        self.op_start = 0.0
        self.fired: str | None = None
        self.rss_kb = 0
        self._halt = threading.Event()

    def begin(self, what: str) -> None:
        self.op_start = time.monotonic()
        self.op = what

    def end(self) -> None:
        self.op = None

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            op = self.op
            if op is not None and time.monotonic() - self.op_start > self.timeout:
                self.fired = f"{op}: over {self.timeout:g} s"
                self.rss_kb = _vm_hwm_kb(self.daemon_pid)
                with_pid(self.daemon_pid, signal.SIGUSR1)  # its Python stack, into its log
                time.sleep(0.3)
                # the blocked request fails at once: through the control filesystem if it is
                # mounted (it is not mounted here, to leave the machine as it was), and anyway
                # when the (stuck) daemon dies, since it holds the only /dev/fuse descriptor
                abort_connection(self.conn)
                with_pid(self.daemon_pid, signal.SIGKILL)
                return


def with_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class MountWalk:
    """Walk and read a mounted tree; every single operation timed by the watchdog."""

    def __init__(self, mnt: str, dog: Watchdog) -> None:
        self.mnt = mnt
        self.dog = dog
        self.errnos: dict[str, int] = {}
        self.entries = 0
        self.bytes = 0
        self.slowest = 0.0

    def op(self, what: str, fn: Callable[[], object]) -> object:
        if self.dog.fired:
            raise TimeoutError(self.dog.fired)
        self.dog.begin(what)
        start = time.monotonic()
        try:
            return fn()
        except OSError as exc:
            if self.dog.fired:
                raise TimeoutError(self.dog.fired) from exc
            key = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.errnos[key] = self.errnos.get(key, 0) + 1
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                raise ConnectionError("the daemon went away") from exc
            return None
        finally:
            self.dog.end()
            self.slowest = max(self.slowest, time.monotonic() - start)

    def run(self) -> None:
        budget = READ_CAP
        self.op("statvfs", lambda: os.statvfs(self.mnt))
        stack = [self.mnt]
        while stack and self.entries < ENTRY_CAP:
            top = stack.pop()
            listing = self.op(f"scandir {top}", lambda top=top: [e.path for e in os.scandir(top)])
            for path in listing or []:  # type: ignore[attr-defined]
                self.entries += 1
                st = self.op(f"lstat {path}", lambda path=path: os.lstat(path))
                names = self.op(f"listxattr {path}",
                                lambda path=path: os.listxattr(path, follow_symlinks=False))
                for xname in (names or [])[:16]:  # type: ignore[index]
                    self.op(f"getxattr {path} {xname}",
                            lambda path=path, xname=xname: os.getxattr(path, xname, follow_symlinks=False))
                if st is None:
                    continue
                mode = st.st_mode  # type: ignore[attr-defined]
                if (mode & 0o170000) == 0o040000:
                    stack.append(path)
                elif (mode & 0o170000) == 0o120000:
                    self.op(f"readlink {path}", lambda path=path: os.readlink(path))
                elif (mode & 0o170000) == 0o100000 and budget > 0:
                    budget -= self.read_file(path, min(FILE_CAP, budget))

    def read_file(self, path: str, cap: int) -> int:
        fd = self.op(f"open {path}", lambda: os.open(path, os.O_RDONLY | os.O_NOFOLLOW))
        if fd is None:
            return 0
        got = 0
        try:
            while got < cap:
                chunk = self.op(f"read {path} at {got}",
                                lambda: os.pread(fd, min(CHUNK, cap - got), got))  # type: ignore[arg-type]
                if not chunk:
                    break
                got += len(chunk)  # type: ignore[arg-type]
        finally:
            self.op(f"close {path}", lambda: os.close(fd))  # type: ignore[arg-type]
        self.bytes += got
        return got


def _daemon_child(layers: list[str], mnt: str, log_path: str) -> None:
    """In the forked child: become the erofs-fuse daemon (foreground), never return."""
    code = 70
    try:
        logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(logfd, 2)
        os.close(null)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        faulthandler.enable(file=sys.stderr)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        from erofs_fuse.cli.mount import main as mount_main

        code = mount_main(["-f", "--layers", ",".join(layers), mnt])
    except BaseException:  # noqa: BLE001 - report whatever it was in the log, as a crash
        traceback.print_exc()
        code = 71
    finally:
        sys.stderr.flush()
        os._exit(code)


def _reap(pid: int, wait: float) -> int | None:
    """The exit status of ``pid`` if it ends within ``wait`` seconds (None: still running)."""
    deadline = time.monotonic() + wait
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


CRASH_MARKS = ("internal error", "Traceback", "Fatal Python error", "CRITICAL")


def run_mount_mutant(path: str, name: str, args: argparse.Namespace, workdir: str) -> dict[str, object]:
    """Mount the mutant with erofs-fuse, walk and read it, unmount; record the daemon's fate."""
    mnt = os.path.join(workdir, "mnt")
    log_path = os.path.join(workdir, "daemon.log")
    os.makedirs(mnt, exist_ok=True)
    start = time.monotonic()
    result: dict[str, object] = {"status": "ok"}
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _daemon_child(stack_for(name, path), mnt, log_path)
    status: int | None = None
    conn = -1
    try:
        deadline = time.monotonic() + 10 + args.timeout
        while True:
            info = mount_info(mnt)
            if info is not None:
                conn = info[0]
                break
            status = _reap(pid, 0)
            if status is not None:
                code = os.waitstatus_to_exitcode(status)
                text = _read_log(log_path)
                clean = code == 2 and not any(m in text for m in CRASH_MARKS)
                result.update(status="refused" if clean else "crash", exit=code,
                              error=text[-600:] if not clean else text.strip()[-200:])
                return result
            if time.monotonic() > deadline:
                with_pid(pid, signal.SIGUSR1)
                time.sleep(0.2)
                result.update(status="hang", error="the mount did not come up",
                              log=_read_log(log_path)[-3000:])
                return result
            time.sleep(0.005)
        dog = Watchdog(conn, args.timeout, pid)
        dog.start()
        walk = MountWalk(mnt, dog)
        try:
            walk.run()
        except TimeoutError as exc:
            result.update(status="hang", error=str(exc))
        except ConnectionError as exc:
            result.update(status="crash", error=str(exc))
        finally:
            dog.stop()
        result.update(entries=walk.entries, bytes=walk.bytes, errnos=walk.errnos,
                      slowest=round(walk.slowest, 3))
        result["rss_kb"] = _vm_hwm_kb(pid) or dog.rss_kb
        if result["status"] == "ok":
            status = _reap(pid, 0)
            if status is not None:
                result.update(status="crash", error="the daemon exited while mounted",
                              exit=os.waitstatus_to_exitcode(status))
        if result["status"] == "ok":
            # SIGTERM must unmount and end the daemon with status 0
            os.kill(pid, signal.SIGTERM)
            status = _reap(pid, max(args.timeout, 5))
            if status is None:
                with_pid(pid, signal.SIGUSR1)
                time.sleep(0.2)
                result.update(status="hang", error="SIGTERM did not end the daemon")
            elif os.waitstatus_to_exitcode(status) != 0:
                result.update(status="crash", exit=os.waitstatus_to_exitcode(status),
                              error="the daemon's exit status after SIGTERM")
            elif mount_info(mnt) is not None:
                result.update(status="crash", error="still mounted after SIGTERM")
    finally:
        if status is None:
            with_pid(pid, signal.SIGKILL)
            status = _reap(pid, 30)
        force_unmount(mnt)
        text = _read_log(log_path)
        if result["status"] == "ok" and any(m in text for m in CRASH_MARKS):
            result.update(status="crash", error="the daemon logged an internal error")
        if result["status"] in ("crash", "hang") and "log" not in result:
            result["log"] = text[-4000:]
    result["seconds"] = round(time.monotonic() - start, 3)
    return result


def _read_log(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# workers and the coordinator ------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    """Reads mutant indexes on stdin, answers one JSON line each."""
    if args.mode == "convert":
        import fuzz_convert

        return fuzz_convert.worker(args)
    corpus = Corpus(args.images)
    inject(args.inject)
    workdir = args.workdir
    path = os.path.join(workdir, "mutant.erofs")
    dump = open(os.path.join(workdir, "stack.txt"), "w+")
    if args.mode == "mount":
        import erofs_fuse.cli.mount  # noqa: F401 - imported once, forked per mutant
    else:
        logging.getLogger("erofs_fuse").addHandler(INTERNAL)
        logging.getLogger("erofs_fuse").propagate = False
    print("ready", flush=True)
    for line in sys.stdin:
        index = int(line)
        name, kind, data = corpus.mutant(args.seed, index)
        with open(path, "wb") as f:
            f.write(data)
        dump.seek(0)
        dump.truncate()
        about = {"index": index, "image": name, "kind": kind,
                 "sha": hashlib.sha256(data).hexdigest()[:16]}

        def on_hang(what: str, about: dict[str, object] = about) -> None:
            # the operation cannot be interrupted: report it and end this worker
            dump.flush()
            dump.seek(0)
            record = {"status": "hang", "error": what, "stack": dump.read()[-4000:],
                      "fatal": True, **about}
            print(json.dumps(record), flush=True)
            os._exit(3)

        if args.mode == "lib":
            result = run_lib_mutant(path, name, index, args, workdir, dump, on_hang)
        else:
            result = run_mount_mutant(path, name, args, workdir)
        result.update(about)
        print(json.dumps(result), flush=True)
    return 0


class Worker:
    def __init__(self, args: argparse.Namespace, number: int, base: str) -> None:
        self.workdir = os.path.join(base, f"w{number}")
        os.makedirs(self.workdir, exist_ok=True)
        cmd = [sys.executable, __file__, "--worker", "--mode", args.mode, "--seed", str(args.seed),
               "--timeout", str(args.timeout), "--extract-every", str(args.extract_every),
               "--workdir", self.workdir, "--images", *args.images]
        if args.mode == "convert":
            cmd += ["--memory", str(args.memory), "--kernel-every", str(args.kernel_every)]
            cmd += ["--tars", *args.tars] if args.tars else []
            cmd += ["--crashes", os.path.abspath(args.crashes)] if args.crashes else []
        if args.inject:
            cmd += ["--inject", args.inject]
        # a session of its own: killing it takes any daemon it forked along
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.index: int | None = None
        self.started = 0.0

    def send(self, index: int) -> None:
        assert self.proc.stdin is not None
        self.index = index
        self.started = time.monotonic()
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        force_unmount(os.path.join(self.workdir, "mnt"))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def selected(args: argparse.Namespace) -> Iterator[int]:
    if args.only is not None:
        yield args.only
        return
    yield from range(args.start, args.start + args.count, args.every)


# Seconds between progress lines: a run as docs/hostile-input.md gives it takes 10-15 minutes,
# and was silent throughout.
PROGRESS_EVERY = 10.0


def progress_line(done: int, total: int, counts: dict[str, int], peak_rss_kb: int,
                  elapsed: float) -> str:
    left = elapsed / done * (total - done) if done else 0.0
    return (f"{done}/{total} mutants ({100 * done // max(total, 1)}%), "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + f"; peak RSS {peak_rss_kb / 1024:.1f} MB; {elapsed:.0f} s, about {left:.0f} s left")


def run(args: argparse.Namespace) -> dict[str, object]:
    total = sum(1 for _ in selected(args))
    indexes = selected(args)
    base = tempfile.mkdtemp(prefix="erofs-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    counts: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    by_mode: dict[str, dict[str, int]] = {}
    splits: list[dict[str, object]] = []  # convert mode: some modes converted, some refused
    kernel_checks = 0  # convert mode: images mounted by the kernel and compared
    findings: list[dict[str, object]] = []
    peak_rss = 0
    done = 0
    started = time.monotonic()
    workers = [Worker(args, k, base) for k in range(args.jobs)]
    busy = {w: False for w in workers}
    last_report = started

    def feed(w: Worker) -> None:
        index = next(indexes, None)
        if index is None:
            busy[w] = False
        else:
            w.send(index)
            busy[w] = True

    def replace(w: Worker) -> Worker:
        w.kill()
        k = workers.index(w)
        workers[k] = nw = Worker(args, k, base)
        del busy[w]
        busy[nw] = False
        return nw

    try:
        for w in workers:
            feed(w)
        while any(busy.values()):
            ready, _, _ = select.select([w.proc.stdout for w in workers if busy[w]], [], [], 0.5)
            for w in list(workers):
                if not busy[w]:
                    continue
                if w.proc.stdout in ready:
                    line = w.proc.stdout.readline() if w.proc.stdout else ""
                    if not line:  # the worker died: a crash of the interpreter itself
                        rec: dict[str, object] = {"index": w.index, "status": "crash",
                                                  "error": "worker died"}
                        w = replace(w)
                    else:
                        rec = json.loads(line)
                        if rec.get("fatal"):  # the worker reported a hang and ended
                            w = replace(w)
                elif time.monotonic() - w.started > MUTANT_BUDGET:
                    rec = {"index": w.index, "status": "hang",
                           "seconds": round(time.monotonic() - w.started, 1),
                           "error": "the whole mutant ran over its budget",
                           "stack": _read_log(os.path.join(w.workdir, "stack.txt"))[-3000:]}
                    w = replace(w)
                else:
                    continue
                status = str(rec["status"])
                counts[status] = counts.get(status, 0) + 1
                kind = str(rec.get("kind", "?")).split(":")[0]
                per_kind = kinds.setdefault(kind, {})
                per_kind[status] = per_kind.get(status, 0) + 1
                kernel_checks += 1 if rec.get("kernel") else 0
                for mode, mode_status in dict(rec.get("modes") or {}).items():
                    per_mode = by_mode.setdefault(mode, {})
                    per_mode[mode_status] = per_mode.get(mode_status, 0) + 1
                peak_rss = max(peak_rss, int(rec.get("rss_kb", 0) or 0))
                if status in BUG_STATUSES:
                    findings.append(rec)
                    print(json.dumps(rec), file=sys.stderr, flush=True)
                elif status == "split":
                    splits.append({k: rec.get(k) for k in ("index", "kind", "modes", "refusal")})
                done += 1
                now = time.monotonic()
                if args.progress and (now - last_report > PROGRESS_EVERY or done == total):
                    last_report = now
                    print(progress_line(done, total, counts, peak_rss, now - started),
                          file=sys.stderr, flush=True)
                feed(w)
    finally:
        for w in workers:
            if busy.get(w):
                w.kill()
            else:
                w.close()
        shutil.rmtree(base, ignore_errors=True)
    return {
        "mode": args.mode, "seed": args.seed, "start": args.start, "count": args.count,
        "every": args.every, "mutants": done, "counts": counts, "by_kind": kinds,
        "crashes": counts.get("crash", 0), "hangs": counts.get("hang", 0),
        "bugs": sum(counts.get(s, 0) for s in BUG_STATUSES),
        **({"by_mode": by_mode, "kernel_checks": kernel_checks} if args.mode == "convert" else {}),
        "peak_rss_mb": round(peak_rss / 1024, 1), "seconds": round(time.monotonic() - started, 1),
        "findings": findings[:100], **({"splits": splits[:100]} if splits else {}),
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="indexes start..start+count-1")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="run every k-th index only")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--mode", choices=["lib", "mount", "convert"], default="lib")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds one operation (convert: one conversion) may take")
    parser.add_argument("--extract-every", type=int, default=10,
                        help="lib mode: extract every k-th mutant into a sandbox (0: never)")
    parser.add_argument("--images", nargs="+", default=DEFAULT_IMAGES)
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB",
                        help="convert mode: address space of one conversion (RLIMIT_AS)")
    parser.add_argument("--kernel-every", type=int, default=20, metavar="K",
                        help="convert mode: mount every k-th mutant's image with the kernel "
                        "(0: never; needs root)")
    parser.add_argument("--tars", nargs="+", metavar="NAME",
                        help="convert mode: the seed tars to mutate (default: all of "
                        "scripts/fuzz_tar_seeds.py's SEEDS)")
    parser.add_argument("--crashes", metavar="DIR",
                        help="convert mode: save the inputs that found a bug here")
    parser.add_argument("--only", type=int, help="run just this mutant index")
    parser.add_argument("--save", metavar="DIR", help="with --only: write the mutant image here")
    parser.add_argument("--json", metavar="FILE", help="write the summary (with findings) here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help=f"a progress line on stderr every {PROGRESS_EVERY:.0f} s and at "
                        "the end (default; --no-progress for none)")
    parser.add_argument("--inject", help=argparse.SUPPRESS, choices=[
        "crash", "exit", "hang", "memory", "leftover", "message", "image"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    # stopped by a signal (SIGINT is ignored in background jobs): kill the workers and their
    # daemons, unmount, then exit
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if args.mode == "mount":
        assert os.geteuid() == 0, "mount mode needs root (FUSE mounts, connection aborts)"
        assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    if args.only is not None and args.save and args.mode == "convert":
        import fuzz_convert

        print(fuzz_convert.save(args, args.save))
    elif args.only is not None and args.save:
        name, kind, data = Corpus(args.images).mutant(args.seed, args.only)
        out = Path(args.save) / f"mutant-{args.seed}-{args.only}-{name}"
        out.write_bytes(data)
        print(f"{out} ({kind})")
    summary = run(args)
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("findings", "by_kind", "splits")}))
    return 1 if summary["bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
