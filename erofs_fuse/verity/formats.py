"""Merkle-tree formats: fs-verity (kernel ``Documentation/filesystems/fsverity.rst``) and
dm-verity (``veritysetup``; kernel ``admin-guide/device-mapper/verity.rst``).

Both build the same kind of tree: data is cut into blocks, each block is hashed, the hashes are
packed into hash blocks (level 0, the leaves), those are hashed into the next level, and so on
until one block remains; the root hash is the hash of that top block. Levels are stored
root-first (top block, ..., leaf level), blocks in index order within a level. They differ in:

* salting: fs-verity hashes ``salt zero-padded to the hash's input block (64/128 B) || block``;
  dm-verity format 1 hashes ``raw salt || block``, format 0 (Chrome OS) ``block || raw salt``;
* slot size: dm-verity format 1 pads each digest to a power of two (only sha1/sha224/sha384
  are affected), fs-verity packs digests;
* the last data block: fs-verity zero-pads a partial one; dm-verity counts whole blocks;
* what the trusted value is: fs-verity trusts ``H(descriptor)`` (256 bytes that cover the
  algorithm, block size, salt, *data size* and root); dm-verity trusts the root only, so the
  data block count and block sizes must come from trusted input too.

For SHA-256, 4096-byte blocks, no salt and block-aligned data the two trees are byte-identical,
which is why one sidecar (a veritysetup hash device: superblock block + tree) serves both.

This module holds the pure parts: parameters, geometry, the descriptor and veritysetup
superblock layouts. ``build`` makes trees, ``trust`` and ``blob`` check them.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Callable

ZERO_UUID = bytes(16)

# name -> (fs-verity algorithm id or 0, digest size, hash input block size for salt padding)
HASH_ALGS: dict[str, tuple[int, int, int]] = {
    "sha1": (0, 20, 64),
    "sha224": (0, 28, 64),
    "sha256": (1, 32, 64),
    "sha384": (0, 48, 128),
    "sha512": (2, 64, 128),
}
FSVERITY_ALGS = {v[0]: k for k, v in HASH_ALGS.items() if v[0]}
ALG_BY_DIGEST_SIZE = {v[1]: k for k, v in HASH_ALGS.items()}

FSVERITY_MAX_SALT = 32
DM_MAX_SALT = 256
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 16  # fs-verity's limit (page-size blocks); also far above veritysetup's use

# struct fsverity_descriptor: version, hash_algorithm, log_blocksize, salt_size,
# reserved/sig_size, data_size, root_hash[64], salt[32], reserved[144]
FSVERITY_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144s")
assert FSVERITY_DESCRIPTOR.size == 256

# struct verity_sb (cryptsetup lib/verity/verity.c): signature, version, hash_type, uuid,
# algorithm, data_block_size, hash_block_size, data_blocks, salt_size, pad, salt, pad
VERITY_SB = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert VERITY_SB.size == 512
VERITY_MAGIC = b"verity\0\0"


class FormatError(ValueError):
    """Parameters or on-disk bytes of a tree format are invalid (message is one line)."""


class SaltMode(Enum):
    FSVERITY = "fs-verity"  # H(salt padded to the hash input block || x)
    DM_PREFIX = "dm-verity format 1"  # H(salt || x)
    DM_SUFFIX = "dm-verity format 0"  # H(x || salt)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class HashParams:
    """How a tree hashes: algorithm, block sizes, salt and how the salt is applied."""

    alg: str = "sha256"
    data_block_size: int = 4096
    hash_block_size: int = 4096
    salt: bytes = b""
    mode: SaltMode = SaltMode.FSVERITY

    def __post_init__(self) -> None:
        if self.alg not in HASH_ALGS:
            raise FormatError(f"unsupported hash algorithm {self.alg!r}")
        for what, size in (("data ", self.data_block_size), ("hash ", self.hash_block_size)):
            if not is_power_of_two(size) or not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE:
                what = "" if self.mode is SaltMode.FSVERITY else what
                raise FormatError(f"{what}block size {size} is not a power of two in 512..64 KiB")
        if self.mode is SaltMode.FSVERITY:
            if HASH_ALGS[self.alg][0] == 0:
                raise FormatError(f"fs-verity does not define {self.alg}")
            if self.data_block_size != self.hash_block_size:
                raise FormatError("fs-verity uses one block size for data and tree")
            if len(self.salt) > FSVERITY_MAX_SALT:
                raise FormatError(f"fs-verity salt of {len(self.salt)} bytes (max 32)")
        elif len(self.salt) > DM_MAX_SALT:
            raise FormatError(f"dm-verity salt of {len(self.salt)} bytes (max 256)")
        if self.hash_block_size < 2 * self.slot_size:
            raise FormatError(f"hash block size {self.hash_block_size} too small for {self.alg}")

    @classmethod
    def fsverity(cls, alg: str = "sha256", block_size: int = 4096, salt: bytes = b"") -> HashParams:
        return cls(alg, block_size, block_size, salt, SaltMode.FSVERITY)

    @property
    def digest_size(self) -> int:
        return HASH_ALGS[self.alg][1]

    @property
    def slot_size(self) -> int:
        """Bytes per hash in a hash block: dm-verity format 1 rounds up to a power of two."""
        ds = self.digest_size
        if self.mode is SaltMode.DM_PREFIX:
            return 1 << (ds - 1).bit_length()
        return ds

    @property
    def hashes_per_block(self) -> int:
        n = self.hash_block_size // self.slot_size
        if self.mode is SaltMode.FSVERITY:
            return n
        return 1 << (n.bit_length() - 1)  # dm-verity rounds down to a power of two

    @property
    def is_dm_compatible_default(self) -> bool:
        """True for the parameters where the fs-verity and dm-verity trees coincide."""
        return (self.alg, self.data_block_size, self.hash_block_size, self.salt) == (
            "sha256", 4096, 4096, b"")

    @property
    def salt_affixes(self) -> tuple[bytes, bytes]:
        """(prefix, suffix): what each block is hashed between, as the salt mode says."""
        salt = self.salt
        if not salt:
            return b"", b""
        if self.mode is SaltMode.DM_SUFFIX:
            return b"", salt
        if self.mode is SaltMode.FSVERITY:
            return salt + bytes(-len(salt) % HASH_ALGS[self.alg][2]), b""
        return salt, b""

    def hasher(self) -> Callable[[bytes | memoryview], bytes]:
        """A function hashing one block the way this format does (salted state precomputed)."""
        ctor: Callable[..., hashlib._Hash] = getattr(hashlib, self.alg)
        prefix, suffix = self.salt_affixes
        if suffix:
            def suffixed(data: bytes | memoryview) -> bytes:
                h = ctor(data)
                h.update(suffix)
                return h.digest()
            return suffixed
        if not prefix:
            return lambda data: ctor(data).digest()
        base = ctor(prefix)

        def prefixed(data: bytes | memoryview) -> bytes:
            h = base.copy()
            h.update(data)
            return h.digest()
        return prefixed


@dataclass(frozen=True, slots=True)
class Geometry:
    """Shape of a tree: ``counts[l]`` blocks at level l (0 = leaves), ``starts[l]`` the index
    of that level's first block in the root-first layout."""

    data_blocks: int
    hashes_per_block: int
    counts: tuple[int, ...]
    starts: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.counts)

    @property
    def total_blocks(self) -> int:
        return sum(self.counts)


