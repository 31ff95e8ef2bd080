"""DeepCache (Ma et al. 2024) on the shipped default model: quality and time of the plan rule
``deepcache`` against the plain run, against plain runs with as few evaluations, and against the peer
package's DeepCacheSDHelper on diffusers' StableDiffusionPipeline over the same weights.

* Quality set (held out: no setting was chosen on it): v1 prompts x 2 images, seeds 5000-5199
  (prompt-major, as `velodiff bench`), DPM-Solver++(2M), 20 steps, CFG 2.5, the model's Karras grid.
  ShapesEval per image, the paired difference to the plain run (95% bootstrap CI over prompts), and the
  distance of every image to the plain image from the same seed (pixels in [0, 1]: RMS, PSNR, SSIM).
* Time: one batch (the first --prompts v1 prompts, seeds 5000+), every configuration timed in turn,
  round after round (so a change of machine load hits all alike), one CPU thread; medians of seconds
  per image end to end (text encoding, sampling, VAE decoding) and the ratio to the plain run.
* Peer: diffusers' StableDiffusionPipeline built from the default model's modules, with
  DPMSolverMultistepScheduler (the model's config, Karras sigmas: the same solver and grid family as
  velodiff's default), the same starting latents; DeepCacheSDHelper at interval 3, branch 0 (its
  defaults' cut), its PSNR taken against the same pipeline without the helper.

    /work/main/.venv/bin/python bench/deepcache/run.py [--rounds 7] [--prompts 25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "guidance"))
import common  # noqa: E402 - the guidance benches' harness (sets, ShapesEval, paired stats, output)

common.CACHE = HERE / ".cache"
common.SETS["heldout"] = [("v1", 2, 5000)]

BASE = {"steps": 20, "solver": "dpmpp_2m", "guidance": 2.5}
DC = [(f"deepcache N={n}{' nonuniform' if s == 'nonuniform' else ''}",
       {**BASE, "plan": f"deepcache:interval={n}" + (",schedule=nonuniform" if s == "nonuniform" else "")})
      for s in ("uniform", "nonuniform") for n in (2, 3, 5)]
FEWER = [(f"plain {k} steps", {**BASE, "steps": k}) for k in (10, 8, 5)]  # about the evals of N = 2, 3, 5
PEER = {"interval": 3, "branch": 0}


def pipeline() -> Any:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    c = common.model().components
    sched = DPMSolverMultistepScheduler.from_config(c["scheduler_config"], use_karras_sigmas=True,
                                                    timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=c["unet"], scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_gen(pipe: Any, peer: bool) -> Any:
    """A `common.generate` generator: the diffusers pipeline, with DeepCacheSDHelper when `peer`."""
    from DeepCache import DeepCacheSDHelper

    from velodiff.pipelines.common import initial_noise

    def gen(texts: list[str], seeds: list[int], **cfg: Any) -> Any:
        latents = initial_noise((len(texts), 4, 16, 16), seeds)
        helper = None
        if peer:
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=PEER["interval"], cache_branch_id=PEER["branch"])
            helper.enable()
        try:
            with torch.inference_mode():
                out = pipe(prompt=texts, latents=latents, num_inference_steps=cfg["steps"],
                           guidance_scale=cfg["guidance"], output_type="latent").images
                images = (pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        finally:
            if helper is not None:
                helper.disable()
        n_full = len(range(0, cfg["steps"], PEER["interval"])) if peer else cfg["steps"]
        return SimpleNamespace(images=images, latents=out, evals=0.0, nfe=n_full,
                               plan=f"DeepCacheSDHelper:{PEER}" if peer else "diffusers")

    return gen


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).flatten(1).mean(1).sqrt().mean())


def quality(pipe: Any) -> tuple[list[list[str]], dict[str, Any]]:
    js = common.jobs("heldout")
    configs = [("plain", BASE), *DC, *FEWER]
    recs, outs = common.run_configs("heldout", configs, "dc", baselines={k: "plain" for k, _ in configs[1:]},
                                    fd=False)
    peer_recs, peer_outs = {}, {}
    for label, peer in (("diffusers plain", False), ("diffusers + DeepCacheSDHelper", True)):
        res = common.generate(js, BASE, tag=f"dc-{'peer' if peer else 'diffusers'}-heldout",
                              gen=diffusers_gen(pipe, peer))
        sc = common.shapes(res["images"], js)
        rec = {"label": label, "plan": res["plan"], "evals": None, **sc}
        if peer:
            base = peer_outs["diffusers plain"]
            before = peer_recs["diffusers plain"]["correct"]
            rec["paired_vs_baseline"] = common.paired(before, sc["correct"], js)
            rec.update(common.vs_plain(res, base))
            rec["rms_vs_plain"] = rms(res["images"], base["images"])
        peer_recs[label], peer_outs[label] = rec, res
    for label, rec in recs.items():
        if label != "plain":
            rec["rms_vs_plain"] = rms(outs[label]["images"], outs["plain"]["images"])
    rows = []
    for label, rec in [*recs.items(), *peer_recs.items()]:
        p = rec.get("paired_vs_baseline")
        rows.append([
            label, common.f3(rec["evals"]) if rec["evals"] is not None else "-",
            f"{rec['shapes']:.3f}", *(f"{v:.3f}" for v in rec["by_category"].values()),
            common.fmt_paired(p) if p else "",
            f"{rec['rms_vs_plain']:.4f}" if "rms_vs_plain" in rec else "",
            f"{rec['psnr_vs_plain']:.1f}" if "psnr_vs_plain" in rec else "",
            f"{rec['ssim_vs_plain']:.3f}" if "ssim_vs_plain" in rec else "",
        ])
    common.sheet([(k, outs[k]["images"][::25]) for k in ("plain", "deepcache N=3", "deepcache N=5",
                                                         "deepcache N=3 nonuniform")]
                 + [(k, peer_outs[k]["images"][::25]) for k in peer_outs], HERE / "sheet.png")
    return rows, {"velodiff": recs, "peer": peer_recs}


def timing(pipe: Any, rounds: int, n: int, only_peer: bool = False) -> tuple[list[list[str]], list[Any]]:
    from velodiff.eval.shapes_eval import load_prompts
    from velodiff.pipelines import text2img

    model = common.model()
    texts = [p.text for p in load_prompts("v1")][:n]
    seeds = [5000 + 2 * i for i in range(n)]
    runs: dict[str, Any] = {"plain": lambda: text2img(model, texts, seeds=seeds, output="tensor", **BASE)}
    for label, cfg in DC + FEWER:
        if not only_peer or label == "deepcache N=3":
            runs[label] = (lambda cfg=cfg: text2img(model, texts, seeds=seeds, output="tensor", **cfg))
    runs["diffusers plain"] = lambda: diffusers_gen(pipe, False)(texts, seeds, **BASE)
    runs["diffusers + DeepCacheSDHelper"] = lambda: diffusers_gen(pipe, True)(texts, seeds, **BASE)
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) / n)
        common.log(f"timing round {r + 1}/{rounds}")
    base, peer_base = statistics.median(times["plain"]), statistics.median(times["diffusers plain"])
    out, rows = [], []
    for k, ts in times.items():
        med = statistics.median(ts)
        ref = peer_base if k.startswith("diffusers") else base
        out.append({"label": k, "median_s_per_image": med, "ratio": med / ref, "times": ts})
        rows.append([k, f"{med:.4f}", f"{ref / med:.2f}x"])
    dc3 = statistics.median(times["deepcache N=3"])
    peer = statistics.median(times["diffusers + DeepCacheSDHelper"])
    pairs = zip(times["deepcache N=3"], times["diffusers + DeepCacheSDHelper"], strict=True)
    paired = statistics.median(a / b for a, b in pairs)
    rows.append(["velodiff deepcache N=3 / peer helper N=3: ratio of medians; median of per-round ratios",
                 f"{dc3 / peer:.3f}", f"{paired:.3f}"])
    return rows, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--peer-timing", action="store_true",
                    help="only time plain, deepcache N=3 and the peer's two rows (to peer_timing.md)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = pipeline()
    if args.peer_timing:
        t_rows, t = timing(pipe, args.rounds, args.prompts, only_peer=True)
        text = common.table(["configuration", "median s / image", "speed-up"], t_rows)
        cmd = "/work/main/.venv/bin/python bench/deepcache/run.py " + " ".join(sys.argv[1:])
        (HERE / "peer_timing.md").write_text(
            f"# velodiff DeepCache vs DeepCacheSDHelper: time side by side\n\nCommand: `{cmd}`; "
            f"{args.prompts} v1 prompts in one batch, {args.rounds} rounds, 1 thread.\n\n{text}\n")
        print(text)
        return
    q_rows, q = quality(pipe)
    t_rows, t = timing(pipe, args.rounds, args.prompts)
    cats = ["single", "binding", "counting", "position"]
    sections = [
        "## Quality (held-out set: v1 x 2 images, seeds 5000-5199; DPM-Solver++ 2M, 20 steps, CFG 2.5)",
        common.table(["configuration", "evals/img", "ShapesEval", *cats,
                      "minus plain [95% CI] (wins/losses, p)", "RMS vs plain", "PSNR vs plain (dB)",
                      "SSIM vs plain"], q_rows),
        "evals/img: network-sample evaluations per image, a cached DeepCache step counted at its measured "
        "FLOP share. The peer rows compare with diffusers' own plain run (its PSNR/RMS are to that run).",
        f"## Time ({args.prompts} v1 prompts in one batch, {args.rounds} rounds side by side, 1 thread)",
        common.table(["configuration", "median s / image", "speed-up"], t_rows),
        "Speed-ups of velodiff rows are against velodiff's plain run, of diffusers rows against diffusers' "
        "plain run.",
    ]
    common.write(HERE, "DeepCache on the default model", sections,
                 {"quality": q, "timing": t, "rounds": args.rounds, "prompts": args.prompts})


if __name__ == "__main__":
    main()
