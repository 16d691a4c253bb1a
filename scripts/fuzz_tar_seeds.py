"""Seed layer tars for ``scripts/fuzz.py --mode convert``, and the tar headers they are made of.

Built in-process, deterministically: with Python's ``tarfile`` (ustar, GNU, PAX: long names,
PAX records, devices, hard and symbolic links, whiteouts) and, where ``tarfile`` writes nothing
of the kind, header by header (global PAX headers, old-style and contiguous regular files,
``LIBARCHIVE.xattr``, binary xattr values, GNU long names and dump directories, data after a
hard link, old GNU sparse ``S`` members with extension blocks, PAX sparse 0.0, 0.1 and 1.0).
Unmutated, every seed converts in every mode without a warning (``tests/test_fuzz.py``).
"""

from __future__ import annotations

import base64
import io
import random
import tarfile
from typing import Callable

BLOCK = 512
GNU_MAGIC = b"ustar  \0"
USTAR_MAGIC = b"ustar\x0000"
MTIME = 1_600_000_000


# writing headers ------------------------------------------------------------------------------
def octal(value: int, width: int) -> bytes:
    """A NUL-terminated octal field, or GNU base-256 when the value does not fit."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    return base256(value, width)


def base256(value: int, width: int) -> bytes:
    if value < 0:
        return (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
    return b"\x80" + (value & ((1 << (8 * (width - 1))) - 1)).to_bytes(width - 1, "big")


def fix_checksum(block: bytearray, at: int = 0) -> None:
    block[at + 148 : at + 156] = b" " * 8
    block[at + 148 : at + 156] = b"%06o\0 " % sum(block[at : at + BLOCK])


def header(name: bytes, kind: bytes, size: int = 0, *, mode: int = 0o644, uid: int = 0,
           gid: int = 0, mtime: int = MTIME, linkname: bytes = b"", magic: bytes = USTAR_MAGIC,
           devmajor: int = 0, devminor: int = 0, extra: dict[int, bytes] | None = None) -> bytearray:
    h = bytearray(BLOCK)
    h[0 : len(name[:100])] = name[:100]
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(uid, 8)
    h[116:124] = octal(gid, 8)
    h[124:136] = octal(size, 12)
    h[136:148] = octal(mtime, 12)
    h[156:157] = kind
    h[157 : 157 + len(linkname[:100])] = linkname[:100]
    h[257:265] = magic.ljust(8, b"\0")
    if magic:
        h[329:337] = octal(devmajor, 8)
        h[337:345] = octal(devminor, 8)
    for at, raw in (extra or {}).items():
        h[at : at + len(raw)] = raw
    fix_checksum(h)
    return h


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax_member(records: list[tuple[bytes, bytes]], kind: bytes = b"x",
               name: bytes = b"PaxHeaders/entry") -> bytes:
    data = b"".join(pax_record(k, v) for k, v in records)
    return bytes(header(name, kind, len(data))) + padded(data)


def member(name: bytes, kind: bytes = b"0", data: bytes = b"", **kw: object) -> bytes:
    return bytes(header(name, kind, len(data), **kw)) + padded(data)  # type: ignore[arg-type]


END = bytes(2 * BLOCK)


def _data(n: int, salt: int) -> bytes:
    """Deterministic file bytes: text-like (compressible) for even salts, random for odd."""
    if salt % 2:
        return random.Random(salt).randbytes(n)
    line = b"line %d of a compressible file, salt %d\n"
    out = b"".join(line % (k, salt) for k in range(n // 30 + 1))
    return out[:n]


# seeds made with tarfile ----------------------------------------------------------------------
class _Tar:
    def __init__(self, fmt: int) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt, encoding="utf-8",
                                errors="surrogateescape")

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *,
            mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: float = MTIME,
            linkname: str = "", dev: tuple[int, int] = (0, 0),
            pax: dict[str, str] | None = None) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
        info.linkname = linkname
        info.devmajor, info.devminor = dev
        info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        if pax:
            info.pax_headers = dict(pax)
        self.tar.addfile(info, io.BytesIO(data) if info.size else None)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def _common(t: _Tar, long_ok: bool) -> None:
    t.add("./", tarfile.DIRTYPE, mode=0o755)
    t.add("etc", tarfile.DIRTYPE, mode=0o755)
    t.add("etc/hostname", data=b"fuzz\n")
    for k, n in enumerate((0, 1, 511, 512, 4095, 4096, 4097, 9000)):
        t.add(f"data/f{n}", data=_data(n, k), mode=0o600 if k % 2 else 0o755, uid=k, gid=2 * k)
    t.add("data/link", tarfile.SYMTYPE, linkname="f4096", mode=0o777)
    t.add("data/hard", tarfile.LNKTYPE, linkname="data/f1")
    t.add("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    t.add("dev/sda1", tarfile.BLKTYPE, mode=0o660, dev=(8, 1))
    t.add("run/fifo", tarfile.FIFOTYPE, mode=0o600)
    t.add("opt/sticky", tarfile.DIRTYPE, mode=0o1777)
    t.add("usr/bin/suid", data=b"#!/bin/sh\n", mode=0o4755)
    if long_ok:
        deep = "/".join(["component-%02d" % k for k in range(12)])
        t.add(deep + "/" + "n" * 200, data=b"deep and long\n")
        t.add("data/longlink", tarfile.SYMTYPE, linkname="/" + "t" * 300)
        t.add("data/" + "h" * 150, tarfile.LNKTYPE, linkname="data/f511")


def seed_pax() -> bytes:
    t = _Tar(tarfile.PAX_FORMAT)
    _common(t, True)
    t.add("pax/frac", data=b"x", mtime=1_600_000_000.25,
          pax={"mtime": "1600000000.123456789", "uid": "3000000", "gid": "4000000"})
    t.add("pax/xattrs", data=b"xattrs\n", pax={
        "SCHILY.xattr.user.comment": "a comment", "SCHILY.xattr.trusted.t": "v",
        "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0"})
    t.add("pax/dirx", tarfile.DIRTYPE, pax={"SCHILY.xattr.user.d": "dir xattr"})
    t.add("pax/renamed", data=b"pax path\n", pax={"path": "pax/" + "p" * 180})
    t.add("pax/slink", tarfile.SYMTYPE, pax={"linkpath": "../" + "l" * 200})
    t.add("pax/\u00e9t\u00e9", data=b"utf-8 name\n")
    t.add("pax/old", data=b"before 1970\n", mtime=-86400)
    return t.bytes()


def seed_gnu() -> bytes:
    t = _Tar(tarfile.GNU_FORMAT)
    _common(t, True)
    t.add("gnu/bigids", data=b"ids\n", uid=1 << 24, gid=(1 << 31) + 5)
    t.add("gnu/negative", data=b"-\n", mtime=-(1 << 33))
    t.add("gnu/future", data=b"+\n", mtime=1 << 34)
    t.add("wh/.wh.gone", mode=0o600)
    t.add("wh/dir", tarfile.DIRTYPE)
    t.add("wh/dir/.wh..wh..opq")
    t.add("wh/dir/kept", data=b"kept\n")
    return t.bytes()


def seed_ustar() -> bytes:
    t = _Tar(tarfile.USTAR_FORMAT)
    _common(t, False)
    t.add("p" * 120 + "/" + "q" * 90, data=b"split by the prefix field\n")
    t.add("ustar/dev", tarfile.CHRTYPE, dev=(4095, 1048575))
    return t.bytes()


def seed_whiteouts() -> bytes:
    t = _Tar(tarfile.PAX_FORMAT)
    t.add("a", tarfile.DIRTYPE, mode=0o750, uid=1)
    t.add("a/.wh.b", mode=0)
    t.add("a/.wh..wh..opq")
    t.add("a/c", tarfile.DIRTYPE)
    t.add("a/c/.wh.d", uid=7, gid=8)
    t.add("a/c/e", data=b"e\n")
    t.add(".wh.top", mode=0o644)
    t.add("a", tarfile.DIRTYPE, mode=0o700, pax={"SCHILY.xattr.user.again": "y"})  # dir over dir
    t.add("x", tarfile.DIRTYPE)
    t.add("x/child", data=b"child\n")
    t.add("x", data=b"a file replaces the directory\n")
    t.add("early", tarfile.LNKTYPE, linkname="late")  # a forward hard link
    t.add("late", data=b"late\n")
    t.add("late2", tarfile.LNKTYPE, linkname="late")
    t.add("s", tarfile.SYMTYPE, linkname="late")
    t.add("s", tarfile.SYMTYPE, linkname="early")  # the same path again
    return t.bytes()


def seed_compressible() -> bytes:
    t = _Tar(tarfile.PAX_FORMAT)
    for k in range(4):
        t.add(f"lib/text{k}", data=_data(20000 + 7000 * k, 2 * k))
    t.add("lib/random", data=_data(20000, 1))
    t.add("lib/zeros", data=bytes(70000))
    t.add("lib/tail", data=_data(4096 * 3 + 100, 4))
    return t.bytes()


# seeds made header by header -------------------------------------------------------------------
def seed_global() -> bytes:
    out = [pax_member([(b"uid", b"77"), (b"gid", b"88"), (b"mtime", b"1234567890.5"),
                       (b"SCHILY.xattr.trusted.global", b"g")], b"g", b"pax_global_header")]
    out.append(member(b"g/one", data=b"one\n"))
    out.append(pax_member([(b"path", b"g/renamed-by-pax"), (b"size", b"11"),
                           (b"LIBARCHIVE.xattr.user.b64", base64.b64encode(b"\0\1bin").rstrip(b"=")),
                           (b"SCHILY.xattr.trusted.bin", b"\0\xff\n=")]))
    out.append(member(b"g/short-name", data=b"eleven byte"))
    out.append(pax_member([(b"SCHILY.devmajor", b"300"), (b"SCHILY.devminor", b"70000")]))
    out.append(member(b"g/dev", b"3"))
    out.append(pax_member([(b"SCHILY.xattr.trusted.global", b"")], b"g"))  # unset
    out.append(member(b"g/two", data=b"two\n", uid=5))
    out.append(member(b"v7/old", b"\0", b"an old regular file\n", magic=b""))
    out.append(member(b"v7/dir/", b"\0", magic=b""))
    out.append(member(b"v7/contig", b"7", b"contiguous\n"))
    out.append(member(b"gnu/dumpdir", b"D", b"Ysub\0\0", magic=GNU_MAGIC))
    out.append(bytes(header(b"././@LongLink", b"L", 301, magic=GNU_MAGIC))
               + padded(b"long/" * 60 + b"\0"))
    out.append(bytes(header(b"././@LongLink", b"K", 251, magic=GNU_MAGIC))
               + padded(b"K" * 250 + b"\0"))
    out.append(member(b"short", b"2", magic=GNU_MAGIC))
    out.append(member(b"dir/", b"5", mode=0o700))
    out.append(member(b"dir/file-after-hardlink-data", data=b"x" * 600))
    out.append(member(b"dir/hl", b"1", b"data stored after a hard link",
                      linkname=b"dir/file-after-hardlink-data"))
    return b"".join(out) + END


def _old_sparse(name: bytes, regions: list[tuple[int, int]], realsize: int) -> bytes:
    """An old GNU ``S`` member: 4 map entries in the header, 21 per extension block."""
    def entries(rs: list[tuple[int, int]]) -> bytes:
        return b"".join(octal(o, 12) + octal(n, 12) for o, n in rs)

    stored = sum(n for _, n in regions)
    head, rest = regions[:4], regions[4:]
    h = header(name, b"S", stored, magic=GNU_MAGIC,
               extra={386: entries(head), 483: octal(realsize, 12)})
    h[482] = 1 if rest else 0
    fix_checksum(h)
    blocks = [bytes(h)]
    while rest:
        part, rest = rest[:21], rest[21:]
        ext = bytearray(BLOCK)
        ext[0 : 24 * len(part)] = entries(part)
        ext[504] = 1 if rest else 0
        blocks.append(bytes(ext))
    data = b"".join(_data(n, o) for o, n in regions)
    return b"".join(blocks) + padded(data)


def seed_sparse_old() -> bytes:
    small = [(0, 512), (8192, 100), (20000, 4096), (40960, 1)]
    many = [(k * 10000, 50 + k) for k in range(30)]
    out = [_old_sparse(b"sparse/small", small, 50000),
           _old_sparse(b"sparse/many", many, 400000),
           _old_sparse(b"sparse/huge", [(0, 10), ((1 << 33) + 7, 5)], (1 << 33) + 4096),
           _old_sparse(b"sparse/empty", [], 1 << 20),
           member(b"sparse/after", data=b"a regular file after the sparse ones\n")]
    return b"".join(out) + END


def seed_sparse_pax() -> bytes:
    regions = [(0, 100), (4096, 4096), (100000, 10)]
    data = b"".join(_data(n, o) for o, n in regions)
    out = []
    # 0.0: repeated offset/numbytes records
    recs: list[tuple[bytes, bytes]] = [(b"GNU.sparse.size", b"200000"),
                                       (b"GNU.sparse.numblocks", b"3")]
    for o, n in regions:
        recs += [(b"GNU.sparse.offset", b"%d" % o), (b"GNU.sparse.numbytes", b"%d" % n)]
    out.append(pax_member(recs))
    out.append(member(b"sparse/v00", data=data))
    # 0.1: one map record
    out.append(pax_member([(b"GNU.sparse.size", b"200000"), (b"GNU.sparse.numblocks", b"3"),
                           (b"GNU.sparse.map",
                            b",".join(b"%d,%d" % r for r in regions))]))
    out.append(member(b"sparse/v01", data=data))
    # 1.0: the map at the start of the data
    out.append(pax_member([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                           (b"GNU.sparse.name", b"sparse/v10"),
                           (b"GNU.sparse.realsize", b"200000")]))
    text = b"%d\n" % len(regions) + b"".join(b"%d\n%d\n" % r for r in regions)
    body = padded(text) + data
    out.append(bytes(header(b"sparse/GNUSparseFile.0/v10", b"0", len(body))) + padded(body))
    # 1.0 with a map longer than one block
    many = [(k * 8192, 3) for k in range(80)]
    text = b"%d\n" % len(many) + b"".join(b"%d\n%d\n" % r for r in many)
    body = padded(text) + b"".join(_data(n, o) for o, n in many)
    out.append(pax_member([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                           (b"GNU.sparse.name", b"sparse/v10-many"),
                           (b"GNU.sparse.realsize", b"%d" % (80 * 8192))]))
    out.append(bytes(header(b"sparse/GNUSparseFile.0/many", b"0", len(body))) + padded(body))
    return b"".join(out) + END


SEEDS: dict[str, Callable[[], bytes]] = {
    "pax": seed_pax, "gnu": seed_gnu, "ustar": seed_ustar, "whiteouts": seed_whiteouts,
    "compressible": seed_compressible, "global": seed_global, "sparse-old": seed_sparse_old,
    "sparse-pax": seed_sparse_pax,
}
