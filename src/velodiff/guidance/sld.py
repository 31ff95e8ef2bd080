"""Safe Latent Diffusion (Schramowski et al. 2023, 'Safe Latent Diffusion: Mitigating Inappropriate
Degeneration in Diffusion Models', Eqs. 3-8): concept steering at sampling time. A third branch,
conditioned on the concept to avoid (``concept``), is evaluated in the same batched call as CFG's two,
and its direction is subtracted from the guidance where the prompt's prediction is close to it:

    g_c  = eps_c - eps_u                                    (CFG's direction)
    mu   = clamp(s_S |eps_c - eps_S|, max=1), 0 where eps_c - eps_S >= lambda   (Eq. 6, element-wise)
    g_S  = mu (eps_S - eps_u) + s_m nu,  nu <- beta nu + (1 - beta) g_S          (Eqs. 4, 7, 8)
    eps  = eps_u + w (g_c - g_S)      after the warm-up steps (Eq. 3; nu builds up during them)

with s_S = ``sld_guidance_scale``, lambda = ``sld_threshold``, s_m = ``sld_momentum_scale``, beta =
``sld_mom_beta`` and the warm-up ``sld_warmup_steps``, named and defaulted as diffusers'
``StableDiffusionPipelineSafe`` (its "MEDIUM" configuration). The gate and the clamp are element-wise
on noise predictions, so the rule computes them on eps (converted from the branches' x0 at the
evaluation's x and t) and adds the term back in x0: x0 = x0_cfg + w (sigma / alpha) g_S. The momentum
is updated at every evaluation (per step for the one-evaluation solvers diffusers uses).
"""

from __future__ import annotations

from typing import Any

from ..errors import VelodiffError
from ..plan import EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .cfg import TERM, GuidanceRule


@register_rule
class SafeLatentDiffusion(GuidanceRule):
    name = "sld"
    stateful = True
    layer = TERM
    claims = ("safety",)
    uses = ("uncond",)
    summary = "Safe Latent Diffusion (Schramowski et al. 2023): steer away from a concept while sampling"
    cost = "+1 eval per step (the concept's branch, same batched call)"
    options = {
        "concept": Option("", "the concept to steer away from (required; a prompt, e.g. 'triangle')",
                          kind=str, aliases=("safety_concept",)),
        "sld_guidance_scale": Option(1000.0, "s_S: strength of the safety guidance (< 1: off)", lo=0.0),
        "sld_warmup_steps": Option(10, "steps before the term is applied (its momentum builds up)",
                                   kind=int, lo=0, hi=100_000),
        "sld_threshold": Option(0.01, "lambda: where eps_c - eps_S >= lambda, no safety guidance (Eq. 6)"),
        "sld_momentum_scale": Option(0.3, "s_m: momentum added to the safety guidance (Eq. 7)", lo=0.0),
        "sld_mom_beta": Option(0.4, "beta: the share of the previous momentum kept (Eq. 8)", lo=0.0, hi=1.0),
        "scale": Option(None, "w, the guidance scale the term is multiplied by (default: the run's)", lo=0.0),
        **GuidanceRule.options,
    }

    def check(self, run: RunInfo) -> None:
        if not str(self.concept).strip():
            raise VelodiffError("plan rule 'sld' needs the concept to avoid: sld:concept=triangle")
        if "uncond" not in run.conds:
            raise VelodiffError(
                "plan rule 'sld' needs an unconditional branch: pass cond=GuidedCond(cond, uncond)"
            )
        if run.encode is None:
            raise VelodiffError("plan rule 'sld' needs a text encoder for its concept (use a pipeline)")
        if self.scale is None and run.guidance is None:
            raise VelodiffError("plan rule 'sld' needs a guidance scale: give scale=W")

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.w = float(self.scale if self.scale is not None else run.guidance)
        self.safety = run.encode([str(self.concept)] * run.batch)
        self.momentum: Any = None

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        if self.sld_guidance_scale < 1 or not self.in_range(req.step):  # diffusers: s_S < 1 disables it
            return inner(req)
        from ..denoisers import broadcast_time, eps_from_x0

        r = inner(req.with_branch("uncond").with_branch("safety", self.safety))
        sched = self.run.schedule
        eps = {k: eps_from_x0(sched, req.x, req.t, r.parts[k]) for k in ("cond", "uncond", "safety")}
        diff = eps["cond"] - eps["safety"]
        mu = (diff.abs() * self.sld_guidance_scale).clamp(max=1.0)  # Eq. 6
        mu = mu.masked_fill(diff >= self.sld_threshold, 0.0)
        g_s = mu * (eps["safety"] - eps["uncond"])  # Eq. 4
        if self.momentum is None:
            self.momentum = g_s.new_zeros(g_s.shape)
        g_s = g_s + self.sld_momentum_scale * self.momentum  # Eq. 7
        self.momentum = self.sld_mom_beta * self.momentum + (1 - self.sld_mom_beta) * g_s  # Eq. 8
        if req.step >= self.sld_warmup_steps:  # Eq. 3: eps = eps_cfg - w g_S, i.e. x0 + w sigma/alpha g_S
            tb = broadcast_time(req.t, r.x0)
            ratio = (sched.sigma(tb) / sched.alpha(tb)).to(r.x0.dtype)
            r.x0 = r.x0 + self.w * ratio * g_s
        return r
