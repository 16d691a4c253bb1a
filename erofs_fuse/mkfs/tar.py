"""Tar headers, read from an ``InputStream``: ustar, GNU and PAX, with every dialect a layer
tar can hold.

One ``TarMember`` per file entry, after the records that modify it (PAX ``x``, GNU ``L``/``K``
long names) have been folded in; global PAX headers (``g``) apply to every later entry.
Numbers are octal or GNU base-256. Sparse files come with their map (old GNU ``S`` headers with
extension blocks, PAX 0.0, 0.1 and 1.0), so the data that follows is the concatenation of the
map's regions. Nothing is taken on trust: every size is bounded and every error names the
entry and the byte offset of its header.

Compared with ``mkfs.erofs --tar`` 1.9.3 (``erofs-writer.md`` 5.2), this reader also takes
old-style ``\\0`` regular files, data after hard links, global PAX headers, and sparse members.

One module past the house's ~450 lines on purpose: the dialects fold into one member through one
state (pending long names, PAX records, global headers), which a split would have to pass around.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Iterator

from .errors import BadInputError, UnsupportedInputError
from .source import InputStream

BLOCK = 512
MAX_META_RECORD = 1 << 20      # a PAX header or GNU long name larger than this is refused
MAX_SPARSE_REGIONS = 1 << 20
NO_ID = (1 << 32) - 1
MAX_FILE_SIZE = (1 << 63) - 1   # EROFS sizes are u64; Linux file offsets are signed 64-bit
MAX_SECONDS = (1 << 63) - 1     # an extended inode's i_mtime is a signed 64-bit count
MAX_SYMLINK = 4095              # PATH_MAX less the NUL

REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHARDEV = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
CONTIGUOUS = b"7"
OLD_REGULAR = b"\0"
GNU_SPARSE = b"S"
GNU_DUMPDIR = b"D"
FILE_TYPES = {REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO, CONTIGUOUS,
              OLD_REGULAR, GNU_SPARSE, GNU_DUMPDIR}
NO_DATA_TYPES = {CHARDEV, BLOCKDEV, FIFO}  # POSIX: the size field of these is ignored


@dataclass(slots=True)
class TarMember:
    """One file entry. ``kind`` is one of the type flags above (normalised: ``0`` for every
    regular file, ``5`` for directories)."""

    path: bytes
    kind: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int                    # logical size (the real size of a sparse file)
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes]
    header_offset: int
    data_offset: int = 0         # of the member's data in the uncompressed stream
    stored_size: int = 0         # bytes of data that follow in the stream
    sparse: list[tuple[int, int]] | None = None  # (offset, length) regions, for sparse files
    unknown_type: bytes | None = None


@dataclass(slots=True)
class _Pending:
    """What the records before an entry said about it."""

    pax: dict[bytes, bytes] = field(default_factory=dict)
    sparse_pairs: list[int] = field(default_factory=list)  # PAX 0.0 offset/numbytes sequence
    long_name: bytes | None = None
    long_link: bytes | None = None


def _cstr(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _number(raw: bytes, what: str, offset: int) -> int:
    """An octal field (spaces and NULs around it) or a GNU base-256 one."""
    if raw and raw[0] & 0x80:
        value = int.from_bytes(raw[1:], "big")
        if raw[0] == 0xFF:  # negative, two's complement over the whole field
            value = int.from_bytes(raw, "big") - (1 << (8 * len(raw)))
        elif raw[0] != 0x80:
            raise BadInputError(f"bad base-256 {what} field", offset=offset)
        return value
    text = raw.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise BadInputError(f"bad {what} field {text[:12]!r}", offset=offset) from None


def _checksum_ok(header: bytes) -> bool:
    stored = _cstr(header[148:156]).strip()
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    if want == unsigned:
        return True
    high = len(blanked.translate(None, _LOW_BYTES))  # bytes >= 0x80, negative when signed
    return want == unsigned - 256 * high


_LOW_BYTES = bytes(range(128))


_PAX_RECORD = re.compile(rb"(\d+) ")


def parse_pax(data: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """The records of a PAX header block, in order (keys may repeat: GNU sparse 0.0)."""
    records = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        m = _PAX_RECORD.match(data, pos)
        if not m:
            raise BadInputError("bad PAX record", offset=offset)
        length = int(m.group(1))
        end = pos + length
        if length < len(m.group(0)) + 2 or end > len(data) or data[end - 1:end] != b"\n":
            raise BadInputError("bad PAX record length", offset=offset)
        body = data[m.end():end - 1]
        key, eq, value = body.partition(b"=")
        if not eq or not key:
            raise BadInputError("PAX record without a key", offset=offset)
        records.append((key, value))
        pos = end
    return records


def _pax_int(value: bytes, key: bytes, offset: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadInputError(f"bad PAX {key.decode(errors='replace')} {value[:20]!r}",
                            offset=offset) from None


def _pax_time_ns(value: bytes, offset: int) -> int:
    """A PAX time (``-12.5`` allowed) in nanoseconds, without float rounding."""
    m = re.fullmatch(rb"(-?)(\d+)(?:\.(\d*))?", value)
    if not m:
        raise BadInputError(f"bad PAX mtime {value[:30]!r}", offset=offset)
    sign = -1 if m.group(1) else 1
    frac = (m.group(3) or b"")[:9].ljust(9, b"0")
    return sign * (int(m.group(2)) * 1_000_000_000 + int(frac))


def _xattr_from_pax(key: bytes, value: bytes, offset: int) -> tuple[bytes, bytes] | None:
    if key.startswith(b"SCHILY.xattr."):
        return key[len(b"SCHILY.xattr."):], value
    if key.startswith(b"LIBARCHIVE.xattr."):
        name = _percent_decode(key[len(b"LIBARCHIVE.xattr."):])
        try:
            return name, base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
        except ValueError:
            raise BadInputError("bad base64 in a LIBARCHIVE.xattr record", offset=offset) from None
    return None


def _percent_decode(raw: bytes) -> bytes:
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)


class TarReader:
    """Iterate the file entries of a tar stream. The caller must consume each member's data
    (``stored_size`` bytes) from the stream, or call ``skip_data``, before the next one."""

    def __init__(self, stream: InputStream) -> None:
        self.stream = stream
        self._global: dict[bytes, bytes] = {}
        self._consumed_data = True
        self._member: TarMember | None = None
        self.ended_cleanly = False

    def _read_block(self, what: str, offset: int) -> bytes:
        data = self.stream.read(BLOCK)
        if len(data) != BLOCK:
            raise BadInputError(f"tar truncated in {what}", offset=offset)
        return data

    def _read_record(self, size: int, what: str, offset: int) -> bytes:
        if size > MAX_META_RECORD:
            raise BadInputError(f"{what} of {size} bytes is too large", offset=offset)
        data = self.stream.read(size)
        if len(data) != size:
            raise BadInputError(f"tar truncated in {what}", offset=offset)
        self._skip_padding(size, offset)
        return data

    def _skip_padding(self, size: int, offset: int) -> None:
        pad = -size % BLOCK
        if pad and self.stream.skip(pad) != pad:
            raise BadInputError("tar truncated in padding", offset=offset)

    def finish_data(self) -> None:
        """Skip what is left of the current member's data and its padding."""
        member = self._member
        if member is None or self._consumed_data:
            return
        self._consumed_data = True
        left = member.data_offset + member.stored_size - self.stream.pos
        if left < 0:
            raise AssertionError("member data over-read")
        if self.stream.skip(left) != left:
            raise BadInputError(f"tar truncated: {member.stored_size} bytes of data declared",
                                entry=member.path, offset=member.header_offset)
        self._skip_padding(member.stored_size, member.header_offset)

    def __iter__(self) -> Iterator[TarMember]:
        pending = _Pending()
        while True:
            self.finish_data()
            offset = self.stream.pos
            header = self.stream.read(BLOCK)
            if not header and offset == 0:  # GNU tar refuses it too (exit 2)
                raise BadInputError("empty input: this does not look like a tar archive")
            if not header:
                return  # end of stream without end-of-archive blocks: accepted, as GNU tar does
            if len(header) != BLOCK:
                raise BadInputError("tar truncated in a header", offset=offset)
            if header == bytes(BLOCK):
                self.ended_cleanly = True
                return
            if not _checksum_ok(header):
                raise BadInputError("bad tar header checksum", offset=offset)
            member = self._member_or_record(header, offset, pending)
            if member is None:
                continue
            pending = _Pending()
            self._member = member
            self._consumed_data = False
            yield member

    # records -----------------------------------------------------------------------------
    def _member_or_record(self, header: bytes, offset: int, pending: _Pending) -> TarMember | None:
        kind = header[156:157]
        size = _number(header[124:136], "size", offset)
        if size < 0:
            raise BadInputError("negative size", offset=offset)
        if kind in (b"x", b"X", b"g"):
            data = self._read_record(size, "a PAX header", offset)
            records = parse_pax(data, offset)
            if kind == b"g":
                for key, value in records:
                    if value:
                        self._global[key] = value
                    else:
                        self._global.pop(key, None)
            else:
                for key, value in records:
                    if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
                        pending.sparse_pairs.append(_pax_int(value, key, offset))
                    else:
                        pending.pax[key] = value
            return None
        if kind == b"L":
            pending.long_name = _cstr(self._read_record(size, "a GNU long name", offset))
            return None
        if kind == b"K":
            pending.long_link = _cstr(self._read_record(size, "a GNU long link", offset))
            return None
        if kind in (b"V", b"M", b"N"):
            if kind == b"M":
                raise UnsupportedInputError("multi-volume tar members are not supported",
                                            offset=offset)
            self._read_record(size, "a GNU volume header", offset) if size <= MAX_META_RECORD \
                else self._skip_big(size, offset)
            return None
        return self._file_member(header, kind, size, offset, pending)

    def _skip_big(self, size: int, offset: int) -> None:
        if self.stream.skip(size) != size:
            raise BadInputError("tar truncated", offset=offset)
        self._skip_padding(size, offset)

    def _file_member(self, header: bytes, kind: bytes, size: int, offset: int,
                pending: _Pending) -> TarMember:
        pax = dict(self._global)
        pax.update(pending.pax)
        magic = header[257:265]
        gnu = magic == b"ustar  \0"
        name = _cstr(header[0:100])
        if not gnu and magic[:6] == b"ustar\0":
            prefix = _cstr(header[345:500])
            if prefix:
                name = prefix + b"/" + name
        if pending.long_name is not None:
            name = pending.long_name
        linkname = _cstr(header[157:257])
        if pending.long_link is not None:
            linkname = pending.long_link
        member = TarMember(
            path=pax.get(b"path", name),
            kind=kind,
            mode=_number(header[100:108], "mode", offset) & 0o7777,
            uid=_number(header[108:116], "uid", offset),
            gid=_number(header[116:124], "gid", offset),
            mtime_ns=_number(header[136:148], "mtime", offset) * 1_000_000_000,
            size=size,
            linkname=pax.get(b"linkpath", linkname),
            devmajor=_number(header[329:337], "devmajor", offset),
            devminor=_number(header[337:345], "devminor", offset),
            xattrs={},
            header_offset=offset,
        )
        self._apply_pax(member, pax, offset)
        if b"\0" in member.path or b"\0" in member.linkname:
            raise BadInputError("a name holds a NUL byte", entry=member.path, offset=offset)
        self._normalise_kind(member, header, gnu, pending, pax)
        _check_ranges(member)
        if not (0 <= member.uid < NO_ID and 0 <= member.gid < NO_ID):
            # (u32)-1 is no id to Linux: chown() takes it as "leave unchanged"
            raise BadInputError(f"owner {member.uid}:{member.gid} out of range",
                                entry=member.path, offset=offset)
        member.data_offset = self.stream.pos
        return member

    def _apply_pax(self, member: TarMember, pax: dict[bytes, bytes], offset: int) -> None:
        for key, value in pax.items():
            if key == b"size":
                member.size = _pax_int(value, key, offset)
            elif key == b"uid":
                member.uid = _pax_int(value, key, offset)
            elif key == b"gid":
                member.gid = _pax_int(value, key, offset)
            elif key == b"mtime":
                member.mtime_ns = _pax_time_ns(value, offset)
            elif key in (b"SCHILY.devmajor", b"SCHILY.devminor"):
                number = _pax_int(value, key, offset)
                if key == b"SCHILY.devmajor":
                    member.devmajor = number
                else:
                    member.devminor = number
            else:
                xattr = _xattr_from_pax(key, value, offset)
                if xattr is not None:
                    member.xattrs[xattr[0]] = xattr[1]
        if member.size < 0:
            raise BadInputError("negative size", entry=member.path, offset=offset)

    def _normalise_kind(self, member: TarMember, header: bytes, gnu: bool, pending: _Pending,
                        pax: dict[bytes, bytes]) -> None:
        kind = member.kind
        member.stored_size = 0 if kind in NO_DATA_TYPES else member.size
        if kind == OLD_REGULAR and member.path.endswith(b"/"):
            kind = DIRECTORY  # pre-POSIX archives mark directories by the trailing slash
        elif kind in (OLD_REGULAR, CONTIGUOUS):
            kind = REGULAR
        elif kind == GNU_DUMPDIR:
            kind = DIRECTORY  # the dump listing that follows is skipped
        elif kind == GNU_SPARSE:
            self._old_gnu_sparse(member, header)
            kind = REGULAR
        elif kind not in FILE_TYPES:
            member.unknown_type = kind
            kind = REGULAR  # POSIX: an unknown type is read as a regular file
        member.kind = kind
        if kind == REGULAR and (b"GNU.sparse.major" in pax or b"GNU.sparse.map" in pax
                                or pending.sparse_pairs or b"GNU.sparse.size" in pax):
            self._pax_sparse(member, pending, pax)

    def _old_gnu_sparse(self, member: TarMember, header: bytes) -> None:
        offset = member.header_offset
        regions = self._sparse_entries(header[386:482], 4, offset)
        extended = header[482]
        while extended:
            block = self._read_block("a GNU sparse extension", offset)
            regions += self._sparse_entries(block[0:504], 21, offset)
            extended = block[504]
            if len(regions) > MAX_SPARSE_REGIONS:
                raise BadInputError("too many sparse regions", entry=member.path, offset=offset)
        member.stored_size = member.size
        member.size = _number(header[483:495], "realsize", offset)
        member.sparse = self._check_regions(regions, member)

    @staticmethod
    def _sparse_entries(raw: bytes, count: int, offset: int) -> list[tuple[int, int]]:
        out = []
        for k in range(count):
            rec = raw[24 * k:24 * k + 24]
            if rec[0] == 0:
                break
            out.append((_number(rec[0:12], "sparse offset", offset),
                        _number(rec[12:24], "sparse size", offset)))
        return out

    def _pax_sparse(self, member: TarMember, pending: _Pending, pax: dict[bytes, bytes]) -> None:
        offset = member.header_offset
        major = pax.get(b"GNU.sparse.major")
        real = pax.get(b"GNU.sparse.realsize", pax.get(b"GNU.sparse.size"))
        if b"GNU.sparse.name" in pax:
            member.path = pax[b"GNU.sparse.name"]
        member.stored_size = member.size
        if real is not None:
            member.size = _pax_int(real, b"GNU.sparse.realsize", offset)
        if major == b"1":
            numbers, used = self._sparse_map_in_data(member)
            member.stored_size -= used
        elif b"GNU.sparse.map" in pax:
            raw = pax[b"GNU.sparse.map"]
            numbers = [_pax_int(v, b"GNU.sparse.map", offset) for v in raw.split(b",")] if raw else []
        else:
            numbers = pending.sparse_pairs
        if len(numbers) % 2:
            raise BadInputError("odd sparse map", entry=member.path, offset=offset)
        regions = list(zip(numbers[0::2], numbers[1::2]))
        member.sparse = self._check_regions(regions, member)

    def _sparse_map_in_data(self, member: TarMember) -> tuple[list[int], int]:
        """PAX 1.0: decimal numbers, one a line, at the start of the data, padded to a block."""
        offset = member.header_offset
        text = b""
        numbers: list[int] = []
        count: int | None = None
        used = 0
        while count is None or len(numbers) < 2 * count:
            if used >= member.stored_size or used > MAX_META_RECORD:
                raise BadInputError("bad PAX 1.0 sparse map", entry=member.path, offset=offset)
            text += self._read_block("a sparse map", offset)
            used += BLOCK
            lines = text.split(b"\n")
            text = lines.pop()
            for line in lines:
                value = _pax_int(line, b"sparse map", offset)
                if count is None:
                    count = value
                    if count > MAX_SPARSE_REGIONS:
                        raise BadInputError("too many sparse regions", entry=member.path,
                                            offset=offset)
                elif len(numbers) < 2 * count:
                    numbers.append(value)
        return numbers, used

    @staticmethod
    def _check_regions(regions: list[tuple[int, int]], member: TarMember) -> list[tuple[int, int]]:
        end = 0
        stored = 0
        for off, length in regions:
            if off < end or length < 0 or off + length > member.size:
                raise BadInputError("sparse map regions out of order or past the file size",
                                    entry=member.path, offset=member.header_offset)
            end = off + length
            stored += length
        if stored != member.stored_size:
            raise BadInputError(f"sparse map covers {stored} bytes but {member.stored_size} "
                                "are stored", entry=member.path, offset=member.header_offset)
        return [(o, n) for o, n in regions if n > 0]


def _check_ranges(member: TarMember) -> None:
    """Sizes, times and link targets the image and Linux can hold."""
    if not 0 <= member.size <= MAX_FILE_SIZE:
        raise BadInputError(f"size {member.size} out of range", entry=member.path,
                            offset=member.header_offset)
    if not -MAX_SECONDS - 1 <= member.mtime_ns // 1_000_000_000 <= MAX_SECONDS:
        raise BadInputError(f"mtime {member.mtime_ns // 1_000_000_000} out of range",
                            entry=member.path, offset=member.header_offset)
    if member.kind == SYMLINK and not 1 <= len(member.linkname) <= MAX_SYMLINK:
        raise BadInputError(f"symlink target of {len(member.linkname)} bytes (Linux takes 1 "
                            f"to {MAX_SYMLINK})", entry=member.path, offset=member.header_offset)
