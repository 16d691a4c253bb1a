#!/usr/bin/env python3
"""Mutation fuzzing of the EROFS reader and of the mounted daemon.

Mutants are made from real fixture images, deterministically from ``(seed, index)``, aimed at
the structures the reader parses (found by parsing the original with the library): superblock,
inodes, directory blocks and their nids, xattr regions, compression indexes, compressed data;
plus truncation, extension, and random words. Each mutant is opened and every file is walked and
read (``--mode lib``: through the library in a worker process; ``--mode mount``: through a real
erofs-fuse mount). Recorded: crashes (an exception outside ``ErofsError``, or a dead worker or
daemon), hangs (one mutant over ``--timeout`` seconds), peak RSS. Reproduce one mutant with
``--only INDEX``.

    scripts/fuzz.py --count 10000 --seed 1 --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# stray exceptions (IndexError, struct.error, ...) are bugs to find, not to hide
os.environ["EROFS_FUSE_STRICT"] = "1"

from erofs_fuse.erofs import ondisk as d  # noqa: E402
from erofs_fuse.erofs.errors import ErofsError  # noqa: E402
from erofs_fuse.erofs.extent import Source  # noqa: E402
from erofs_fuse.erofs.image import Image  # noqa: E402
from erofs_fuse.erofs.superblock import crc32c_raw  # noqa: E402

CORPUS = ROOT / "fixtures" / "corpus"
DEFAULT_IMAGES = [
    "plain.erofs", "compact.erofs", "chunked.erofs", "b512.erofs", "plain-48bit.erofs",
    "xattr-prefix.erofs", "dot-omitted.erofs", "lz4.erofs", "lz4-legacy.erofs",
    "lz4-bigpcluster.erofs", "lz4-ztailpacking.erofs", "lz4-fragments.erofs",
    "lz4-dedupe.erofs", "lzma.erofs", "deflate.erofs", "zstd.erofs", "zstd-extents.erofs",
    "metabox.erofs", "old-ztail.erofs", "layer-upper-aufs.erofs",
]
READ_CAP = 64 << 20  # bytes read per mutant at most: a mutant may claim huge files


@dataclass
class Regions:
    """Byte ranges of an image by what they hold, found by parsing the intact image."""

    superblock: list[tuple[int, int]]
    inodes: list[tuple[int, int]]
    xattrs: list[tuple[int, int]]
    dirs: list[tuple[int, int]]
    dirent_nids: list[int]  # positions of the nid field of dirents
    zindex: list[tuple[int, int]]
    zdata: list[tuple[int, int]]
    nids: list[int]


def find_regions(path: str) -> Regions:
    r = Regions([(1024, 1024 + 144)], [], [], [], [], [], [], [])
    with Image.open(path) as image:
        bs = image.superblock.block_size
        nodes = [image.root] + [node for _, node in image.walk()]
        for node in nodes:
            info = node.info
            if info.in_metabox:
                continue
            r.nids.append(info.nid)
            r.inodes.append((info.pos, info.isize))
            if info.xattr_isize:
                r.xattrs.append((info.pos + info.isize, info.xattr_isize))
            if info.is_compressed:
                start = (info.after + 7) & ~7
                r.zindex.append((start, min(8 + 8 * (info.size // bs + 2), 4096)))
            if not info.has_data or info.size == 0:
                continue
            mapper = image._mapper(node)
            pos = 0
            seen = 0
            while pos < info.size and seen < 64:
                ext = mapper.map(pos)
                seen += 1
                if ext.source == Source.DEVICE and ext.device == 0:
                    span = (ext.pa, min(ext.plen or ext.llen, 1 << 20))
                    if info.is_dir:
                        r.dirs.append(span)
                    elif info.is_compressed:
                        r.zdata.append(span)
                elif ext.source == Source.META and info.is_dir and not info.in_metabox:
                    r.dirs.append((ext.pa, ext.llen))
                pos = ext.end
        for start, length in r.dirs:
            block = image.blob.read(start, min(length, bs))
            if len(block) < 12:
                continue
            (nameoff0,) = struct.unpack_from("<H", block, 8)
            for k in range(min(nameoff0 // 12, len(block) // 12)):
                r.dirent_nids.append(start + 12 * k)
    return r


def reseal(data: bytearray) -> None:
    bs = 1 << data[1024 + 12] if 9 <= data[1024 + 12] <= 16 else 4096
    length = bs - 1024 if bs > 1024 else bs
    if len(data) < 1024 + length:
        return
    block = bytearray(data[1024 : 1024 + length])
    block[4:8] = bytes(4)
    struct.pack_into("<I", data, 1028, crc32c_raw(bytes(block)))


BOUNDARY_WORDS = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE]


def _pick(rnd: random.Random, spans: list[tuple[int, int]], size: int) -> int:
    if not spans:
        return rnd.randrange(1024, size)
    start, length = rnd.choice(spans)
    return min(start + rnd.randrange(max(length, 1)), size - 1)


def mutate(data: bytes, regions: Regions, rnd: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    size = len(out)
    kind = rnd.choice([
        "sb-field", "inode-field", "inode-bits", "dir-bits", "dirent-nid", "xattr-bits",
        "zindex-bits", "zdata-bits", "zindex-word", "truncate", "extend", "random-words",
        "inode-word",
    ])
    if kind == "sb-field":
        off = 1024 + rnd.choice([0x0C, 0x0D, 0x0E, 0x10, 0x28, 0x2C, 0x50, 0x54, 0x56, 0x58,
                                 0x5B, 0x5C, 0x60, 0x70, 0x80])
        width = 1 if off - 1024 in (0x0C, 0x0D, 0x5B) else 2 if off - 1024 in (0x0E, 0x54, 0x56, 0x58) else 4
        value = rnd.choice(BOUNDARY_WORDS + [rnd.getrandbits(32)]) & ((1 << (8 * width)) - 1)
        out[off : off + width] = value.to_bytes(width, "little")
        if rnd.random() < 0.8:
            reseal(out)
    elif kind in ("inode-field", "inode-word") and regions.inodes:
        pos, isize = rnd.choice(regions.inodes)
        field = rnd.choice([0, 2, 4, 6, 8, 12, 16] if isize == 32 else [0, 2, 4, 6, 8, 12, 16, 20, 44])
        width = 2 if field < 8 else 4
        value = rnd.choice(BOUNDARY_WORDS + [rnd.getrandbits(32)]) & ((1 << (8 * width)) - 1)
        out[pos + field : pos + field + width] = value.to_bytes(width, "little")
        reseal(out)
    elif kind == "dirent-nid" and regions.dirent_nids:
        pos = rnd.choice(regions.dirent_nids)
        target = rnd.choice(regions.nids + [0, 2**63 - 1, 2**64 - 1, size // 32, size // 32 + 1])
        out[pos : pos + 8] = struct.pack("<Q", target)
        reseal(out)
    elif kind == "truncate":
        del out[rnd.randrange(1024 + 128, size):]
    elif kind == "extend":
        out += bytes(rnd.choice([1, 511, 4096, 65536]))
    elif kind == "zindex-word" and regions.zindex:
        pos = _pick(rnd, regions.zindex, size - 4) & ~1
        out[pos : pos + 2] = rnd.choice([0, 1, 0x7FF, 0x800, 0x801, 0xFFFF, 0x8000]).to_bytes(2, "little")
        reseal(out)
    elif kind == "random-words":
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randrange(1024, size - 4)
            out[pos : pos + 4] = rnd.choice(BOUNDARY_WORDS + [rnd.getrandbits(32)]).to_bytes(4, "little")
        reseal(out)
    else:
        spans = {
            "inode-bits": regions.inodes, "dir-bits": regions.dirs, "xattr-bits": regions.xattrs,
            "zindex-bits": regions.zindex, "zdata-bits": regions.zdata,
        }.get(kind, [])
        for _ in range(rnd.randint(1, 4)):
            pos = _pick(rnd, spans, size)
            out[pos] ^= 1 << rnd.randrange(8)
        reseal(out)
    return bytes(out), kind


def read_everything(image: Image) -> tuple[int, float]:
    """Walk and read everything; returns (errors, slowest single operation in seconds)."""
    errors = 0
    budget = READ_CAP
    slowest = 0.0

    def timed(fn: object) -> None:
        nonlocal slowest, errors
        start = time.monotonic()
        try:
            fn()  # type: ignore[operator]
        except ErofsError:
            errors += 1
        slowest = max(slowest, time.monotonic() - start)

    walker = image.walk()
    while True:
        start = time.monotonic()
        try:
            _, node = next(walker)
        except StopIteration:
            break
        except ErofsError:
            errors += 1
            break
        finally:
            slowest = max(slowest, time.monotonic() - start)
        if node.is_reg:
            want = min(node.size, budget)
            budget -= want

            def read(node: object = node, want: int = want) -> None:
                pos = 0
                while pos < want:
                    chunk = node.read(pos, min(1 << 20, want - pos))  # type: ignore[attr-defined]
                    if not chunk:
                        break
                    pos += len(chunk)

            timed(read)
        elif node.is_symlink:
            timed(node.readlink)
        timed(node.xattrs)
    return errors, slowest


class Corpus:
    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.data = {n: (CORPUS / n).read_bytes() for n in names}
        self.regions = {n: find_regions(str(CORPUS / n)) for n in names}

    def mutant(self, seed: int, index: int) -> tuple[str, str, bytes]:
        rnd = random.Random(f"{seed}:{index}")
        name = rnd.choice(self.names)
        data, kind = mutate(self.data[name], self.regions[name], rnd)
        return name, kind, data


def run_lib_mutant(path: str) -> dict[str, object]:
    start = time.monotonic()
    result: dict[str, object] = {"status": "ok"}
    try:
        with Image.open(path) as image:
            errors, slowest = read_everything(image)
        result.update(errors=errors, slowest=round(slowest, 3))
    except ErofsError as exc:
        result.update(status="refused", error=str(exc)[:200])
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer is looking for
        import traceback

        result.update(status="crash", error=f"{type(exc).__name__}: {exc}"[:300],
                      trace=traceback.format_exc()[-2000:])
    result["seconds"] = round(time.monotonic() - start, 3)
    result["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result


def worker(args: argparse.Namespace) -> int:
    """Reads mutant indexes on stdin, answers one JSON line each."""
    corpus = Corpus(args.images)
    workdir = tempfile.mkdtemp(prefix="erofs-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = os.path.join(workdir, "mutant.erofs")
    print("ready", flush=True)
    for line in sys.stdin:
        index = int(line)
        name, kind, data = corpus.mutant(args.seed, index)
        with open(path, "wb") as f:
            f.write(data)
        result = run_lib_mutant(path) if args.mode == "lib" else run_mount_mutant(path, args)
        result.update(index=index, image=name, kind=kind,
                      sha=hashlib.sha256(data).hexdigest()[:16])
        print(json.dumps(result), flush=True)
    return 0


def run_mount_mutant(path: str, args: argparse.Namespace) -> dict[str, object]:
    """Mount the mutant with erofs-fuse, walk and read it, unmount; record the daemon's fate."""
    mnt = tempfile.mkdtemp(prefix="erofs-fuzz-mnt-")
    log = mnt + ".log"
    start = time.monotonic()
    result: dict[str, object] = {"status": "ok"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "erofs_fuse", "mount", "-f", "--layers", path, mnt],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=str(ROOT),
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                result["status"] = "refused" if proc.returncode == 2 else "crash"
                result["error"] = Path(log).read_text(errors="replace")[-300:]
                return result
            if time.monotonic() > deadline:
                result["status"] = "hang"
                return result
            time.sleep(0.02)
        walker = subprocess.run(
            [sys.executable, "-c", WALK_SNIPPET, mnt], capture_output=True, text=True,
            timeout=args.timeout,
        )
        result["errors"] = walker.stdout.strip()
        if proc.poll() is not None:
            result.update(status="crash", error=Path(log).read_text(errors="replace")[-300:])
        else:
            result["rss_kb"] = _rss_kb(proc.pid)
    except subprocess.TimeoutExpired:
        result["status"] = "hang"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        try:
            proc.terminate()
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.rmdir(mnt)
        os.unlink(log)
    result["seconds"] = round(time.monotonic() - start, 3)
    return result