def geometry(data_blocks: int, hashes_per_block: int) -> Geometry:
    """Levels until one block remains; none for 0 or 1 data blocks (the root then hashes the
    lone data block, or is all zeros for an empty fs-verity file)."""
    counts: list[int] = []
    n = data_blocks
    while n > 1:
        n = -(-n // hashes_per_block)
        counts.append(n)
    starts = [0] * len(counts)
    pos = 0
    for level in reversed(range(len(counts))):
        starts[level] = pos
        pos += counts[level]
    return Geometry(data_blocks, hashes_per_block, tuple(counts), tuple(starts))


def data_blocks_of(size: int, block_size: int) -> int:
    return -(-size // block_size)


# fs-verity descriptor -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FsVerityDescriptor:
    params: HashParams
    data_size: int
    root: bytes


def fsverity_descriptor(params: HashParams, data_size: int, root: bytes) -> bytes:
    alg_id = HASH_ALGS[params.alg][0]
    return FSVERITY_DESCRIPTOR.pack(
        1, alg_id, params.data_block_size.bit_length() - 1, len(params.salt), 0, data_size,
        root, params.salt, b"")


def fsverity_digest(params: HashParams, data_size: int, root: bytes) -> bytes:
    """The file digest ``fsverity digest`` prints: H(descriptor)."""
    ctor: Callable[[bytes], hashlib._Hash] = getattr(hashlib, params.alg)  # not hashlib.new:
    return ctor(fsverity_descriptor(params, data_size, root)).digest()  # no lookup by name


def parse_fsverity_descriptor(raw: bytes) -> FsVerityDescriptor:
    if len(raw) != FSVERITY_DESCRIPTOR.size:
        raise FormatError(f"fs-verity descriptor of {len(raw)} bytes (expected 256)")
    version, alg_id, log_bs, salt_size, sig_size, data_size, root, salt, _ = (
        FSVERITY_DESCRIPTOR.unpack(raw))
    if version != 1:
        raise FormatError(f"fs-verity descriptor version {version}")
    if alg_id not in FSVERITY_ALGS:
        raise FormatError(f"fs-verity hash algorithm {alg_id} unknown")
    if not 9 <= log_bs <= 16 or salt_size > FSVERITY_MAX_SALT or sig_size:
        raise FormatError("fs-verity descriptor has bad block size, salt size or sig_size")
    if raw[112:] != bytes(144) or salt[salt_size:] != bytes(32 - salt_size):
        raise FormatError("fs-verity descriptor has non-zero reserved bytes")
    params = HashParams.fsverity(FSVERITY_ALGS[alg_id], 1 << log_bs, salt[:salt_size])
    ds = params.digest_size
    if root[ds:] != bytes(64 - ds):
        raise FormatError("fs-verity descriptor root hash has trailing bytes")
    return FsVerityDescriptor(params, data_size, root[:ds])


# veritysetup superblock ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class VeritySuperblock:
    hash_type: int
    uuid: bytes
    alg: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes


def pack_verity_superblock(sb: VeritySuperblock) -> bytes:
    return VERITY_SB.pack(
        VERITY_MAGIC, 1, sb.hash_type, sb.uuid, sb.alg.encode(), sb.data_block_size,
        sb.hash_block_size, sb.data_blocks, len(sb.salt), b"", sb.salt, b"")


def parse_verity_superblock(raw: bytes) -> VeritySuperblock:
    """Decode a veritysetup superblock; its fields are *not* trusted (the root does not cover
    them), callers compare them with trusted input."""
    if len(raw) < VERITY_SB.size or raw[:8] != VERITY_MAGIC:
        raise FormatError("no veritysetup superblock (magic 'verity' missing)")
    (_, version, hash_type, uuid, alg_raw, dbs, hbs, data_blocks, salt_size, _, salt,
     _) = VERITY_SB.unpack(raw[: VERITY_SB.size])
    if version != 1 or hash_type not in (0, 1):
        raise FormatError(f"veritysetup superblock version {version}, hash type {hash_type}")
    alg = alg_raw.rstrip(b"\0").decode("ascii", errors="replace").lower()
    if alg not in HASH_ALGS:
        raise FormatError(f"veritysetup superblock hash algorithm {alg!r} unsupported")
    if salt_size > DM_MAX_SALT:
        raise FormatError(f"veritysetup superblock salt of {salt_size} bytes")
    return VeritySuperblock(hash_type, uuid, alg, dbs, hbs, data_blocks, salt[:salt_size])


def dm_params(sb: VeritySuperblock) -> HashParams:
    mode = SaltMode.DM_PREFIX if sb.hash_type == 1 else SaltMode.DM_SUFFIX
    return HashParams(sb.alg, sb.data_block_size, sb.hash_block_size, sb.salt, mode)


def hash_area_offset(hash_offset: int, hash_block_size: int, superblock: bool) -> int:
    """Byte offset of the top tree block: the superblock (512 B at ``hash_offset``) is followed
    by the tree at the next hash-block boundary (cryptsetup ``VERITY_hash_offset_block``)."""
    if not superblock:
        return hash_offset
    return -(-(hash_offset + VERITY_SB.size) // hash_block_size) * hash_block_size
