"""Layered brushes' edit latency on the shipped default model: a layer re-render (only its last strength
share of the steps, from the cached trajectory below) against a full generation, median of several runs,
measured side by side in one process.

    python bench/edit/brush_bench.py --steps 20 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import velodiff
from velodiff.edit.brushes import Canvas
from velodiff.pipelines import text2img

PROMPT = "a red circle above a blue square"
LAYER = "a blue square above a green triangle"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("brush.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = velodiff.load("default")
    mask = torch.zeros(64, 64)
    mask[32:] = 1
    kw = dict(steps=args.steps, guidance=args.guidance)
    text2img(model, PROMPT, seeds=[0], **kw)  # warm-up
    times: dict[str, list[float]] = {"full generation": []}
    nfe: dict[str, int] = {"full generation": args.steps}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        text2img(model, PROMPT, seeds=[0], **kw)
        times["full generation"].append(time.perf_counter() - t0)
        for strength in (0.3, 0.6, 0.9):
            c = Canvas(model, PROMPT, seed=0, **kw)
            c.render()
            c.add(mask, LAYER, seed=1, strength=strength)
            t0 = time.perf_counter()
            c.render()
            key = f"layer, strength {strength:g}"
            times.setdefault(key, []).append(time.perf_counter() - t0)
            nfe[key] = c.last_nfe
    full = statistics.median(times["full generation"])
    rows = {
        k: {"median_s": statistics.median(v), "nfe": nfe[k], "vs_full": statistics.median(v) / full}
        for k, v in times.items()
    }
    args.out.write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n"
    )
    print("| run | NFE | median s | vs full generation |")
    print("|---|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['nfe']} | {r['median_s']:.3f} | {r['vs_full']:.2f} |")


if __name__ == "__main__":
    main()
