"""diffusers' own cache hooks on the shipped default model's UNet, beside velodiff's ``deepcache``.

Peers: ``apply_pyramid_attention_broadcast`` (PyramidAttentionBroadcastConfig, PAB: Zhao et al. 2024) and
``apply_taylorseer_cache`` (TaylorSeerCacheConfig: Liu et al. 2025), from diffusers' ``hooks/``.

* **Which modules they hook on a UNet2DConditionModel.** PAB walks every ``Attention`` module and matches
  its name with ``re.search`` against ``("blocks", "transformer_blocks", ...)``: every UNet attention
  name contains "blocks" (``down_blocks.1.attentions.0.transformer_blocks.0.attn1``), so all 14 are
  hooked: the 7 ``attn1`` as spatial (``is_cross_attention`` False), the 7 ``attn2`` as cross. It
  applies. TaylorSeer's default patterns are ``re.fullmatch`` against names rooted at the model
  (``^transformer_blocks.*attn``, ``^blocks.*attn``, ...): the UNet's start with ``down_blocks`` /
  ``mid_block`` / ``up_blocks``, so it hooks nothing and the run is the plain run, bit for bit. Any
  config that does hook UNet modules (``cache_identifiers``, ``use_lite_mode``) fails on the first
  UNet call, in diffusers' StableDiffusionPipeline and in velodiff's pipeline alike, with
  ``ValueError: No cache context is set`` (hooks/hooks.py, ``StateManager.context``): the hook's state is
  kept per cache context, which only pipelines of ``CacheMixin`` models open, and UNet2DConditionModel
  is no ``CacheMixin`` (``unet.enable_cache`` is an AttributeError). Lite mode also hooks
  ``down_blocks.N`` / ``up_blocks.N``, whose output is ``(tensor, tuple)``: with a context opened by hand
  it fails at ``self.module_dtypes = tuple(output.dtype for output in outputs)`` (taylorseer_cache.py).
  So TaylorSeer does not apply to the UNet and is not forced here; the script records each of these
  outcomes in the JSON (``taylorseer``).
* **How the peers run.** diffusers' StableDiffusionPipeline built on the same modules
  (``model.to_diffusers``), DPMSolverMultistepScheduler from the model's scheduler config with Karras
  sigmas and ``timestep_spacing="linspace"`` (the grid velodiff runs: checked, max time difference
  recorded), the same starting latents (``velodiff.pipelines.common.initial_noise`` per seed). Without
  a hook, the diffusers images equal velodiff's plain images (max |difference| and PSNR recorded).
  The StableDiffusionPipeline keeps no current timestep, so PAB's required ``current_timestep_callback``
  reads the timestep the UNet was last called with (a forward pre-hook); the SD pipeline resets stateful
  hooks only on ``CacheMixin`` components (pipeline_utils.py, ``maybe_free_model_hooks``), so the PAB
  state is reset by hand before every call (``reset_stateful_hooks``), as it is for a transformer.
* **PAB settings** (chosen beforehand, none tuned; no seed of the reported set was used to choose):
  (a) its defaults: no skip range given, which it turns into ``spatial_attention_block_skip_range=2``
  with the default timestep range (100, 800); (b) the paper's pyramid, broadcast range 2 for spatial
  and 6 for cross attention (no temporal attention in an image UNet), range (100, 800); (c) the most it
  can skip at range 2: spatial and cross 2 over the whole schedule, range (0, 1000).
* **Quality set**: v1 prompts x 2 images, seeds 0-199, prompt-major (image j: seed j), as ``velodiff eval
  shapes`` draws them; DPM-Solver++(2M), 20 steps, CFG 2.5, the model's Karras grid. ShapesEval per
  image; the paired difference to the plain run of the same pipeline (95% bootstrap CI over prompts,
  stratified by category; wins/losses); PSNR and SSIM (torchmetrics, pixels in [0, 1]) of each image to
  the plain image of the same pipeline and seed, averaged over images.
* **Cost**: velodiff's ``result.evals`` (a cached DeepCache step at its measured FLOP share, a full CFG step
  2); PAB skips no network evaluation, only attention calls: counted per call (a pre-hook on each
  attention's ``to_q``, which a broadcast call does not reach) and converted at each attention module's
  FLOP share of a full UNet call (``torch.utils.flop_counter``).
* **Time**: one batch of the first 25 v1 prompts (seeds 0-24), every configuration in turn, the order
  reversed every other round, ``--rounds`` rounds after one warm-up each, one thread; the median of
  seconds per image end to end (text encoding, sampling, VAE decoding) and its ratio to the plain run of
  the same pipeline.

    .venv/bin/python bench/peers/unet_caches.py [--rounds 11] [--images-per-prompt 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE = dict(steps=20, solver="dpmpp_2m", guidance=2.5)
DEEPCACHE = [2, 3]
PAB_HOOK = "pyramid_attention_broadcast"
TS_HOOK = "taylorseer_cache"
PAB_SETTINGS: dict[str, dict[str, Any]] = {
    "PAB defaults (spatial 2, t in (100, 800))": {},
    "PAB pyramid (spatial 2, cross 6, t in (100, 800))": dict(
        spatial_attention_block_skip_range=2, cross_attention_block_skip_range=6),
    "PAB all steps (spatial 2, cross 2, t in (0, 1000))": dict(
        spatial_attention_block_skip_range=2, cross_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(0, 1000), cross_attention_timestep_skip_range=(0, 1000)),
}


def log(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class Bench:
    def __init__(self) -> None:
        from diffusers import DPMSolverMultistepScheduler
        from diffusers.models.attention_processor import Attention

        import velodiff

        self.model = velodiff.load("default")
        cfg = self.model.components["scheduler_config"]
        sched = DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True,
                                                        timestep_spacing="linspace")
        self.pipe = self.model.to_diffusers(sched)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet
        assert self.unet is self.model.network
        self.attn = {n: m for n, m in self.unet.named_modules() if isinstance(m, Attention)}
        self.t_now = 1000
        self.unet.register_forward_pre_hook(self._record_t, with_kwargs=True)
        self.computed = {n: 0 for n in self.attn}
        for n, m in self.attn.items():
            m.to_q.register_forward_pre_hook(lambda mod, a, n=n: self._count(n))

    # --- instruments
    def _record_t(self, module: Any, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.t_now = int(torch.as_tensor(t).flatten()[0])

    def _count(self, name: str) -> None:
        self.computed[name] += 1

    def attention_shares(self) -> dict[str, float]:
        """Each attention module's FLOPs over a whole UNet call (batch 2: CFG's cond + uncond)."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.randn(2, 4, 16, 16)
        e = torch.randn(2, 77, self.unet.config.cross_attention_dim)
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            self.unet(x, torch.tensor([500, 500]), encoder_hidden_states=e)
        f = fc.get_flop_counts()
        total = sum(f["Global"].values())
        root = type(self.unet).__name__
        return {n: sum(f[f"{root}.{n}"].values()) / total for n in self.attn}

    # --- generators
    def velodiff(self, texts: list[str], seeds: list[int], plan: str | None) -> Any:
        from velodiff.pipelines import text2img

        return text2img(self.model, texts, seeds=seeds, plan=plan, output="tensor", **BASE)

    def registry(self) -> Any:
        from diffusers.hooks import HookRegistry

        return HookRegistry.check_if_exists_or_initialize(self.unet)

    def diffusers(self, texts: list[str], seeds: list[int]) -> torch.Tensor:
        from velodiff.pipelines.common import initial_noise

        self.registry().reset_stateful_hooks(recurse=True)  # what the pipeline does for CacheMixin models
        latents = initial_noise((len(texts), 4, 16, 16), seeds)
        with torch.inference_mode():
            return self.pipe(prompt=texts, latents=latents, num_inference_steps=BASE["steps"],
                             guidance_scale=BASE["guidance"], output_type="pt").images

    def pab(self, setting: dict[str, Any] | None) -> Any:
        """Remove any PAB hooks, then apply ``setting`` (None: none); the config as applied."""
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        reg = self.registry()
        reg.remove_hook(PAB_HOOK, recurse=True)
        reg.invalidate_child_registries_cache()
        if setting is None:
            return None
        config = PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: self.t_now, **setting)
        apply_pyramid_attention_broadcast(self.unet, config)
        reg.invalidate_child_registries_cache()
        return config

    def hooked(self, hook: str) -> list[str]:
        out = []
        for n, m in self.unet.named_modules():
            reg = getattr(m, "_diffusers_hook", None)
            if reg is not None and reg.get_hook(hook) is not None:
                out.append(n)
        return out


