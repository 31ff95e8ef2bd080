"""Layout control with explicit boxes: each ShapesEval v1 single-object prompt gets a box (the four quadrants
in turn, each 0.45 of the side), generated without control, with the plan rule `layout` (guidance) and
with `collage:strength=S` (velodiff.edit.collage) at --seed (20 steps, guidance 2.5); reported: the
median IoU of the box of the largest detection of the prompt's shape and colour with the asked box (0
if none), the share of objects whose centre falls inside their box, ShapesEval's verdict, network
evaluations and seconds per image; `regional` (regional prompting with explicit regions: each object's
phrase the prompt of its box) beside them. Rows are added to bench/edit/layout_boxes.json (keyed by plan
and seed).

    python bench/edit/layout_boxes_bench.py "layout:scale=0.05,iters=3" "layout:scale=0.1,iters=3,steps=0.8"
    python bench/edit/layout_boxes_bench.py --seed 1000 collage:strength=0.3 collage:strength=0.5
    python bench/edit/layout_boxes_bench.py --two --sheet docs/collage.png collage   # contact sheet only

With --two: the 25 v1 position prompts ("a white cross to the left of a blue triangle"), each object a
quadrant box on its side of the relation (the other coordinate varying with the prompt, so a third of
the layouts are diagonal); per object, the IoU of the largest detection of its shape and colour with its
box, the median over the 50 objects. --sheet PATH writes only a contact sheet (the first 8 prompts, a
row per plan, the boxes drawn in grey).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.edit.collage import DEFAULT_STRENGTH, collage
from velodiff.edit.layout import LayoutGuidance, object_words, spatial_parts
from velodiff.eval.shapes_eval import detect, load_prompts, score_prompt
from velodiff.pipelines import text2img
from velodiff.plan import Plan

QUADRANTS = [(0.05, 0.05, 0.5, 0.5), (0.5, 0.05, 0.95, 0.5), (0.05, 0.5, 0.5, 0.95), (0.5, 0.5, 0.95, 0.95)]
# a quadrant by (column, row), 0 = left / top
QUADRANT = {(c, r): QUADRANTS[2 * r + c] for c in (0, 1) for r in (0, 1)}
SIDES = {"above": ("row", 0, 1), "below": ("row", 1, 0), "to the left of": ("col", 0, 1),
         "to the right of": ("col", 1, 0)}


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def layout(prompt, k: int) -> dict:
    """Object words -> box: the single object's quadrant k mod 4, or each side of the relation a
    quadrant on its side, the other coordinate (k mod 2, k // 2 mod 2)."""
    parts = spatial_parts(prompt)
    if not parts:
        return {object_words(prompt): QUADRANTS[k % 4]}
    rel = next(r for r in SIDES if f" {r} " in prompt)
    axis, a, b = SIDES[rel]
    other = (k % 2, k // 2 % 2)
    cells = [(side, o) if axis == "col" else (o, side) for side, o in zip((a, b), other, strict=True)]
    return {object_words(part): QUADRANT[c] for (part, _), c in zip(parts, cells, strict=True)}


def generate(model, plan: str, text: str, boxes: dict, seed: int):
    if plan.startswith("collage"):
        strength = float(plan.partition("strength=")[2] or DEFAULT_STRENGTH)
        return collage(model, text, boxes, strength=strength, seeds=[seed], steps=20, guidance=2.5)
    rules = []
    if plan.startswith("regional"):  # explicit regions: each object's phrase its own prompt in its box
        from velodiff.edit.regional import RegionalPrompting

        regions = {f"a {words}": box for words, box in boxes.items()}
        rules = [RegionalPrompting(regions=regions, **Plan.parse(plan).find("regional").values)]
    elif plan != "none":
        rules = [LayoutGuidance(boxes=boxes, **Plan.parse(plan).find("layout").values)]
    return text2img(model, text, seeds=[seed], steps=20, guidance=2.5, plan=rules)


def measure(prompt, res, boxes: dict) -> tuple[list[float], list[bool], bool]:
    """Per object: the IoU of its largest detection (its shape and colour) with its box (0 if none) and
    whether that detection's centre is inside the box; and ShapesEval's verdict on the image."""
    dets = detect(np.asarray(res.images[0]))
    ious, inside = [], []
    for obj, box in zip(prompt.spec["objects"], boxes.values(), strict=True):
        mine = [d for d in dets if (d.shape, d.color) == (obj["shape"], obj["color"])]
        if not mine:
            ious.append(0.0)
            inside.append(False)
            continue
        got = tuple(v / 64 for v in max(mine, key=lambda d: d.area).box)
        ious.append(iou(got, box))
        cx, cy = (got[0] + got[2]) / 2, (got[1] + got[3]) / 2
        inside.append(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])
    return ious, inside, bool(score_prompt(dets, prompt.spec)["correct"])


def contact_sheet(model, prompts, plans, seed: int, path: Path) -> None:
    from PIL import ImageDraw

    from velodiff.images import image_grid

    images, captions = [], []
    for plan in plans:
        for k, prompt in enumerate(prompts):
            boxes = layout(prompt.text, k)
            img = generate(model, plan, prompt.text, boxes, seed).images[0].copy()
            draw = ImageDraw.Draw(img)
            for box in boxes.values():
                draw.rectangle([round(v * 64) for v in box], outline=(110, 110, 110))
            images.append(img)
            captions.append(f"{plan}: {prompt.text}" if k == 0 else prompt.text)
    image_grid(images, cols=len(prompts), scale=2, captions=captions).save(path)
    print(f"wrote {path}")


def main() -> None:
    import argparse

    from velodiff.plan import Plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="*", help="plans to run beside 'none' (e.g. collage:strength=0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two", action="store_true", help="the position prompts, a box per object")
    ap.add_argument("--sheet", type=Path, help="write only a contact sheet here")
    a = ap.parse_args()
    seed, two, sheet, args = a.seed, a.two, a.sheet, a.plans
    for plan in args:  # a typo is refused before the 'none' baseline runs (and rewrites its row)
        if not plan.startswith("collage"):
            Plan.parse(plan)
    torch.set_num_threads(1)
    model = velodiff.load("default")
    category = "position" if two else "single"
    prompts = [p for p in load_prompts("v1") if p.category == category]
    if sheet is not None:
        return contact_sheet(model, prompts[:8], ["none", *args], seed, sheet)
    out = Path(__file__).with_name("layout_boxes.json")
    for plan in ["none", *args]:
        ious, inside, right, t0 = [], [], [], time.perf_counter()
        for k, prompt in enumerate(prompts):
            boxes = layout(prompt.text, k)
            res = generate(model, plan, prompt.text, boxes, seed)
            i, c, r = measure(prompt, res, boxes)
            ious += i
            inside += c
            right.append(r)
        row = {
            "plan": plan,
            "objects": 2 if two else 1,
            "seed": seed,
            "median_iou": statistics.median(ious),
            "centre_inside": float(np.mean(inside)),
            "right_object": float(np.mean(right)),
            "network_evals_per_image": res.evals,
            "seconds_per_image": (time.perf_counter() - t0) / len(prompts),
        }
        key = (plan, row["objects"], seed)
        rows = json.loads(out.read_text()) if out.exists() else []  # read late: runs side by side add rows
        rows = [r for r in rows if (r["plan"], r.get("objects", 1), r.get("seed", 0)) != key] + [row]
        out.write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    print("| plan | objects | seed | median IoU | centre inside | ShapesEval | evals | s / image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r['plan']}` | {r.get('objects', 1)} | {r.get('seed', 0)} | {r['median_iou']:.2f} | "
            f"{r['centre_inside']:.2f} | {r.get('right_object', float('nan')):.2f} | "
            f"{r.get('network_evals_per_image', '')} | {r['seconds_per_image']:.2f} |"
        )


if __name__ == "__main__":
    main()
