"""Classifier-free guidance on the seam, the base of every rule that combines the conditional and the
unconditional branch, and guidance rescale.

Guidance that is linear in the prediction gives the same result applied to x0, eps or v at the same
(x, t) (tests/test_guidance.py), so velodiff combines x0 predictions and converts only where a rule
needs another space (rescale: eps; CFG-Zero*: velocity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..limits import check_guidance
from ..plan import Accelerator, Cond, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class GuidedCond:
    """The two conditionings CFG needs: the prompt's and the unconditional (or negative) one."""

    cond: Cond
    uncond: Cond


#: the stacking layers of the guidance family (lower = closer to the network; see velodiff.plan)
COMBINER, TERM, POST = 10, 20, 30

START = Option(
    0.0, "fraction of the steps after which the rule starts (diffusers guiders' start)", lo=0, hi=1
)
STOP = Option(1.0, "fraction of the steps after which the rule stops (diffusers guiders' stop)", lo=0, hi=1)
SCALE = Option(None, "guidance scale w (default: the run's --guidance)", lo=0.0, aliases=("guidance_scale",))


class GuidanceRule(Accelerator):
    """A guidance rule with diffusers guiders' ``start`` / ``stop``: active at steps
    int(start * N) <= i < int(stop * N) of an N-step run."""

    options = {"start": START, "stop": STOP}

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        if not self.start <= self.stop:  # refused with the plan string, before any run
            raise VelodiffError(
                f"plan rule {self.name!r}: start ({self.start:g}) must not exceed stop ({self.stop:g})"
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.first, self.last = int(self.start * run.steps), int(self.stop * run.steps)

    def in_range(self, step: int) -> bool:
        return self.first <= step < self.last


class UncondCombiner(GuidanceRule):
    """Base of the rules that combine the ``cond`` and ``uncond`` branches into x0 (CFG and its
    variants); at most one per plan (they claim ``uncond``). ``combine`` forms x0 from the parts."""

    layer = COMBINER
    claims = ("uncond",)
    options = {"scale": SCALE, **GuidanceRule.options}

    def check(self, run: RunInfo) -> None:
        if "uncond" not in run.conds:
            raise VelodiffError(
                f"plan rule {self.name!r} needs an unconditional branch: pass cond=GuidedCond(cond, uncond)"
            )
        if self.scale is None and run.guidance is None:
            raise VelodiffError(f"plan rule {self.name!r} needs a guidance scale: give scale=W")
        if self.scale is None and float(run.guidance) == 1.0:  # it would be reported, never act
            raise VelodiffError(
                f"plan rule {self.spec()!r} acts on classifier-free guidance, which is off at scale 1 (this "
                "run's; a student with guidance folded in runs at 1): give --guidance W or scale=W, or "
                "leave the rule out"
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.w = check_guidance(float(self.scale if self.scale is not None else run.guidance))

    def active(self, req: EvalRequest) -> bool:
        return self.w != 1.0 and self.in_range(req.step)

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        if not self.active(req):
            return inner(req)
        r = inner(req.with_branch("uncond"))
        r.x0 = self.combine(req, r.parts["cond"], r.parts["uncond"], r)
        return r

    def combine(self, req: EvalRequest, c: Tensor, u: Tensor, r: EvalResult) -> Tensor:
        return u + self.w * (c - u)  # Ho & Salimans 2022, Eq. 6, written for x0


@register_rule
class ClassifierFreeGuidance(UncondCombiner):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): x0 = x0_u + w (x0_c - x0_u); cond and uncond
    run as one batched call (1 NFE, 2 network-sample evaluations). ``t_lo`` / ``t_hi``: guidance only
    where t_lo <= t <= t_hi (Kynkaanniemi et al. 2024, 'Applying Guidance in a Limited Interval'),
    elsewhere one conditional pass."""

    name = "cfg"
    summary = "classifier-free guidance (Ho & Salimans 2022); t_lo/t_hi: interval (Kynkaanniemi et al. 2024)"
    cost = "2 evals per step where active (cond + uncond, one batched call), 1 elsewhere"
    options = {
        **UncondCombiner.options,
        "t_lo": Option(0.0, "guidance only where t >= t_lo (schedule time, 0 = clean)", lo=0.0),
        "t_hi": Option(float("inf"), "guidance only where t <= t_hi", lo=0.0),
    }

    def check(self, run: RunInfo) -> None:
        super().check(run)
        if not self.t_lo <= self.t_hi:
            raise VelodiffError(
                f"guidance interval must have t_lo <= t_hi, got ({self.t_lo:g}, {self.t_hi:g})"
            )

    def active(self, req: EvalRequest) -> bool:
        t = float(req.t.max())
        return super().active(req) and self.t_lo <= t <= self.t_hi


@register_rule
class GuidanceRescale(Accelerator):
    """Guidance rescale (Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps Are Flawed',
    Sec. 3.4, Eq. 15-16) on the network's own prediction (eps, v, ...) as diffusers' ``rescale_noise_cfg``
    takes the pipeline's ``noise_pred``: p_r = p_g * std(p_c) / std(p_g), p = phi p_r + (1 - phi) p_g,
    applied to whatever the guidance rules below it made of the conditional prediction (nothing to do
    where they left it). A bare denoiser without a prediction type is rescaled on eps."""

    name = "rescale"
    layer = POST
    summary = "guidance rescale phi (Lin et al. 2023; diffusers' guidance_rescale)"
    cost = "free"
    options = {
        "phi": Option(0.7, "rescale strength phi in [0, 1]", lo=0.0, hi=1.0, aliases=("guidance_rescale",))
    }

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        r = inner(req)
        c = r.parts.get("cond")
        if self.phi > 0 and c is not None and r.x0 is not c:
            kind = self.run.prediction_type or "epsilon"
            r.x0 = rescaled(self.run.schedule, req.x, req.t, r.x0, c, self.phi, kind)
        return r


def rescaled(
    sched, x: Tensor, t: Tensor, x0: Tensor, x0_c: Tensor, phi: float, prediction_type: str = "epsilon"
) -> Tensor:
    from ..denoisers import broadcast_time, prediction_from_x0, x0_from_alpha_sigma

    tb = broadcast_time(t, x)
    a, s = sched.alpha(tb).to(x.dtype), sched.sigma(tb).to(x.dtype)
    p_cfg, p_c = (prediction_from_x0(prediction_type, x, v, a, s) for v in (x0, x0_c))
    dims = list(range(1, x.ndim))
    p_r = p_cfg * p_c.std(dim=dims, keepdim=True) / p_cfg.std(dim=dims, keepdim=True)
    return x0_from_alpha_sigma(prediction_type, x, phi * p_r + (1 - phi) * p_cfg, a, s)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine similarity of two batches (computed in float64)."""
    import torch
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1)
