"""Token Merging for SD (Bolya & Hoffman 2023, the `tomesd` package) on the shipped model, as a peer beside
velodiff's plans: `tomesd.apply_patch` on the default UNet (it swaps the transformer blocks' classes, so
it runs only here, never inside velodiff), the same prompts, seeds, solver and grid as the plain run.

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
from velodiff.default_model import default_model_path
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
    model = velodiff.load(default_model_path())
    unet = model.components["unet"]
    prompts = [p.text for p in load_prompts("v1")]
    texts = [t for t in prompts for _ in range(2)]
    seeds = [5000 + i for i in range(len(texts))]

    def images() -> torch.Tensor:
        return torch.cat([text2img(model, texts[i:i + 25], seeds=seeds[i:i + 25], **KW).images
                          for i in range(0, len(texts), 25)])

    def timed() -> float:
        t0 = time.perf_counter()
        text2img(model, prompts[:25], seeds=5000, **KW)
        return (time.perf_counter() - t0) / 25

    rows, plain = [], images()
    times: dict[str, list[float]] = {"plain": []}
    for r in RATIOS:
        times[f"tomesd ratio={r}"] = []
    for _ in range(7):
        tomesd.remove_patch(unet)
        times["plain"].append(timed())
        for r in RATIOS:
            tomesd.apply_patch(unet, ratio=r, max_downsample=MAX_DOWNSAMPLE)
            times[f"tomesd ratio={r}"].append(timed())
            tomesd.remove_patch(unet)
    base_t = statistics.median(times["plain"])
    for name in times:
        if name == "plain":
            imgs = plain
        else:
            tomesd.apply_patch(unet, ratio=float(name.split("=")[1]), max_downsample=MAX_DOWNSAMPLE)
            imgs = images()
            tomesd.remove_patch(unet)
        score = evaluate(imgs * 2 - 1, texts, keep_detections=False)["overall"]
        rows.append({"plan": name, "shapes_eval": score,
                     "psnr_vs_plain": None if name == "plain" else float(psnr(imgs, plain).mean()),
                     "median_s_per_image": statistics.median(times[name]),
                     "speedup": base_t / statistics.median(times[name])})
    Path(__file__).with_name("tome.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| peer | ShapesEval | PSNR to plain (dB) | s / image | speed-up |\n|---|---:|---:|---:|---:|")
    for r in rows:
        ps = "-" if r["psnr_vs_plain"] is None else f"{r['psnr_vs_plain']:.1f}"
        print(f"| {r['plan']} | {r['shapes_eval']:.3f} | {ps} | {r['median_s_per_image']:.4f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
