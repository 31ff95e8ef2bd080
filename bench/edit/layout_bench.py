"""Layout control (plan rules `layout` and `regional`, regions from the prompt's spatial words; and
`collage[:strength=S,group_side=G]`, velodiff.edit.collage with its boxes from the prompt) on the
ShapesEval v1 position prompts, or --category's (25 prompts x the given seed bases, 20 steps, guidance
2.5), against no control; the rules leave prompts without a relation (or, the collage, a count)
unchanged. Writes the rows to --out
(default bench/edit/layout.json).

    python bench/edit/layout_bench.py "layout:scale=0.05,iters=3" "layout:scale=0.1,iters=3,steps=0.8"
    python bench/edit/layout_bench.py --seeds 0,3000,6000,7000 --out bench/edit/regional.json regional
    python bench/edit/layout_bench.py --seeds 0 --sheet docs/regional.png regional    # contact sheet only
    python bench/edit/layout_bench.py --seeds 0,3000,6000,7000 --out bench/edit/collage.json collage
    python bench/edit/layout_bench.py --category counting --seeds 1000,2000 collage collage:group_side=0.4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import velodiff
from velodiff.edit.collage import DEFAULT_STRENGTH, boxes_from_prompt, collage
from velodiff.eval.shapes_eval import evaluate, load_prompts
from velodiff.pipelines import text2img


def generate(model, texts: list[str], seed: int, plan: str) -> list:
    """Image j of prompt j with seed seed + j, under a plan or (``collage[:strength=S]``) by collage."""
    if not plan.startswith("collage"):
        return list(text2img(model, texts, seeds=seed, steps=20, guidance=2.5, plan=plan).images)
    opts = dict(kv.split("=") for kv in plan.partition(":")[2].split(",") if kv)
    strength = float(opts.get("strength", DEFAULT_STRENGTH))
    side = {"group_side": float(opts["group_side"])} if "group_side" in opts else {}
    return [collage(model, t, boxes_from_prompt(t, **side), strength=strength, seeds=[seed + j], steps=20,
                    guidance=2.5).images[0] for j, t in enumerate(texts)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="*", help="plans measured after 'none'")
    ap.add_argument("--seeds", default="0,1000", help="seed bases (image j of a base s has seed s + j)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("layout.json"))
    ap.add_argument("--sheet", type=Path, help="only a contact sheet: 8 prompts, first seed, a row a plan")
    ap.add_argument("--category", default="position", help="the ShapesEval v1 category of the prompts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = velodiff.load("default")
    prompts = [p for p in load_prompts("v1") if p.category == args.category]
    texts = [p.text for p in prompts]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.sheet:
        from velodiff.images import image_grid

        images, captions = [], []
        for plan in ["none", *args.plans]:
            images += generate(model, texts[:8], seeds[0], plan)
            captions += [f"{plan}: {t}" for t in texts[:8]]
        image_grid(images, cols=8, scale=2, captions=captions).save(args.sheet)
        return
    rows = []
    for plan in ["none", *args.plans]:
        t0 = time.perf_counter()
        per_seed = [generate(model, texts, s, plan) for s in seeds]
        seconds = time.perf_counter() - t0
        ordered = [im[j] for j in range(len(texts)) for im in per_seed]  # prompt-major
        score = evaluate(ordered, prompts, keep_detections=False)["by_category"][args.category]
        rows.append(
            {"plan": plan, "seeds": seeds, args.category: score, "seconds_per_image": seconds / len(ordered)}
        )
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"| plan | ShapesEval {args.category} | s / image |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| `{r['plan']}` | {r[args.category]:.2f} | {r['seconds_per_image']:.3f} |")


if __name__ == "__main__":
    main()
