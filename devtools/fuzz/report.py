"""What ``scripts/fuzz`` reports: the tally of mutant records, progress lines and the summary."""

from __future__ import annotations

import argparse
import json
import sys

# what a mutant's status may be that is a bug (convert mode has more than crashes and hangs)
BUG_STATUSES = ("crash", "hang", "memory", "bad-image", "differs", "leftover", "bad-message")
# Seconds between progress lines: a run as docs/hostile-input.md gives it takes 10-15 minutes,
# and was silent throughout.
PROGRESS_EVERY = 10.0


def progress_line(done: int, total: int, counts: dict[str, int], peak_rss_kb: int,
                  elapsed: float) -> str:
    left = elapsed / done * (total - done) if done else 0.0
    return (f"{done}/{total} mutants ({100 * done // max(total, 1)}%), "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + f"; peak RSS {peak_rss_kb / 1024:.1f} MB; {elapsed:.0f} s, about {left:.0f} s left")


class Tally:
    """The records of the mutants run so far, counted by status, kind and (convert) mode."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.kinds: dict[str, dict[str, int]] = {}
        self.by_mode: dict[str, dict[str, int]] = {}
        self.splits: list[dict[str, object]] = []  # convert mode: some modes converted, some refused
        self.kernel_checks = 0  # convert mode: images mounted by the kernel and compared
        self.findings: list[dict[str, object]] = []
        self.peak_rss = 0
        self.done = 0

    def add(self, rec: dict[str, object]) -> None:
        """Count one mutant's record; a bug is also printed on stderr at once."""
        status = str(rec["status"])
        self.counts[status] = self.counts.get(status, 0) + 1
        kind = str(rec.get("kind", "?")).split(":")[0]
        per_kind = self.kinds.setdefault(kind, {})
        per_kind[status] = per_kind.get(status, 0) + 1
        self.kernel_checks += 1 if rec.get("kernel") else 0
        for mode, mode_status in dict(rec.get("modes") or {}).items():  # type: ignore[call-overload]
            per_mode = self.by_mode.setdefault(mode, {})
            per_mode[mode_status] = per_mode.get(mode_status, 0) + 1
        self.peak_rss = max(self.peak_rss, int(rec.get("rss_kb", 0) or 0))  # type: ignore[call-overload]
        if status in BUG_STATUSES:
            self.findings.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
        elif status == "split":
            self.splits.append({k: rec.get(k) for k in ("index", "kind", "modes", "refusal")})
        self.done += 1

    def summary(self, args: argparse.Namespace, seconds: float) -> dict[str, object]:
        counts = self.counts
        return {
            "mode": args.mode, "seed": args.seed, "start": args.start, "count": args.count,
            "every": args.every, "mutants": self.done, "counts": counts, "by_kind": self.kinds,
            "crashes": counts.get("crash", 0), "hangs": counts.get("hang", 0),
            "bugs": sum(counts.get(s, 0) for s in BUG_STATUSES),
            **({"by_mode": self.by_mode, "kernel_checks": self.kernel_checks}
               if args.mode == "convert" else {}),
            "peak_rss_mb": round(self.peak_rss / 1024, 1), "seconds": round(seconds, 1),
            "findings": self.findings[:100], **({"splits": self.splits[:100]} if self.splits else {}),
        }
