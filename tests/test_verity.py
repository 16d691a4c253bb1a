"""Runtime integrity: trees against ``fsverity digest`` and ``veritysetup``, lazy verification,
tamper tests at the blob and at the image level.

``fsverity`` (fsverity-utils) and ``veritysetup`` (cryptsetup-bin) are references: without
them these tests fail, they never skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from io import StringIO
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from erofs_fuse.blob import Blob, FileBlob
from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs import space
from erofs_fuse.erofs.extent import Source
from erofs_fuse.erofs.image import Image, Inode
from erofs_fuse.cli import main as cli_main
from erofs_fuse.verity import (
    DmVerityRoot,
    FsVerityDigest,
    HashParams,
    IntegrityError,
    ProgressBar,
    TrustError,
    TrustSpec,
    VerifiedBlob,
    fsverity_tree,
    open_layer_blob,
    parse_trust_args,
    read_digests_file,
    seal,
)
from erofs_fuse.verity import build
from erofs_fuse.verity.build import hash_blocks, hash_blocks_python
from erofs_fuse.verity.formats import HASH_ALGS, SaltMode, geometry

from helpers import WatchedBlob, corpus, flip

BS = 4096
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(autouse=True, scope="module")
def _reference_tools() -> None:
    for tool in ("fsverity", "veritysetup"):
        assert shutil.which(tool), f"{tool} missing: apt-get install fsverity cryptsetup-bin"


# reference tools ------------------------------------------------------------------------------

def fsverity_digest(path: str, *opts: str) -> str:
    out = subprocess.run(["fsverity", "digest", *opts, path], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def veritysetup_format(data: str, hash_dev: str, *opts: str) -> dict[str, str]:
    """``veritysetup format`` (the hash file removed first: veritysetup never truncates)."""
    if os.path.exists(hash_dev) and hash_dev != data:
        os.unlink(hash_dev)
    out = subprocess.run(["veritysetup", "format", *opts, data, hash_dev], capture_output=True,
                         text=True, check=True).stdout
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


SIZES = [0, 1, BS, BS + 1, 129 * BS, (1 << 20) + 1]
FIXTURES = ["plain.erofs", "lz4.erofs", "layer-lower-tarindex.erofs", "b512.erofs"]


def sample(tmp_path: Path, case: str | int) -> str:
    if isinstance(case, int):
        return write(tmp_path / f"data{case}", payload(case))
    dest = tmp_path / case
    shutil.copyfile(corpus(case), dest)
    return str(dest)


@pytest.mark.parametrize("size", [1, BS - 1, BS, BS + 1, 3 * BS + 5])
@pytest.mark.parametrize("how", ["accelerated", "python"])
def test_hash_blocks_pads_only_the_last_block(size: int, how: str) -> None:
    """hash_blocks hashes whole blocks in place and a zero-padded copy of a partial last one:
    the same hashes as over the data zero-padded whole, as fs-verity defines them (both the
    compiled hasher and the hashlib one)."""
    data = payload(size)
    padded = data + bytes(-size % BS)
    params = HashParams.fsverity()
    hasher = params.hasher()
    want = b"".join(hasher(padded[k:k + BS]) for k in range(0, len(padded), BS))
    got = (hash_blocks(params, data, BS, params.slot_size) if how == "accelerated"
           else hash_blocks_python(hasher, data, BS, params.slot_size))
    assert got == want


def test_block_hasher_is_built() -> None:
    """pip install builds the compiled block hasher (setup.py; OpenSSL's headers from
    libssl-dev): without it every verified read hashes in Python, 1.7x slower on large reads.
    Only EROFS_FUSE_HASH=python may turn it off."""
    assert os.environ.get("EROFS_FUSE_HASH") != "python", "the suite runs the compiled hasher"
    assert build._digests is not None, "erofs_fuse/verity/_blockhash.c was not built"


@settings(max_examples=60, deadline=None)
@given(alg=st.sampled_from(sorted(HASH_ALGS)), mode=st.sampled_from(list(SaltMode)),
       salt=st.binary(max_size=40), log_block=st.integers(9, 16),
       size=st.sampled_from([0, 1, 511, 4096, 4097, 65536 + 3, 256 << 10, (256 << 10) + 1,
                             (1 << 20) - 7]),
       slot_extra=st.sampled_from([0, 12]), threads=st.sampled_from([1, 2]))
def test_block_hasher_agrees_with_hashlib(alg: str, mode: SaltMode, salt: bytes, log_block: int,
                                          size: int, slot_extra: int, threads: int) -> None:
    """The compiled hasher gives hashlib's digests for every algorithm, salt mode (prefix,
    padded prefix, suffix), block size, partial last block and slot padding, on one thread or
    two (buffers of 256 KiB and more are split)."""
    assert build._digests is not None
    block = 1 << log_block
    if mode is SaltMode.FSVERITY:
        assume(HASH_ALGS[alg][0] and len(salt) <= 32)
    params = HashParams(alg, block, block, salt, mode)
    data = random.Random(size ^ block).randbytes(size)
    slot = params.digest_size + slot_extra
    prefix, suffix = params.salt_affixes
    got = build._digests(alg, prefix, suffix, data, block, slot, threads)
    assert got == hash_blocks_python(params.hasher(), data, block, slot)


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_sha_extensions_hash_where_the_cpu_has_them() -> None:
    """SHA-256 blocks (fs-verity's, seal's and veritysetup's trees) go through sha256ni.c
    wherever the CPU has the SHA extensions (1.8x OpenSSL's speed here); EROFS_FUSE_HASH=openssl
    keeps OpenSSL, to compare."""
    from erofs_fuse.verity import _blockhash

    assert _blockhash.SHA_NI == ("sha_ni" in _cpu_flags())
    code = "from erofs_fuse.verity import _blockhash; print(_blockhash.SHA_NI)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "EROFS_FUSE_HASH": "openssl"}).stdout
    assert out.strip() == "0"


def test_openssl_keeps_sha256_when_asked() -> None:
    """With EROFS_FUSE_HASH=openssl the SHA-256 blocks go through OpenSSL again (the path of
    CPUs without the SHA extensions), with hashlib's digests: salted or not, whole or a
    partial last block, one thread or two."""
    code = """if True:
        import hashlib, random
        from erofs_fuse.verity import _blockhash
        assert _blockhash.SHA_NI == 0
        r = random.Random(5)
        for size, prefix, suffix, threads in ((8 * 4096, b"", b"", 1), (5000, b"s" * 32, b"", 1),
                                              ((1 << 20) + 7, b"", b"t" * 32, 2)):
            data = r.randbytes(size)
            padded = data + bytes(-size % 4096)
            want = b"".join(hashlib.sha256(prefix + padded[k:k + 4096] + suffix).digest()
                            for k in range(0, len(padded), 4096))
            assert _blockhash.digests("sha256", prefix, suffix, data, 4096, 32, threads) == want
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "EROFS_FUSE_HASH": "openssl"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@settings(max_examples=120, deadline=None)
@given(log_block=st.integers(6, 16), blocks=st.integers(0, 19), tail=st.integers(0, 100),
       prefix=st.binary(max_size=130), suffix=st.binary(max_size=300),
       slot_extra=st.sampled_from([0, 32]), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 1 << 16))
def test_two_lane_sha256_agrees_with_hashlib(log_block: int, blocks: int, tail: int,
                                             prefix: bytes, suffix: bytes, slot_extra: int,
                                             threads: int, seed: int) -> None:
    """The two-lane path gives hashlib's digest of prefix || block || suffix for any block size
    from 64 bytes, salts before or after of any length (a chunk of salt alone, salt and block
    in one chunk, padding in a chunk of its own; past 256 bytes of suffix OpenSSL takes over),
    even and odd block counts, a zero-padded partial last block, slot padding, and one thread
    or two past 512 KiB."""
    block = 1 << log_block
    data = random.Random(seed).randbytes(blocks * block + min(tail, block - 1))
    padded = data + bytes(-len(data) % block)
    slot = 32 + slot_extra
    want = b"".join(hashlib.sha256(prefix + padded[k:k + block] + suffix).digest()
                    + bytes(slot_extra) for k in range(0, len(padded), block))
    assert build._digests is not None
    assert build._digests("sha256", prefix, suffix, data, block, slot, threads) == want


def test_two_lane_sha256_splits_large_buffers_alike() -> None:
    """Buffers past the two-thread threshold, whole and with a partial last block, on one
    thread and two: the same digests as hashlib."""
    params = HashParams.fsverity()
    for size in ((1 << 20) + 3 * BS, (1 << 20) + 3 * BS + 17, 9 << 20):
        data = random.Random(size).randbytes(size)
        want = hash_blocks_python(params.hasher(), data, BS, 32)
        assert build._digests is not None
        for threads in (1, 2):
            assert build._digests("sha256", b"", b"", data, BS, 32, threads) == want


def test_block_hasher_serves_threads_at_once() -> None:
    """Reads verified on several threads at once (a lazy mount's blocking reads): each call
    gets its own buffer's digests while the others hash outside the GIL, split or not."""
    params = HashParams.fsverity()
    buffers = [random.Random(k).randbytes((1 << 20) - 4096 * k) for k in range(8)]
    want = [hash_blocks_python(params.hasher(), b, BS, params.slot_size) for b in buffers]
    got: list[bytes | None] = [None] * len(buffers)

    def work(k: int) -> None:
        for _ in range(5):
            got[k] = hash_blocks(params, buffers[k], BS, params.slot_size)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(buffers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_block_hasher_refuses_bad_arguments() -> None:
    """An unknown algorithm, a block size out of range or a slot shorter than the digest or
    past any format's (whose size times the block count could overflow) is a ValueError, not a
    crash or a short result."""
    digests = build._digests
    assert digests is not None
    for args in (("md0", 4096, 32), ("sha256", 0, 32), ("sha256", 1 << 17, 32),
                 ("sha256", 4096, 31), ("sha256", 4096, 1 << 62)):
        alg, block, slot = args
        with pytest.raises(ValueError):
            digests(alg, b"", b"", b"x" * 10, block, slot, 1)


# sealing against the reference tools ----------------------------------------------------------

@pytest.mark.parametrize("case", [*SIZES, *FIXTURES])
def test_seal_digest_and_tree_match_fsverity(tmp_path: Path, case: str | int) -> None:
    layer = sample(tmp_path, case)
    result = seal(layer)
    assert result.digest_line() == fsverity_digest(layer)
    ref_tree = str(tmp_path / "ref.tree")
    ref_desc = str(tmp_path / "ref.desc")
    fsverity_digest(layer, f"--out-merkle-tree={ref_tree}", f"--out-descriptor={ref_desc}")
    sidecar = Path(result.sidecar).read_bytes()
    tree = sidecar[BS:] if result.dm_root is not None else sidecar
    assert tree == Path(ref_tree).read_bytes()
    size = os.path.getsize(layer)
    assert result.data_blocks == -(-size // BS)
    assert (result.dm_root is not None) == (size > 0 and size % BS == 0)
    assert result.descriptor is None


@pytest.mark.parametrize("case", [BS, 129 * BS, 1 << 20, 300 * BS, "plain.erofs", "lz4.erofs"])
def test_sidecar_is_veritysetup_hash_device(tmp_path: Path, case: str | int) -> None:
    layer = sample(tmp_path, case)
    result = seal(layer)
    ref = str(tmp_path / "ref.vh")
    info = veritysetup_format(layer, ref, "--salt=-", f"--uuid={ZERO_UUID}", "--hash=sha256",
                              "--data-block-size=4096", "--hash-block-size=4096")
    assert Path(result.sidecar).read_bytes() == Path(ref).read_bytes()
    assert result.dm_root is not None and result.dm_root.hex() == info["Root hash"]
    assert str(result.data_blocks) == info["Data blocks"]
    subprocess.run(["veritysetup", "verify", layer, result.sidecar, info["Root hash"]],
                   check=True, capture_output=True)


@pytest.mark.parametrize("alg,block_size,salt", [
    ("sha512", 4096, "0102030405060708090a"),
    ("sha256", 1024, "ab" * 32),
    ("sha256", 65536, ""),
    ("sha256", 4096, "deadbeef"),
    ("sha512", 4096, ""),  # the defaults follow from the digest: no descriptor needed
])
def test_seal_other_parameters(tmp_path: Path, alg: str, block_size: int, salt: str) -> None:
    data = payload(300 * 1024 + 7)
    layer = write(tmp_path / "layer", data)
    params = HashParams.fsverity(alg, block_size, bytes.fromhex(salt))
    result = seal(layer, progress=None, params=params)
    opts = [f"--hash-alg={alg}", f"--block-size={block_size}"]
    opts += [f"--salt={salt}"] if salt else []
    ref_desc = str(tmp_path / "ref.desc")
    assert result.digest_line() == fsverity_digest(layer, *opts, f"--out-descriptor={ref_desc}")
    if block_size != 4096 or salt:
        assert result.descriptor is not None
        assert Path(result.descriptor).read_bytes() == Path(ref_desc).read_bytes()
    else:
        assert result.descriptor is None
    blob = open_layer_blob(layer, TrustSpec(FsVerityDigest.parse(result.digest)), require=True)
    try:
        assert isinstance(blob, VerifiedBlob)
        assert blob.read(0, len(data)) == data
    finally:
        blob.close()


def test_seal_command_prints_fsverity_lines(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path / "a.erofs", payload(10 * BS))
    b = write(tmp_path / "b.erofs", payload(BS + 5, seed=2))
    assert cli_main(["seal", a, b]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    digests = [line for line in lines if not line.startswith("#")]
    assert digests == fsverity_digest(a).splitlines() + fsverity_digest(b).splitlines()
    comments = [line for line in lines if line.startswith("#")]
    info = veritysetup_format(a, str(tmp_path / "ref.vh"), "--salt=-")
    assert comments == [f"# dm-verity {info['Root hash']}:10 {a}"]  # b is not block-aligned
    roots = write(tmp_path / "roots", out.encode())
    assert [(str(dg), p) for dg, p in read_digests_file(roots)] == [
        tuple(line.split(" ", 1)) for line in digests]
    # the printed root is what --dm-verity takes
    spec = parse_trust_args([a], dm_verity=[f"0={comments[0].split()[2]}"])[0]
    assert spec.dmverity == DmVerityRoot(bytes.fromhex(info["Root hash"]), 10)


def test_seal_command_errors_are_one_line_exit_2(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cases = [([str(tmp_path / "missing")], "No such file"),
             ([str(tmp_path)], "not a regular file"),
             (["-o", "x", "a", "b"], "--output takes exactly one"),
             (["--block-size=1000", "a"], "block size"),
             (["--salt", "zz", "a"], "not hex"),
             ([], "required")]
    for args, why in cases:
        assert cli_main(["seal", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("erofs-fuse: ") and why in err and err.count("\n") == 1, err


def test_seal_library_raises_seal_error(tmp_path: Path) -> None:
    from erofs_fuse.verity import SealError

    with pytest.raises(SealError, match="No such file"):
        seal(str(tmp_path / "missing"))
    with pytest.raises(SealError, match="not a regular file"):
        seal(str(tmp_path))


def test_seal_through_cli(tmp_path: Path) -> None:
    layer = sample(tmp_path, "plain.erofs")
    proc = subprocess.run([sys.executable, "-m", "erofs_fuse", "seal", layer],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == fsverity_digest(layer)


def test_progress_bar() -> None:
    stream = StringIO()
    bar = ProgressBar("L", stream)
    bar(50 << 20, 100 << 20)
    bar(100 << 20, 100 << 20)
    bar.clear()
    text = stream.getvalue()
    assert "sealing L  50% 50/100 MiB" in text and "100%" in text and text.endswith("\r")


# opening and reading through other tools' trees -----------------------------------------------

def read_all(blob: Blob, step: int = 65536) -> bytes:
    return b"".join(blob.read(off, min(step, blob.size - off)) for off in range(0, blob.size, step))


@pytest.mark.parametrize("size", [0, 1, BS, 5 * BS + 3, 200 * BS])
def test_raw_fsverity_tree_sidecar(tmp_path: Path, size: int) -> None:
    data = payload(size)
    layer = write(tmp_path / "layer", data)
    digest = fsverity_digest(layer, f"--out-merkle-tree={layer}.verity").split()[0]
    blob = open_layer_blob(layer, TrustSpec(FsVerityDigest.parse(digest)), require=True)
    assert isinstance(blob, VerifiedBlob) and blob.size == size
    assert read_all(blob) == data
    blob.close()


def test_raw_fsverity_tree_with_descriptor(tmp_path: Path) -> None:
    data = payload(77 * 1024 + 1)
    layer = write(tmp_path / "layer", data)
    side = str(tmp_path / "tree")
    digest = fsverity_digest(layer, "--hash-alg=sha512", "--block-size=1024", "--salt=00ff",
                             f"--out-merkle-tree={side}", f"--out-descriptor={side}.desc")
    spec = parse_trust_args([layer], verity=[f"0={digest.split()[0]}"],
                            verity_sidecar=[f"0={side}"])[0]
    blob = open_layer_blob(layer, spec, require=True)
    assert read_all(blob, 3000) == data
    blob.close()
    os.unlink(side + ".desc")  # without it the defaults (4096, no salt) are assumed: refused
    with pytest.raises(IntegrityError):
        open_layer_blob(layer, spec, require=True)


def test_a_hint_asks_for_the_leaves_that_check_its_bytes_unless_cached(tmp_path: Path) -> None:
    per_leaf = BS * (BS // 32)  # the data one SHA-256 leaf block checks: 512 KiB
    data = payload(3 * per_leaf + 5 * BS)  # four leaves under the top block
    layer = write(tmp_path / "layer", data)
    side = str(tmp_path / "layer.verity")
    digest = fsverity_digest(layer, f"--out-merkle-tree={side}").split()[0]
    inner, tree_file = WatchedBlob(layer), WatchedBlob(side)
    blob = VerifiedBlob(inner, fsverity_tree(inner, FsVerityDigest.parse(digest), tree_file))
    def leaf(index: int) -> int:
        return BS * (1 + index)  # the sidecar holds the top block, then the leaves

    try:
        tree_file.events.clear()
        blob.prefetch(per_leaf + 10, per_leaf)  # bytes checked by leaves 1 and 2
        assert inner.hints() == [(per_leaf + 10, per_leaf)]
        assert tree_file.hints() == [(leaf(1), 2 * BS)]
        assert blob.read(per_leaf, per_leaf + BS) == data[per_leaf:2 * per_leaf + BS]
        tree_file.events.clear()
        blob.prefetch(per_leaf + 10, per_leaf)  # both verified and kept: not asked for again
        blob.prefetch(len(data), BS)  # past the data: no leaf
        assert tree_file.hints() == []
        blob.prefetch(0, 1)
        assert tree_file.hints() == [(leaf(0), BS)]
    finally:
        blob.close()


@pytest.mark.parametrize("opts", [
    [],  # random salt and uuid
    ["--format=0"],
    ["--hash=sha1"],
    ["--hash=sha512", "--salt=" + "11" * 40],
    ["--data-block-size=512", "--hash-block-size=512"],
    ["--data-block-size=4096", "--hash-block-size=1024"],
    ["--hash=sha1", "--format=0", "--data-block-size=512", "--hash-block-size=512"],
    ["--no-superblock", "--salt=-"],
])
def test_veritysetup_hash_device_verifies(tmp_path: Path, opts: list[str]) -> None:
    data = payload(300 * BS)
    layer = write(tmp_path / "layer", data)
    hash_dev = str(tmp_path / "layer.vh")
    info = veritysetup_format(layer, hash_dev, *opts)
    dbs = int(info.get("Data block size", "4096"))
    hbs = int(info.get("Hash block size", "4096"))
    root = f"{info['Root hash']}:{info['Data blocks']}:{dbs}:{hbs}"
    dm = DmVerityRoot.parse(root)
    if "--format=0" in opts:  # the hash type is trusted input too; the option grammar has none
        dm = DmVerityRoot(dm.root, dm.data_blocks, dbs, hbs, hash_type=0)
    blob = open_layer_blob(layer, TrustSpec(None, dm, hash_dev), require=True)
    assert isinstance(blob, VerifiedBlob)
    assert read_all(blob, 10000) == data
    blob.close()
    # the wrong root, or the wrong block count, is refused at open
    for wrong in (DmVerityRoot(bytes(len(dm.root)), dm.data_blocks, dbs, hbs, dm.hash_type),
                  DmVerityRoot(dm.root, dm.data_blocks - 1, dbs, hbs, dm.hash_type)):
        with pytest.raises(IntegrityError):
            open_layer_blob(layer, TrustSpec(None, wrong, hash_dev), require=True)


def test_hash_type_is_not_taken_from_the_superblock(tmp_path: Path) -> None:
    """With an all-zero salt (containerd's), H(salt || X) == H(Y || salt) for Y = X shifted by
    one slot: a format-0 tree over data shifted by 32 bytes reproduces a format-1 root. So a
    superblock claiming format 0 must not be believed."""
    n = 3
    data = b"".join(payload(BS - 32, seed=k) + bytes(32) for k in range(n))
    layer = write(tmp_path / "layer", data)
    info = veritysetup_format(layer, str(tmp_path / "honest.vh"), "--salt=" + "00" * 32)
    top = (tmp_path / "honest.vh").read_bytes()[BS : 2 * BS]
    assert top[-32:] == bytes(32)
    forged = payload(BS) + b"".join(bytes(32) + data[k : k + BS - 32] for k in range(0, 2 * BS, BS))
    forged_layer = write(tmp_path / "forged", forged)
    sb = bytearray((tmp_path / "honest.vh").read_bytes()[:BS])
    sb[12:16] = (0).to_bytes(4, "little")  # hash_type 0
    hash_dev = write(tmp_path / "forged.vh", bytes(sb) + bytes(32) + top[:-32])
    trusted = DmVerityRoot(bytes.fromhex(info["Root hash"]), n)
    with pytest.raises(IntegrityError, match="superblock says"):
        open_layer_blob(forged_layer, TrustSpec(None, trusted, hash_dev), require=True)
    # what believing the superblock would have done: block 1 verifies with forged bytes
    believed = DmVerityRoot(trusted.root, n, hash_type=0)
    blob = open_layer_blob(forged_layer, TrustSpec(None, believed, hash_dev), require=True)
    assert blob.read(BS, BS) == forged[BS : 2 * BS] != data[BS : 2 * BS]
    blob.close()


def containerd_layer(tmp_path: Path, fixture: str, bs: int) -> tuple[str, bytes, str]:
    """A layer with the tree appended at hashoffset and LAYER.dmverity, as containerd's EROFS
    differ writes them (salt of 32 zero bytes)."""
    data = Path(corpus(fixture)).read_bytes()
    assert len(data) % bs == 0
    layer = write(tmp_path / "layer.erofs", data)
    info = veritysetup_format(layer, layer, f"--hash-offset={len(data)}",
                              f"--data-blocks={len(data) // bs}", f"--data-block-size={bs}",
                              f"--hash-block-size={bs}", "--salt=" + "00" * 32)
    Path(layer + ".dmverity").write_text(
        json.dumps({"roothash": info["Root hash"], "hashoffset": len(data)}))
    subprocess.run(["veritysetup", "verify", f"--hash-offset={len(data)}", layer, layer,
                    info["Root hash"]], check=True, capture_output=True)
    return layer, data, info["Root hash"]


@pytest.mark.parametrize("fixture,bs", [("plain.erofs", 4096), ("layer-lower-tarindex.erofs", 512)])
def test_containerd_appended_tree(tmp_path: Path, fixture: str, bs: int) -> None:
    layer, data, root = containerd_layer(tmp_path, fixture, bs)
    assert os.path.getsize(layer) > len(data)
    blob = open_layer_blob(layer, TrustSpec(trust_dmverity_sidecar=True), require=True)
    assert isinstance(blob, VerifiedBlob) and blob.size == len(data)
    assert read_all(blob) == data
    with Image(blob) as image:  # the image sees hashoffset bytes, not the file size
        plain = Image(FileBlob(corpus(fixture)))
        assert tree_contents(image) == tree_contents(plain)
        plain.close()
    # an explicit root needs no opt-in; a different one is refused
    spec = parse_trust_args([layer], dm_verity=[f"0={root}:{len(data) // bs}:{bs}"])[0]
    open_layer_blob(layer, spec, require=True).close()
    other = DmVerityRoot(bytes(32), len(data) // bs, bs, bs)
    with pytest.raises(IntegrityError, match="trusted is"):
        open_layer_blob(layer, TrustSpec(None, other), require=True)
    # without trust the .dmverity root is not believed
    with pytest.raises(IntegrityError, match="required"):
        open_layer_blob(layer, TrustSpec(), require=True)
    unverified = open_layer_blob(layer, TrustSpec(), require=False)
    assert isinstance(unverified, FileBlob)
    unverified.close()
    # tamper with the data part: caught on read
    flip(layer, len(data) - 1, 0xFF)
    blob = open_layer_blob(layer, TrustSpec(trust_dmverity_sidecar=True), require=True)
    with pytest.raises(IntegrityError):
        blob.read(len(data) - 1, 1)
    assert blob.read(0, bs) == data[:bs]
    blob.close()


# tampering at the blob level ------------------------------------------------------------------

NBLOCKS = 300  # three leaf tree blocks (128 + 128 + 44 data blocks) under one top block


@pytest.fixture(params=["veritysetup-sidecar", "raw-tree", "dm-verity"])
def sealed(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, TrustSpec, bytes]:
    data = payload(NBLOCKS * BS)
    layer = write(tmp_path / "layer", data)
    result = seal(layer)
    if request.param == "raw-tree":
        Path(result.sidecar).write_bytes(Path(result.sidecar).read_bytes()[BS:])
    spec = TrustSpec(FsVerityDigest.parse(result.digest))
    if request.param == "dm-verity":
        assert result.dm_root is not None
        spec = TrustSpec(None, DmVerityRoot(result.dm_root, result.data_blocks))
    return layer, spec, data


def tree_block_offset(layer: str, level: int, index: int) -> int:
    """Byte offset of a tree block in LAYER.verity (with or without the superblock block)."""
    geo = geometry(NBLOCKS, BS // 32)
    base = BS if os.path.getsize(layer + ".verity") == (geo.total_blocks + 1) * BS else 0
    return base + (geo.starts[level] + index) * BS


def test_tampered_data_block(sealed: tuple[str, TrustSpec, bytes]) -> None:
    layer, spec, data = sealed
    flip(layer, 7 * BS + 100, 0xFF)
    blob = open_layer_blob(layer, spec, require=True)
    assert isinstance(blob, VerifiedBlob)
    with pytest.raises(IntegrityError, match=r"data block 7: hash mismatch, expected [0-9a-f]{16}"):
        blob.read(7 * BS + 5, 1)
    with pytest.raises(IntegrityError) as exc:
        blob.read(0, 20 * BS)  # a read spanning the block
    assert exc.value.image == layer and exc.value.offset == 7 * BS
    assert blob.read(0, 7 * BS) == data[: 7 * BS]
    assert blob.read(8 * BS, 100 * BS) == data[8 * BS : 108 * BS]
    assert blob.failures == 2
    blob.close()


def test_tampered_leaf_tree_block(sealed: tuple[str, TrustSpec, bytes]) -> None:
    layer, spec, data = sealed
    flip(layer + ".verity", tree_block_offset(layer, 0, 1) + 5, 0xFF)
    blob = open_layer_blob(layer, spec, require=True)
    for block in (128, 200, 255):
        with pytest.raises(IntegrityError, match="tree block 1 of level 0"):
            blob.read(block * BS, 10)
    for block in (0, 127, 256, 299):
        assert blob.read(block * BS, BS) == data[block * BS : (block + 1) * BS]
    blob.close()


def test_tampered_top_block_fails_at_open(sealed: tuple[str, TrustSpec, bytes]) -> None:
    layer, spec, _ = sealed
    flip(layer + ".verity", tree_block_offset(layer, 1, 0) + 5, 0xFF)
    with pytest.raises(IntegrityError, match="mismatch"):
        open_layer_blob(layer, spec, require=True)


def _tree_cache(blob: VerifiedBlob) -> dict[tuple[int, int], bytes]:
    return dict(blob._cache.items())


def test_load_tree_caches_what_lazy_reads_verify(sealed: tuple[str, TrustSpec, bytes]) -> None:
    layer, spec, data = sealed
    lazy = open_layer_blob(layer, spec, require=True)
    ahead = open_layer_blob(layer, spec, require=True)
    assert isinstance(lazy, VerifiedBlob) and isinstance(ahead, VerifiedBlob)
    try:
        assert read_all(lazy) == data
        assert ahead.load_tree()
        assert _tree_cache(ahead) == _tree_cache(lazy) and len(_tree_cache(ahead)) == 3
        assert read_all(ahead) == data and ahead.failures == 0
    finally:
        lazy.close()
        ahead.close()


@pytest.mark.parametrize("opts", [["--hash=sha512", "--salt=" + "11" * 40],
                                  ["--data-block-size=4096", "--hash-block-size=1024"],
                                  ["--hash=sha1", "--format=0", "--data-block-size=512",
                                   "--hash-block-size=512"]])
def test_load_tree_of_veritysetup_trees(tmp_path: Path, opts: list[str]) -> None:
    data = payload(3000 * 512)  # two levels under the top with 512-byte hash blocks
    layer = write(tmp_path / "layer", data)
    hash_dev = str(tmp_path / "layer.vh")
    info = veritysetup_format(layer, hash_dev, *opts)
    dbs = int(info.get("Data block size", "4096"))
    hbs = int(info.get("Hash block size", "4096"))
    dm = DmVerityRoot.parse(f"{info['Root hash']}:{info['Data blocks']}:{dbs}:{hbs}")
    if "--format=0" in opts:
        dm = DmVerityRoot(dm.root, dm.data_blocks, dbs, hbs, hash_type=0)
    lazy = open_layer_blob(layer, TrustSpec(None, dm, hash_dev), require=True)
    ahead = open_layer_blob(layer, TrustSpec(None, dm, hash_dev), require=True)
    assert isinstance(lazy, VerifiedBlob) and isinstance(ahead, VerifiedBlob)
    try:
        assert read_all(lazy, 10000) == data
        assert ahead.load_tree()
        assert _tree_cache(ahead) == _tree_cache(lazy)
    finally:
        lazy.close()
        ahead.close()


def test_load_tree_keeps_nothing_that_does_not_verify(sealed: tuple[str, TrustSpec, bytes]) -> None:
    layer, spec, data = sealed
    flip(layer + ".verity", tree_block_offset(layer, 0, 2) + 5, 0xFF)  # the third leaf
    blob = open_layer_blob(layer, spec, require=True)
    assert isinstance(blob, VerifiedBlob)
    try:
        assert not blob.load_tree()
        assert _tree_cache(blob) == {}
        assert blob.read(0, 256 * BS) == data[:256 * BS]  # leaves 0 and 1 verify lazily
        with pytest.raises(IntegrityError, match="tree block 2 of level 0"):
            blob.read(256 * BS, BS)
        assert blob.failures == 1  # the load reported nothing itself
    finally:
        blob.close()


def test_load_tree_leaves_large_trees_lazy(sealed: tuple[str, TrustSpec, bytes]) -> None:
    layer, spec, _ = sealed
    blob = open_layer_blob(layer, spec, require=True)
    assert isinstance(blob, VerifiedBlob)
    try:
        assert not blob.load_tree(max_bytes=BS)
        assert _tree_cache(blob) == {}
    finally:
        blob.close()


@pytest.mark.parametrize("change", ["one block short", "one byte longer", "one byte shorter"])
def test_size_change_fails_at_open(sealed: tuple[str, TrustSpec, bytes], change: str) -> None:
    layer, spec, data = sealed
    new = {"one block short": data[:-BS], "one byte longer": data + b"\0",
           "one byte shorter": data[:-1]}[change]
    Path(layer).write_bytes(new)
    with pytest.raises(IntegrityError) as exc:
        open_layer_blob(layer, spec, require=True)
    assert "bytes" in str(exc.value) or "blocks" in str(exc.value)


def test_layer_changed_after_open_is_caught(sealed: tuple[str, TrustSpec, bytes]) -> None:
    layer, spec, data = sealed
    blob = open_layer_blob(layer, spec, require=True)
    assert blob.read(3 * BS, BS) == data[3 * BS : 4 * BS]
    flip(layer, 3 * BS, 0xFF)  # data blocks are hashed on every read: no stale "verified" flag
    with pytest.raises(IntegrityError):
        blob.read(3 * BS, BS)
    blob.close()


def test_wrong_digest_and_missing_tree(tmp_path: Path) -> None:
    layer = write(tmp_path / "layer", payload(10 * BS))
    other = FsVerityDigest.parse("sha256:" + "ab" * 32)
    seal(layer)
    with pytest.raises(IntegrityError, match="fs-verity digest mismatch"):
        open_layer_blob(layer, TrustSpec(other), require=True)
    os.unlink(layer + ".verity")
    with pytest.raises(IntegrityError, match="no Merkle tree"):
        open_layer_blob(layer, TrustSpec(other), require=True)


def test_salted_hash_device_cannot_check_an_fsverity_digest(tmp_path: Path) -> None:
    layer = write(tmp_path / "layer", payload(10 * BS))
    digest = FsVerityDigest.parse(fsverity_digest(layer).split()[0])
    veritysetup_format(layer, layer + ".verity")  # random salt
    with pytest.raises(IntegrityError, match="dm-verity hash device"):
        open_layer_blob(layer, TrustSpec(digest), require=True)


def test_top_block_as_data_forgery(tmp_path: Path) -> None:
    """The attack of integrity.md §2: data' = the real top hash block, superblock says 1
    block. veritysetup accepts it; we take the size from trusted input and refuse."""
    layer = write(tmp_path / "layer", payload(300 * BS))
    result = seal(layer)
    assert result.dm_root is not None
    side = Path(result.sidecar).read_bytes()
    forged = write(tmp_path / "forged", side[BS : 2 * BS])
    forged_sb = bytearray(side[:BS])
    forged_sb[72:80] = (1).to_bytes(8, "little")
    write(tmp_path / "forged.verity", bytes(forged_sb))
    subprocess.run(["veritysetup", "verify", forged, forged + ".verity", result.dm_root.hex()],
                   check=True, capture_output=True)
    for spec in (TrustSpec(FsVerityDigest.parse(result.digest)),
                 TrustSpec(None, DmVerityRoot(result.dm_root, result.data_blocks))):
        with pytest.raises(IntegrityError):
            open_layer_blob(forged, spec, require=True)


def test_concurrent_reads(tmp_path: Path) -> None:
    data = payload(NBLOCKS * BS)
    layer = write(tmp_path / "layer", data)
    result = seal(layer)
    flip(layer, 250 * BS, 0xFF)
    blob = open_layer_blob(layer, TrustSpec(FsVerityDigest.parse(result.digest)), require=True,
                           cache_bytes=2 * BS)  # a tiny cache: tree blocks are re-read
    assert isinstance(blob, VerifiedBlob)
    errors: list[BaseException] = []
    bad = 0
    lock = threading.Lock()

    def worker(seed: int) -> None:
        nonlocal bad
        rng = random.Random(seed)
        for _ in range(300):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 3 * BS)
            n = min(n, len(data) - off)
            try:
                got = blob.read(off, n)
                if off // BS <= 250 <= (off + n - 1) // BS or got != data[off:off + n]:
                    errors.append(AssertionError(f"read {off}+{n} returned bad bytes"))
            except IntegrityError:
                with lock:
                    bad += 1
                if not off // BS <= 250 <= (off + n - 1) // BS:
                    errors.append(AssertionError(f"read {off}+{n} failed"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert blob.failures == bad > 0
    blob.close()


# tampering through the image: every kind of EROFS block ---------------------------------------

class RecordingBlob:
    """Notes which 4 KiB blocks of the layer each read covers."""

    def __init__(self, inner: FileBlob) -> None:
        self.inner = inner
        self.name = inner.name
        self.blocks: set[int] = set()

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        if length:
            self.blocks.update(range(offset // BS, (offset + length - 1) // BS + 1))
        return self.inner.read(offset, length)

    def close(self) -> None:
        self.inner.close()


def access(image: Image, path: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Everything a reader can take from one entry: lookup, data or listing, xattrs."""
    node = image.lookup(path)
    if node.is_reg:
        body = node.read(0, node.size)
    elif node.is_symlink:
        body = node.readlink()
    elif node.is_dir:
        body = b"\0".join(e.name for e in node.readdir())
    else:
        body = b""
    return node.mode, body, node.xattrs()


def tree_contents(image: Image) -> dict[bytes, tuple[int, bytes, list[tuple[bytes, bytes]]]]:
    return {path: access(image, path) for path, _ in image.walk()}


class Footprints:
    """For one image: each entry's contents and the blocks a fresh Image needs to get them
    (metadata read a block at a time: the clusters read ahead are not needed, and a bad block
    in one must fail only the reads that need it)."""

    def __init__(self, path: str) -> None:
        with Image(FileBlob(path)) as image:
            self.paths = [p for p, _ in image.walk()]
        self.reference: dict[bytes, object] = {}
        self.blocks: dict[bytes, set[int]] = {}
        rec = RecordingBlob(FileBlob(path))
        with mock.patch.object(space, "CLUSTER_BYTES", BS):
            Image(rec)
            self.open_blocks = set(rec.blocks)
            for p in self.paths:
                rec.blocks.clear()
                self.reference[p] = access(Image(rec), p)
                self.blocks[p] = set(rec.blocks)
        rec.close()


@pytest.fixture(scope="module")
def footprints() -> dict[str, Footprints]:
    return {name: Footprints(corpus(name)) for name in ("plain.erofs", "lz4.erofs")}


def pick_targets(path: str) -> dict[str, tuple[int, bool]]:
    """Byte offsets (in the layer, or with ``True`` in its sidecar) of one block of each kind,
    found by parsing the image with the library."""
    with Image(FileBlob(path)) as image:
        bs = image.superblock.block_size
        nodes = [image.lookup(p) for p, _ in image.walk()]

        def data_pa(node: Inode) -> int | None:
            ext = image._mapper(node).map(0)
            return ext.pa if ext.source == Source.DEVICE else None

        used = {0}

        def position(kind: str, node: Inode) -> int | None:
            info = node.info
            if kind == "inode":
                return info.pos + 4
            if kind == "xattr area":
                return info.pos + info.isize + 5
            if kind == "inline tail":
                return info.after + 3
            pa = data_pa(node)
            return None if pa is None else pa + 20

        def pick(kind: str, pred: Callable[[Inode], bool]) -> int | None:
            """A matching position, in a block no other kind uses if there is one."""
            spots = [pos for n in nodes if pred(n) and (pos := position(kind, n)) is not None]
            fresh = [pos for pos in spots if pos // BS not in used]
            if not spots:
                return None
            chosen = (fresh or spots)[0]
            used.add(chosen // BS)
            return chosen

        found = {
            "inode": pick("inode", lambda n: n.is_reg),
            "xattr area": pick("xattr area", lambda n: n.info.xattr_icount > 0),
            "inline tail": pick("inline tail", lambda n: n.is_reg and n.size > bs
                                and n.info.layout == d.LAYOUT_FLAT_INLINE and n.size % bs != 0),
            "directory block": pick("directory block", lambda n: n.is_dir and n.size > bs),
            "data block": pick("data block", lambda n: n.is_reg and n.size >= bs),
        }
        leaf1 = geometry(-(-image.blob.size // BS), BS // 32).starts[0] + 1  # data 128..255
        targets = {"superblock": (d.SUPERBLOCK_OFFSET + 8, False),
                   "tree node": (BS + leaf1 * BS + 17, True)}
        targets.update({kind: (pos, False) for kind, pos in found.items() if pos is not None})
        return targets


@pytest.mark.parametrize("name", ["plain.erofs", "lz4.erofs"])
@pytest.mark.parametrize("kind", ["superblock", "inode", "xattr area", "directory block",
                                  "inline tail", "data block", "tree node"])
def test_tampered_image_block(tmp_path: Path, footprints: dict[str, Footprints], name: str,
                              kind: str) -> None:
    fp = footprints[name]
    layer = sample(tmp_path, name)
    digest = FsVerityDigest.parse(seal(layer).digest)
    targets = pick_targets(layer)
    if kind not in targets:
        pytest.fail(f"{name} has no {kind} block")
    offset, in_tree = targets[kind]
    if in_tree:
        bad = set(range(128, 256))
        flip(layer + ".verity", offset, 0xFF)
    else:
        bad = {offset // BS}
        flip(layer, offset, 0xFF)
    blob = open_layer_blob(layer, TrustSpec(digest), require=True)
    assert isinstance(blob, VerifiedBlob)
    if fp.open_blocks & bad:
        with pytest.raises(IntegrityError):
            Image(blob)
        blob.close()
        return
    image = Image(blob)
    failed = 0
    for path in fp.paths:
        if fp.blocks[path] & bad:
            with pytest.raises(IntegrityError):
                access(image, path)
            failed += 1
        else:
            assert access(image, path) == fp.reference[path], path
    assert failed > 0 and blob.failures > 0
    assert failed < len(fp.paths)  # files elsewhere still read
    image.close()


def test_verified_image_reads_like_the_plain_one(footprints: dict[str, Footprints],
                                                 tmp_path: Path) -> None:
    for name, fp in footprints.items():
        layer = sample(tmp_path, name)
        digest = FsVerityDigest.parse(seal(layer).digest)
        with Image(open_layer_blob(layer, TrustSpec(digest), require=True)) as image:
            assert {p: access(image, p) for p in fp.paths} == fp.reference


# option parsing ------------------------------------------------------------------------------

def test_parse_trust_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layers = ["a.erofs", str(tmp_path / "b.erofs"), "sub/c.erofs"]
    dg = "sha256:" + "11" * 32
    (tmp_path / "roots").write_text(
        f"# made by seal\nsha256:{'22' * 32} {tmp_path}/a.erofs\n"
        f"# dm-verity {'33' * 32}:5 a.erofs\n\nsha512:{'44' * 64} c.erofs\n")
    specs = parse_trust_args(
        layers, verity=[f"1={dg}"], verity_roots=["roots"],
        dm_verity=[f"sub/c.erofs=dm-verity:sha256:{'55' * 32}:9:512"],
        verity_sidecar=["0=side=car"], trust_dmverity_sidecar=True)
    first = FsVerityDigest.parse(f"sha256:{'22' * 32}")
    assert specs[0] == TrustSpec(first, None, "side=car", True)
    assert specs[1].fsverity == FsVerityDigest.parse(dg)
    assert specs[2].fsverity is None  # explicit --dm-verity wins over the roots file
    assert specs[2].dmverity == DmVerityRoot(bytes.fromhex("55" * 32), 9, 512, 512)
    assert parse_trust_args(layers[2:], verity_roots=["roots"])[0].fsverity is not None  # basename
    for bad in ([f"3={dg}"], [f"x.erofs={dg}"], ["0=sha256:abc"], ["0=md5:" + "00" * 16], ["0"]):
        with pytest.raises(TrustError):
            parse_trust_args(layers, verity=bad)
    with pytest.raises(TrustError, match="already"):
        parse_trust_args(layers, verity=[f"0={dg}"], dm_verity=[f"0={'55' * 32}:9"])
    with pytest.raises(TrustError):
        parse_trust_args(layers, dm_verity=[f"0={'55' * 32}"])  # no block count
    with pytest.raises(TrustError, match=":3"):
        (tmp_path / "broken").write_text("\n\nnot-a-digest x\n")
        parse_trust_args(layers, verity_roots=["broken"])
    assert parse_trust_args(["x"], index_base=1, verity=[f"1={dg}"])[0].fsverity is not None


def test_dm_verity_root_grammar() -> None:
    root = "ab" * 32
    assert DmVerityRoot.parse(f"{root}:10") == DmVerityRoot(bytes.fromhex(root), 10)
    assert DmVerityRoot.parse(f"sha256:{root}:10:512:4096").hash_block_size == 4096
    assert DmVerityRoot.parse(f"dm-verity:sha512:{'cd' * 64}:3").alg == "sha512"
    assert str(DmVerityRoot.parse(f"{root}:10")) == f"dm-verity:sha256:{root}:10"
    for bad in (f"sha512:{root}:10", f"{root}:0", f"{root}:10:1000", f"{root}:x", root):
        with pytest.raises(ValueError):
            DmVerityRoot.parse(bad)


def test_open_without_trust(tmp_path: Path) -> None:
    layer = write(tmp_path / "layer", payload(BS))
    blob = open_layer_blob(layer, None, require=False)
    assert isinstance(blob, FileBlob)
    blob.close()
    with pytest.raises(IntegrityError, match="required"):
        open_layer_blob(layer, None, require=True)


def test_fsverity_tree_api_directly(tmp_path: Path) -> None:
    data = payload(140 * BS + 9)
    layer = write(tmp_path / "layer", data)
    digest = FsVerityDigest.parse(seal(layer).digest)
    inner = FileBlob(layer)
    tree = fsverity_tree(inner, digest, FileBlob(layer + ".verity"))
    blob = VerifiedBlob(inner, tree, name="L1")
    assert blob.name == "L1" and blob.read(len(data) - 20, 20) == data[-20:]
    blob.close()



def test_roots_file_from_fsverity_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "layers").mkdir()
    datas = [payload(40 * BS, seed=k) for k in range(2)]
    layers = [write(tmp_path / "layers" / f"l{k}.erofs", data) for k, data in enumerate(datas)]
    for layer in layers:
        seal(layer)
    rel = [os.path.relpath(layer) for layer in layers]
    listing = subprocess.run(["fsverity", "digest", *rel], capture_output=True, check=True)
    roots = write(tmp_path / "roots.txt", listing.stdout)
    specs = parse_trust_args(layers, verity_roots=[roots])
    for layer, spec, data in zip(layers, specs, datas):
        assert spec.fsverity is not None
        blob = open_layer_blob(layer, spec, require=True)
        assert read_all(blob) == data
        blob.close()
