"""CFG-Zero* (Fan et al. 2025) on the tiny random-weight SD3 and Flux models (the only flow models here).

Claim (paper): for flow-matching models, CFG-Zero* (a per-image optimized scale s* on the
unconditional velocity, and 'zero-init': zero velocity on the first step) improves samples over CFG,
most at few steps. RANDOM WEIGHTS MAKE EVERY QUALITY CLAIM IMPOSSIBLE TO TEST HERE: the tiny models
(velodiff.models.tiny.save_tiny) generate noise-like images whatever the rule. What is measurable:
  * solver accuracy: the distance of few-step samples (2, 4, 8 steps, Euler on the model's default
    flow-shifted grid) to a 64-step Euler sample of the SAME rule and seed (relative latent L2 error),
    for cfg, cfg_zero with s* only (zero_init_steps=0), cfg_zero with s* + zero-init (the default), and
    zero-init alone (a bench-only rule: CFG with the first step's velocity set to zero);
  * how far each rule moves the 64-step sample from CFG's (the size of the intervention);
  * s*: its mean per step (s* = 1 makes cfg_zero equal to cfg);
  * cost: evals per image (zero-init skips the first step's network call).
64 x 64 images (the tiny Flux's default is 512: pass the size); 8 prompts x 4 seeds; SD3 at guidance 7 (its default), Flux-dev with true CFG 3.5 (embedded guidance 3.5).
No setting is tuned (the defaults of diffusers' CFG-Zero* guider), so there is no calibration set.
Run: .venv/bin/python bench/guidance/cfg_zero.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from common import HERE, log, table, write

from velodiff.guidance.cfg import UncondCombiner
from velodiff.guidance.cfg_zero import CFGZeroStar, s_star
from velodiff.plan import register_rule

OUT = HERE / "cfg_zero"
PROMPTS = [
    "a photo of a red cat",
    "a blue cube on the table",
    "a green sphere in the garden",
    "a painting of a dog",
    "the red circle",
    "a photo of a blue square",
    "a green triangle on the table",
    "an ugly blurry painting of a cat",
]
SEEDS = 4
STEPS = [2, 4, 8]
REF_STEPS = 64
GUIDANCE = {"sd3": 7.0, "flux": 3.5}
RULES = {
    "cfg": "none",
    "cfg_zero s* only": "cfg_zero:zero_init_steps=0",
    "cfg_zero s* + zero-init": "cfg_zero",
    "zero-init only": "bench_zero_init_only",
}


@register_rule
class ZeroInitOnly(CFGZeroStar):
    """Bench-only: CFG-Zero*'s zero-init with plain CFG (no s*), to separate the two parts."""

    name = "bench_zero_init_only"

    def combine(self, req, c, u, r):  # noqa: ANN001
        return UncondCombiner.combine(self, req, c, u, r)


@register_rule
class SStarProbe(CFGZeroStar):
    """Bench-only: cfg_zero that records s* per step (mean over images)."""

    name = "bench_sstar_probe"
    log: list = []

    def combine(self, req, c, u, r):  # noqa: ANN001
        t = self.run.schedule.sigma(req.t).reshape(-1, *([1] * (c.ndim - 1))).to(c.device, c.dtype)
        s = s_star((req.x - c) / t, (req.x - u) / t).flatten()
        SStarProbe.log.append(
            (req.step, float(t.flatten()[0]), float(s.mean()), float(s.min()), float(s.max()))
        )
        return super().combine(req, c, u, r)


