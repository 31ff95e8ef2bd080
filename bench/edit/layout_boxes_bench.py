"""Layout guidance with explicit boxes: each ShapesEval v1 single-object prompt gets a box (the four quadrants
in turn, each 0.45 of the side), generated with and without `layout` (seed 0, 20 steps, guidance 2.5);
reported: the median IoU of the largest detected object's box with the asked box, and the share of
images whose object centre falls inside it. Writes bench/edit/layout_boxes.json.

    python bench/edit/layout_boxes_bench.py "layout:scale=0.05,iters=3" "layout:scale=0.1,iters=3,steps=0.8"
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.edit.layout import LayoutGuidance
from velodiff.eval.shapes_eval import detect, load_prompts
from velodiff.pipelines import text2img
from velodiff.plan import Plan

QUADRANTS = [(0.05, 0.05, 0.5, 0.5), (0.5, 0.05, 0.95, 0.5), (0.05, 0.5, 0.5, 0.95), (0.5, 0.5, 0.95, 0.95)]


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main() -> None:
    torch.set_num_threads(1)
    model = velodiff.load("default")
    prompts = [p.text for p in load_prompts("v1") if p.category == "single"]
    rows = []
    for plan in ["none", *sys.argv[1:]]:
        ious, inside, t0 = [], [], time.perf_counter()
        for k, text in enumerate(prompts):
            box = QUADRANTS[k % 4]
            words = " ".join(text.split()[1:])  # "a red circle" -> "red circle"
            rules = []
            if plan != "none":
                rule = Plan.parse(plan).find("layout")
                rules = [LayoutGuidance(boxes={words: box}, **rule.values)]
            img = text2img(model, text, seeds=[0], steps=20, guidance=2.5, plan=rules).images[0]
            dets = detect(np.asarray(img))
            if not dets:
                ious.append(0.0)
                inside.append(False)
                continue
            d = max(dets, key=lambda d: d.area)
            got = tuple(v / 64 for v in d.box)
            ious.append(iou(got, box))
            cx, cy = (got[0] + got[2]) / 2, (got[1] + got[3]) / 2
            inside.append(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])
        rows.append(
            {
                "plan": plan,
                "median_iou": statistics.median(ious),
                "centre_inside": float(np.mean(inside)),
                "seconds_per_image": (time.perf_counter() - t0) / len(prompts),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    Path(__file__).with_name("layout_boxes.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| plan | median IoU with the box | centre inside | s / image |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r['plan']}` | {r['median_iou']:.2f} | {r['centre_inside']:.2f} | "
            f"{r['seconds_per_image']:.2f} |"
        )


if __name__ == "__main__":
    main()
