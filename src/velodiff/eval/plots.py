"""Plots for benchmarks and reports (matplotlib, Agg backend, PNG bytes out)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any


def pareto_png(
    records: Sequence[dict[str, Any]], quality: str, label: str, higher_better: bool = True,
    group: str = "solver", name: Callable[[dict[str, Any]], str] | None = None,
) -> bytes:
    """Seconds per image (log x) against a quality metric, one colour per ``group`` value (the solver),
    marker size by NFE; the Pareto-optimal configurations are ringed, joined by a step line and
    labelled (by ``name(record)``: solver and NFE, and guidance when it varies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a configuration equal to the reference has PSNR inf: no point on a plot (the table says so)
    recs = [r for r in records if "error" not in r and r.get(quality) is not None
            and math.isfinite(float(r[quality])) and math.isfinite(float(r.get("seconds_per_image", 0.0)))]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    solvers = list(dict.fromkeys(r[group] for r in recs))
    cmap = plt.get_cmap("tab10")
    for i, s in enumerate(solvers):
        rs = [r for r in recs if r[group] == s]
        ax.scatter([r["seconds_per_image"] for r in rs], [r[quality] for r in rs],
                   s=[18 + 4 * r["nfe"] for r in rs], color=cmap(i % 10), alpha=0.8, label=s, zorder=2)
    front = sorted((r for r in recs if r.get("pareto")), key=lambda r: r["seconds_per_image"])
    if front:
        xs = [r["seconds_per_image"] for r in front]
        ys = [r[quality] for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1.0, ls="--", zorder=1, label="Pareto front")
        ax.scatter(xs, ys, s=140, facecolors="none", edgecolors="black", lw=1.2, zorder=3)
        several = len({x.get("guidance") for x in recs}) > 1

        def default_name(r: dict[str, Any]) -> str:
            plan = f" {r['plan']}" if r.get("plan", "none") != "none" else ""
            return f"{r['solver']} {r['nfe']}" + (f" g{r['guidance']:g}" if several else "") + plan

        for r in front:
            ax.annotate((name or default_name)(r), (r["seconds_per_image"], r[quality]),
                        textcoords="offset points", xytext=(5, 5), fontsize=7)
    if recs and min(r["seconds_per_image"] for r in recs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("seconds per image (median)")
    ax.set_ylabel(label + ("" if higher_better else " (lower is better)"))
    ax.set_title(f"{label} vs time; marker size ~ NFE")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def bars_png(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> bytes:
    """A simple bar chart (used by reports for eval folders)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 3.6), dpi=110)
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
