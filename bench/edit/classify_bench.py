"""The shipped default model as a zero-shot classifier (Li et al. 2023) of generator-rendered single-object
scenes: ShapesWorld renders each of the 28 colour-shape classes ("a {colour} {shape}", the held-out purple
triangle included) ``--per-class`` times (render seeds 0..per_class-1; the weighting and time range were
chosen on 14 other renders, seeds 1000+), and ``velodiff.edit.classify.classify`` picks among the 28
prompts with its default adaptive pruning. Reports accuracy, network evaluations and seconds per image.

    python bench/edit/classify_bench.py --per-class 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import velodiff
from velodiff.data.shapes import COLORS, SHAPES, ShapesWorld
from velodiff.edit.classify import ROUNDS, classify


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--rounds", default=",".join(f"{n}:{k}" for n, k in ROUNDS))
    ap.add_argument("--weighting", default="eps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("classify.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = [tuple(int(v) for v in r.split(":")) for r in args.rounds.split(",")]
    model = velodiff.load("default")
    labels = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    world = ShapesWorld(seed=0)
    rows = []
    t0 = time.perf_counter()
    for seed in range(args.per_class):
        for y, text in enumerate(labels):
            image = Image.fromarray(world.render(text, seed=seed).image)
            r = classify(model, image, labels, rounds=rounds, weighting=args.weighting, seed=seed)
            rows.append(
                {
                    "true": text,
                    "seed": seed,
                    "predicted": r.label,
                    "correct": r.index == y,
                    "evaluations": r.evaluations,
                    "seconds": r.seconds,
                    "true_survived": text in r.rounds[-1],
                }
            )
            print(len(rows), text, "->", r.label, flush=True)
    summary = {
        "images": len(rows),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "shape_accuracy": float(np.mean([r["true"].split()[-1] == r["predicted"].split()[-1] for r in rows])),
        "colour_accuracy": float(np.mean([r["true"].split()[1] == r["predicted"].split()[1] for r in rows])),
        "true_label_in_last_round": float(np.mean([r["true_survived"] for r in rows])),
        "evaluations_per_image": float(np.mean([r["evaluations"] for r in rows])),
        "evaluations_without_pruning": len(labels) * rounds[-1][0],
        "seconds_per_image_median": float(np.median([r["seconds"] for r in rows])),
    }
    out = {
        "settings": vars(args) | {"out": str(args.out), "rounds": rounds},
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summary,
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
