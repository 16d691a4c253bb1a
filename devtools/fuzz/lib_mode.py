"""``scripts/fuzz --mode lib``: one mutant through the library in the worker process.

Through ``Image`` (walk, read, readlink, xattrs, path lookup), through ``MergedTree`` and the
FUSE ``Operations`` in-process (the daemon's code path) and, every ``--extract-every`` mutants,
through ``extract`` into a sandbox that must hold nothing else afterwards. ``inject`` plants
the faults that prove the harness sees crashes and hangs (in mount mode too).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import resource
import shutil
import threading
import time
import traceback
from functools import partial
from typing import Callable, Coroutine, cast

from erofs_fuse.erofs.errors import ErofsError
from erofs_fuse.erofs.image import Image, Inode

from devtools.fuzz.image_mutants import stack_for

# the caps of one mutant's walk (mount mode too)
READ_CAP = 64 << 20  # bytes read per mutant at most: a mutant may claim huge (sparse) files
FILE_CAP = 16 << 20  # ... and per file
ENTRY_CAP = 20000  # directory entries visited per mutant at most
CHUNK = 1 << 20


# injected faults: prove that the harness sees crashes and hangs --------------------------------
def inject(fault: str | None) -> None:
    if not fault:
        return
    original = Image._read_data

    def faulty(self: Image, inode: Inode, offset: int, length: int, *, packed: bool = False) -> bytes:
        if inode.is_reg and inode.size > 4096 and offset == 0:
            if fault == "crash":
                raise IndexError("injected fault")
            if fault == "exit":
                os._exit(1)
            time.sleep(3600)
        return original(self, inode, offset, length, packed=packed)

    Image._read_data = faulty  # type: ignore[method-assign]


# library mode ---------------------------------------------------------------------------------
class Timer:
    """Times single operations; a watchdog thread dumps the stack of one that runs too long."""

    def __init__(self, timeout: float, dump: object, on_hang: Callable[[str], None]) -> None:
        self.timeout = timeout
        self.dump = dump
        self.on_hang = on_hang
        self.slowest = 0.0
        self.slowest_op = ""
        self.errors = 0
        self._op_start: float | None = None
        self._op = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            start = self._op_start
            if start is not None and time.monotonic() - start > self.timeout:
                faulthandler.dump_traceback(file=self.dump, all_threads=True)  # type: ignore[arg-type]
                self.on_hang(f"{self._op}: over {self.timeout:g} s")  # does not return

    def close(self) -> None:
        self._done.set()
        self._thread.join()

    def run(self, what: str, fn: Callable[[], object]) -> object:
        self._op = what
        start = self._op_start = time.monotonic()
        try:
            return fn()
        except ErofsError:
            self.errors += 1
            return None
        finally:
            self._op_start = None
            took = time.monotonic() - start
            if took > self.slowest:
                self.slowest, self.slowest_op = took, what


def lib_read_everything(image: Image, timer: Timer) -> None:
    """Walk the image and read everything through the library."""
    budget = [READ_CAP]

    def read_all(node: Inode) -> None:
        want = min(node.size, FILE_CAP, budget[0])
        budget[0] -= want
        pos = 0
        while pos < want:
            chunk = node.read(pos, min(CHUNK, want - pos))
            if not chunk:
                break
            pos += len(chunk)

    walker = image.walk()
    paths: list[bytes] = []
    for _ in range(ENTRY_CAP):
        item = timer.run("walk", lambda: next(walker, None))
        if item is None:
            break
        path, node = cast(tuple[bytes, Inode], item)
        paths.append(path)
        if node.is_reg:
            timer.run(f"read {path!r}", partial(read_all, node))
        elif node.is_symlink:
            timer.run(f"readlink {path!r}", node.readlink)
        timer.run(f"xattrs {path!r}", node.xattrs)
    for path in paths[:: max(1, len(paths) // 100)]:  # lookups of ~100 paths
        timer.run(f"lookup {path!r}", partial(image.lookup, path))


def _drive(coro: Coroutine[object, object, object]) -> object:
    """Run a coroutine that never suspends (the FUSE handlers over an in-memory tree)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the handler suspended")


