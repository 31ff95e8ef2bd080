"""Wall-clock of plans side by side: the same batch (the first N v1 prompts, seeds from 0), each plan
timed in turn, round after round, so a change in machine load hits every plan alike; medians and the
ratio to the first plan. One thread, the shipped model, DPM-Solver++ 2M, 20 steps, guidance 2.5.

    python bench/guidance/timing.py --plans "none;ag:threshold=0.999" --rounds 9 --prompts 25
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import velodiff
from velodiff.default_model import default_model_path
from velodiff.eval.shapes_eval import load_prompts
from velodiff.pipelines import text2img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", default="none;ag:threshold=0.999")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--out", default=str(Path(__file__).with_name("timing.json")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = velodiff.load(default_model_path())
    texts = [p.text for p in load_prompts("v1")][: args.prompts]
    plans = [p.strip() for p in args.plans.split(";")]
    kw = dict(steps=20, solver="dpmpp_2m", guidance=2.5, seeds=0, output="latent")
    text2img(model, texts[:2], **kw)  # warm-up
    times: dict[str, list[float]] = {p: [] for p in plans}
    evals: dict[str, float] = {}
    for _ in range(args.rounds):
        for p in plans:
            t0 = time.perf_counter()
            r = text2img(model, texts, plan=p, **kw)
            times[p].append((time.perf_counter() - t0) / len(texts))
            evals[p] = r.evals
    base = statistics.median(times[plans[0]])
    rows = [{"plan": p, "evals": evals[p], "median_s_per_image": statistics.median(t),
             "ratio": statistics.median(t) / base} for p, t in times.items()]
    res = {"command": "python bench/guidance/timing.py " + " ".join(sys.argv[1:]), "rounds": args.rounds,
           "images": len(texts), "threads": 1, "rows": rows}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print("| plan | evals / image | median s / image | ratio |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['plan']} | {r['evals']:g} | {r['median_s_per_image']:.4f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
