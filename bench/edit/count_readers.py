"""What the count classifiers see of ShapesEval's counting failures: the v1 counting prompts, unguided
(DPM-Solver++ 2M, 20 steps, CFG 2.5), seeds BASE + j; for each image whether ShapesEval counts it right,
whether the clean-image pair counter (``velodiff.guidance.pair_counter``) reads every named pair's count
right, and whether the noise-aware pair counter (``velodiff.guidance.noisy_counter``, on the final latent
noised to t = 0.02) does, and what ShapesEval detected in the images it counts wrong. Classifier
steering toward the count can only move images the classifier reads wrong. Writes
bench/edit/count_readers.json.

    python bench/edit/count_readers.py --seeds 4000,5000,6000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.eval.shapes_eval import evaluate, load_prompts
from velodiff.guidance.classifier import prompt_target
from velodiff.guidance.noisy_counter import load_noisy_counter
from velodiff.guidance.pair_counter import load_counter
from velodiff.pipelines import text2img


def named_right(logits: torch.Tensor, targets: list[torch.Tensor]) -> list[bool]:
    read = logits.argmax(-1)
    return [bool((read[i][t > 0] == t[t > 0]).all()) for i, t in enumerate(targets)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="4000,5000,6000")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = velodiff.load("default")
    clean, noisy = load_counter(), load_noisy_counter(model)
    prompts = [p for p in load_prompts("v1") if p.category == "counting"]
    targets = [torch.tensor(prompt_target(p.text, "pair_counts")) for p in prompts]
    rows: dict[str, list[bool]] = {"shapes_eval": [], "clean_counter": [], "noisy_counter": []}
    failures: list[dict] = []
    t = torch.tensor(0.02)
    for base in (int(s) for s in args.seeds.split(",")):
        seeds = [base + j for j in range(len(prompts))]
        r = text2img(model, [p.text for p in prompts], seeds=seeds, steps=20, guidance=2.5)
        records = evaluate(list(r.images), prompts)["per_prompt"]
        rows["shapes_eval"] += [bool(rec["correct"]) for rec in records]
        failures += [{"prompt": rec["text"], "seed": seeds[rec["prompt_index"]], "found": rec["found"],
                      "detected": [f"{d['color']} {d['shape']} ({d['area']} px)" for d in rec["detections"]]}
                     for rec in records if not rec["correct"]]
        images = torch.stack([torch.from_numpy(np.asarray(i).copy()).permute(2, 0, 1) for i in r.images])
        g = torch.Generator().manual_seed(base)
        z = model.schedule.alpha(t).float() * r.latents + model.schedule.sigma(t).float() * torch.randn(
            r.latents.shape, generator=g)
        with torch.no_grad():
            rows["clean_counter"] += named_right(clean.logits(images)["pair_counts"], targets)
            read = noisy.logits(z, model.schedule.log_snr(t))["pair_counts"]
            rows["noisy_counter"] += named_right(read, targets)
    ok = np.array(rows["shapes_eval"])
    out = {"seeds": args.seeds, "images": len(ok), "shapes_eval_right": float(ok.mean())}
    for k in ("clean_counter", "noisy_counter"):
        a = np.array(rows[k])
        out[k] = {"reads_right": float(a.mean()), "reads_right_where_shapes_eval_fails": float(a[~ok].mean()),
                  "shapes_eval_failures": int((~ok).sum())}
    out["what_shapes_eval_detected_in_its_failures"] = failures
    print(json.dumps(out, indent=2))
    Path(__file__).with_name("count_readers.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
