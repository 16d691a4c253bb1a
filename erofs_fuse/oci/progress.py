"""Progress of ``convert-image`` (and of ``push``'s uploads: ``TransferView``) on stderr, per
layer file and in total.

On a terminal, a block of bars (one per running job, then the total) is redrawn in place at most
10 times a second, with a permanent line above it per finished layer; anywhere else, plain
lines: one when a job starts and one when it ends, and the total every ``PLAIN_EVERY`` seconds.
The bytes counted are those read: a layer's blob as stored (compressed), or the file sealed.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TextIO

from .workers import Job, JobResult


def human_size(n: int) -> str:
    """``n`` bytes as people read them: 512 B, 1.5 KiB, 12.0 MiB, 3.2 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class ProgressView:
    """Progress on stderr: on a terminal, a block of bars (one per running layer and a total)
    redrawn in place at most 10 times a second, with a permanent line per finished layer;
    otherwise plain lines: one when a layer starts and ends, the total every PLAIN_EVERY s."""

    PLAIN_EVERY = 10.0

    def __init__(self, stream: TextIO, nlayers: int, jobs: list[Job], *, quiet: bool = False,
                 tty: bool | None = None) -> None:
        self._out = stream
        self._nlayers = nlayers
        self._quiet = quiet
        self._tty = stream.isatty() if tty is None else tty
        self._total = sum(job.work for job in jobs)
        self._done: dict[int, int] = {}
        self._active: dict[int, tuple[Job, float]] = {}
        self._finished = 0
        self._jobs = len(jobs)
        self._start = time.monotonic()
        self._last_draw = 0.0 if self._tty else self._start
        self._drawn = 0  # lines of the bar block on screen
        self._closed = False

    def label(self, job: Job) -> str:
        which = ",".join(str(i + 1) for i in job.indexes)
        return f"layer {which}/{self._nlayers} {job.layer.diff_id[:19]}"

    def note(self, line: str) -> None:
        """A permanent line (above the bars)."""
        if self._quiet:
            return
        self._erase()
        print(line, file=self._out, flush=True)
        self._draw(force=True)

    def started(self, job: Job) -> None:
        self._active[job.key] = (job, time.monotonic())
        self._done[job.key] = 0
        if not self._tty:
            what = "converting" if job.convert else "sealing"
            self.note(f"{self.label(job)}: {what} {human_size(job.work)}")

    def progress(self, job: Job, done: int) -> None:
        self._done[job.key] = min(done, job.work)

    def finished(self, job: Job, result: JobResult) -> None:
        _, began = self._active.pop(job.key, (job, time.monotonic()))
        self._done[job.key] = job.work
        self._finished += 1
        took = time.monotonic() - began
        if job.convert or result.reconverted:
            read = job.layer.size if result.reconverted else job.work  # the blob, not the file
            self.note(f"{self.label(job)}: converted {human_size(read)} -> "
                      f"{human_size(result.image_size)} in {took:.1f} s")
        else:
            self.note(f"{self.label(job)}: present, sealed in {took:.1f} s")
        for warning in result.warnings[:5]:
            self.note(f"{self.label(job)}: warning: {warning}")
        if len(result.warnings) > 5:
            self.note(f"{self.label(job)}: ... and {len(result.warnings) - 5} more warnings")

    def tick(self) -> None:
        now = time.monotonic()
        if self._tty:
            self._draw()
        elif not self._quiet and self._jobs and now - self._last_draw >= self.PLAIN_EVERY:
            self._last_draw = now
            print(self._total_line(), file=self._out, flush=True)

    def close(self) -> None:
        """Take the bars away for good (later notes are plain lines)."""
        self._erase()
        self._closed = True

    # the bar block ---------------------------------------------------------------------------
    def _total_line(self) -> str:
        done = sum(self._done.values())
        pct = 100 * done // max(self._total, 1)
        return (f"total {pct:3d}% {human_size(done)}/{human_size(self._total)}, "
                f"{self._finished}/{self._jobs} files, {time.monotonic() - self._start:.0f} s")

    def _bar(self, fraction: float, width: int = 20) -> str:
        full = int(fraction * width)
        return "[" + "#" * full + "-" * (width - full) + "]"

    def _lines(self) -> list[str]:
        lines = []
        now = time.monotonic()
        for key, (job, began) in self._active.items():
            done = self._done.get(key, 0)
            rate = done / max(now - began, 1e-3) / 1e6
            lines.append(f"  {self.label(job)} {self._bar(done / max(job.work, 1))} "
                         f"{100 * done // max(job.work, 1):3d}% {human_size(done)}/{human_size(job.work)} "
                         f"{rate:.1f} MB/s")
        done = sum(self._done.values())
        lines.append(f"{self._bar(done / max(self._total, 1))} {self._total_line()}")
        return lines

    def _draw(self, force: bool = False) -> None:
        if not self._tty or self._quiet or not self._jobs or self._closed:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = max(20, _columns(self._out) - 1)  # a wrapped line would break the redraw
        self._erase()
        lines = [line[:width] for line in self._lines()]
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()
        self._drawn = len(lines)

    def _erase(self) -> None:
        if self._drawn:
            self._out.write(f"\x1b[{self._drawn}F\x1b[J")  # to the block's first line, clear
            self._out.flush()
            self._drawn = 0


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80  # 0: size never set
    except (OSError, ValueError):
        return 80


