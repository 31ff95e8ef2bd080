"""Concept erasure of a shape's singular and plural words (UCE, one closed form for both) against the
singular alone, on the shipped default model: how often prompts naming the shape in the plural ("two red
triangles", "three red triangles") and in the singular still show it, and ShapesEval accuracy of the other
shapes' single-object and counting prompts ("a red circle", "two red circles"). Seeds 2-5 (the report
seeds of erase_bench.py), 20 steps dpmpp_2m, guidance 2.5; the anchor targets of erase.json
(circle / circles). Writes bench/edit/erase_plural.json.

    python bench/edit/erase_plural_bench.py --concept triangle --target circle
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.data.shapes import COLORS, PLURALS, SHAPES
from velodiff.edit.erase import apply_erasure, erase_concept
from velodiff.eval.shapes_eval import detect, evaluate
from velodiff.pipelines import text2img


def gen(model, prompts, seeds):
    ps = [p for p in prompts for _ in seeds]
    return text2img(model, ps, seeds=[s for _ in prompts for s in seeds]).images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default="triangle")
    ap.add_argument("--target", default="circle")
    ap.add_argument("--seeds", default="2,3,4,5")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    shape, plural = args.concept, PLURALS[args.concept]
    others = [s for s in SHAPES if s != shape]
    named = {
        "plural": [f"{n} {c} {plural}" for c in COLORS for n in ("two", "three")],
        "singular": [f"a {c} {shape}" for c in COLORS],
    }
    kept = {
        "single": [f"a {c} {s}" for s in others for c in COLORS],
        "counting": [f"two {c} {PLURALS[s]}" for s in others for c in COLORS],
    }
    runs = {
        "unedited": None,
        f"erased {shape!r} -> {args.target!r}": dict(concept=shape, preserve=others, target=args.target),
        f"erased {shape!r},{plural!r} -> {args.target!r},{PLURALS[args.target]!r}": dict(
            concept=[shape, plural],
            preserve=[*others, *(PLURALS[s] for s in others)],
            target=[args.target, PLURALS[args.target]],
        ),
    }
    rows = []
    for label, kw in runs.items():
        model = velodiff.load("default")
        row: dict = {"model": label}
        if kw is not None:
            e = erase_concept(model, **kw)
            apply_erasure(model, e)
            row["residuals"] = {"erase": round(e.erase_residual, 4),
                                "preserve": round(e.preserve_residual, 4)}
        for k, prompts in named.items():
            imgs = gen(model, prompts, seeds)
            row[f"{k}_with_{shape}"] = float(np.mean([any(d.shape == shape for d in detect(np.asarray(i)))
                                                      for i in imgs]))
            row[f"{k}_images"] = len(imgs)
        for k, prompts in kept.items():
            res = evaluate(gen(model, prompts, seeds), prompts, keep_detections=False)
            row[f"others_{k}"] = res["by_category"][k]
            row[f"others_{k}_images"] = len(prompts) * len(seeds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(__file__).with_name("erase_plural.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