WALK_SNIPPET = r"""
import os, sys
errors = 0
for root, dirs, files in os.walk(sys.argv[1]):
    for name in files + dirs:
        p = os.path.join(root, name)
        try:
            os.listxattr(p, follow_symlinks=False)
            if os.path.islink(p):
                os.readlink(p)
            elif os.path.isfile(p):
                with open(p, 'rb') as f:
                    while f.read(1 << 20):
                        pass
        except OSError:
            errors += 1
print(errors)
"""


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", "--mode", args.mode, "--seed", str(args.seed),
               "--timeout", str(args.timeout), "--images", *args.images]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.index: int | None = None
        self.started = 0.0

    def send(self, index: int) -> None:
        assert self.proc.stdin is not None
        self.index = index
        self.started = time.monotonic()
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run(args: argparse.Namespace) -> dict[str, object]:
    indexes: Iterator[int] = iter([args.only] if args.only is not None else range(args.start, args.start + args.count))
    workers = [Worker(args) for _ in range(args.jobs)]
    counts: dict[str, int] = {}
    findings: list[dict[str, object]] = []
    peak_rss = 0
    done = 0
    started = time.monotonic()
    busy = {w: False for w in workers}

    def feed(w: Worker) -> None:
        index = next(indexes, None)
        if index is None:
            busy[w] = False
        else:
            w.send(index)
            busy[w] = True

    for w in workers:
        feed(w)
    while any(busy.values()):
        ready, _, _ = select.select([w.proc.stdout for w in workers if busy[w]], [], [], 0.5)
        for w in list(workers):
            if not busy[w]:
                continue
            if w.proc.stdout in ready:
                line = w.proc.stdout.readline() if w.proc.stdout else ""
                if not line:  # the worker died: a crash of the interpreter itself
                    rec: dict[str, object] = {"index": w.index, "status": "crash", "error": "worker died"}
                    w.kill()
                    workers[workers.index(w)] = nw = Worker(args)
                    busy[nw] = False
                    del busy[w]
                    w = nw
                else:
                    rec = json.loads(line)
            elif time.monotonic() - w.started > args.timeout * 2:
                rec = {"index": w.index, "status": "hang", "seconds": round(time.monotonic() - w.started, 1)}
                w.kill()
                workers[workers.index(w)] = nw = Worker(args)
                busy[nw] = False
                del busy[w]
                w = nw
            else:
                continue
            slow = float(rec.get("slowest", 0) or 0) > args.timeout
            status = "hang" if slow else str(rec["status"])
            counts[status] = counts.get(status, 0) + 1
            peak_rss = max(peak_rss, int(rec.get("rss_kb", 0) or 0))
            if status in ("crash", "hang"):
                findings.append(rec)
                print(json.dumps(rec), file=sys.stderr)
            done += 1
            if args.progress and done % 500 == 0:
                print(f"{done} mutants, {counts}, {time.monotonic() - started:.0f} s", file=sys.stderr)
            feed(w)
    for w in workers:
        if w.proc.stdin:
            w.proc.stdin.close()
        w.proc.wait()
    return {
        "mode": args.mode, "seed": args.seed, "mutants": done, "counts": counts,
        "crashes": counts.get("crash", 0), "hangs": counts.get("hang", 0),
        "peak_rss_mb": round(peak_rss / 1024, 1), "seconds": round(time.monotonic() - started, 1),
        "findings": findings[:50],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--mode", choices=["lib", "mount"], default="lib")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds one operation may take")
    parser.add_argument("--images", nargs="+", default=DEFAULT_IMAGES)
    parser.add_argument("--only", type=int, help="run just this mutant index")
    parser.add_argument("--save", metavar="DIR", help="with --only: write the mutant image here")
    parser.add_argument("--json", metavar="FILE", help="write the summary here")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.only is not None and args.save:
        name, kind, data = Corpus(args.images).mutant(args.seed, args.only)
        out = Path(args.save) / f"mutant-{args.seed}-{args.only}-{name}"
        out.write_bytes(data)
        print(f"{out} ({kind})")
    summary = run(args)
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}))
    return 1 if summary["crashes"] or summary["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
