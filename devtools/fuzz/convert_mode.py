"""The converter under mutated layer tars: the worker of ``scripts/fuzz --mode convert``.

Each mutant (``tar_corpus.TarCorpus``) is converted in every mode (``MODES``), each conversion in
a forked child with a deadline (``--timeout``; faulthandler dumps the child's stack before it is
ended) and a memory limit (``--memory`` MiB of address space, ``RLIMIT_AS``). The child also
reads the image it wrote back with our reader (``Image.open``, walk, read every file, readlink,
xattrs), so a bad image is found where it was made. Per mode:

- ``ok``: converted, the image reads back without any exception, and the output directory
  holds the image and nothing else;
- ``refused``: ``MkfsError``, its message one printable line, the output directory empty;
- ``crash``: any other exception (traceback kept), or the child died without a word;
- ``hang``: over ``--timeout`` seconds; ``memory``: ``MemoryError``, or the child killed by
  SIGKILL (the OOM killer);
- ``bad-image``: converted, but our reader (or, sampled, the kernel) fails on the image;
- ``leftover``: something other than the image left in the output directory;
- ``bad-message``: an ``MkfsError`` whose message is empty, several lines or not printable.

Across modes: the images of ``SAME_VIEW`` modes must show one tree (paths, types, modes,
owners, times, sizes, contents, link targets, devices, xattrs, link counts), else ``differs``.
Of every ``--kernel-every``-th mutant, one image (the modes in turn) is also mounted by the
kernel (``mount -t erofs -o loop,ro``), walked and read: every operation must succeed and the
view must equal our reader's.

A mutant's status is the worst of its modes' (``ok`` when every mode converted, ``refused``
when every mode refused, ``split`` for a mix). Inputs whose status is a bug are saved to
``--crashes DIR`` with their record, for ``python3 -m erofs_fuse convert FILE OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import io
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import BinaryIO, Callable, cast

from erofs_fuse.erofs.image import Image
from erofs_fuse.mkfs import ConvertOptions, MkfsError, convert_tar

from devtools.fuzz.tar_corpus import Mutant, TarCorpus
from devtools.fuzz.tree_views import KernelError, dir_view, reader_view, view_diff

MODES = {
    "full": ConvertOptions(),
    "tar-index": ConvertOptions(tar_index=True),
    "lz4": ConvertOptions(compress="lz4"),
    "oci": ConvertOptions(whiteouts="oci"),
}
SAME_VIEW = ("full", "tar-index", "lz4")  # one tree, whatever the data layout
# worst first; all but the last two are bugs
SEVERITY = ["crash", "hang", "memory", "bad-image", "differs", "leftover", "bad-message",
            "refused", "ok"]
BUG_STATUSES = frozenset(SEVERITY[:-2])
IMAGE = "layer.erofs"


# one conversion in a child ----------------------------------------------------------------------
class _Unseekable(io.RawIOBase):
    """A file read as a pipe would be: no seek, no descriptor (the converter tees the tar)."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        return self._f.readinto(b) or 0

    def close(self) -> None:
        self._f.close()
        super().close()


class _TwoLineError(MkfsError):
    def __str__(self) -> str:
        return "two\nlines"


def _faulty_convert(fault: str) -> Callable[[str | BinaryIO, str, ConvertOptions], object]:
    """``convert_tar`` with a fault injected: proves that the harness sees each kind of bug."""
    def convert(source: str | BinaryIO, out: str, options: ConvertOptions) -> object:
        if fault == "crash":
            raise IndexError("injected fault")
        if fault == "exit":
            os._exit(1)
        if fault == "hang":
            time.sleep(3600)
        if fault == "memory":
            return bytearray(4 << 30)
        if fault == "leftover":
            with open(os.path.join(os.path.dirname(out), ".layer.erofs.tmp"), "wb"):
                raise MkfsError("injected refusal")
        if fault == "message":  # MkfsError escapes control characters: bypass that
            raise _TwoLineError("two lines")
        if fault == "image":  # converted, then cut short: must not read back
            result = convert_tar(source, out, options)
            os.truncate(out, 1024)
            return result
        raise AssertionError(fault)

    return convert


