"""Prompt-to-prompt colour swap on the shipped default model, against the same seed without attention control.

For the ShapesEval v1 single-object and two-object (binding) prompts, the first colour word is swapped to
the next colour of the shapes world (red -> yellow -> ... -> white -> red, skipping a colour the prompt
already names). For each prompt and seed: the source image, its prompt-to-prompt edit (source + target in
one batch from one noise) and the target prompt generated plainly from the same seed. Reported per
category: the share of edits that ShapesEval scores correct for the target prompt (the swapped object
has the new colour, the other keeps its own), the share of sources correct, and the IoU of the
foreground masks (all detected objects) of source and edit, with and without prompt-to-prompt.

    python bench/edit/p2p_bench.py --seeds 2 --steps 20 --guidance 2.5
    python bench/edit/p2p_bench.py --first-seed 2 --seeds 2 --p2p-only --cross-steps 0.5   # p2p alone
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.edit.p2p import edit_prompt
from velodiff.eval.shapes_eval import COLORS, detect, evaluate, load_prompts
from velodiff.pipelines import text2img
from velodiff.pipelines.invert import invert


def swap_colour(text: str) -> str | None:
    words = text.split()
    named = [w for w in words if w in COLORS]
    if not named:
        return None
    first = words.index(named[0])
    k = COLORS.index(named[0])
    for step in range(1, len(COLORS)):
        new = COLORS[(k + step) % len(COLORS)]
        if new not in named:
            words[first] = new
            return " ".join(words)
    return None


def foreground(image) -> np.ndarray:
    arr = np.asarray(image)
    mask = np.zeros(arr.shape[:2], bool)
    for d in detect(arr, keep_masks=True):
        mask |= d.mask
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--p2p-only", action="store_true", help="skip the inverted and plain comparisons")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.5)
    ap.add_argument("--cross-steps", type=float, default=0.8)
    ap.add_argument("--self-steps", type=float, default=0.4)
    ap.add_argument("--blend", action="store_true",
                    help="local blend on the swapped colour words and the object's shape word")
    ap.add_argument("--threshold", type=float, default=0.3, help="the local blend's threshold")
    ap.add_argument("--limit", type=int, default=25, help="prompts per category")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("p2p.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = velodiff.load("default")
    rows = []
    t0 = time.perf_counter()
    for cat in ("single", "binding"):
        prompts = [p.text for p in load_prompts("v1") if p.category == cat][: args.limit]
        for text in prompts:
            target = swap_colour(text)
            if target is None:
                continue
            blend = {}
            if args.blend:  # the first differing word (the colour), its new version, the shape after it
                a, b = text.split(), target.split()
                i = next(i for i in range(len(a)) if a[i] != b[i])
                blend = {"blend": (a[i], b[i], a[i + 1]), "threshold": args.threshold}
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                r = edit_prompt(
                    model,
                    text,
                    target,
                    seed=seed,
                    steps=args.steps,
                    guidance=args.guidance,
                    cross_steps=args.cross_steps,
                    self_steps=args.self_steps,
                    **blend,
                )
                src, edit = r.images[0], r.images[1]
                if args.p2p_only:
                    score = evaluate([src, edit], [text, target], keep_detections=False)["per_prompt"]
                    m_src = foreground(src)
                    rows.append({"category": cat, "source": text, "target": target, "seed": seed,
                                 "source_ok": score[0]["correct"], "p2p_ok": score[1]["correct"],
                                 "p2p_iou": iou(m_src, foreground(edit))})
                    continue
                plain = text2img(model, target, seeds=[seed], steps=args.steps, guidance=args.guidance)
                base = plain.images[0]
                # the same edit from the source image inverted (fixed-point of DDIM), regenerated with DDIM
                inv = invert(
                    model,
                    src,
                    text,
                    "fixed-point",
                    solver="ddim",
                    steps=args.steps,
                    guidance=args.guidance,
                    measure=False,
                )
                ri = edit_prompt(
                    model,
                    text,
                    target,
                    latents=inv.latents,
                    solver="ddim",
                    steps=args.steps,
                    guidance=args.guidance,
                    cross_steps=args.cross_steps,
                    self_steps=args.self_steps,
                    **blend,
                )
                inv_edit = ri.images[1]
                score = evaluate(
                    [src, edit, base, inv_edit], [text, target, target, target], keep_detections=False
                )["per_prompt"]
                m_src = foreground(src)
                rows.append(
                    {
                        "category": cat,
                        "source": text,
                        "target": target,
                        "seed": seed,
                        "source_ok": score[0]["correct"],
                        "p2p_ok": score[1]["correct"],
                        "plain_ok": score[2]["correct"],
                        "p2p_iou": iou(m_src, foreground(edit)),
                        "plain_iou": iou(m_src, foreground(base)),
                        "inverted_ok": score[3]["correct"],
                        "inverted_iou": iou(m_src, foreground(inv_edit)),
                    }
                )
    seconds = time.perf_counter() - t0
    summary = {}
    for cat in ("single", "binding", "all"):
        rs = [r for r in rows if cat in ("all", r["category"])]
        if args.p2p_only:
            summary[cat] = {
                "pairs": len(rs),
                "source_correct": float(np.mean([r["source_ok"] for r in rs])),
                "p2p_new_colour": float(np.mean([r["p2p_ok"] for r in rs])),
                "p2p_iou_median": float(np.median([r["p2p_iou"] for r in rs])),
                "p2p_iou>=0.8": float(np.mean([r["p2p_iou"] >= 0.8 for r in rs])),
            }
            continue
        summary[cat] = {
            "pairs": len(rs),
            "source_correct": float(np.mean([r["source_ok"] for r in rs])),
            "p2p_new_colour": float(np.mean([r["p2p_ok"] for r in rs])),
            "plain_new_colour": float(np.mean([r["plain_ok"] for r in rs])),
            "p2p_iou_median": float(np.median([r["p2p_iou"] for r in rs])),
            "plain_iou_median": float(np.median([r["plain_iou"] for r in rs])),
            "p2p_iou>=0.8": float(np.mean([r["p2p_iou"] >= 0.8 for r in rs])),
            "plain_iou>=0.8": float(np.mean([r["plain_iou"] >= 0.8 for r in rs])),
            "inverted_new_colour": float(np.mean([r["inverted_ok"] for r in rs])),
            "inverted_iou_median": float(np.median([r["inverted_iou"] for r in rs])),
            "inverted_iou>=0.8": float(np.mean([r["inverted_iou"] >= 0.8 for r in rs])),
        }
    out = {
        "settings": vars(args) | {"out": str(args.out)},
        "seconds": round(seconds, 1),
        "summary": summary,
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.p2p_only:
        print(json.dumps(summary))
        return
    print(
        "| prompts | pairs | source correct | new colour: p2p / p2p inverted / plain | mask IoU median: "
        "p2p / p2p inverted / plain | IoU >= 0.8: p2p / p2p inverted / plain |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for cat, s in summary.items():
        print(
            f"| {cat} | {s['pairs']} | {s['source_correct']:.2f} | {s['p2p_new_colour']:.2f} / "
            f"{s['inverted_new_colour']:.2f} / {s['plain_new_colour']:.2f} | {s['p2p_iou_median']:.2f} / "
            f"{s['inverted_iou_median']:.2f} / {s['plain_iou_median']:.2f} | {s['p2p_iou>=0.8']:.2f} / "
            f"{s['inverted_iou>=0.8']:.2f} / {s['plain_iou>=0.8']:.2f} |"
        )


if __name__ == "__main__":
    main()
