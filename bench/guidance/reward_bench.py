"""Reward steering (plan rule `reward`, FlowChef-style) in the direction of its paper's claim: a
differentiable reward of the decoded image rises with the scale while the image stays what the prompt
asks. The reward here is the share of the image the objects cover (foreground: pixels farther than 0.25
from the border's median colour, a soft step), so steering should draw larger objects; measured on the
25 ShapesEval v1 single-object prompts x 2 seeds: the reward, the detected object's area (pixels at
64x64), ShapesEval single accuracy, and seconds per image, the rows of one run one after another.

    python bench/guidance/reward_bench.py --seed 0        # writes bench/guidance/reward.json
    python bench/guidance/reward_bench.py --sheet docs/reward.png    # sheet only: 8 prompts, a row a scale
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.eval.shapes_eval import detect, evaluate, load_prompts
from velodiff.guidance.reward import RewardSteering
from velodiff.pipelines import text2img


def coverage(images: torch.Tensor) -> torch.Tensor:
    """(B,) soft share of pixels farther than 0.25 (RGB distance) from the border's median colour."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    background = border.median(dim=-1).values.detach()[..., None, None]  # (B, 3, 1, 1)
    distance = (images - background).pow(2).sum(1).sqrt()
    return torch.sigmoid((distance - 0.25) / 0.05).mean((1, 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0, help="image j has seed seed + j")
    ap.add_argument("--scales", default="0,0.05,0.1,0.2")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("reward.json"))
    ap.add_argument("--sheet", type=Path, help="only a contact sheet: the first 8 prompts, a row a scale")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = velodiff.load("default")
    prompts = [p for p in load_prompts("v1") if p.category == "single"]
    texts = [p.text for p in prompts for _ in range(2)]
    seeds = [args.seed + j for j in range(len(texts))]
    scales = [float(s) for s in args.scales.split(",")]
    if args.sheet:
        from velodiff.images import image_grid

        images, captions = [], []
        for scale in scales:
            plan = [RewardSteering(reward=coverage, scale=scale)] if scale else None
            eight = [p.text for p in prompts[:8]]
            images += text2img(model, eight, seeds=args.seed, steps=20, guidance=2.5, plan=plan).images
            captions += [f"scale {scale:g}: {t}" for t in eight]
        image_grid(images, cols=8, scale=2, captions=captions).save(args.sheet)
        return
    rows = []
    for scale in scales:
        plan = [RewardSteering(reward=coverage, scale=scale)] if scale else None
        t0 = time.perf_counter()
        res = text2img(model, texts, seeds=seeds, steps=20, guidance=2.5, plan=plan, output="tensor")
        seconds = time.perf_counter() - t0
        images = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in res.images]
        areas = [max((d.area for d in detect(im)), default=0) for im in images]
        single = evaluate(images, prompts, keep_detections=False)["by_category"]["single"]
        rows.append({"scale": scale, "seed": args.seed, "reward": float(coverage(res.images).mean()),
                     "object_area_px": float(np.mean(areas)), "single": single,
                     "evals": res.evals, "seconds_per_image": seconds / len(texts)})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| scale | reward (foreground share) | largest object (px) | single | evals | s / image |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scale']:g} | {r['reward']:.3f} | {r['object_area_px']:.0f} | {r['single']:.2f} | "
              f"{r['evals']:g} | {r['seconds_per_image']:.3f} |")


if __name__ == "__main__":
    main()
