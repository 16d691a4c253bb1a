"""Summaries of ``scripts/bench`` results: medians and spread, ratios, targets, a PNG chart."""

from __future__ import annotations

import statistics
from typing import Any

REFERENCE = "erofs-fuse"
# The figures for the all-userspace C stack (erofsfuse x3 + fuse-overlayfs), seconds:
# the low end of each measured range.
C_STACK_FIGURES = {"walk": 1.21, "read-all": 2.77, "python-import": 0.54}
# ... and the kernel stack's on that machine (midpoints), to tell how fast this machine is
KERNEL_FIGURES = {"walk": 0.235, "read-all": 0.815, "python-import": 0.17}
FUSE_OVERLAY_LIMIT = 1.5
VERITY_LIMIT = 0.20

Results = dict[str, dict[str, list[float]]]  # stack -> workload -> samples


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def _fmt(value: float, unit: str) -> str:
    if unit == "MiB":
        return f"{value:.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def table(results: Results, stacks: list[str], workloads: list[tuple[str, str]]) -> str:
    """Medians [min-max] per workload and stack, then erofs-fuse's ratio to each other stack."""
    others = [s for s in stacks if s != REFERENCE]
    head = ["workload"] + stacks + [f"ef/{s}" for s in others]
    rows = [head]
    for wl, unit in workloads:
        row = [f"{wl} ({unit})"]
        for s in stacks:
            xs = results.get(s, {}).get(wl) or []
            if not xs:
                row.append("-")
                continue
            m = summary(xs)
            row.append(f"{_fmt(m['median'], unit)} [{_fmt(m['min'], unit)}-"
                       f"{_fmt(m['max'], unit)}]")
        ref = results.get(REFERENCE, {}).get(wl) or []
        for s in others:
            xs = results.get(s, {}).get(wl) or []
            if ref and xs and statistics.median(xs) > 0:
                row.append(f"{statistics.median(ref) / statistics.median(xs):.2f}")
            else:
                row.append("-")
        rows.append(row)
    return align(rows)


def align(rows: list[list[str]]) -> str:
    """A text table: the first row is the head, underlined; the first column left-aligned,
    the others right-aligned."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def targets(results: Results) -> list[tuple[str, bool | None, str]]:
    """(target, met or None if not measured, detail) for the issue's done-when list."""
    out: list[tuple[str, bool | None, str]] = []
    ef = results.get(REFERENCE, {})
    fo = results.get("fuse-overlayfs", {})
    c_stack = results.get("erofsfuse", {})
    kernel = results.get("kernel", {})
    for wl, fig in C_STACK_FIGURES.items():
        xs = ef.get(wl)
        if not xs:
            out.append((f"{wl}: faster than the C stack's {fig} s", None, "not measured"))
            continue
        m = statistics.median(xs)
        speed = ""
        if kernel.get(wl):
            speed = (f" (this machine's kernel stack: {statistics.median(kernel[wl]):.3f} s, "
                     f"the issue's {KERNEL_FIGURES[wl]} s)")
        out.append((f"{wl}: faster than the issue's C-stack figure {fig} s", m < fig,
                    f"{m:.3f} s{speed}"))
        cs = c_stack.get(wl)
        if cs:
            r = m / statistics.median(cs)
            out.append((f"{wl}: faster than erofsfuse + fuse-overlayfs, side by side", r < 1,
                        f"{r:.2f}x"))
        ys = fo.get(wl)
        if ys:
            r = m / statistics.median(ys)
            out.append((f"{wl}: within {FUSE_OVERLAY_LIMIT}x of fuse-overlayfs",
                        r <= FUSE_OVERLAY_LIMIT, f"{r:.2f}x"))
    xs, vs = ef.get("read-all"), results.get("erofs-fuse+verity", {}).get("read-all")
    if xs and vs:
        cost = statistics.median(vs) / statistics.median(xs) - 1
        out.append((f"verification costs under {VERITY_LIMIT:.0%} on read-all",
                    cost < VERITY_LIMIT, f"{cost:+.1%}"))
    else:
        out.append((f"verification costs under {VERITY_LIMIT:.0%} on read-all", None,
                    "not measured"))
    return out


def chart(results: Results, stacks: list[str], workloads: list[tuple[str, str]],
          labels: dict[str, str], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(wl, unit) for wl, unit in workloads
             if any(results.get(s, {}).get(wl) for s in stacks)]
    ncols = 4
    nrows = -(-len(shown) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows + 1.0),
                             squeeze=False)
    tab10 = plt.get_cmap("tab10")  # a listed map: index k gives its k-th color
    colors = [tab10(k) for k in range(tab10.N)]
    for ax, (wl, unit) in zip(axes.flat, shown):
        xs, meds, lo, hi, cols = [], [], [], [], []
        for k, s in enumerate(stacks):
            samples = results.get(s, {}).get(wl)
            if not samples:
                continue
            m = summary(samples)
            xs.append(labels.get(s, s))
            meds.append(m["median"])
            lo.append(m["median"] - m["min"])
            hi.append(m["max"] - m["median"])
            cols.append(colors[k % len(colors)])
        pos = range(len(xs))
        ax.bar(pos, meds, yerr=[lo, hi], color=cols, capsize=3)
        for p, v in zip(pos, meds):
            ax.text(p, v, _fmt(v, unit), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(pos))
        ax.set_xticklabels(xs, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{wl} ({unit}, lower is better)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(title + "\nbars: median; whiskers: min-max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_json(results: Results) -> dict[str, Any]:
    return {s: {wl: {"samples": xs, **summary(xs)} for wl, xs in per.items() if xs}
            for s, per in results.items()}