class TransferView:
    """Progress of blobs sent to a registry (``push``), from several threads: on a terminal
    a bar per blob being sent and a total, redrawn in place at most 10 times a second, with a
    permanent line per blob done; otherwise only the permanent lines."""

    def __init__(self, stream: TextIO, total: int, *, quiet: bool = False,
                 tty: bool | None = None) -> None:
        self._out = stream
        self._quiet = quiet
        self._tty = stream.isatty() if tty is None else tty
        self._total = total
        self._lock = threading.Lock()
        self._active: dict[str, tuple[str, int, float]] = {}  # key: label, size, start
        self._done: dict[str, int] = {}
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = 0

    def started(self, key: str, label: str, size: int) -> None:
        with self._lock:
            self._active[key] = (label, size, time.monotonic())
            self._done[key] = 0
            self._draw(force=True)

    def progress(self, key: str, done: int) -> None:
        with self._lock:
            self._done[key] = done
            self._draw()

    def finished(self, key: str, line: str, size: int = 0) -> None:
        """A blob is done (sent, or found present: ``size`` 0 then counts it as done)."""
        with self._lock:
            entry = self._active.pop(key, None)
            self._done[key] = entry[1] if entry is not None else size
            self._line(line)

    def note(self, line: str) -> None:
        with self._lock:
            self._line(line)

    def close(self) -> None:
        with self._lock:
            self._erase()
            self._tty = False

    def _line(self, line: str) -> None:
        if self._quiet:
            return
        self._erase()
        print(line, file=self._out, flush=True)
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self._tty or self._quiet:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = max(20, _columns(self._out) - 1)
        lines = []
        for key, (label, size, began) in self._active.items():
            done = min(self._done.get(key, 0), size)
            rate = done / max(now - began, 1e-3) / 1e6
            lines.append(f"  {label} {_bar(done / max(size, 1))} {100 * done // max(size, 1):3d}% "
                         f"{human_size(done)}/{human_size(size)} {rate:.1f} MB/s")
        done = sum(self._done.values())
        lines.append(f"{_bar(done / max(self._total, 1))} sent {human_size(done)}/"
                     f"{human_size(self._total)}, {now - self._start:.0f} s")
        self._erase()
        self._out.write("\n".join(line[:width] for line in lines) + "\n")
        self._out.flush()
        self._drawn = len(lines)

    def _erase(self) -> None:
        if self._drawn:
            self._out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._out.flush()
            self._drawn = 0


def _bar(fraction: float, width: int = 20) -> str:
    full = int(min(max(fraction, 0.0), 1.0) * width)
    return "[" + "#" * full + "-" * (width - full) + "]"
