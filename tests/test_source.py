"""The writer's input stream (erofs_fuse/mkfs/source.py): ISA-L or zlib inflate give the same
bytes and the same errors, and the read-ahead thread never outlives a conversion."""

from __future__ import annotations

import gzip
import hashlib
import io
import threading
import zlib
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

from erofs_fuse.mkfs import ConvertOptions, MkfsError, convert_tar
from erofs_fuse.mkfs import source
from erofs_fuse.mkfs.source import InputStream
from ocilayout import many_files_tar

TAR = many_files_tar(3000, size=700)


def zlib_only() -> tuple[ModuleType, tuple[type[Exception], ...]]:
    return zlib, (zlib.error,)


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "erofs-fuse-read-ahead" and t.is_alive()]


def test_isal_is_installed_and_chosen() -> None:
    # install-deps installs it: the fallback is for machines without the package
    module, _ = source._inflate_module()
    assert module.__name__.endswith("isal_zlib")


def test_isal_and_zlib_make_the_same_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # two members, as some registries' layers have
    data = gzip.compress(TAR[:len(TAR) // 2]) + gzip.compress(TAR[len(TAR) // 2:])
    results = []
    for name in ("isal", "zlib"):
        if name == "zlib":
            monkeypatch.setattr(source, "_inflate_module", zlib_only)
        out = tmp_path / f"{name}.erofs"
        result = convert_tar(io.BytesIO(data), str(out), ConvertOptions(seal=True))
        results.append((out.read_bytes(), result.diff_id, result.verity_digest))
    assert results[0] == results[1]
    assert results[0][1] == "sha256:" + hashlib.sha256(TAR).hexdigest()


@pytest.mark.parametrize("inflate", ["isal", "zlib"])
def test_bad_gzip_is_the_same_error(inflate: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if inflate == "zlib":
        monkeypatch.setattr(source, "_inflate_module", zlib_only)
    data = gzip.compress(TAR)
    truncated = data[:len(data) // 2]
    with pytest.raises(MkfsError, match="gzip stream truncated"):
        convert_tar(io.BytesIO(truncated), str(tmp_path / "t.erofs"), ConvertOptions())
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 3: len(corrupt) // 3 + 64] = bytes(64)
    with pytest.raises(MkfsError, match="bad gzip stream|gzip stream truncated"):
        convert_tar(io.BytesIO(bytes(corrupt)), str(tmp_path / "c.erofs"), ConvertOptions())
    assert not list(tmp_path.iterdir())
    assert read_ahead_threads() == []


def test_read_ahead_stops_when_the_conversion_fails(tmp_path: Path) -> None:
    """A bad header early in a long stream: the thread decoding ahead stops, and stops
    reading its input (it was blocked on a full queue)."""
    bad = bytearray(TAR)
    bad[512 * 40 + 148: 512 * 40 + 156] = b"00000000"  # a wrong header checksum, early
    reads = []

    class Counting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            data = super().read(n)
            reads.append(len(data))
            return data

    raw = Counting(bytes(bad) * 40)  # far more than the read-ahead holds
    with pytest.raises(MkfsError, match="checksum"):
        convert_tar(raw, str(tmp_path / "bad.erofs"), ConvertOptions())
    assert read_ahead_threads() == []
    assert sum(reads) < len(raw.getvalue()) // 2
    assert not list(tmp_path.iterdir())


def test_stream_reads_and_hashes_every_byte() -> None:
    data = bytes(range(256)) * 40000
    stream = InputStream(io.BytesIO(gzip.compress(data)))
    try:
        assert stream.compression == "gzip"
        assert stream.read(10) == data[:10]
        assert stream.skip(1000) == 1000
        assert stream.read(5) == data[1010:1015]
        assert stream.drain() == len(data) - 1015
        assert stream.read(1) == b"" and stream.eof
        assert stream.diff_id() == "sha256:" + hashlib.sha256(data).hexdigest()
    finally:
        stream.close()
    assert read_ahead_threads() == []


def test_read_ahead_thread_takes_no_signal() -> None:
    """A worker blocks SIGTERM while it reports its result: the read-ahead thread must block it
    too, or the kernel hands it the signal and the handler runs anyway."""
    import signal

    blocked: list[set[signal.Signals]] = []

    def probe() -> Iterator[bytes]:
        blocked.append(signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        yield b"x" * 10

    ahead = source._ReadAhead(probe())
    try:
        assert ahead.next() == b"x" * 10 and ahead.next() == b""
    finally:
        ahead.close()
    assert {signal.SIGTERM, signal.SIGINT} <= blocked[0]


def test_read_ahead_thread_is_born_with_signals_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not blocked by its own first act, which leaves an instant in which the kernel may hand it
    a process-directed SIGINT: the main thread, asleep in the queue, would never wake. The
    creating thread's mask is as it was."""
    import signal

    at_birth: list[set[signal.Signals]] = []
    run = source._ReadAhead._run

    def probe(self: source._ReadAhead, chunks: Iterator[bytes]) -> None:
        at_birth.append(signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        run(self, chunks)

    monkeypatch.setattr(source._ReadAhead, "_run", probe)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    ahead = source._ReadAhead(iter([b"x"]))
    try:
        assert ahead.next() == b"x" and ahead.next() == b""
    finally:
        ahead.close()
    assert {signal.SIGINT, signal.SIGTERM} <= at_birth[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
