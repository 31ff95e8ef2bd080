"""Inversion round trip on the shipped default model: generate N images (the first N ShapesEval v1 prompts,
seed 0), invert each under its prompt with every method, regenerate, and report the latent and image
errors and the network calls. Writes bench/edit/invert.json and prints a markdown table.

    python bench/edit/invert_bench.py --n 20 --steps 20 --guidance 2.5
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import velodiff
from velodiff.eval.shapes_eval import load_prompts
from velodiff.pipelines import text2img
from velodiff.pipelines.invert import invert

CONFIGS = [
    ("ddim", {}),
    ("edict", {}),
    ("fixed-point", {"solver": "ddim"}),
    ("fixed-point", {"solver": "dpmpp_2m"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("invert.json"))
    ap.add_argument("--only", nargs="+", action="extend", help="METHOD:SOLVER rows to run (default: all)")
    ap.add_argument("--iters", type=int, default=8, help="fixed-point iterations per step")
    args = ap.parse_args()
    rows_known = {f"{m}:{kw.get('solver', 'ddim')}" for m, kw in CONFIGS}
    if args.only and not set(args.only) <= rows_known:
        ap.error(f"--only {sorted(set(args.only) - rows_known)}: rows are {', '.join(sorted(rows_known))}")
    torch.set_num_threads(args.threads)
    model = velodiff.load("default")
    prompts = [p.text for p in load_prompts("v1")[: args.n]]
    rows = []
    for g in args.guidance:
        gen = text2img(model, prompts, seeds=0, steps=args.steps, guidance=g, output="tensor")
        for method, kw in CONFIGS:
            if args.only and f"{method}:{kw.get('solver', 'ddim')}" not in args.only:
                continue
            t0 = time.perf_counter()
            if method == "fixed-point":
                kw = {**kw, "iters": args.iters}
            inv = invert(model, gen.images, prompts, method, steps=args.steps, guidance=g, **kw)
            m = dict(inv.metrics)
            m["seconds"] = round(time.perf_counter() - t0, 2)
            m["images"] = len(prompts)
            rows.append(m)
            print(json.dumps(m), flush=True)
    clean = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in m.items()} for m in rows]
    args.out.write_text(json.dumps(clean, indent=2) + "\n")  # psnr null: identical images
    print(
        "\n| guidance | method | solver | latent max error | latent rms error | PSNR (dB) | NFE to invert |"
    )
    print("|---:|---|---|---:|---:|---:|---:|")
    for m in rows:
        psnr = "inf (identical)" if math.isinf(m["psnr"]) else f"{m['psnr']:.1f}"
        print(
            f"| {m['guidance']:g} | {m['method']} | {m['solver']} | {m['latent_max_error']:.3g} | "
            f"{m['latent_rms_error']:.3g} | {psnr} | {m['invert_nfe']} |"
        )


if __name__ == "__main__":
    main()
