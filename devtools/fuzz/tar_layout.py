"""The layout of a tar as the reader walks it, header by header: what the tar mutations aim at."""

from __future__ import annotations

from dataclasses import dataclass

from devtools.tars import BLOCK


@dataclass
class Entry:
    pos: int            # of the header
    kind: bytes
    blocks: int         # header blocks (1, more with GNU sparse extension blocks)
    data: int           # bytes of data that follow (unpadded)

    @property
    def data_pos(self) -> int:
        return self.pos + BLOCK * self.blocks

    @property
    def end(self) -> int:
        return self.data_pos + self.data + (-self.data % BLOCK)


def field_number(raw: bytes) -> int | None:
    """A numeric header field as the reader takes it (octal or GNU base-256); None: garbage."""
    if raw and raw[0] & 0x80:
        return int.from_bytes(raw[1:], "big") if raw[0] == 0x80 else None
    text = raw.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The records of a PAX body, leniently (stops at the first one that does not parse)."""
    out, pos = [], 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 24)
        try:
            n = int(data[pos:sp])
        except ValueError:
            break
        if sp < 0 or n <= 0 or pos + n > len(data):
            break
        key, _, value = data[sp + 1 : pos + n - 1].partition(b"=")
        out.append((key, value))
        pos += n
    return out


def scan(data: bytes | bytearray) -> tuple[list[Entry], int]:
    """The entries of a tar (records included) and where its end blocks start (or its end)."""
    entries: list[Entry] = []
    pos = 0
    pax_size: int | None = None
    while pos + BLOCK <= len(data):
        h = bytes(data[pos : pos + BLOCK])
        if h == bytes(BLOCK):
            return entries, pos
        size = field_number(h[124:136])
        if size is None or size < 0:
            break
        kind = h[156:157]
        blocks = 1
        if kind == b"S":
            ext = h[482]
            while ext and pos + BLOCK * (blocks + 1) <= len(data):
                ext = data[pos + BLOCK * blocks + 504]
                blocks += 1
        if kind in (b"x", b"X"):
            start = pos + BLOCK
            for key, value in pax_records(bytes(data[start : start + min(size, 1 << 20)])):
                if key == b"size" and value.isdigit():
                    pax_size = int(value)
        elif kind not in (b"g", b"L", b"K"):
            if pax_size is not None:
                size, pax_size = pax_size, None
            if kind in (b"3", b"4", b"6"):
                size = 0
        e = Entry(pos, kind, blocks, size)
        entries.append(e)
        pos = e.end
    return entries, min(pos, len(data))
