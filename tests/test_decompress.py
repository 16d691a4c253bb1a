"""Decompressors (spec §5, §11.6): exact and partial decoding, zero padding, caps, bad input."""

from __future__ import annotations

import lzma
import os
import tracemalloc
import zlib
from typing import Callable

import lz4.block
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_fuse.erofs import decompress as dc
from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.decompress import decompress, lz4_block_decode
from erofs_fuse.erofs.errors import CorruptImageError, UnsupportedFeatureError
from erofs_fuse.erofs.superblock import CompressionConfig

CFG = CompressionConfig()
MiB = 1 << 20

# "abcd", then a match of 8 bytes 4 back (overlapping), then the literals "xyz12"
HAND_LZ4 = bytes([0x44]) + b"abcd" + b"\x04\x00" + bytes([0x50]) + b"xyz12"
HAND_OUT = b"abcdabcdabcdxyz12"


def microlzma(data: bytes, preset: int = 6) -> bytes:
    """What mkfs.erofs writes for LZMA: NOT(props), then the raw LZMA1 stream minus byte 0."""
    raw = lzma.compress(data, format=lzma.FORMAT_RAW,
                        filters=[{"id": lzma.FILTER_LZMA1, "preset": preset}])
    props = (2 * 5 + 0) * 9 + 3  # pb=2, lp=0, lc=3: the preset defaults
    return bytes([~props & 0xFF]) + raw[1:]


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zstd_frame(data: bytes) -> bytes:
    out: bytes = zstandard.ZstdCompressor(level=3).compress(data)
    return out


def lz4_block(data: bytes) -> bytes:
    out: bytes = lz4.block.compress(data, store_size=False)
    return out


ENCODERS = {
    d.ALG_LZ4: lz4_block,
    d.ALG_LZMA: microlzma,
    d.ALG_DEFLATE: raw_deflate,
    d.ALG_ZSTD: zstd_frame,
}
SAMPLE = b"".join(b"line %d of a compressible sample\n" % i for i in range(3000)) + os.urandom(5000)


# hand-made LZ4 --------------------------------------------------------------------------------
def test_hand_lz4_exact_c_and_python() -> None:
    assert decompress(d.ALG_LZ4, HAND_LZ4, len(HAND_OUT), False, CFG) == HAND_OUT
    assert lz4_block_decode(HAND_LZ4, len(HAND_OUT), exact=True) == HAND_OUT


@pytest.mark.parametrize("n", [1, 4, 6, 12, 13, len(HAND_OUT)])
def test_hand_lz4_partial(n: int) -> None:
    assert decompress(d.ALG_LZ4, HAND_LZ4, n, True, CFG) == HAND_OUT[:n]
    assert lz4_block_decode(HAND_LZ4, n, exact=False) == HAND_OUT[:n]


def test_hand_lz4_exact_rejects_wrong_length() -> None:
    for n in (len(HAND_OUT) - 1, len(HAND_OUT) + 1):
        with pytest.raises(CorruptImageError):
            decompress(d.ALG_LZ4, HAND_LZ4, n, False, CFG)
        with pytest.raises(CorruptImageError):
            lz4_block_decode(HAND_LZ4, n, exact=True)


@pytest.mark.parametrize("stream", [
    bytes([0x44]) + b"abcd" + b"\x05\x00" + bytes([0x50]) + b"xyz12",  # before the output start
    bytes([0x44]) + b"abcd" + b"\x04",  # offset cut short
    bytes([0x80]) + b"abc",  # literals past the end
    bytes([0xF0]) + b"\xff\xff",  # length extension past the end
])
def test_lz4_bad_streams(stream: bytes) -> None:
    for partial in (False, True):
        with pytest.raises(CorruptImageError):
            decompress(d.ALG_LZ4, stream, 16, partial, CFG)
        with pytest.raises(CorruptImageError):
            lz4_block_decode(stream, 16, exact=not partial)


OFFSET0 = bytes([0x44]) + b"abcd" + b"\x00\x00" + bytes([0x50]) + b"xyz12"


