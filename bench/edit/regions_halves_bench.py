"""Regional prompting with explicit regions that split the image: the 25 ShapesEval v1 binding prompts
"a X and a Y", the first object's phrase given the left half and the second's the right
(``RegionalPrompting(regions=...)``, the rule's defaults), against no control; 20 steps, guidance 2.5,
image j of the prompts from seed S + j. Reported: the share of images with each object (its shape and
colour) centred in its half, the share with exactly two objects detected, and ShapesEval's verdict
(both objects right, in any place). Writes bench/edit/regions_halves.json.

    python bench/edit/regions_halves_bench.py --seeds 0,3000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.edit.regional import RegionalPrompting
from velodiff.eval.shapes_eval import detect, load_prompts, score_prompt
from velodiff.pipelines import text2img

HALVES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))


def measure(img, prompt) -> tuple[bool, bool, bool]:
    dets = detect(np.asarray(img))
    placed = []
    for obj, box in zip(prompt.spec["objects"], HALVES, strict=True):
        mine = [d for d in dets if (d.shape, d.color) == (obj["shape"], obj["color"])]
        if not mine:
            placed.append(False)
            continue
        b = max(mine, key=lambda d: d.area).box
        placed.append(box[0] <= (b[0] + b[2]) / 128 < box[2])
    return all(placed), len(dets) == 2, bool(score_prompt(dets, prompt.spec)["correct"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="seed bases, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = velodiff.load("default")
    prompts = [p for p in load_prompts("v1") if p.category == "binding"]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for plan in ("none", "regional"):
            got = []
            for j, p in enumerate(prompts):
                a, b = (s.strip() for s in p.text.split(" and "))
                regions = dict(zip((a, b), HALVES, strict=True))
                rules = [] if plan == "none" else [RegionalPrompting(regions=regions)]
                img = text2img(model, p.text, seeds=[seed + j], steps=20, guidance=2.5, plan=rules).images[0]
                got.append(measure(img, p))
            row = {"plan": plan, "seed": seed, "images": len(got),
                   **{k: float(np.mean([g[i] for g in got])) for i, k in
                      enumerate(("both_in_their_halves", "exactly_two_objects", "shapes_eval"))}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(__file__).with_name("regions_halves.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