def _convert_and_read(tar: str, outdir: str, options: ConvertOptions, stream: bool,
                      fault: str | None = None) -> dict[str, object]:
    out = os.path.join(outdir, IMAGE)
    result: dict[str, object] = {}
    convert: Callable[[str | BinaryIO, str, ConvertOptions], object] = \
        _faulty_convert(fault) if fault else convert_tar
    try:
        # a raw stream, which convert_tar reads as it would a pipe's
        source = cast(BinaryIO, _Unseekable(tar)) if stream else tar
        converted = convert(source, out, options)
        result.update(status="ok", warnings=len(getattr(converted, "warnings", ())))
    except MkfsError as exc:
        message = str(exc)
        result.update(status="refused", error=f"{type(exc).__name__}: {message}"[:400])
        if not message or len(message.splitlines()) != 1 or not message.isprintable():
            result.update(status="bad-message", error=repr(message)[:400])
        return result
    except MemoryError:
        result.update(status="memory", error="MemoryError in the converter",
                      trace=traceback.format_exc()[-3000:])
        return result
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        result.update(status="crash", error=f"{_name(exc)}: {exc}"[:400],
                      trace=traceback.format_exc()[-3000:])
        return result
    try:
        result["view"] = reader_view(out)
    except MemoryError:
        result.update(status="memory", error="MemoryError reading the image back",
                      trace=traceback.format_exc()[-3000:])
    except Exception as exc:  # noqa: BLE001 - the image we wrote must read back
        result.update(status="bad-image", error=f"reader: {_name(exc)}: {exc}"[:400],
                      trace=traceback.format_exc()[-3000:])
    return result