def error_of(fn: Any) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        fr = traceback.extract_tb(e.__traceback__)[-1]
        where = fr.filename.split("site-packages/")[-1]
        return f"{type(e).__name__}: {e} ({where}:{fr.lineno}: {fr.line})"
    return None


def taylorseer_check(b: Bench, texts: list[str], seeds: list[int]) -> dict[str, Any]:
    """What apply_taylorseer_cache does on the UNet: default config, attention identifiers, lite mode."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.models.cache_utils import CacheMixin

    def clear() -> None:
        b.registry().remove_hook(TS_HOOK, recurse=True)
        b.registry().invalidate_child_registries_cache()

    out: dict[str, Any] = {"default_patterns": list(_TRANSFORMER_BLOCK_IDENTIFIERS),
                           "unet_is_cache_mixin": isinstance(b.unet, CacheMixin),
                           "enable_cache": error_of(lambda: b.unet.enable_cache(TaylorSeerCacheConfig()))}
    plain = b.diffusers(texts, seeds)  # the same batch without a hook
    apply_taylorseer_cache(b.unet, TaylorSeerCacheConfig())
    out["default_hooked"] = b.hooked(TS_HOOK)
    img = b.diffusers(texts, seeds)
    out["default_max_abs_diff_to_plain"] = float((img - plain).abs().max())
    clear()
    trials = {"cache_identifiers=[r'.*transformer_blocks\\.\\d+\\.attn\\d']":
              TaylorSeerCacheConfig(cache_identifiers=[r".*transformer_blocks\.\d+\.attn\d"]),
              "use_lite_mode=True": TaylorSeerCacheConfig(use_lite_mode=True)}
    for label, cfg in trials.items():
        apply_taylorseer_cache(b.unet, cfg)
        rec = {"hooked": b.hooked(TS_HOOK),
               "diffusers_pipeline": error_of(lambda: b.diffusers(texts[:1], seeds[:1])),
               "velodiff_pipeline": error_of(lambda: b.velodiff(texts[:1], seeds[:1], None))}
        if cfg.use_lite_mode:  # a diagnosis only: a context opened by hand, which neither pipeline does
            def by_hand() -> None:
                x = torch.randn(2, 4, 16, 16)
                e = torch.randn(2, 77, b.unet.config.cross_attention_dim)
                with torch.inference_mode(), CacheMixin.cache_context(b.unet, "cond"):
                    for i in range(5):
                        b.unet(x, torch.tensor([999 - 100 * i] * 2), encoder_hidden_states=e)
            rec["with_a_context_opened_by_hand"] = error_of(by_hand)
        out[label] = rec
        clear()
    return out


def bootstrap_ci(diff: np.ndarray, cats: np.ndarray, k: int, n: int = 4000) -> list[float]:
    """95% CI of the mean paired difference, prompts resampled within their category."""
    rng = np.random.default_rng(0)
    per_prompt = diff.reshape(-1, k).mean(1)
    pc = cats[::k]
    groups = [per_prompt[pc == c] for c in np.unique(pc)]
    means = np.empty(n)
    for i in range(n):
        means[i] = np.mean([g[rng.integers(0, len(g), len(g))].mean() for g in groups])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--out", type=Path, default=HERE / "unet_caches.json")
    ap.add_argument("--limit", type=int, default=None, help="only this many prompts, spread (quick checks)")
    ap.add_argument("--timing-prompts", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers.utils import logging as dlog
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from velodiff.eval.pipeline_bench import diffusers_grid
    from velodiff.eval.shapes_eval import evaluate, load_prompts
    from velodiff.pipelines import text2img

    dlog.set_verbosity_error()
    t_start = time.perf_counter()
    b = Bench()
    k = args.images_per_prompt
    plist = load_prompts("v1")
    if args.limit is not None:
        plist = [plist[int(i * len(plist) / args.limit)] for i in range(args.limit)]
    texts = [p.text for p in plist for _ in range(k)]
    cats = np.array([p.category for p in plist for _ in range(k)])
    seeds = list(range(len(texts)))
    shares = b.attention_shares()
    a1 = sum(v for n, v in shares.items() if n.endswith("attn1"))
    a2 = sum(v for n, v in shares.items() if n.endswith("attn2"))
    log(f"attention FLOP share of a UNet call: attn1 {a1:.4f}, attn2 {a2:.4f}")

    configs: list[tuple[str, str, Any]] = [("velodiff plain", "velodiff", None)]
    configs += [(f"velodiff deepcache:interval={n}", "velodiff", f"deepcache:interval={n}")
                for n in DEEPCACHE]
    configs += [("diffusers plain", "diffusers", None)]
    configs += [(label, "diffusers", s) for label, s in PAB_SETTINGS.items()]

    def run(kind: str, setting: Any, tx: list[str], sd: list[int]) -> tuple[torch.Tensor, float | None]:
        if kind == "velodiff":
            b.pab(None)
            r = b.velodiff(tx, sd, setting)
            return r.images, float(r.evals)
        b.pab(setting)
        return b.diffusers(tx, sd), None

    # ---- quality
    records: dict[str, dict[str, Any]] = {}
    images: dict[str, torch.Tensor] = {}
    for label, kind, setting in configs:
        t0 = time.perf_counter()
        b.computed = dict.fromkeys(b.attn, 0)
        parts, evals, calls = [], 0.0, 0
        for i in range(0, len(texts), args.batch):
            im, ev = run(kind, setting, texts[i:i + args.batch], seeds[i:i + args.batch])
            parts.append(im.float().cpu())
            evals += (ev or 0.0) * len(im)
            calls += 1
        imgs = torch.cat(parts)
        images[label] = imgs
        res = evaluate(imgs, plist, value_range=(0, 1), keep_detections=False)  # prompt-major, k per prompt
        rec: dict[str, Any] = {"pipeline": kind, "setting": setting if kind == "velodiff" else
                               (None if setting is None else {kk: list(v) if isinstance(v, tuple) else v
                                                              for kk, v in setting.items()}),
                               "shapes_eval": res["overall"], "by_category": res["by_category"],
                               "correct": [int(r["correct"]) for r in res["per_prompt"]]}
        steps = BASE["steps"]
        if kind == "velodiff":
            rec["evals_per_image"] = evals / len(texts)
            rec["attention_calls_skipped_per_image"] = 0
        else:
            cfg = b.pab(setting) if setting is not None else None
            if cfg is not None:
                rec["config_as_applied"] = {
                    "spatial_attention_block_skip_range": cfg.spatial_attention_block_skip_range,
                    "cross_attention_block_skip_range": cfg.cross_attention_block_skip_range,
                    "spatial_attention_timestep_skip_range": list(cfg.spatial_attention_timestep_skip_range),
                    "cross_attention_timestep_skip_range": list(cfg.cross_attention_timestep_skip_range)}
                rec["hooked"] = b.hooked(PAB_HOOK)
                b.pab(None)
            skipped = {n: steps * calls - c for n, c in b.computed.items()}  # per batch call; per image alike
            per_run = {n: s / calls for n, s in skipped.items()}
            rec["attention_calls_skipped_per_image"] = sum(per_run.values())
            rec["attention_calls_per_image"] = steps * len(b.attn)
            rec["skipped_by_module"] = per_run
            rec["evals_per_image"] = 2 * (steps - sum(per_run[n] * shares[n] for n in per_run))
        rec["evals_saved_per_image_flop_weighted"] = 2 * steps - rec["evals_per_image"]
        rec["quality_seconds"] = time.perf_counter() - t0
        records[label] = rec
        log(f"{label}: ShapesEval {rec['shapes_eval']:.3f}, evals {rec['evals_per_image']:.2f}, "
            f"{rec['quality_seconds']:.0f} s")

    for label, kind, _ in configs:
        rec = records[label]
        ref = "velodiff plain" if kind == "velodiff" else "diffusers plain"
        rec["reference"] = ref
        if label == ref:
            continue
        a, r = images[label], images[ref]
        ps = peak_signal_noise_ratio(a, r, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ss = structural_similarity_index_measure(a, r, data_range=1.0, reduction="none")
        rec["psnr_vs_plain"] = float(ps.clamp(max=100).mean())
        rec["ssim_vs_plain"] = float(ss.mean())
        d = np.array(rec["correct"]) - np.array(records[ref]["correct"])
        rec["minus_plain"] = float(d.mean())
        rec["minus_plain_ci95"] = bootstrap_ci(d.astype(float), cats, k)
        rec["wins_losses"] = [int((d > 0).sum()), int((d < 0).sum())]

    # ---- parity of the two pipelines without a hook: velodiff on the model's Karras grid (the rows above)
    # and velodiff on diffusers' own time steps (integer timesteps: what pipeline_bench matches)
    vres = b.velodiff(texts[:1], seeds[:1], None)
    b.diffusers(texts[:1], seeds[:1])
    grid_d = diffusers_grid(b.model, b.pipe)
    on_grid = torch.cat([
        text2img(b.model, texts[i:i + args.batch], seeds=seeds[i:i + args.batch], output="tensor",
                 **{**BASE, "grid": grid_d}).images.float().cpu()
        for i in range(0, len(texts), args.batch)])

    def apart(a: torch.Tensor, r: torch.Tensor) -> dict[str, float]:
        ps = peak_signal_noise_ratio(a, r, data_range=1.0, reduction="none", dim=(1, 2, 3))
        return {"max_abs_diff": float((a - r).abs().max()),
                "rms": float((a - r).pow(2).flatten(1).mean(1).sqrt().mean()),
                "psnr": float(ps.clamp(max=100).mean()), "min_psnr": float(ps.min())}

    parity = {
        "velodiff_model_grid": apart(images["velodiff plain"], images["diffusers plain"]),
        "velodiff_diffusers_grid": apart(on_grid, images["diffusers plain"]),
        "max_abs_time_diff_model_grid": float(
            (vres.ts.double().cpu() - torch.tensor(grid_d, dtype=torch.float64)).abs().max()),
        "diffusers_timesteps": b.pipe.scheduler.timesteps.tolist(),
        "shapes_eval_verdicts_apart": sum(x != y for x, y in zip(
            records["diffusers plain"]["correct"], records["velodiff plain"]["correct"], strict=True)),
    }
    log("parity", {kk: v for kk, v in parity.items() if kk != "diffusers_timesteps"})

    # ---- TaylorSeer: does it apply?
    ts = taylorseer_check(b, texts[:4], seeds[:4])
    log("taylorseer hooked by default:", ts["default_hooked"])

    # ---- time
    nt = min(args.timing_prompts, len(plist))
    tt, tsd = [p.text for p in plist][:nt], list(range(nt))
    times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    for _label, kind, setting in configs:  # warm-up
        run(kind, setting, tt, tsd)
    for rnd in range(args.rounds):
        order = configs if rnd % 2 == 0 else configs[::-1]
        for label, kind, setting in order:
            if kind == "diffusers":
                b.pab(setting)  # hooks applied outside the timed call
            t0 = time.perf_counter()
            if kind == "velodiff":
                b.velodiff(tt, tsd, setting)
            else:
                b.diffusers(tt, tsd)
            times[label].append((time.perf_counter() - t0) / len(tt))
        log(f"round {rnd + 1}/{args.rounds}")
    b.pab(None)
    for label, _kind, _ in configs:
        rec = records[label]
        ref = rec["reference"]
        rec["seconds_per_image"] = statistics.median(times[label])
        rec["seconds_all"] = times[label]
        rec["speedup"] = statistics.median(times[ref]) / rec["seconds_per_image"]
        rec["speedup_paired_median"] = statistics.median(
            p / x for p, x in zip(times[ref], times[label], strict=True))

    out = {
        "protocol": {"prompts": "v1", "images_per_prompt": k, "seeds": [0, len(texts) - 1], **BASE,
                     "grid": "karras (the model's)", "threads": torch.get_num_threads(),
                     "timing": {"rounds": args.rounds, "batch": nt, "seeds": [0, nt - 1]},
                     "attention_flop_share": shares},
        "parity_no_hook": parity,
        "taylorseer": ts,
        "configs": records,
        "seconds_total": time.perf_counter() - t_start,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("| configuration | evals / img | attention calls skipped / img | ShapesEval | minus plain [95% CI] "
          "(wins/losses) | PSNR to plain (dB) | SSIM to plain | s / img | speed-up |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for label, rec in records.items():
        mp, ps, ss = "", "", ""
        if "minus_plain" in rec:
            lo, hi = rec["minus_plain_ci95"]
            w, los = rec["wins_losses"]
            mp = f"{rec['minus_plain']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({w}/{los})"
            ps, ss = f"{rec['psnr_vs_plain']:.1f}", f"{rec['ssim_vs_plain']:.3f}"
        print(f"| {label} | {rec['evals_per_image']:.1f} | {rec['attention_calls_skipped_per_image']:.0f} | "
              f"{rec['shapes_eval']:.3f} | {mp} | {ps} | {ss} | "
              f"{rec['seconds_per_image']:.4f} | {rec['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
