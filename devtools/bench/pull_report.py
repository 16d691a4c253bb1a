"""The tables of ``scripts/bench-pull`` (markdown), its aims, and the profile summaries."""

from __future__ import annotations

import io
import pstats
from collections import Counter
from pathlib import Path

from devtools.bench.pull import NOISY_LOAD, BenchImage, Case, Samples, median, ratio_samples

# issue 19's aims on a 2-core machine: time until ready against ctr + overlayfs, per image;
# first output of ctr run against the same
READY_AIMS = {"balanced": 0.5, "python": 0.8}
FIRST_OUTPUT_AIM = 1.2
# issue 20's: the lazy pull's ready + first output against ctr + overlayfs's
LAZY_FIRST_OUTPUT_AIM = 0.2


def markdown(rows: list[list[str]]) -> str:
    """A markdown table; the first row is the head; columns after the first right-aligned."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) if k == 0 else c.rjust(w)
                               for k, (c, w) in enumerate(zip(r, widths))) + " |" for r in rows]
    rule = "|" + "|".join(("-" * (w + 2)) if k == 0 else ("-" * (w + 1) + ":")
                          for k, w in enumerate(widths)) + "|"
    return "\n".join([lines[0], rule, *lines[1:]])


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = median(xs)
    assert m is not None
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def ratio(xs: list[float]) -> str:
    m = median(xs)
    return "-" if m is None else f"{m:.2f}x"


def noisy(samples: Samples) -> bool:
    return max(samples.get("load-start", []) + samples.get("load-end", []), default=0) > \
        NOISY_LOAD


def baseline_of(case: Case, all_cases: list[Case]) -> Case:
    return next(c for c in all_cases if c.source == case.source and c.baseline)


def times_table(results: dict[tuple[str, str], Samples], image: BenchImage,
                all_cases: list[Case]) -> str:
    """Seconds (median [min-max]) until ready, to the first output of ``ctr run`` and of the
    cold walk and read; the ratios (median of each run's) to ctr + overlayfs from the same
    source; the load averages."""
    rows = [["case", "ready (s)", "vs overlayfs", "first output (s)", "vs overlayfs",
             "ready + first output vs overlayfs", "find + read-all (s)", "load start-end",
             "noisy"]]
    for case in all_cases:
        s = results.get((image.key, case.name), {})
        base = baseline_of(case, all_cases)
        walk = [a + b for a, b in zip(s.get("find", []), s.get("read-all", []))]
        loads = list(zip(s.get("load-start", []), s.get("load-end", [])))
        rows.append([case.name, spread(s.get("ready", [])),
                     ratio(ratio_samples(results, image.key, case, base, "ready")),
                     spread(s.get("first-output", [])),
                     ratio(ratio_samples(results, image.key, case, base, "first-output")),
                     ratio(ratio_samples(results, image.key, case, base, "to-first-output")),
                     spread(walk), ", ".join(f"{a:.1f}-{b:.1f}" for a, b in loads) or "-",
                     f"yes (> {NOISY_LOAD})" if noisy(s) else "no"])
    return markdown(rows)


def fetched_table(results: dict[tuple[str, str], Samples], image: BenchImage,
                  all_cases: list[Case], erofs_bytes: int) -> str:
    """The lazy case's blob bytes from the registry (MB, medians) by ready, by the first
    output and after the read-all, each also as a share of the pushed image's blobs."""
    rows = [["case (pushed: layers + trees)", "fetched by ready", "by first output",
             "after read-all"]]
    for case in all_cases:
        s = results.get((image.key, case.name), {})
        if not case.lazy or "fetched-ready" not in s:
            continue
        cells = []
        for metric in ("fetched-ready", "fetched-first-output", "fetched-all"):
            m = median(s.get(metric, []))
            share = f" ({m / erofs_bytes:.1%})" if m is not None and erofs_bytes else ""
            cells.append("-" if m is None else f"{m / 1e6:.1f} MB{share}")
        rows.append([f"{case.name} ({erofs_bytes / 1e6:.0f} MB)", *cells])
    return markdown(rows) if len(rows) > 1 else "(no lazy case)"


def pss_table(results: dict[tuple[str, str], Samples], images: list[BenchImage],
              all_cases: list[Case]) -> str:
    """PSS (MiB, medians) of the snapshotter (fresh for each case) and of its chain mounts,
    with a container running, before and after the cold walk and read of its root."""
    rows = [["image, case", "snapshotter idle", "snapshotter walked", "chain mounts",
             "mounts idle", "mounts walked"]]
    for image in images:
        for case in all_cases:
            s = results.get((image.key, case.name), {})
            if "pss-snapshotter-idle" not in s:
                continue
            vals = [median(s.get(k, [])) for k in
                    ("pss-snapshotter-idle", "pss-snapshotter-walked", "mounts-idle",
                     "pss-mounts-idle", "pss-mounts-walked")]
            rows.append([f"{image.key}, {case.name}",
                         *(("-" if v is None else f"{v:.0f}") for v in vals)])
    return markdown(rows)


def aims(results: dict[tuple[str, str], Samples], images: list[BenchImage],
         all_cases: list[Case]) -> list[str]:
    """Issue 19's aims, for each erofs-fuse case, and issue 20's for the lazy one (ready +
    first output, ``to-first-output``): met, missed, or not measured."""
    out = []
    for image in images:
        for case in all_cases:
            if case.tool != "erofs-fuse":
                continue
            base = baseline_of(case, all_cases)
            checks = [("to-first-output", LAZY_FIRST_OUTPUT_AIM)] if case.lazy else \
                [("ready", READY_AIMS.get(image.key)), ("first-output", FIRST_OUTPUT_AIM)]
            for metric, limit in checks:
                if limit is None:
                    continue
                r = median(ratio_samples(results, image.key, case, base, metric))
                verdict = "not measured" if r is None else \
                    f"{r:.2f}x: {'met' if r <= limit else 'MISSED'}"
                out.append(f"{image.key}, {case.name}: {metric} <= {limit}x of {base.name}: "
                           f"{verdict}")
    return out


def cprofile_summary(stats_dir: Path, top: int = 15) -> str:
    """The pull's own process, then its workers merged: the top functions by own time."""
    parts = []
    main = stats_dir / "main.prof"
    worker_files = sorted(stats_dir.glob("worker-*.prof"))
    for title, files in (("the command's process", [main] if main.exists() else []),
                         (f"its {len(worker_files)} conversion workers, merged", worker_files)):
        if not files:
            parts.append(f"{title}: no profile")
            continue
        buf = io.StringIO()
        stats = pstats.Stats(*map(str, files), stream=buf)
        stats.sort_stats("tottime").print_stats(top)
        parts.append(f"{title} (top {top} by own time):\n{_listing(buf)}")
        buf = io.StringIO()
        stats.stream = buf  # type: ignore[attr-defined]
        stats.sort_stats("cumulative").print_stats("erofs_fuse/", top)
        parts.append(f"{title}, erofs_fuse's functions (top {top} by cumulative time):\n"
                     f"{_listing(buf)}")
    return "\n\n".join(parts)


def cprofile_cpu(stats_dir: Path) -> float:
    """CPU seconds of the profiled command and its workers, as each recorded them."""
    return sum(float(p.read_text()) for p in stats_dir.glob("*.cpu"))


def _listing(buf: io.StringIO) -> str:
    """pstats' table without its preamble."""
    body = buf.getvalue()
    start = body.find("   ncalls")
    return body[start:].rstrip() if start >= 0 else "(none)"


def pyspy_summary(raw: Path, top: int = 15) -> str:
    """py-spy's raw (collapsed) stacks: the innermost frames with the most samples."""
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        leaves[stack.split(";")[-1]] += int(count)
    rows = [f"{n:8d} {n / max(total, 1):6.1%}  {frame}" for frame, n in leaves.most_common(top)]
    return f"py-spy, {total} samples, top {top} innermost frames:\n" + "\n".join(rows)
