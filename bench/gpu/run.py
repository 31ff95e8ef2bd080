"""What a GPU changes, on the shipped model: the same seeds on the CPU and on CUDA (float32, float16),
their distance (latents, pixels) and a side-by-side sheet; generation time per batch; and the GPU-only
quantization schemes (fp8, int4 weight-only) beside int8, with their single-evaluation error, the
ShapesEval change (v1 x 2 images) and the time, all in one run.

    python bench/gpu/run.py OUT_DIR      # on a machine with CUDA; writes OUT_DIR/gpu.json, sheet.png

Results on one H100 (2026-11-27): bench/gpu/README.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import velodiff
from velodiff.accel.quantize import evaluation_error
from velodiff.eval.shapes_eval import evaluate, load_prompts
from velodiff.pipelines import text2img
from velodiff.plan import parse_rule

STEPS, GUIDANCE = 20, 2.5


def timed(fn, repeat: int = 5):
    out = fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float().cpu() - b.float().cpu()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    prompts = [p.text for p in load_prompts("v1")][:8]
    seeds = list(range(8))
    kw = dict(seeds=seeds, steps=STEPS, guidance=GUIDANCE)
    cpu = velodiff.load("default")
    t = time.perf_counter()
    ref = text2img(cpu, prompts, output="tensor", **kw)
    report["cpu_seconds_8_images"] = time.perf_counter() - t
    rows = [ref.images]
    for dtype in ("float32", "float16", "bfloat16"):
        m = velodiff.load("default", device="cuda", dtype=dtype)
        res, sec = timed(lambda m=m: text2img(m, prompts, output="tensor", **kw))
        rows.append(res.images)
        report[f"cuda_{dtype}"] = {
            "seconds_8_images": sec,
            "latent_max_abs_diff_vs_cpu": float((res.latents.float().cpu() - ref.latents).abs().max()),
            "pixel_max_abs_diff_vs_cpu": float((res.images.float().cpu() - ref.images).abs().max()),
            "psnr_vs_cpu_db": psnr(res.images, ref.images),
        }
        print(dtype, report[f"cuda_{dtype}"], flush=True)
    sheet = torch.cat([torch.cat(list(r.float().cpu().clamp(0, 1)), dim=2) for r in rows], dim=1)
    arr = (sheet.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(out / "sheet.png")
    # quantization on CUDA: float32 weights, plan rules
    eval_prompts = load_prompts("v1")
    texts = [p.text for p in eval_prompts for _ in range(2)]
    eseeds = list(range(len(texts)))
    base = velodiff.load("default", device="cuda", dtype="float32")
    quant: dict = {}
    for scheme in ("none", "int8", "int8:activations=dynamic", "fp8", "fp8:activations=dynamic", "int4",
                   "int4:group_size=32"):
        try:
            plan = None if scheme == "none" else scheme
            errs = [] if plan is None else [
                evaluation_error(base, parse_rule(scheme), t=tt, seed=i, prompt=p)
                for i, p in enumerate(prompts[:4]) for tt in (0.1, 0.5, 0.9)
            ]
            res, sec = timed(lambda plan=plan: text2img(base, prompts, output="tensor", plan=plan, **kw),
                             repeat=3)
            imgs = text2img(base, texts, seeds=eseeds, steps=STEPS, guidance=GUIDANCE, plan=plan,
                            output="pil").images
            score = evaluate(imgs, eval_prompts, keep_detections=False)  # 2 images per prompt
            quant[scheme] = {"seconds_8_images": sec, "shapes_eval": score["overall"],
                             "eval_error_median": statistics.median(errs) if errs else 0.0,
                             "eval_error_max": max(errs) if errs else 0.0}
        except Exception as e:  # noqa: BLE001 - a scheme this torch / torchao cannot run is reported
            quant[scheme] = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
        print(scheme, quant[scheme], flush=True)
    report["quantization_cuda_float32"] = quant
    (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