def lib_merged(images: list[Image], timer: Timer) -> None:
    """The daemon's code path: merged listings, lookups, reads, readlink, xattrs, and the FUSE
    attributes and statfs replies made from them (in-process, no mount)."""
    import pyfuse3

    from erofs_fuse.fuse.operations import Operations
    from erofs_fuse.fuse.overlay import MergedTree, Node

    tree = MergedTree(images)
    ops = Operations(tree)
    try:
        _drive(ops.statfs())
    except pyfuse3.FUSEError:
        timer.errors += 1
    budget = READ_CAP
    visited = 0
    seen = {tree.root.ino}
    stack: list[Node] = [tree.root]
    while stack and visited < ENTRY_CAP:
        parent = stack.pop()
        listing = timer.run(f"merged listdir {parent.ino}", partial(tree.listdir, parent))
        for name, node in listing.entries if listing is not None else ():  # type: ignore[attr-defined]
            visited += 1
            timer.run(f"merged lookup {name!r}",
                      partial(tree.lookup, parent, name))
            timer.run(f"attributes {name!r}", partial(ops.attributes, node))
            if node.is_dir and node.ino not in seen:
                seen.add(node.ino)
                stack.append(node)
            elif node.inode.is_reg and budget > 0:
                want = min(node.inode.size, 1 << 20, budget)
                budget -= want
                timer.run(f"merged prefetch {name!r}", partial(tree.prefetch, node, 0, want))
                timer.run(f"merged read {name!r}", partial(tree.read, node, 0, want))
            elif node.inode.is_symlink:
                timer.run(f"merged readlink {name!r}", partial(tree.readlink, node))
            timer.run(f"merged xattrs {name!r}", partial(tree.listxattr, node))


def lib_extract(image: Image, workdir: str, timer: Timer) -> str | None:
    """Extract into a sandbox; a problem description if anything landed outside it."""
    from erofs_fuse.cli.extract import Extractor

    box = os.path.join(workdir, "box")
    shutil.rmtree(box, ignore_errors=True)
    dest = os.path.join(box, "dest")
    os.makedirs(dest)

    def run() -> None:
        try:
            Extractor(image, owners=False, xattrs=False).extract(dest)
        except OSError:
            timer.errors += 1  # e.g. two entries of one name: refused by O_EXCL, reported

    timer.run("extract", run)
    escaped = sorted(set(os.listdir(box)) - {"dest"})
    shutil.rmtree(box, ignore_errors=True)
    return f"extract wrote outside the destination: {escaped}" if escaped else None


class InternalErrors(logging.Handler):
    """Collects the FUSE layer's "internal error" log records (a bug behind an EIO)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "internal error" in record.getMessage():
            self.seen.append(self.format(record)[-2000:])


INTERNAL = InternalErrors()


def run_lib_mutant(path: str, name: str, index: int, args: argparse.Namespace, workdir: str,
                   dump: object, on_hang: Callable[[str], None]) -> dict[str, object]:
    start = time.monotonic()
    INTERNAL.seen.clear()
    timer = Timer(args.timeout, dump, on_hang)
    result: dict[str, object] = {"status": "ok"}
    images: list[Image] = []
    try:
        image = Image.open(path)
        images.append(image)
        lib_read_everything(image, timer)
        stack = [Image.open(p) if p != path else image for p in stack_for(name, path)]
        images += [im for im in stack if im is not image]
        lib_merged(stack, timer)
        if args.extract_every and index % args.extract_every == 0:
            problem = lib_extract(image, workdir, timer)
            if problem:
                result.update(status="crash", error=problem)
        result.update(errors=timer.errors, slowest=round(timer.slowest, 3))
        if INTERNAL.seen:
            result.update(status="crash", error="internal error in a FUSE handler",
                          trace=INTERNAL.seen[0])
        if timer.slowest > args.timeout:
            result.update(status="hang", error=f"{timer.slowest_op}: {timer.slowest:.1f} s")
    except ErofsError as exc:
        result.update(status="refused", error=str(exc)[:200])
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer is looking for
        result.update(status="crash", error=f"{type(exc).__name__}: {exc}"[:300],
                      trace=traceback.format_exc()[-3000:])
    finally:
        timer.close()
        for im in images:
            im.close()
    result["seconds"] = round(time.monotonic() - start, 3)
    result["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result