def test_lz4_offset_zero_never_leaks_memory() -> None:
    """liblz4 does not reject offset 0; its output must then come from zeroed memory."""
    assert dc._liblz4() is not None, "the system liblz4 should be loadable here"
    for partial in (False, True):
        try:
            out = decompress(d.ALG_LZ4, OFFSET0, 17, partial, CFG)
        except CorruptImageError:
            continue
        # liblz4's wide copies may replay input bytes; anything else would be stale memory
        assert out[:4] == b"abcd" and out[-5:] == b"xyz12"
        assert set(out) <= set(OFFSET0) | {0}
    with pytest.raises(CorruptImageError):
        lz4_block_decode(OFFSET0, 17, exact=True)


def check_lz4_sample() -> None:
    """The whole, a partial and an overlong decode of SAMPLE, by whichever LZ4 path is left."""
    src = lz4_block(SAMPLE)
    assert decompress(d.ALG_LZ4, src, len(SAMPLE), False, CFG) == SAMPLE
    assert decompress(d.ALG_LZ4, src, 1000, True, CFG) == SAMPLE[:1000]
    with pytest.raises(CorruptImageError):
        decompress(d.ALG_LZ4, src, len(SAMPLE) + 1, False, CFG)


def test_python_lz4_extension_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc, "_native_lz4", None)
    check_lz4_sample()


def test_pure_python_lz4_when_nothing_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc, "_lz4block", None)
    monkeypatch.setattr(dc, "_native_lz4", None)
    check_lz4_sample()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), rep=st.integers(1, 40), cut=st.floats(0, 1))
