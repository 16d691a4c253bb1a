"""Structure-aware mutations of layer tars, for ``scripts/fuzz --mode convert``.

A mutant is a function of ``(seed, index)`` only, made from one of the seed tars of
``tar_seeds.py``. The mutations know the tar's layout (found by scanning the current
bytes, header by header, as the reader will): numeric header fields (octal, GNU base-256,
negative, unterminated, garbage), the size field with and without the data to match, type
flags, magic, names, checksums (usually recomputed, so that mutants reach the checks behind
them), PAX records (lengths, keys, values, many xattrs near the inline limits; the header's size
rewritten or left stale), sparse maps (old GNU entries, extension flags, real sizes; PAX maps),
whole members duplicated, dropped, swapped, end blocks removed or put early, truncation at
header, data and record boundaries (``tar_corpus.py`` then wraps a share of the mutants in
gzip or zstd, multi-member too, and mutates the compressed bytes in turn: flips, truncation,
header flags, trailer).
"""

from __future__ import annotations

import random

from devtools.fuzz.tar_layout import Entry, field_number, pax_records, scan
from devtools.tars import (BLOCK, END, GNU_MAGIC, USTAR_MAGIC, base256, fix_checksum, octal, padded,
                           pax_member, pax_record)


# mutations --------------------------------------------------------------------------------------
NUMERIC = {"mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
           "mtime": (136, 12), "devmajor": (329, 8), "devminor": (337, 8)}
GNU_NUMERIC = {"realsize": (483, 12), "sparse0-offset": (386, 12), "sparse0-size": (398, 12),
               "sparse1-offset": (410, 12), "atime": (345, 12)}
TYPES = [b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"\0", b"x", b"g", b"X", b"L", b"K",
         b"S", b"D", b"M", b"N", b"V", b"A", b"Z", b"\xff", b" ", b"9"]
HOSTILE_NAMES = [
    b"", b".", b"..", b"/", b"./", b"../escape", b"a/../../b", b"/abs/path", b"a//b/./c",
    b".wh.", b".wh..", b".wh...", b".wh..wh..opq", b"dir/.wh..wh..opq", b".wh.etc", b"x" * 100,
    b"n" * 256, b"a/" * 50, b"data/f1", b"data", b"etc/hostname/below", b"\xff\xfe", b"sp ace",
    b"new\nline", b"data/link/through", b"dev/null", b"etc", b"data/link", b"wh/.wh.gone",
    b"late", b"early", b"sparse/small",
]
PAX_KEYS = [
    b"path", b"linkpath", b"size", b"mtime", b"atime", b"uid", b"gid", b"uname", b"hdrcharset",
    b"SCHILY.devmajor", b"SCHILY.devminor", b"SCHILY.xattr.user.k", b"SCHILY.xattr.trusted.k",
    b"SCHILY.xattr.security.capability", b"SCHILY.xattr.system.posix_acl_access",
    b"SCHILY.xattr.nonamespace", b"SCHILY.xattr.user." + b"k" * 260, b"SCHILY.xattr.",
    b"LIBARCHIVE.xattr.user.k%41", b"LIBARCHIVE.xattr.user.bad", b"GNU.sparse.major",
    b"GNU.sparse.minor", b"GNU.sparse.name", b"GNU.sparse.realsize", b"GNU.sparse.size",
    b"GNU.sparse.map", b"GNU.sparse.offset", b"GNU.sparse.numbytes", b"GNU.sparse.numblocks",
    b"comment", b"",
]
PAX_VALUES = [
    b"", b"0", b"1", b"-1", b"7", b"511", b"512", b"4096", b"65536", b"4294967295",
    b"4294967296", b"18446744073709551615", b"18446744073709551616", b"9" * 40, b"1e9",
    b"0x10", b" 12", b"12 ", b"1.5", b"-1.000000001", b".5", b"1.", b"-", b"1.2.3",
    b"1234567890.123456789123", b"abc", b"a\0b", b"line\nbreak", b"/", b"..", b"../x",
    b"\xff" * 8, b"x" * 70000, b"0,10,20,30", b"0,10,5,10", b"10,10,0,10", b"0,-1", b"1,2,3",
    b",", b"0,1e3", b"=", b"%ZZ", b"AAAA====", b"@@@", b"a/" * 1000 + b"f", b"a/" * 1100,
    b"t" * 4095, b"t" * 4096, b"/".join([b"n" * 255] * 20),
]


