"""Does the step plan cost time per step? text2img on the shipped model (20 steps, CFG 2.5, one image,
one thread) with the code before the seam and with the current code, in fresh processes that alternate
run by run (the same machine load for both), several timed generations each; medians and the ratio.

    python bench/plan-overhead/run.py --before a046c21 --rounds 7 --per-round 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent.parent

CHILD = r"""
import sys, time, json, torch
torch.set_num_threads(1)
import velodiff
from velodiff.default_model import default_model_path
from velodiff.pipelines import text2img
m = velodiff.load(default_model_path())
kw = dict(steps=20, solver="dpmpp_2m", guidance=2.5, seeds=0, output="latent")
text2img(m, "a red circle above a blue square", **kw)  # warm-up
times = []
for _ in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    r = text2img(m, "a red circle above a blue square", **kw)
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "nfe": r.nfe, "sum": float(r.latents.double().sum())}))
"""


def source(rev: str, tmp: Path) -> Path:
    out = tmp / rev
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(TOP), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out / "src"


def run(src: Path, n: int) -> dict:
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="a046c21", help="git revision before the seam")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        variants = {"before": source(args.before, Path(d)), "after": TOP / "src"}
        times: dict[str, list[float]] = {k: [] for k in variants}
        sums: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, src in variants.items():
                r = run(src, args.per_round)
                times[name] += r["times"]
                sums[name] = r["sum"]
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "command": "python bench/plan-overhead/run.py " + " ".join(sys.argv[1:]),
        "before": args.before,
        "runs_each": len(times["after"]),
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "ratio_after_over_before": med["after"] / med["before"],
        "same_latents": sums["before"] == sums["after"],
    }
    (HERE / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [
        "| code | median s / image (20 steps, CFG) | min s | runs |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {med[k]:.4f} | {res['min_s'][k]:.4f} | {len(times[k])} |" for k in variants),
        "",
        f"ratio after / before: {res['ratio_after_over_before']:.3f}; identical latents: {res['same_latents']}",
        f"command: `{res['command']}`",
    ]
    (HERE / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
