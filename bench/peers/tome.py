"""Token Merging for SD (Bolya & Hoffman 2023): velodiff's plan rule ``tome`` beside the peer package
``tomesd`` on the shipped model's weights, the same prompts, seeds, solver and grid as the plain run.

tomesd swaps the transformer blocks' classes; diffusers' hook registry (velodiff's rules) wraps a
module's instance ``forward``, which would hide tomesd's class forward, so the peer runs on its own copy
of the model (same weights). Both use random destinations here (tomesd's default; velodiff's seeded per
run, tomesd's from its process-wide generator); with ``use_rand=false`` they are bit-identical
(tests/test_tome.py).

Quality set: v1 x 2 images, seeds 5000+ (held out, as bench/deepcache). Time: 25 prompts, 7 rounds side
by side, one thread, medians. Distance: PSNR of each image to the plain image from the same seed.

    pip install --no-deps tomesd
    python bench/peers/tome.py            # writes bench/peers/tome.json and prints the table
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import velodiff
from velodiff.eval.metrics import psnr
from velodiff.eval.shapes_eval import evaluate, load_prompts
from velodiff.pipelines import text2img

RATIOS = [0.25, 0.5]
#: tomesd's default (1) merges only in blocks at full latent resolution, where the default UNet has no
#: attention: the patch then changes nothing. 8 merges in every transformer block.
MAX_DOWNSAMPLE = 8
KW = dict(steps=20, solver="dpmpp_2m", guidance=2.5, output="tensor")


def main() -> None:
    import tomesd

    torch.set_num_threads(1)
    ours, peer = velodiff.load("default"), velodiff.load("default")
    prompts = [p.text for p in load_prompts("v1")]
    texts = [t for t in prompts for _ in range(2)]
    seeds = [5000 + i for i in range(len(texts))]

    def peer_patch(r: float | None) -> None:
        tomesd.remove_patch(peer.components["unet"])
        if r is not None:
            tomesd.apply_patch(peer.components["unet"], ratio=r, max_downsample=MAX_DOWNSAMPLE)

    runs: dict[str, tuple] = {"plain": (peer, None, None)}
    for r in RATIOS:
        runs[f"tomesd ratio={r}"] = (peer, r, None)
        runs[f"velodiff tome:ratio={r}"] = (ours, None, f"tome:ratio={r},max_downsample={MAX_DOWNSAMPLE}")

    def images(model, plan) -> torch.Tensor:
        return torch.cat([text2img(model, texts[i:i + 25], seeds=seeds[i:i + 25], plan=plan, **KW).images
                          for i in range(0, len(texts), 25)])

    def timed(model, plan) -> float:
        t0 = time.perf_counter()
        text2img(model, prompts[:25], seeds=5000, plan=plan, **KW)
        return (time.perf_counter() - t0) / 25

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(7):
        for name, (model, r, plan) in runs.items():
            peer_patch(r)
            times[name].append(timed(model, plan))
    rows, plain = [], None
    for name, (model, r, plan) in runs.items():
        peer_patch(r)
        imgs = images(model, plan)
        plain = imgs if plain is None else plain
        score = evaluate(imgs * 2 - 1, texts, keep_detections=False)["overall"]
        rows.append({"plan": name, "shapes_eval": score,
                     "psnr_vs_plain": None if name == "plain" else float(psnr(imgs, plain).mean()),
                     "median_s_per_image": statistics.median(times[name]),
                     "speedup": statistics.median(times["plain"]) / statistics.median(times[name])})
    peer_patch(None)
    Path(__file__).with_name("tome.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| run | ShapesEval | PSNR to plain (dB) | s / image | speed-up |\n|---|---:|---:|---:|---:|")
    for r in rows:
        ps = "-" if r["psnr_vs_plain"] is None else f"{r['psnr_vs_plain']:.1f}"
        print(f"| {r['plan']} | {r['shapes_eval']:.3f} | {ps} | {r['median_s_per_image']:.4f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
