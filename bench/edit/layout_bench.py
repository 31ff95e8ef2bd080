"""Layout guidance (plan rule `layout`, regions from the prompt's spatial words) on the ShapesEval v1 position
prompts (25 prompts x 2 seeds, 20 steps, guidance 2.5) against no guidance; the other categories have no
spatial relation, so the rule leaves them unchanged. Writes bench/edit/layout.json.

    python bench/edit/layout_bench.py "layout:scale=0.05,iters=3" "layout:scale=0.1,iters=3,steps=0.8"
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import velodiff
from velodiff.eval.shapes_eval import evaluate, load_prompts
from velodiff.pipelines import text2img


def main() -> None:
    torch.set_num_threads(1)
    model = velodiff.load("default")
    prompts = [p for p in load_prompts("v1") if p.category == "position"]
    texts = [p.text for p in prompts]
    rows = []
    for plan in ["none", *sys.argv[1:]]:
        t0 = time.perf_counter()
        per_seed = [
            list(
                text2img(
                    model,
                    texts,
                    seeds=s * 1000,
                    steps=20,
                    guidance=2.5,
                    plan=None if plan == "none" else plan,
                ).images
            )
            for s in (0, 1)
        ]
        seconds = time.perf_counter() - t0
        ordered = [per_seed[k][j] for j in range(len(texts)) for k in range(2)]  # prompt-major
        score = evaluate(ordered, prompts, keep_detections=False)["by_category"]["position"]
        rows.append({"plan": plan, "position": score, "seconds_per_image": seconds / (2 * len(texts))})
        print(json.dumps(rows[-1]), flush=True)
    Path(__file__).with_name("layout.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| plan | ShapesEval position | s / image |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| `{r['plan']}` | {r['position']:.2f} | {r['seconds_per_image']:.3f} |")


if __name__ == "__main__":
    main()
