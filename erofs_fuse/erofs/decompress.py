"""Decompressors behind one function (spec §5, checks of §11.6).

``decompress`` turns one pcluster into exactly ``llen`` bytes. Streams are right-aligned in their
pcluster, so leading zero bytes are skipped first (§5.1). In exact mode the stream must produce
exactly ``llen`` bytes; in partial mode decoding stops after ``llen`` bytes. No decoder is ever
allowed to produce more than ``llen`` bytes, whatever sizes a hostile stream claims.

LZ4 goes through the system liblz4 (ctypes) when it can be loaded, for exact and partial
decoding; else through the ``lz4`` extension (exact only) and a small pure-Python block decoder
(``lz4_block_decode``) with an output cap, for partial decoding and as the last fallback.
``lz4_run`` decodes a run of consecutive LZ4 pclusters in one call of the optional compiled
module ``_lz4run`` (the reader's whole extents of one read).

Each codec's module is imported when a pcluster of that algorithm is first decoded, not with
this module: a mount of lz4 layers never loads zstandard or lzma (start-up time).
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from typing import Any, Callable, Iterable, Sequence

from . import ondisk as d
from .errors import CorruptImageError, UnsupportedFeatureError
from .superblock import CompressionConfig

_UNSET: Any = object()
# The codec modules: _UNSET until first needed, then the module, or None when it is missing
# (tests set None to see that case).
_lz4block: Any = _UNSET
zstandard: Any = _UNSET
lzma: Any = _UNSET
zlib: Any = _UNSET
_MODULES = {"_lz4block": "lz4.block", "zstandard": "zstandard", "lzma": "lzma", "zlib": "zlib"}
_ALG_MODULES = {d.ALG_LZMA: "lzma", d.ALG_DEFLATE: "zlib", d.ALG_ZSTD: "zstandard"}


def _codec(name: str) -> Any:
    """The module bound to the global ``name``, imported on first use (None if missing)."""
    module = globals()[name]
    if module is _UNSET:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError:  # pragma: no cover - exercised by monkeypatching in tests
            module = None
        globals()[name] = module
    return module


Buffer = bytes | memoryview

_NONZERO = re.compile(rb"[^\x00]")
_LZMA_MIN_DICT = 4096
_LZMA_MAX_DICT = 8 << 20
_ZSTD_MAX_WINDOW = 1 << 20  # the format's limit (§5.5)
_zstd_local = threading.local()


def decompress(
    codec: int, src: bytes, llen: int, partial: bool, config: CompressionConfig
) -> bytes:
    """Exactly ``llen`` bytes decoded from pcluster ``src`` with algorithm ``codec``."""
    if not 0 <= llen <= d.Z_PCLUSTER_MAX_DSIZE:
        raise UnsupportedFeatureError(f"extent of {llen} bytes exceeds the format's limit")
    decoder = _DECODERS.get(codec)
    if decoder is None:
        raise UnsupportedFeatureError(f"unknown compression algorithm {codec}")
    if llen == 0:
        return b""
    return decoder(skip_padding(src), llen, partial, config)


def skip_padding(src: bytes) -> Buffer:
    """The stream after its zero padding (§5.1); an all-zero pcluster is corrupt."""
    m = _NONZERO.search(src)
    if m is None:
        raise CorruptImageError(f"compressed pcluster of {len(src)} bytes holds only zeros")
    start = m.start()
    return memoryview(src)[start:] if start else src


def _corrupt(alg: str, msg: str) -> CorruptImageError:
    return CorruptImageError(f"{alg} stream: {msg}")


def _missing(alg: str, module: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"{alg} compression needs the Python module '{module}'")


def _check_length(alg: str, out: bytes, llen: int) -> bytes:
    if len(out) != llen:
        raise _corrupt(alg, f"decoded to {len(out)} bytes, the extent has {llen}")
    return out


def load_codecs(algorithms: Iterable[int]) -> None:
    """Load now what decoding ``algorithms`` needs (liblz4, the codec modules), instead of at
    the first pcluster: a daemon does it once it is idle after mounting, so that no request
    waits for imports (the first compressed read of a cold bench mount: 3 ms of CPU)."""
    for alg in algorithms:
        if alg == d.ALG_LZ4:
            _lz4run_module()
            if _liblz4() is None:
                _codec("_lz4block")
        elif alg in _ALG_MODULES:
            _codec(_ALG_MODULES[alg])


# Runs of LZ4 pclusters decoded in one call (the optional compiled module ``_lz4run``, see its
# C source): a 4 KiB-pcluster lz4hc file costs about 4 us of ctypes calls and copies per
# pcluster otherwise. EROFS_FUSE_LZ4=ctypes does without it, to compare.
LZ4Job = tuple[int, int, int, bool]  # (offset in the bytes read, pcluster length, llen, partial)
_lz4run: Any = _UNSET


def lz4_run(src: bytes, jobs: Sequence[LZ4Job]) -> bytes | None:
    """The outputs of the LZ4 pclusters ``jobs`` of ``src``, one after the other, decoded in
    one call; None without the compiled module (decode them one by one then). A job that does
    not decode to exactly its ``llen`` raises ``LZ4RunError`` naming it."""
    module = _lz4run_module()
    if module is None:
        return None
    try:
        out: bytes = module.lz4_run(src, jobs)
    except ValueError as exc:
        if len(exc.args) != 2:  # not a job's: a caller's mistake
            raise
        index, message = exc.args
        raise LZ4RunError(index, _corrupt("lz4", message)) from None
    return out


class LZ4RunError(Exception):
    """Job ``index`` of an ``lz4_run`` failed with ``error``."""

    def __init__(self, index: int, error: CorruptImageError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _lz4run_module() -> Any:
    """The compiled ``_lz4run``, loaded at the first call; None where it is missing."""
    global _lz4run
    if _lz4run is _UNSET:
        _lz4run = _load_lz4run()
    return _lz4run


def _load_lz4run() -> Any:
    if os.environ.get("EROFS_FUSE_LZ4") == "ctypes":
        return None
    try:
        return importlib.import_module("erofs_fuse.erofs._lz4run")
    except ImportError:
        return None


# LZ4 (§5.2) ------------------------------------------------------------------------------------
def _lz4(data: Buffer, llen: int, partial: bool, config: CompressionConfig) -> bytes:
    native = _liblz4()
    if native is not None:
        return native(data, llen, partial)
    lz4block = _codec("_lz4block") if not partial else None
    if lz4block is not None:
        try:
            out: bytes = lz4block.decompress(data, uncompressed_size=llen)
        except lz4block.LZ4BlockError as exc:
            raise _corrupt("lz4", str(exc)) from exc
        return _check_length("lz4", out, llen)
    return lz4_block_decode(data, llen, exact=not partial)


_NativeLz4 = Callable[[Buffer, int, bool], bytes]
_native_lz4: Any = _UNSET


def _liblz4() -> _NativeLz4 | None:
    """The system liblz4 through ctypes, or None (then python-lz4 / pure Python).

    Two reasons to prefer it over python-lz4: it has the partial decoder python-lz4 lacks (pure
    Python manages a few MB/s), and we hand it a zeroed output buffer. liblz4 does not reject
    match offset 0, which copies output bytes onto themselves: python-lz4 decodes into
    uninitialised memory, so a crafted image could read back stale heap of this process.
    """
    global _native_lz4
    if _native_lz4 is _UNSET:
        _native_lz4 = _load_liblz4()
    fn: _NativeLz4 | None = _native_lz4
    return fn


def _load_liblz4() -> _NativeLz4 | None:
    try:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL("liblz4.so.1")
        except OSError:  # find_library runs a subprocess: only when the usual name fails
            lib = ctypes.CDLL(ctypes.util.find_library("lz4") or "liblz4.so")
        # partial decoding reads out of bounds in releases before 1.9.2
        if lib.LZ4_versionNumber() < 10902:
            return None
        exact_fn = lib.LZ4_decompress_safe
        partial_fn = lib.LZ4_decompress_safe_partial
    except (ImportError, OSError, AttributeError):
        return None
    exact_fn.restype = partial_fn.restype = ctypes.c_int
    exact_fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    partial_fn.argtypes = exact_fn.argtypes + [ctypes.c_int]

    def decode(src: Buffer, llen: int, partial: bool) -> bytes:
        data = src if isinstance(src, bytes) else bytes(src)
        if len(data) > 0x7FFFFFFF:
            raise _corrupt("lz4", "pcluster too large")
        out = bytearray(llen)
        # c_char.from_buffer, not (c_char * llen): array types are cached per length, forever
        dst = ctypes.addressof(ctypes.c_char.from_buffer(out))
        if partial:
            got = partial_fn(data, dst, len(data), llen, llen)
        else:
            got = exact_fn(data, dst, len(data), llen)
        if got < 0:
            raise _corrupt("lz4", f"invalid stream (liblz4 error {got})")
        if got != llen:
            raise _corrupt("lz4", f"decoded to {got} bytes, the extent has {llen}")
        return bytes(out)

    return decode


def lz4_block_decode(src: Buffer, llen: int, *, exact: bool) -> bytes:
    """Decode an LZ4 block, producing at most ``llen`` bytes.

    ``exact``: the block must produce exactly ``llen`` bytes and end there (LZ4_decompress_safe);
    otherwise decoding stops once ``llen`` bytes are out (LZ4_decompress_safe_partial).
    """
    data = bytes(src)
    end = len(data)
    out = bytearray()
    i = 0
    while i < end:
        token = data[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            lit, i = _lz4_length(data, i, lit)
        if lit:
            room = llen - len(out)
            if lit >= room:
                if i + room > end:
                    raise _corrupt("lz4", "literals run past the end of the input")
                out += data[i:i + room]
                if exact and (lit > room or i + lit != end):
                    raise _corrupt("lz4", f"stream is longer than the {llen}-byte extent")
                return bytes(out)
            if i + lit > end:
                raise _corrupt("lz4", "literals run past the end of the input")
            out += data[i:i + lit]
            i += lit
        if i >= end:
            break  # the last sequence has literals only
        if i + 2 > end:
            raise _corrupt("lz4", "match offset past the end of the input")
        offset = data[i] | data[i + 1] << 8
        i += 2
        have = len(out)
        if offset == 0 or offset > have:
            raise _corrupt("lz4", f"match offset {offset} outside the {have} bytes decoded")
        mlen = token & 15
        if mlen == 15:
            mlen, i = _lz4_length(data, i, mlen)
        mlen += 4
        room = llen - have
        take = mlen if mlen < room else room
        _lz4_copy(out, offset, take)
        if take == room:
            if exact and (mlen > room or i != end):
                raise _corrupt("lz4", f"stream is longer than the {llen}-byte extent")
            return bytes(out)
    return _check_length("lz4", bytes(out), llen)


def _lz4_length(data: bytes, i: int, length: int) -> tuple[int, int]:
    """Add the 255-continued length extension bytes at ``i``; bounded by the input."""
    end = len(data)
    while True:
        if i >= end:
            raise _corrupt("lz4", "length runs past the end of the input")
        b = data[i]
        i += 1
        length += b
        if b != 255:
            return length, i


def _lz4_copy(out: bytearray, offset: int, count: int) -> None:
    start = len(out) - offset
    if offset >= count:
        out += out[start:start + count]
        return
    # overlapping match: the last ``offset`` bytes repeat
    pattern = bytes(out[start:])
    reps, rest = divmod(count, offset)
    out += pattern * reps + pattern[:rest]


# MicroLZMA (§5.3) ------------------------------------------------------------------------------
def _lzma(data: Buffer, llen: int, partial: bool, config: CompressionConfig) -> bytes:
    lzma = _codec("lzma")
    if lzma is None:
        raise _missing("lzma", "lzma")
    if len(data) < 2:
        raise _corrupt("lzma", "too short")
    props = ~data[0] & 0xFF
    lc, lp, pb = props % 9, props // 9 % 5, props // 45
    if props > 224 or lc + lp > 4:
        raise _corrupt("lzma", f"invalid properties byte {data[0]:#04x}")
    # Distances never reach before the extent's first byte, so a dictionary of llen bytes is
    # always enough; it saves allocating 8 MiB for every small extent.
    dict_size = max(_LZMA_MIN_DICT, min(llen, config.lzma_dict_size or _LZMA_MAX_DICT))
    filt = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
    try:
        dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[filt])
        out = dec.decompress(b"\x00" + data[1:], max_length=llen)
    except lzma.LZMAError as exc:
        raise _corrupt("lzma", str(exc)) from exc
    return _check_length("lzma", out, llen)


# DEFLATE (§5.4) --------------------------------------------------------------------------------
def _deflate(data: Buffer, llen: int, partial: bool, config: CompressionConfig) -> bytes:
    zlib = _codec("zlib")
    if zlib is None:
        raise _missing("deflate", "zlib")
    try:
        dec = zlib.decompressobj(wbits=-15)
        out = dec.decompress(data, llen)
        if len(out) == llen and not partial and not dec.eof:
            # inflate stops when the output is full, possibly just before the end-of-stream
            # code; one more step tells "ends here" from "goes on"
            if dec.decompress(dec.unconsumed_tail, 1):
                raise _corrupt("deflate", f"stream is longer than the {llen}-byte extent")
            if not dec.eof:
                raise _corrupt("deflate", f"stream does not end after {llen} bytes")
    except zlib.error as exc:
        raise _corrupt("deflate", str(exc)) from exc
    return _check_length("deflate", out, llen)


# Zstandard (§5.5) ------------------------------------------------------------------------------
def _zstd_context() -> Any:
    dctx = getattr(_zstd_local, "dctx", None)
    if dctx is None:
        dctx = _codec("zstandard").ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        _zstd_local.dctx = dctx
    return dctx


def _zstd(data: Buffer, llen: int, partial: bool, config: CompressionConfig) -> bytes:
    zstandard = _codec("zstandard")
    if zstandard is None:
        raise _missing("zstd", "zstandard")
    parts: list[bytes] = []
    have = 0
    try:
        reader = _zstd_context().stream_reader(data, read_across_frames=False)
        while have < llen:
            chunk = reader.read(llen - have)
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        if have == llen and not partial and reader.read(1):
            raise _corrupt("zstd", f"stream is longer than the {llen}-byte extent")
    except zstandard.ZstdError as exc:
        raise _corrupt("zstd", str(exc)) from exc
    return _check_length("zstd", b"".join(parts), llen)


_Decoder = Callable[[Buffer, int, bool, CompressionConfig], bytes]
_DECODERS: dict[int, _Decoder] = {
    d.ALG_LZ4: _lz4,
    d.ALG_LZMA: _lzma,
    d.ALG_DEFLATE: _deflate,
    d.ALG_ZSTD: _zstd,
}
