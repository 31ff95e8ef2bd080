"""Concept erasure (UCE, closed form) of one shape on the shipped default model, against the unedited model
and the negative-prompt route.

Calibration (seeds 0-1): the target word among "" and the other shapes, for the erased shape; the first target
whose erased prompts yield the shape least often while the other shapes' single-object accuracy stays >= 0.95
is kept. Report (seeds 2-5, unseen by the calibration): the share of images of prompts naming the shape
("a {colour} {shape}" and "a small {colour} {shape}", all 7 colours) in which ShapesEval's detector finds it,
and ShapesEval single-object accuracy on "a {colour} {other shape}" for the other three shapes, for: the
unedited model, the unedited model with the negative prompt "{shape}", the erased model saved as a folder
and loaded back, and the erasure with target "" (the word left out).

    python bench/edit/erase_bench.py --concept triangle
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.data.shapes import COLORS, SHAPES
from velodiff.edit.erase import apply_erasure, erase_concept, save_erased
from velodiff.eval.shapes_eval import detect, evaluate
from velodiff.pipelines import text2img


def gen(model, prompts, seeds, **kw):
    ps = [p for p in prompts for _ in seeds]
    return text2img(model, ps, seeds=[s for _ in prompts for s in seeds], **kw).images


def measure(model, concept, seeds, negation=None, **kw) -> dict:
    """``negation``: a weight w: every prompt gets the part "AND a {concept} :w" (plan rule compose)."""
    tail = "" if negation is None else f" AND a {concept} :{negation}"
    if negation is not None:
        kw["plan"] = "compose"
    named = [f"a {c} {concept}" for c in COLORS] + [f"a small {c} {concept}" for c in COLORS]
    imgs = gen(model, [p + tail for p in named], seeds, **kw)
    rate = float(np.mean([any(d.shape == concept for d in detect(np.asarray(im))) for im in imgs]))
    others = [f"a {c} {s}" for s in SHAPES if s != concept for c in COLORS]
    ev = evaluate(gen(model, [p + tail for p in others], seeds, **kw), others, keep_detections=False)
    return {
        "named_images": len(imgs),
        "concept_rate": rate,
        "other_images": len(others) * len(seeds),
        "other_single": ev["by_category"]["single"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default="triangle")
    ap.add_argument("--calib-seeds", default="0,1")
    ap.add_argument("--seeds", default="2,3,4,5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--negation", type=float, nargs="*", help="only measure the compose negation route")
    ap.add_argument("--sld", nargs="*", choices=sorted(SLD_PRESETS),
                    help="only measure Safe Latent Diffusion (plan rule sld) at diffusers' presets")
    ap.add_argument("--sheet", type=Path, help="only draw a contact sheet")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("erase.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sheet:
        sheet(args)
        return
    if args.sld:
        sld(args)
        return
    if args.negation:
        negation(args)
        return
    calib = [int(s) for s in args.calib_seeds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    preserve = [s for s in SHAPES if s != args.concept]
    model = velodiff.load("default")
    t0 = time.perf_counter()
    calibration = {}
    for target in ["", *preserve]:
        fresh = velodiff.load("default")
        apply_erasure(fresh, erase_concept(fresh, args.concept, preserve, target))
        calibration[target] = measure(fresh, args.concept, calib)
        print("calibration", repr(target), calibration[target], flush=True)
    ok = [t for t in calibration if calibration[t]["other_single"] >= 0.95] or list(calibration)
    chosen = min(ok, key=lambda t: calibration[t]["concept_rate"])
    report = {"unedited": measure(model, args.concept, seeds)}
    report["negative prompt"] = measure(model, args.concept, seeds, negative=args.concept)
    erased = erase_concept(model, args.concept, preserve, chosen)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_erased(model, erased, Path(tmp) / "erased")
        report[f"erased, target {chosen!r} (folder)"] = measure(
            velodiff.load(str(folder)), args.concept, seeds
        )
    if chosen != "":
        fresh = velodiff.load("default")
        apply_erasure(fresh, erase_concept(fresh, args.concept, preserve, ""))
        report["erased, target ''"] = measure(fresh, args.concept, seeds)
    out = {
        "settings": vars(args) | {"out": str(args.out), "preserve": preserve, "chosen_target": chosen},
        "seconds": round(time.perf_counter() - t0, 1),
        "calibration": calibration,
        "report": report,
        "residuals": {"erase": erased.erase_residual, "preserve": erased.preserve_residual},
        "edit_settings": erased.settings,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"| model | images naming {args.concept} | with a {args.concept} | other shapes' single accuracy |")
    print("|---|---:|---:|---:|")
    for k, r in report.items():
        print(
            f"| {k} | {r['named_images']} | {r['concept_rate']:.3f} | {r['other_single']:.3f} "
            f"({r['other_images']} images) |"
        )


def sheet(args) -> None:
    """Prompts "a {colour} {concept}" at the first report seed: unedited, erased to "circle", to ""."""
    from velodiff.images import image_grid

    preserve = [s for s in SHAPES if s != args.concept]
    named = [f"a {c} {args.concept}" for c in COLORS]
    seed = [int(args.seeds.split(",")[0])]
    rows, captions = [], []
    for target in (None, preserve[0], ""):
        model = velodiff.load("default")
        if target is not None:
            apply_erasure(model, erase_concept(model, args.concept, preserve, target))
        rows += gen(model, named, seed)
        tag = "unedited" if target is None else f"-> {target or 'left out'}"
        captions += [f"{tag}: {c}" for c in COLORS]
    image_grid(rows, cols=len(COLORS), scale=2, captions=captions).save(args.sheet)


def negation(args) -> None:
    """Sampling-time steering instead of an edit: the prompt plus a negated part naming the concept
    (composable diffusion's negation, Liu et al. 2022, plan rule ``compose``), unedited model."""
    model = velodiff.load("default")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    report = {f"negation {w:g}": measure(model, args.concept, seeds, negation=w) for w in args.negation}
    write_report(args, report, t0)


def write_report(args, report: dict, t0: float) -> None:
    """A sampling-time route's report: the JSON file and a markdown row per setting."""
    out = {"settings": vars(args) | {"out": str(args.out)}, "seconds": round(time.perf_counter() - t0, 1),
           "report": report}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for k, r in report.items():
        label = f"{k} (`{r['plan']}`)" if "plan" in r else k
        print(f"| {label} | {r['named_images']} | {r['concept_rate']:.3f} | {r['other_single']:.3f} "
              f"({r['other_images']} images) |")


#: diffusers' SafetyConfig presets (Schramowski et al. 2023), for its 50 steps; the warm-up is scaled to
#: this bench's 20 steps (the same share of the run)
SLD_PRESETS = {
    "medium": dict(sld_guidance_scale=1000, sld_warmup_steps=10, sld_threshold=0.01, sld_momentum_scale=0.3,
                   sld_mom_beta=0.4),
    "strong": dict(sld_guidance_scale=2000, sld_warmup_steps=7, sld_threshold=0.025, sld_momentum_scale=0.5,
                   sld_mom_beta=0.7),
    "max": dict(sld_guidance_scale=5000, sld_warmup_steps=0, sld_threshold=1.0, sld_momentum_scale=0.5,
                sld_mom_beta=0.7),
}


def sld(args, steps: int = 20) -> None:
    """Sampling-time steering with Safe Latent Diffusion (plan rule ``sld``, concept = the shape's word)
    at diffusers' presets, unedited model; the other shapes' prompts are steered too (a user who always
    steers away from the concept)."""
    model = velodiff.load("default")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    report = {}
    for name in args.sld:
        preset = SLD_PRESETS[name]
        cfg = dict(preset, sld_warmup_steps=round(preset["sld_warmup_steps"] * steps / 50))
        plan = f"sld:concept={args.concept}," + ",".join(f"{k}={v:g}" for k, v in cfg.items())
        rates = measure(model, args.concept, seeds, steps=steps, guidance=2.5, plan=plan)
        report[f"sld {name}"] = {"plan": plan, **rates}
    write_report(args, report, t0)


if __name__ == "__main__":
    main()
