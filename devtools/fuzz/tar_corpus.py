"""The mutants of ``scripts/fuzz --mode convert``: a seed tar (``tar_seeds``), mutated
(``tar_mutants``), then maybe wrapped in gzip or zstd whose bytes are damaged in turn; a pure
function of ``(seed, index)``.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass

import zstandard

from devtools.fuzz.tar_mutants import mutate_tar
from devtools.fuzz.tar_seeds import SEEDS


# compressed wrappings ---------------------------------------------------------------------------
def wrap(data: bytes, rnd: random.Random) -> tuple[bytes, str]:
    """Maybe compress (gzip or zstd, one or more members) and maybe damage the result."""
    how = rnd.choice(["plain"] * 5 + ["gzip", "gzip", "gzip-multi", "zstd", "zstd", "zstd-multi"])
    if how == "plain":
        return data, how
    cut = rnd.randrange(len(data) + 1) if data else 0
    parts = [data[:cut], data[cut:]] if how.endswith("multi") else [data]
    if how.startswith("gzip"):
        out = bytearray(b"".join(gzip.compress(p, compresslevel=1, mtime=0) for p in parts))
    else:
        cctx = zstandard.ZstdCompressor(level=1)
        out = bytearray(b"".join(cctx.compress(p) for p in parts))
    if rnd.random() < 0.5:
        return bytes(out), how
    op = rnd.choice(["flip", "flip", "truncate", "header", "trailer", "append", "bytes"])
    if op == "flip":
        for _ in range(rnd.randint(1, 4)):
            p = rnd.randrange(len(out))
            out[p] ^= 1 << rnd.randrange(8)
    elif op == "truncate":
        del out[rnd.randrange(len(out)) :]
    elif op == "header":
        p = rnd.randrange(min(len(out), 18 if how.startswith("gzip") else 14))
        out[p] = rnd.choice([0, 0xFF, out[p] ^ 0x04, out[p] ^ 0x08, out[p] ^ 0x10, out[p] + 1 & 0xFF])
    elif op == "trailer":
        p = len(out) - rnd.randrange(1, min(len(out), 9))
        out[p] ^= 1 << rnd.randrange(8)
    elif op == "append":
        out += rnd.choice([b"\x1f\x8b", b"\x1f\x8b\x08\x00" + bytes(6), b"\x28\xb5\x2f\xfd",
                           b"junk", bytes(100), bytes(out[: len(out) // 2])])
    else:
        p = rnd.randrange(len(out))
        n = rnd.choice([1, 4, 16, 64])
        out[p : p + n] = bytes([rnd.choice([0, 0xFF, rnd.getrandbits(8)])]) * n
    return bytes(out), f"{how}+{op}"


class TarCorpus:
    """The seed tars, built once; ``mutant`` is a pure function of ``(seed, index)``."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.names = names or list(SEEDS)
        self.data = {n: SEEDS[n]() for n in self.names}

    def mutant(self, seed: int, index: int) -> Mutant:
        rnd = random.Random(f"convert:{seed}:{index}")
        name = rnd.choice(self.names)
        data, kind, notes = mutate_tar(self.data[name], rnd)
        data, wrapping = wrap(data, rnd)
        return Mutant(name, kind, notes, wrapping, data)


@dataclass(frozen=True)
class Mutant:
    seed_tar: str       # the seed it was made from
    kind: str           # the mutation: "pax", "stack:size+truncate", ...
    notes: str          # what exactly was changed, where
    wrapping: str       # "plain", "gzip", "zstd-multi+flip", ...
    data: bytes

    @property
    def suffix(self) -> str:
        return {"p": ".tar", "g": ".tar.gz", "z": ".tar.zst"}[self.wrapping[0]]
