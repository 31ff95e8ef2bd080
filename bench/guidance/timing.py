"""Wall-clock of plans side by side: the same batch (the first N v1 prompts, seeds from 0), each plan
timed in turn, round after round, so a change in machine load hits every plan alike; medians and the
ratio to the first plan. One thread, the shipped model, DPM-Solver++ 2M, 20 steps, guidance 2.5 (a
plan may set its own solver, NFE and grid). Sampling only (latents out), or with ``--end-to-end`` text
encoding, sampling and decoding. ``--models`` gives each plan its model (';'-separated as the plans;
a student samples at its own guidance, e.g. a guided student's 1 with its embedded scale).

    python bench/guidance/timing.py --plans "none;ag:threshold=0.999" --rounds 9 --prompts 25
    python bench/guidance/timing.py --plans "none;solver=unipc+nfe=10+grid=trailing" \
        --models "default;runs-guided/g1" --end-to-end --rounds 7 --prompts 25
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
    ap.add_argument("--models", help="each plan's model, ';'-separated (default: the shipped one)")
    ap.add_argument("--end-to-end", action="store_true", help="time text encoding and decoding too")
    ap.add_argument("--out", default=str(Path(__file__).with_name("timing.json")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    plans = [p.strip() for p in args.plans.split(";")]
    names = [default_model_path()] * len(plans)
    if args.models:
        names = [m.strip() for m in args.models.split(";")]
    if len(names) != len(plans):
        raise SystemExit(f"--models: {len(names)} models for {len(plans)} plans")
    models = {n: velodiff.load(n) for n in dict.fromkeys(names)}
    texts = [p.text for p in load_prompts("v1")][: args.prompts]
    output = "tensor" if args.end_to_end else "latent"
    runs = list(zip(plans, names, strict=True))

    def run(plan: str, name: str):
        m = models[name]
        return text2img(m, texts, plan=plan, steps=m.default_steps, solver=m.default_solver,
                        guidance=m.default_guidance, seeds=0, output=output)

    for plan, name in runs:  # warm-up
        run(plan, name)
    times: dict[int, list[float]] = {k: [] for k in range(len(runs))}
    evals: dict[int, float] = {}
    for _ in range(args.rounds):
        for k, (plan, name) in enumerate(runs):
            t0 = time.perf_counter()
            evals[k] = run(plan, name).evals
            times[k].append((time.perf_counter() - t0) / len(texts))
    base = statistics.median(times[0])
    rows = [
        {"plan": plan, "model": str(name), "evals": evals[k],
         "median_s_per_image": statistics.median(times[k]), "ratio": statistics.median(times[k]) / base}
        for k, (plan, name) in enumerate(runs)
    ]
    res = {"command": "python bench/guidance/timing.py " + " ".join(sys.argv[1:]), "rounds": args.rounds,
           "images": len(texts), "threads": 1, "end_to_end": args.end_to_end, "rows": rows}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print("| model | plan | evals / image | median s / image | ratio |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['plan']} | {r['evals']:g} | {r['median_s_per_image']:.4f} | "
              f"{r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
