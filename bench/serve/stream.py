"""Streaming img2img (velodiff.serve.stream) against the plain img2img pipeline on the same frames, in one
run: frames per second and per-frame latency.

The video: --frames 64x64 frames of a red circle moving over a blue square, the second half still (the
similarity filter's case). Every variant runs the same frames through the shipped default model with
the same prompt, a 10-step grid at strength 0.5 (k = 5 denoising times, DDIM), guidance 1.5:

* plain: ``velodiff.pipelines.img2img`` per frame (5 sequential steps, CFG: batch 2 per call);
* stream full: stream batch with plain CFG (one call per frame, batch 2k; the same images as plain);
* stream self: stream batch with residual CFG, self-negative (one call per frame, batch k);
* stream self + SSF: as above with the stochastic similarity filter at threshold 0.98.

Rounds alternate the variants (--rounds); medians over rounds are reported. Latency is per input frame,
wall time of the call (encode, sample, decode); the stream's output lags k - 1 = 4 frames behind.

    python bench/serve/stream.py --device cpu --out bench/serve/stream-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

PROMPT = "a red circle above a blue square"


def video(n: int) -> list[torch.Tensor]:
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        x = 8 + min(i, n // 2) * 40 // max(1, n // 2)  # moves during the first half, then still
        im = Image.new("RGB", (64, 64), (12, 12, 16))
        d = ImageDraw.Draw(im)
        d.rectangle((22, 36, 42, 56), fill=(40, 90, 220))
        d.ellipse((x, 6, x + 18, 24), fill=(220, 40, 40))
        out.append(torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None].float() / 255)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_plain(model, frames, device) -> list[float]:
    from velodiff.pipelines import img2img

    lat = []
    for f in frames:
        t = time.perf_counter()
        img2img(
            model, PROMPT, f, strength=0.5, steps=10, solver="ddim", guidance=1.5, seeds=[0], output="tensor"
        )
        sync(device)
        lat.append(time.perf_counter() - t)
    return lat


def run_stream(model, frames, device, cfg: str, similarity: float | None) -> tuple[list[float], int]:
    from velodiff.serve.stream import StreamConfig, StreamImg2Img

    s = StreamImg2Img(
        model,
        StreamConfig(prompt=PROMPT, steps=10, strength=0.5, guidance=1.5, cfg=cfg, similarity=similarity),
    )
    s(frames[0].to(device))  # priming (k - 1 extra calls, once per stream) is not timed
    sync(device)
    lat, skips = [], 0
    for f in frames:
        t = time.perf_counter()
        out, skipped = s(f.to(device))
        out.cpu()
        lat.append(time.perf_counter() - t)
        skips += skipped
    return lat, skips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from velodiff.models import load
    from velodiff.models.base import default_dtype
    from velodiff.shipped import resolve_model

    dev = torch.device(a.device)
    model = load(resolve_model("default"), device=a.device, dtype=default_dtype(dev))
    frames = video(a.frames)
    variants = {
        "plain img2img": lambda: (run_plain(model, frames, a.device), 0),
        "stream full CFG": lambda: run_stream(model, frames, a.device, "full", None),
        "stream RCFG self": lambda: run_stream(model, frames, a.device, "self", None),
        "stream RCFG self + SSF 0.98": lambda: run_stream(model, frames, a.device, "self", 0.98),
    }
    for fn in variants.values():  # warm-up (CUDA kernels, allocator)
        fn()
    rounds: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(a.rounds):
        for name, fn in variants.items():
            lat, skips = fn()
            res = {
                "fps": len(lat) / sum(lat),
                "p50_ms": 1000 * statistics.median(lat),
                "p95_ms": 1000 * statistics.quantiles(lat, n=20)[18],
                "skipped": skips,
            }
            rounds[name].append(res)
            print(
                f"round {r + 1} {name}: {res['fps']:.1f} fps, p50 {res['p50_ms']:.1f} ms, "
                f"p95 {res['p95_ms']:.1f} ms, skipped {skips}",
                flush=True,
            )
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in rounds.items()}
    base = summary["plain img2img"]["fps"]
    for s in summary.values():
        s["speed-up"] = s["fps"] / base
    print(json.dumps({"device": device_name, "summary": summary}, indent=2))
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "config": vars(a) | {"out": str(a.out)},
                    "summary": summary,
                    "rounds": rounds,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