class Mutator:
    """One mutant: ``data`` mutated in place by ``apply`` steps, described in ``notes``."""

    def __init__(self, data: bytes, rnd: random.Random) -> None:
        self.out = bytearray(data)
        self.rnd = rnd
        self.notes: list[str] = []

    def entries(self) -> tuple[list[Entry], int]:
        return scan(self.out)

    def pick(self, kinds: tuple[bytes, ...] | None = None) -> Entry | None:
        entries, _ = self.entries()
        if kinds is not None:
            entries = [e for e in entries if e.kind in kinds]
        return self.rnd.choice(entries) if entries else None

    def reseal(self, e: Entry) -> None:
        """Recompute the checksum, usually: sometimes a mutant must fail on it."""
        if self.rnd.random() < 0.9:
            fix_checksum(self.out, e.pos)
        else:
            self.notes.append("stale checksum")

    # header fields ---------------------------------------------------------------------------
    def numeric_value(self, orig: int | None, width: int) -> bytes:
        r = self.rnd
        base = orig if orig is not None else 0
        how = r.choice(["octal", "octal", "octal", "base256", "negative", "bad256", "spaces",
                        "nuls", "garbage", "unterminated", "signed-text"])
        if how == "octal":
            v = r.choice([0, 1, base - 1, base + 1, base * 2, base + 512, base - 512,
                          8 ** (width - 1) - 1, 511, 512, 4096, 1 << 31, 1 << 32, (1 << 33) - 1,
                          r.getrandbits(3 * (width - 1))])
            return octal(max(v, 0), width)
        if how == "base256":
            v = r.choice([0, 1, base, base + 1, 1 << 33, 1 << 40, 1 << 62, 1 << 63,
                          (1 << (8 * (width - 1))) - 1, r.getrandbits(8 * (width - 1))])
            return base256(v, width)
        if how == "negative":
            return base256(-r.choice([1, 2, 512, 1 << 33, 1 << 62]), width)
        if how == "bad256":
            return bytes([r.choice([0x81, 0xC0, 0xFE])]) + bytes(width - 1)
        if how == "spaces":
            return b" " * width
        if how == "nuls":
            return bytes(width)
        if how == "garbage":
            return r.choice([b"12x4", b"8", b"9999", b"+1", b"0o7", b"\xff\xff", b"-0"]).ljust(width, b"\0")
        if how == "unterminated":
            return b"7" * width
        return b"-1".ljust(width, b" ")

    def field(self, name: str | None = None) -> None:
        e = self.pick()
        if e is None:
            return
        table = dict(NUMERIC)
        if e.kind == b"S" or self.rnd.random() < 0.2:
            table.update(GNU_NUMERIC)
        name = name or self.rnd.choice(sorted(table))
        at, width = table[name]
        p = e.pos + at
        orig = field_number(bytes(self.out[p : p + width]))
        self.out[p : p + width] = self.numeric_value(orig, width)
        self.notes.append(f"{name}@{e.pos}={bytes(self.out[p:p + width])!r}")
        self.reseal(e)

    def size(self) -> None:
        """The size field with the data changed to match, or not."""
        e = self.pick()
        if e is None:
            return
        r = self.rnd
        if r.random() < 0.5:
            self.field("size")
            return
        new = r.choice([0, 1, e.data + 1, max(e.data - 1, 0), e.data + 512, e.data * 2,
                        r.randrange(1, 70000)])
        start, stop = e.data_pos, e.end
        body = bytes(self.out[start : start + min(e.data, new)])
        body += bytes([r.choice([0, 0x41])]) * (new - len(body))
        self.out[start:stop] = padded(body)
        self.out[e.pos + 124 : e.pos + 136] = octal(new, 12)
        self.notes.append(f"resize@{e.pos} {e.data}->{new}")
        self.reseal(e)

    def typeflag(self) -> None:
        e = self.pick()
        if e is None:
            return
        t = self.rnd.choice(TYPES)
        self.out[e.pos + 156] = t[0]
        self.notes.append(f"type@{e.pos}={t!r}")
        self.reseal(e)

    def magic(self) -> None:
        e = self.pick()
        if e is None:
            return
        m = self.rnd.choice([GNU_MAGIC, USTAR_MAGIC, b"ustar\0\0\0", b"ustar 00", bytes(8),
                             b"USTAR\x0000", b"ustar\x00xx"])
        self.out[e.pos + 257 : e.pos + 265] = m
        if self.rnd.random() < 0.3:  # a prefix field that a GNU header uses otherwise
            self.out[e.pos + 345 : e.pos + 360] = b"prefix/../x\0\xff\xff\xff\xff"[:15]
        self.notes.append(f"magic@{e.pos}={m!r}")
        self.reseal(e)

    def name(self) -> None:
        e = self.pick()
        if e is None:
            return
        r = self.rnd
        at, width = r.choice([(0, 100), (0, 100), (157, 100), (345, 155)])
        value = r.choice(HOSTILE_NAMES)
        if r.random() < 0.2:  # fill the field: no terminating NUL
            value = (value or b"z") * (width // max(len(value), 1) + 1)
        self.out[e.pos + at : e.pos + at + width] = value[:width].ljust(width, b"\0")
        self.notes.append(f"name@{e.pos}+{at}={value[:40]!r}")
        self.reseal(e)

    def checksum(self) -> None:
        e = self.pick()
        if e is None:
            return
        fix_checksum(self.out, e.pos)
        p = e.pos + 148
        good = field_number(bytes(self.out[p : p + 8])) or 0
        value = self.rnd.choice([b"%06o\0 " % (good + 1), b"%06o\0 " % (good - 1), b" " * 8,
                                 bytes(8), b"garbage!", b"%07o\0" % good, b"%o" % good,
                                 b"\x80" + good.to_bytes(7, "big")])
        self.out[p : p + 8] = value[:8].ljust(8, b"\0")
        self.notes.append(f"checksum@{e.pos}={value!r}")

    # PAX records -----------------------------------------------------------------------------
    def pax(self) -> None:
        e = self.pick((b"x", b"g", b"X"))
        if e is None:  # make a PAX header for a random member
            target = self.pick()
            if target is None:
                return
            record = (self.rnd.choice(PAX_KEYS), self.rnd.choice(PAX_VALUES))
            self.out[target.pos : target.pos] = pax_member([record])
            self.notes.append(f"new pax before {target.pos}: {record[0]!r}")
            return
        r = self.rnd
        body = bytes(self.out[e.data_pos : e.data_pos + e.data])
        recs = [pax_record(k, v) for k, v in pax_records(body)] or [b""]
        k = r.randrange(len(recs))
        op = r.choice(["set", "set", "set", "key", "length", "drop", "dup", "insert",
                       "no-equals", "garbage", "nul-pad", "xattrs"])
        key, _, _ = recs[k].partition(b"=")
        key = key.partition(b" ")[2]
        if op == "set":
            recs[k] = pax_record(key or r.choice(PAX_KEYS), r.choice(PAX_VALUES))
        elif op == "key":
            recs[k] = pax_record(r.choice(PAX_KEYS), recs[k].partition(b"=")[2][:-1])
        elif op == "length":
            rec = recs[k]
            n = int(rec.partition(b" ")[0] or b"0")
            length = r.choice([0, 1, 3, n - 1, n + 1, n + 100, 10 ** 18, n * 2])
            recs[k] = str(length).encode() + rec[len(str(n)) :]
        elif op == "drop":
            del recs[k]
        elif op == "dup":
            recs.insert(k, recs[k])
        elif op == "insert":
            recs.insert(k, pax_record(r.choice(PAX_KEYS), r.choice(PAX_VALUES)))
        elif op == "no-equals":
            recs[k] = pax_record(b"novalue", b"").replace(b"=", b"")
        elif op == "xattrs":  # near the inline limits of 512- and 4096-byte blocks
            count, size = r.choice([(1, 400), (1, 480), (2, 230), (8, 500), (40, 100), (1, 3900),
                                    (1, 4040), (1, 65000), (300, 230), (2000, 1)])
            ns = r.choice([b"user", b"trusted", b"security"])
            recs[k:k] = [pax_record(b"SCHILY.xattr.%s.x%d" % (ns, j), b"v" * size)
                         for j in range(count)]
        elif op == "garbage":
            recs[k] = r.choice([b"abc def\n", b"5 a=\n", b"99999999999999999999 x=y\n", b"\n",
                                b" 5 a=b\n", b"-5 a=b\n"])
        else:
            recs.append(b"\0" * 3 + b"7 a=bc\n")
        body = b"".join(recs)
        self.out[e.data_pos : e.end] = padded(body)
        if r.random() < 0.85:
            self.out[e.pos + 124 : e.pos + 136] = octal(len(body), 12)
        self.notes.append(f"pax {op}@{e.pos} {key[:30]!r}")
        self.reseal(e)

    # sparse maps -----------------------------------------------------------------------------
    def sparse(self) -> None:
        r = self.rnd
        e = self.pick((b"S",))
        if e is not None and r.random() < 0.6:
            block = r.randrange(e.blocks)
            if block == 0:
                slots, at, flag = 4, e.pos + 386, e.pos + 482
            else:
                slots, at, flag = 21, e.pos + BLOCK * block, e.pos + BLOCK * block + 504
            op = r.choice(["entry", "entry", "swap", "overlap", "flag", "realsize"])
            if op == "flag":
                self.out[flag] = r.choice([0, 1, 0xFF])
            elif op == "realsize":
                p = e.pos + 483
                self.out[p : p + 12] = self.numeric_value(field_number(bytes(self.out[p : p + 12])), 12)
            else:
                i = r.randrange(slots)
                p = at + 24 * i
                if op == "swap" and i + 1 < slots:
                    a, b = bytes(self.out[p : p + 24]), bytes(self.out[p + 24 : p + 48])
                    self.out[p : p + 48] = b + a
                elif op == "overlap" and i > 0:
                    self.out[p : p + 12] = self.out[p - 24 : p - 12]
                else:
                    w = r.choice([0, 12])
                    self.out[p + w : p + w + 12] = self.numeric_value(
                        field_number(bytes(self.out[p + w : p + w + 12])), 12)
            self.notes.append(f"old sparse {op}@{e.pos} block {block}")
            self.reseal(e)
            return
        e = self.pick((b"x",))
        if e is None:
            return
        body = bytes(self.out[e.data_pos : e.data_pos + e.data])
        recs = pax_records(body)
        sparse = [i for i, (k, _) in enumerate(recs) if k.startswith(b"GNU.sparse")]
        nxt = [x for x in self.entries()[0] if x.pos > e.pos][:1]
        if any(k == b"GNU.sparse.major" for k, _ in recs) and nxt and r.random() < 0.5:
            self._sparse_map_in_data(nxt[0])
            return
        if not sparse:
            recs.append((b"GNU.sparse.size", r.choice(PAX_VALUES)))
            i = len(recs) - 1
        else:
            i = r.choice(sparse)
        key, value = recs[i]
        op = r.choice(["value", "numbers", "numbers", "dup", "drop"])
        if op == "value":
            recs[i] = (key, r.choice(PAX_VALUES))
        elif op == "numbers":
            nums = value.split(b",")
            j = r.randrange(len(nums))
            nums[j] = r.choice([b"0", b"-1", b"%d" % (1 << 62), b"%d" % (1 << 64), b"99999999",
                                nums[j - 1] if j else b"1", b"", b"x"])
            if r.random() < 0.3:
                r.shuffle(nums)
            recs[i] = (key, b",".join(nums))
        elif op == "dup":
            recs.insert(i, recs[i])
        else:
            del recs[i]
        new = b"".join(pax_record(k, v) for k, v in recs)
        self.out[e.data_pos : e.end] = padded(new)
        self.out[e.pos + 124 : e.pos + 136] = octal(len(new), 12)
        self.notes.append(f"pax sparse {op}@{e.pos} {key!r}")
        self.reseal(e)

    def _sparse_map_in_data(self, e: Entry) -> None:
        """PAX 1.0: the decimal map at the start of the member's data."""
        r = self.rnd
        start = e.data_pos
        head = bytes(self.out[start : start + min(e.data, 4 * BLOCK)])
        lines = head.split(b"\n")
        i = r.randrange(max(len(lines) - 1, 1))
        lines[i] = r.choice([b"0", b"1", b"-1", b"%d" % (1 << 20), b"%d" % (1 << 21),
                             b"%d" % (1 << 63), b"abc", b"", b"99999999999", b"1 2"])
        new = b"\n".join(lines)
        if r.random() < 0.2:
            new = new.replace(b"\n", b"", 1)
        new = new[: len(head)].ljust(len(head), b"\0")
        self.out[start : start + len(head)] = new
        self.notes.append(f"sparse 1.0 map line {i}@{e.pos}")

    # structure -------------------------------------------------------------------------------
    def structure(self) -> None:
        r = self.rnd
        entries, end = self.entries()
        if not entries:
            return
        op = r.choice(["dup", "drop", "swap", "move", "early-end", "no-end", "garbage-after",
                       "zero-block", "half-end"])
        a = r.choice(entries)
        chunk = bytes(self.out[a.pos : a.end])
        if op == "dup":
            b = r.choice(entries)
            self.out[b.pos : b.pos] = chunk
        elif op == "drop":
            del self.out[a.pos : a.end]
        elif op == "swap":
            b = r.choice(entries)
            if b.pos != a.pos:
                lo, hi = sorted((a, b), key=lambda x: x.pos)
                lo_b, hi_b = bytes(self.out[lo.pos : lo.end]), bytes(self.out[hi.pos : hi.end])
                mid = bytes(self.out[lo.end : hi.pos])
                self.out[lo.pos : hi.end] = hi_b + mid + lo_b
        elif op == "move":  # to the end, before the end blocks
            del self.out[a.pos : a.end]
            self.out[end - len(chunk) : end - len(chunk)] = chunk
        elif op == "early-end":
            self.out[a.pos : a.pos] = END
        elif op == "no-end":
            del self.out[end:]
        elif op == "half-end":
            del self.out[end + BLOCK :]
        elif op == "garbage-after":
            self.out += r.choice([b"\xff" * 100, bytes(BLOCK) * 3, chunk, b"trailing junk"])
        else:
            self.out[a.end : a.end] = bytes(BLOCK)
        self.notes.append(f"{op}@{a.pos}")

    def truncate(self) -> None:
        r = self.rnd
        entries, end = self.entries()
        points = [r.randrange(len(self.out) + 1), end, end + BLOCK]
        for e in r.sample(entries, min(3, len(entries))):
            points += [e.pos, e.pos + r.randrange(BLOCK), e.data_pos, e.data_pos + e.data // 2,
                       e.data_pos + e.data, e.end]
        at = max(0, r.choice(points) + r.choice([0, 0, 0, -1, 1]))
        del self.out[at:]
        self.notes.append(f"truncate at {at}")

    def data_bytes(self) -> None:
        e = self.pick((b"0", b"\0", b"7", b"S", b"1"))
        if e is None or not e.data:
            return
        for _ in range(self.rnd.randint(1, 8)):
            p = e.data_pos + self.rnd.randrange(e.data)
            self.out[p] ^= 1 << self.rnd.randrange(8)
        self.notes.append(f"data flips@{e.pos}")


TAR_KINDS = ["field", "field", "size", "size", "typeflag", "magic", "name", "name", "checksum",
             "pax", "pax", "pax", "sparse", "sparse", "structure", "structure", "truncate",
             "data", "stack"]


def mutate_tar(data: bytes, rnd: random.Random) -> tuple[bytes, str, str]:
    """The mutant, its kind (``size``, ``stack:pax+truncate``) and what was done."""
    m = Mutator(data, rnd)
    kind = rnd.choice(TAR_KINDS)
    kinds = [rnd.choice(TAR_KINDS[:-1]) for _ in range(rnd.randint(2, 3))] if kind == "stack" \
        else [kind]
    kinds.sort(key=lambda k: k == "truncate")  # cutting last keeps the others in range
    for k in kinds:
        getattr(m, "data_bytes" if k == "data" else k)()
    name = ("stack:" + "+".join(kinds)) if kind == "stack" else kind
    return bytes(m.out), name, "; ".join(m.notes)[:300]
