"""Seed layer tars for ``scripts/fuzz --mode convert`` (their headers: ``devtools/tars.py``).

Built in-process, deterministically: with Python's ``tarfile`` (ustar, GNU, PAX: long names,
PAX records, devices, hard and symbolic links, whiteouts) and, where ``tarfile`` writes nothing
of the kind, header by header (global PAX headers, old-style and contiguous regular files,
``LIBARCHIVE.xattr``, binary xattr values, GNU long names and dump directories, data after a
hard link, old GNU sparse ``S`` members with extension blocks, PAX sparse 0.0, 0.1 and 1.0).
Unmutated, every seed converts in every mode without a warning (``tests/test_fuzz.py``).
"""

from __future__ import annotations

import base64
import random
import tarfile
from typing import Callable

from devtools.tars import (BLOCK, END, GNU_MAGIC, TarBuilder, fix_checksum, header, member, octal,
                           padded, pax_member)


def _data(n: int, salt: int) -> bytes:
    """Deterministic file bytes: text-like (compressible) for even salts, random for odd."""
    if salt % 2:
        return random.Random(salt).randbytes(n)
    line = b"line %d of a compressible file, salt %d\n"
    out = b"".join(line % (k, salt) for k in range(n // 30 + 1))
    return out[:n]


# seeds made with tarfile ----------------------------------------------------------------------
def _common(t: TarBuilder, long_ok: bool) -> None:
    t.add("./", tarfile.DIRTYPE, mode=0o755)
    t.add("etc", tarfile.DIRTYPE, mode=0o755)
    t.add("etc/hostname", data=b"fuzz\n")
    for k, n in enumerate((0, 1, 511, 512, 4095, 4096, 4097, 9000)):
        t.add(f"data/f{n}", data=_data(n, k), mode=0o600 if k % 2 else 0o755, uid=k, gid=2 * k)
    t.add("data/link", tarfile.SYMTYPE, linkname="f4096", mode=0o777)
    t.add("data/hard", tarfile.LNKTYPE, linkname="data/f1")
    t.add("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
    t.add("dev/sda1", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=1)
    t.add("run/fifo", tarfile.FIFOTYPE, mode=0o600)
    t.add("opt/sticky", tarfile.DIRTYPE, mode=0o1777)
    t.add("usr/bin/suid", data=b"#!/bin/sh\n", mode=0o4755)
    if long_ok:
        deep = "/".join(["component-%02d" % k for k in range(12)])
        t.add(deep + "/" + "n" * 200, data=b"deep and long\n")
        t.add("data/longlink", tarfile.SYMTYPE, linkname="/" + "t" * 300)
        t.add("data/" + "h" * 150, tarfile.LNKTYPE, linkname="data/f511")


def seed_pax() -> bytes:
    t = TarBuilder(tarfile.PAX_FORMAT)
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
    t = TarBuilder(tarfile.GNU_FORMAT)
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
    t = TarBuilder(tarfile.USTAR_FORMAT)
    _common(t, False)
    t.add("p" * 120 + "/" + "q" * 90, data=b"split by the prefix field\n")
    t.add("ustar/dev", tarfile.CHRTYPE, devmajor=4095, devminor=1048575)
    return t.bytes()


def seed_whiteouts() -> bytes:
    t = TarBuilder(tarfile.PAX_FORMAT)
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
    t = TarBuilder(tarfile.PAX_FORMAT)
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