def _name(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__qualname__
    return name if kind.__module__ == "builtins" else f"{kind.__module__}.{name}"


def run_child(tar: str, outdir: str, options: ConvertOptions, *, stream: bool, timeout: float,
              memory_mb: int, fault: str | None = None) -> dict[str, object]:
    """Convert and read back in a forked child, under a deadline and a memory limit."""
    stack_path = outdir + ".stack"
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: report one JSON document on the pipe, never return
        code = 0
        try:
            os.close(rfd)
            # stdout is the worker's line protocol: keep it clean; stderr goes with the stack
            dump = open(stack_path, "w")
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(dump.fileno(), 2)
            limit = memory_mb << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            faulthandler.dump_traceback_later(timeout, exit=True, file=dump)
            report = _convert_and_read(tar, outdir, options, stream, fault)
            faulthandler.cancel_dump_traceback_later()
            report["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            data = json.dumps(report).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:  # noqa: BLE001 - reported by the parent as a dead child
            traceback.print_exc()  # into the stack file, which the parent reports
            sys.stderr.flush()
            code = 70
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout + 5
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([rfd], [], [], left)
        if not ready:
            continue
        data = os.read(rfd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    os.close(rfd)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    stack = _read(stack_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stack_path)
    if chunks and not timed_out:
        try:
            result: dict[str, object] = json.loads(b"".join(chunks))
            return result
        except ValueError:
            pass
    if "Timeout" in stack or timed_out:
        return {"status": "hang", "error": f"over {timeout:g} s", "trace": stack[-3000:]}
    code = os.waitstatus_to_exitcode(status)
    died = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return {"status": "memory" if code == -signal.SIGKILL else "crash",
            "error": f"the child died without a report ({died})", "trace": stack[-3000:]}


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# the kernel's view --------------------------------------------------------------------------------
def kernel_check(image: str, ours: dict[str, str], mnt: str) -> dict[str, object] | None:
    """Mount ``image`` with the kernel's erofs, compare its view with ours; a finding or None."""
    proc = subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", image, mnt],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "bad-image", "error": f"kernel mount: {proc.stderr.strip()[:300]}"}
    try:
        theirs = dir_view(mnt)
    except KernelError as exc:
        return {"status": "bad-image", "error": f"kernel: {exc}"[:400]}
    finally:
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    diff = view_diff(ours, theirs)
    if diff:
        return {"status": "differs", "error": "our reader != the kernel: " + " | ".join(diff)}
    return None


# one mutant in every mode ---------------------------------------------------------------------------
def worst(statuses: list[str]) -> str:
    bugs = [s for s in statuses if s in BUG_STATUSES]
    if bugs:
        return min(bugs, key=SEVERITY.index)
    if all(s == "ok" for s in statuses):
        return "ok"
    return "refused" if all(s == "refused" for s in statuses) else "split"


def run_mutant(m: Mutant, index: int, args: argparse.Namespace, workdir: str) -> dict[str, object]:
    start = time.monotonic()
    tar = os.path.join(workdir, "mutant" + m.suffix)
    with open(tar, "wb") as f:
        f.write(m.data)
    record: dict[str, object] = {"index": index, "tar": m.seed_tar, "kind": m.kind,
                                 "notes": m.notes, "wrapping": m.wrapping, "bytes": len(m.data),
                                 "sha": hashlib.sha256(m.data).hexdigest()[:16]}
    modes: dict[str, str] = {}
    refusals: dict[str, str] = {}
    findings: list[dict[str, object]] = []
    views: dict[str, dict[str, str]] = {}
    rss = 0
    for k, (mode, options) in enumerate(MODES.items()):
        outdir = os.path.join(workdir, "out-" + mode)
        shutil.rmtree(outdir, ignore_errors=True)
        os.mkdir(outdir)
        stream = (index + k) % 2 == 1  # half the conversions read a pipe-like stream
        res = run_child(tar, outdir, options, stream=stream, timeout=args.timeout,
                        memory_mb=args.memory, fault=args.inject if mode == "full" else None)
        rss = max(rss, int(res.get("rss_kb", 0) or 0))  # type: ignore[call-overload]
        status = str(res["status"])
        if status in ("ok", "refused", "bad-message", "bad-image"):
            left = sorted(os.listdir(outdir))
            if left != ([IMAGE] if status in ("ok", "bad-image") else []):
                status = "leftover"
                res["error"] = f"{res.get('error', 'converted')}; the output directory holds {left}"
        if status == "ok":
            views[mode] = res["view"]  # type: ignore[assignment]
        modes[mode] = status
        if status in BUG_STATUSES:
            seen = any(f["error"] == res.get("error") for f in findings)
            findings.append({"mode": mode, "stream": stream, "status": status,
                             "error": res.get("error"),
                             "trace": None if seen else res.get("trace")})  # once per error
        elif status == "refused":
            refusals[mode] = str(res.get("error"))
    same = [m for m in SAME_VIEW if m in views]
    for other in same[1:]:
        diff = view_diff(views[same[0]], views[other])
        if diff:
            findings.append({"mode": other, "status": "differs",
                             "error": f"{same[0]} != {other}: " + " | ".join(diff)})
    if args.kernel_every and index % args.kernel_every == 0 and views:
        choice = sorted(views)[(index // args.kernel_every) % len(views)]
        mnt = os.path.join(workdir, "mnt")
        os.makedirs(mnt, exist_ok=True)
        found = kernel_check(os.path.join(workdir, "out-" + choice, IMAGE), views[choice], mnt)
        record["kernel"] = choice if found is None else f"{choice}: {found['status']}"
        if found is not None:
            findings.append({"mode": choice, "kernel": True, **found})
    statuses = list(modes.values()) + [str(f["status"]) for f in findings]
    record.update(status=worst(statuses), modes=modes, rss_kb=rss,
                  seconds=round(time.monotonic() - start, 3))
    if refusals:  # every refusal message when they are not all the same
        record["refusal"] = (next(iter(refusals.values())) if len(set(refusals.values())) == 1
                             else refusals)
    if findings:
        first = min(findings, key=lambda f: SEVERITY.index(str(f["status"])))
        record.update(error=f"{first['mode']}: {first['error']}", trace=first.get("trace"),
                      findings=findings)
    if record["status"] in BUG_STATUSES and args.crashes:
        os.makedirs(args.crashes, exist_ok=True)
        base = os.path.join(args.crashes, f"convert-{args.seed}-{index}")
        with open(base + m.suffix, "wb") as f:
            f.write(m.data)
        with open(base + ".json", "w") as out:
            json.dump(record, out, indent=1)
        record["saved"] = base + m.suffix
    return record


def worker(args: argparse.Namespace) -> int:
    """Reads mutant indexes on stdin, answers one JSON line each (as the other modes' workers do)."""
    corpus = TarCorpus(args.tars)
    workdir = args.workdir
    if args.kernel_every and os.geteuid() != 0:
        args.kernel_every = 0  # kernel mounts need root
    print("ready", flush=True)
    for line in sys.stdin:
        index = int(line)
        record = run_mutant(corpus.mutant(args.seed, index), index, args, workdir)
        print(json.dumps(record), flush=True)
    return 0


def save(args: argparse.Namespace, directory: str) -> str:
    """Write mutant ``args.only`` into ``directory``; its path and what it is."""
    m = TarCorpus(args.tars).mutant(args.seed, args.only)
    path = os.path.join(directory, f"convert-{args.seed}-{args.only}-{m.seed_tar}{m.suffix}")
    with open(path, "wb") as f:
        f.write(m.data)
    return f"{path} ({m.kind} [{m.wrapping}]: {m.notes})"
