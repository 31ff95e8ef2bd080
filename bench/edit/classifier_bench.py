"""Classifier guidance (plan rule `classifier`) on the whole ShapesEval v1 set (100 prompts x 2 images,
DPM-Solver++ 2M, 20 steps, CFG 2.5; or one ``--category``) against no guidance, per category, with the
seconds per image. Images use seeds SEED + j (prompt-major, as `velodiff eval shapes --seed SEED`):
calibrate on one seed base (1000) and report on another (0, the protocol of the model card's 0.84).
Appends to bench/edit/classifier.json.

    python bench/edit/classifier_bench.py --seed 1000 "classifier:head=count,scale=3,through=network"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import velodiff
from velodiff.commands.eval_shapes import generate_for_prompts
from velodiff.eval.shapes_eval import evaluate, load_prompts
from velodiff.pipelines import text2img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default="v1")
    ap.add_argument("--category", default=None, help="only this category's prompts (quick sweeps)")
    ap.add_argument("--sheet", type=Path, help="only draw a contact sheet: 8 counting prompts, a row a plan")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = velodiff.load("default")
    if args.sheet:
        sheet(model, args)
        return
    prompts = [p for p in load_prompts(args.prompts) if args.category in (None, p.category)]
    out = Path(__file__).with_name("classifier.json")
    rows = json.loads(out.read_text()) if out.is_file() else []
    for plan in args.plans:
        t0 = time.perf_counter()
        images, _, info = generate_for_prompts(
            model, [p.text for p in prompts], 2, seed=args.seed, batch=16, steps=20, guidance=2.5,
            plan=None if plan == "none" else plan,
        )
        seconds = time.perf_counter() - t0
        res = evaluate(images, prompts, keep_detections=False)
        rows.append({
            "plan": plan, "prompts": args.prompts, "category": args.category, "seed": args.seed,
            "overall": round(res["overall"], 4),
            "by_category": res["by_category"], "evals_per_image": info["evals"],
            "seconds_per_image": round(seconds / len(images), 4),
        })
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")


def sheet(model, args) -> None:
    from velodiff.images import image_grid

    prompts = [p.text for p in load_prompts(args.prompts) if p.category == "counting"][:8]
    rows, captions = [], []
    for plan in args.plans:
        rows += text2img(model, prompts, seeds=[args.seed] * len(prompts), steps=20, guidance=2.5,
                         plan=None if plan == "none" else plan).images
        captions += [f"{plan.split(',')[0] if plan != 'none' else 'none'}: {p}" for p in prompts]
    image_grid(rows, cols=len(prompts), scale=2, captions=captions).save(args.sheet)


if __name__ == "__main__":
    main()
