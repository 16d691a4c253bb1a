"""Layer tars built in-process, for the tests (``tests/layertar.py``, ``tests/ocilayout.py``),
the fuzzer's seed tars and mutations (``devtools/fuzz``) and the benchmarks' synthetic layers.

Two ways, one module: ``TarBuilder`` writes entries with Python's ``tarfile`` (any dialect, any
odd field it can express); the functions below write ustar/GNU headers block by block, for what
``tarfile`` writes nothing of the kind (global PAX headers, old-style and contiguous files, GNU
sparse members, binary fields, broken checksums).
"""

from __future__ import annotations

import io
import tarfile

BLOCK = 512
END = bytes(2 * BLOCK)  # the two zero blocks that end an archive
GNU_MAGIC = b"ustar  \0"
USTAR_MAGIC = b"ustar\x0000"
MTIME = 1_600_000_000


class TarBuilder:
    """A tar written entry by entry with Python's tarfile (any dialect, any odd field)."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt,
                                encoding="utf-8", errors="surrogateescape")

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *,
            mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: float = MTIME,
            linkname: str = "", devmajor: int = 0, devminor: int = 0,
            pax: dict[str, str] | None = None) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = mtime
        info.linkname = linkname
        info.devmajor, info.devminor = devmajor, devminor
        info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        if pax:
            info.pax_headers = dict(pax)
        self.tar.addfile(info, io.BytesIO(data) if info.size else None)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def ustar_header(name: str, kind: bytes, size: int, mtime: int = MTIME) -> bytes:
    """tarfile's ustar header of a root-owned entry (0755 for a directory, else 0644): for
    streams of many entries, written without a TarFile."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, mtime
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


# headers block by block -------------------------------------------------------------------------
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
