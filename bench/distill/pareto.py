"""Students beside the teacher on one Pareto plot (issue 13, item 4): ShapesEval (v1 prompts x 2 images,
seed 0) against seconds per image end to end (median of single-image runs, one thread) for the teacher
at 20 steps, the teacher with the fastest training-free plans, and every shipped student run as shipped.

    python bench/distill/pareto.py --out bench/distill/pareto        # ~6 min on one CPU thread

Each row is one ``velodiff eval shapes`` run (its JSON is kept in --out and reused on a rerun while its
model's files are unchanged: ``stamp.py``); the rows run one after another in one process, so the
timings are side by side on the same machine (delete --out's rows to time them all again)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stamp import model_stamp

#: label -> extra ``velodiff eval shapes`` arguments
ROWS: dict[str, list[str]] = {
    "teacher, 20 steps CFG 2.5": ["--model", "default"],
    "teacher, unipc 12 NFE (tune 0.02)": ["--model", "default", "--plan", "solver=unipc+nfe=12"],
    "teacher, ddim 8 NFE trailing (tune 0.05)": [
        "--model",
        "default",
        "--plan",
        "solver=ddim+nfe=8+grid=trailing",
    ],
    "default-guided, dpmpp_2m 8 NFE trailing (tune 0.02 with the guided student)": [
        "--model",
        "default-guided",
        "--plan",
        "solver=dpmpp_2m+nfe=8+grid=trailing",
    ],
    "teacher, ddim 4 steps, no CFG": [
        "--model",
        "default",
        "--steps",
        "4",
        "--solver",
        "ddim",
        "--grid",
        "trailing",
        "--guidance",
        "1",
    ],
}


def shipped_students() -> dict[str, list[str]]:
    from velodiff.shipped import SHIPPED

    return {f"{name} (as shipped)": ["--model", name] for name, e in SHIPPED.items() if e.base is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--speed-runs", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {**ROWS, **shipped_students()}
    table = []
    for i, (label, extra) in enumerate(rows.items()):
        js, stamp = args.out / f"row-{i:02d}.json", model_stamp(extra)
        kept = json.loads(js.read_text()) if js.is_file() else {}
        if (kept.get("label"), kept.get("model_hash")) != (label, stamp):
            cmd = [
                sys.executable,
                "-m",
                "velodiff.cli",
                "eval",
                "shapes",
                *extra,
                "--images-per-prompt",
                "2",
                "--speed-runs",
                str(args.speed_runs),
                "--threads",
                "1",
                "--json",
                str(js),
            ]
            print(" ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            d = json.loads(js.read_text())
            d["label"], d["command"], d["model_hash"] = label, "velodiff " + " ".join(cmd[3:]), stamp
            js.write_text(json.dumps(d, indent=1))
        d = json.loads(js.read_text())
        table.append((label, d["overall"], d["speed"]["median_s"], d["config"].get("evals"), d["command"]))
    lines = ["| model / plan | evals / image | ShapesEval | s / image |", "|---|---:|---:|---:|"]
    lines += [f"| {lab} | {ev} | {ov:.3f} | {s:.3f} |" for lab, ov, s, ev, _ in table]
    (args.out / "pareto.md").write_text(
        "\n".join(lines) + "\n\n" + "\n".join(f"    {c}" for *_, c in table) + "\n"
    )
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for lab, ov, s, _, _ in table:  # a legend, not labels at the points: close points' labels overlap
        ax.scatter(s, ov, marker="o" if "teacher" in lab else "*", s=60, label=lab)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.05, not 5 x 10^-2
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([0.03, 0.05, 0.1, 0.2, 0.3, 0.5])
    ax.set_xlabel("seconds per image, end to end (one CPU thread, median)")
    ax.set_ylabel("ShapesEval overall (v1 x 2)")
    ax.set_title("default model: students vs training-free plans")
    fig.tight_layout()
    fig.savefig(args.out / "pareto.png", dpi=120)


if __name__ == "__main__":
    main()