def main() -> None:
    import velodiff
    from velodiff.models.tiny import save_tiny
    from velodiff.pipelines import text2img

    torch.set_num_threads(1)
    texts = [p for p in PROMPTS for _ in range(SEEDS)]
    seeds = list(range(len(texts)))
    results, rows, probe_rows = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sd3", "flux"):
            m = velodiff.load(save_tiny(kind, Path(tmp) / kind))
            m.max_sequence_length = 32  # as tests/test_models_dit.py, to keep T5 fast
            g = GUIDANCE[kind]

            def gen(steps: int, plan: str):  # noqa: ANN202
                return text2img(
                    m,
                    texts,
                    steps=steps,
                    solver="euler",
                    guidance=g,
                    plan=plan,
                    seeds=seeds,
                    height=64,
                    width=64,
                    output="tensor",
                )

            lat = {}
            for rule, plan in RULES.items():
                for n in [*STEPS, REF_STEPS]:
                    r = gen(n, plan)
                    lat[(rule, n)] = (r.latents.double(), r.evals, r.plan)
                    log(f"[cfg_zero] {kind} {rule} {n} steps: evals {r.evals}")
            for rule in RULES:
                ref = lat[(rule, REF_STEPS)][0]
                cfg_ref = lat[("cfg", REF_STEPS)][0]
                rec = {"model": kind, "guidance": g, "rule": rule, "plan": lat[(rule, REF_STEPS)][2]}
                for n in STEPS:
                    z, ev, _ = lat[(rule, n)]
                    err = ((z - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).numpy()
                    rec[f"rel_err_{n}"] = float(err.mean())
                    rec[f"rel_err_{n}_per_sample"] = err.tolist()
                    rec[f"evals_{n}"] = ev
                move = ((ref - cfg_ref).flatten(1).norm(dim=1) / cfg_ref.flatten(1).norm(dim=1)).numpy()
                rec["ref_vs_cfg_ref"] = float(move.mean())
                results[f"{kind}/{rule}"] = rec
                rows.append(
                    [
                        kind,
                        rule,
                        rec["plan"],
                        *(f"{rec[f'rel_err_{n}']:.4f} ({rec[f'evals_{n}']})" for n in STEPS),
                        f"{rec['ref_vs_cfg_ref']:.4f}",
                    ]
                )
            SStarProbe.log = []
            text2img(
                m,
                texts,
                steps=8,
                solver="euler",
                guidance=g,
                plan="bench_sstar_probe:zero_init_steps=0",
                seeds=seeds,
                height=64,
                width=64,
                output="tensor",
            )
            for step, t, mean, lo, hi in SStarProbe.log:
                probe_rows.append([kind, step, f"{t:.3f}", f"{mean:.3f}", f"{lo:.3f}", f"{hi:.3f}"])
            results[f"{kind}/sstar_8_steps"] = SStarProbe.log
            # paired comparison of the per-sample errors, cfg_zero (default) vs cfg
            for n in STEPS:
                a = np.array(results[f"{kind}/cfg"][f"rel_err_{n}_per_sample"])
                for rule in ("cfg_zero s* only", "cfg_zero s* + zero-init"):
                    b = np.array(results[f"{kind}/{rule}"][f"rel_err_{n}_per_sample"])
                    results[f"{kind}/{rule}/better_than_cfg_fraction_{n}"] = float((b < a).mean())

    better = [
        [
            k,
            n,
            *(
                f"{results[f'{k}/{rule}/better_than_cfg_fraction_{n}']:.2f}"
                for rule in ("cfg_zero s* only", "cfg_zero s* + zero-init")
            ),
        ]
        for k in GUIDANCE
        for n in STEPS
    ]
    write(
        OUT,
        "CFG-Zero* vs CFG on the tiny random-weight SD3 / Flux models (solver accuracy only)",
        [
            "Random weights: these numbers say nothing about image quality or prompt alignment, only how each rule "
            "behaves as an ODE sampler and how much it changes the sample. 8 prompts x 4 seeds, Euler, model default "
            "flow-shifted grid.",
            "Relative latent L2 error of the N-step sample to the same rule's 64-step sample (mean over 32 samples), "
            "evals per image in brackets; last column: relative distance of the rule's 64-step sample to CFG's.",
            table(
                ["model", "rule", "plan that ran", *(f"{n} steps" for n in STEPS), "64-step sample vs CFG's"],
                rows,
            ),
            "Fraction of the 32 samples where the rule's N-step sample is closer to its own 64-step sample than CFG's is to CFG's:",
            table(["model", "steps", "cfg_zero s* only", "cfg_zero s* + zero-init"], better),
            "s* per step (8 Euler steps, no zero-init; mean / min / max over the 32 samples):",
            table(["model", "step", "t", "mean s*", "min", "max"], probe_rows),
        ],
        {"prompts": PROMPTS, "seeds_per_prompt": SEEDS, "results": results},
    )


if __name__ == "__main__":
    main()