def test_lz4_decoders_agree(data: bytes, rep: int, cut: float) -> None:
    payload = data * rep + data[: len(data) // 2]
    if not payload:
        return
    src = lz4_block(payload)
    n = max(1, int(len(payload) * cut))
    assert lz4_block_decode(src, len(payload), exact=True) == payload
    assert decompress(d.ALG_LZ4, src, len(payload), False, CFG) == payload
    assert lz4_block_decode(src, n, exact=False) == payload[:n]
    assert decompress(d.ALG_LZ4, src, n, True, CFG) == payload[:n]


# every algorithm ------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", sorted(ENCODERS))
def test_roundtrip_exact_and_partial(alg: int) -> None:
    src = ENCODERS[alg](SAMPLE)
    assert decompress(alg, src, len(SAMPLE), False, CFG) == SAMPLE
    for n in (1, 4096, len(SAMPLE) // 2):
        assert decompress(alg, src, n, True, CFG) == SAMPLE[:n]


@pytest.mark.parametrize("alg", sorted(ENCODERS))
def test_zero_padding_is_skipped(alg: int) -> None:
    src = bytes(3000) + ENCODERS[alg](SAMPLE)
    assert decompress(alg, src, len(SAMPLE), False, CFG) == SAMPLE


@pytest.mark.parametrize("alg", sorted(ENCODERS))
def test_all_zero_pcluster_is_corrupt(alg: int) -> None:
    with pytest.raises(CorruptImageError):
        decompress(alg, bytes(4096), 100, False, CFG)


@pytest.mark.parametrize("alg", sorted(ENCODERS))
def test_truncated_stream_is_corrupt(alg: int) -> None:
    src = ENCODERS[alg](SAMPLE)
    for partial in (False, True):
        with pytest.raises(CorruptImageError):
            decompress(alg, src[: len(src) // 2], len(SAMPLE), partial, CFG)


@pytest.mark.parametrize("alg", sorted(ENCODERS))
def test_garbage_is_corrupt(alg: int) -> None:
    garbage = bytes([0x28, 0xB5, 0x2F, 0xFD]) + os.urandom(200) if alg == d.ALG_ZSTD else (
        b"\xff" + os.urandom(300))
    for partial in (False, True):
        with pytest.raises(CorruptImageError):
            decompress(alg, garbage, 64 << 10, partial, CFG)


@pytest.mark.parametrize("alg", [d.ALG_LZ4, d.ALG_DEFLATE, d.ALG_ZSTD])
def test_exact_mode_rejects_longer_stream(alg: int) -> None:
    src = ENCODERS[alg](SAMPLE)
    with pytest.raises(CorruptImageError):
        decompress(alg, src, len(SAMPLE) - 10, False, CFG)
    assert decompress(alg, src, len(SAMPLE) - 10, True, CFG) == SAMPLE[:-10]


def test_lzma_bad_properties_byte() -> None:
    src = microlzma(SAMPLE)
    for props in (225, (1 * 5 + 0) * 9 + 5):  # over 224; pb=1, lp=0, lc=5: lc + lp > 4
        with pytest.raises(CorruptImageError):
            decompress(d.ALG_LZMA, bytes([~props & 0xFF]) + src[1:], 100, False, CFG)


def test_unknown_algorithm_is_unsupported() -> None:
    with pytest.raises(UnsupportedFeatureError):
        decompress(9, b"x", 1, False, CFG)


def test_oversized_extent_is_unsupported() -> None:
    with pytest.raises(UnsupportedFeatureError):
        decompress(d.ALG_LZ4, HAND_LZ4, d.Z_PCLUSTER_MAX_DSIZE + 1, True, CFG)


@pytest.mark.parametrize("module, alg, name", [
    ("zstandard", d.ALG_ZSTD, "zstd"),
    ("lzma", d.ALG_LZMA, "lzma"),
    ("zlib", d.ALG_DEFLATE, "deflate"),
])
def test_missing_module_names_the_algorithm(monkeypatch: pytest.MonkeyPatch, module: str,
                                            alg: int, name: str) -> None:
    monkeypatch.setattr(dc, module, None)
    with pytest.raises(UnsupportedFeatureError, match=name):
        decompress(alg, b"\x01\x02\x03", 10, False, CFG)


# bombs ----------------------------------------------------------------------------------------
def _bomb(alg: int, size: int) -> bytes:
    """A small stream of zeros expanding to ``size`` bytes, made without holding them."""
    chunk = bytes(4 * MiB)
    if alg == d.ALG_ZSTD:
        c = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
        return b"".join(c.compress(chunk) for _ in range(size // len(chunk))) + c.flush()
    if alg == d.ALG_DEFLATE:
        z = zlib.compressobj(1, zlib.DEFLATED, -15)
        return b"".join(z.compress(chunk) for _ in range(size // len(chunk))) + z.flush()
    if alg == d.ALG_LZMA:
        return microlzma(bytes(size), preset=0)
    return lz4_block(bytes(size))


BOMB_SIZES = {d.ALG_LZ4: 64 * MiB, d.ALG_LZMA: 48 * MiB, d.ALG_DEFLATE: 256 * MiB,
              d.ALG_ZSTD: 512 * MiB}


@pytest.mark.parametrize("alg", sorted(ENCODERS))
def test_bomb_stays_within_the_cap(alg: int) -> None:
    bomb = _bomb(alg, BOMB_SIZES[alg])
    assert len(bomb) < 2 * MiB
    cap = d.Z_PCLUSTER_MAX_DSIZE
    tracemalloc.start()
    try:
        out = decompress(alg, bomb, cap, True, CFG)
        assert out == bytes(cap)
        del out
        if alg == d.ALG_LZMA:
            # MicroLZMA has no end marker: exact mode can only check "cap bytes came out" (§5.3)
            assert len(decompress(alg, bomb, cap, False, CFG)) == cap
        else:
            with pytest.raises(CorruptImageError):
                decompress(alg, bomb, cap, False, CFG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * cap, f"peak {peak} bytes for a {cap}-byte cap"


def test_pure_python_bomb_stays_within_the_cap() -> None:
    bomb = lz4_block(bytes(64 * MiB))
    tracemalloc.start()
    try:
        assert len(lz4_block_decode(bomb, MiB, exact=False)) == MiB
        with pytest.raises(CorruptImageError):
            lz4_block_decode(bomb, MiB, exact=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB + len(bomb)


def test_tiny_input_claiming_12_mib_is_corrupt() -> None:
    tiny = {alg: enc(b"tiny") for alg, enc in ENCODERS.items()}
    tracemalloc.start()
    try:
        for alg, src in tiny.items():
            for partial in (False, True):
                with pytest.raises(CorruptImageError):
                    decompress(alg, src, d.Z_PCLUSTER_MAX_DSIZE, partial, CFG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * d.Z_PCLUSTER_MAX_DSIZE


# lz4_run: runs of LZ4 pclusters in one call (the compiled _lz4run) --------------------------------
def _pcluster(data: bytes, size: int) -> bytes:
    """``data`` LZ4-compressed and right-aligned in ``size`` bytes, as mkfs.erofs stores it."""
    stream = lz4_block(data)
    return bytes(max(0, size - len(stream))) + stream


def _run_of(chunks: list[bytes]) -> tuple[bytes, list[dc.LZ4Job]]:
    src = b""
    jobs: list[dc.LZ4Job] = []
    for chunk in chunks:
        pcluster = _pcluster(chunk, 4096 * (1 + len(chunk) // 4096))
        jobs.append((len(src), len(pcluster), len(chunk), False))
        src += pcluster
    return src, jobs


def test_lz4_run_is_built() -> None:
    """pip install builds erofs_fuse/erofs/_lz4run.c (setup.py, with the compiler the block
    hasher needs): without it a compressed read decodes pcluster by pcluster through ctypes.
    Only EROFS_FUSE_LZ4=ctypes may turn it off."""
    assert os.environ.get("EROFS_FUSE_LZ4") != "ctypes", "the suite runs the compiled decoder"
    assert dc._load_lz4run() is not None, "erofs_fuse/erofs/_lz4run.c was not built"


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=9000), min_size=1, max_size=12),
       rep=st.integers(1, 8))
def test_lz4_run_equals_one_by_one(chunks: list[bytes], rep: int) -> None:
    chunks = [c * rep for c in chunks]
    src, jobs = _run_of(chunks)
    assert dc.lz4_run(src, jobs) == b"".join(chunks)
    assert b"".join(decompress(d.ALG_LZ4, src[at:at + n], llen, False, CFG)
                    for at, n, llen, _ in jobs) == b"".join(chunks)


def test_lz4_run_decodes_partial_pclusters() -> None:
    # a partial stream decodes to more than its extent holds: only llen bytes are kept
    src, jobs = _run_of([SAMPLE[:8000], SAMPLE[8000:16000]])
    jobs = [(at, n, 5000, True) for at, n, _, _ in jobs]
    assert dc.lz4_run(src, jobs) == SAMPLE[:5000] + SAMPLE[8000:13000]


@pytest.mark.parametrize("bad, why", [
    (lambda src, jobs: (src, [jobs[0], (jobs[1][0], jobs[1][1], jobs[1][2] + 1, False)]),
     "decoded to fewer bytes"),
    (lambda src, jobs: (src[:jobs[1][0]] + b"\xff" * jobs[1][1], jobs), "invalid stream"),
    (lambda src, jobs: (src[:jobs[1][0]] + bytes(jobs[1][1]), jobs), "only zeros"),
    (lambda src, jobs: (src, [jobs[0], (len(src) - 10, 20, 100, False)]), "outside the bytes"),
    (lambda src, jobs: (src, [jobs[0], (-1, 20, 100, False)]), "outside the bytes"),
    (lambda src, jobs: (src, [jobs[0], (0, 20, 1 << 30, False)]), "output length"),
])
def test_lz4_run_names_the_pcluster_that_fails(bad: Callable[..., tuple[bytes, list[dc.LZ4Job]]],
                                               why: str) -> None:
    src, jobs = bad(*_run_of([SAMPLE[:4000], SAMPLE[4000:8000]]))
    with pytest.raises(dc.LZ4RunError) as caught:
        dc.lz4_run(src, jobs)
    assert caught.value.index == 1
    assert isinstance(caught.value.error, CorruptImageError)
    assert why in str(caught.value.error)


@settings(max_examples=200, deadline=None)
@given(src=st.binary(max_size=3000),
       jobs=st.lists(st.tuples(st.integers(-5, 3100), st.integers(-5, 3100),
                               st.integers(-5, 70000), st.booleans()), max_size=6))
def test_lz4_run_survives_any_input(src: bytes, jobs: list[dc.LZ4Job]) -> None:
    try:
        out = dc.lz4_run(src, jobs)
    except dc.LZ4RunError:
        return
    assert out is not None and len(out) == sum(llen for _, _, llen, _ in jobs)


def test_lz4_run_without_the_compiled_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc, "_lz4run", None)
    src, jobs = _run_of([SAMPLE[:4000]])
    assert dc.lz4_run(src, jobs) is None
