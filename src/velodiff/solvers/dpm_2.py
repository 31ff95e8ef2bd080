"""k-diffusion's DPM-2 and DPM-2 ancestral (``sample_dpm_2``, ``sample_dpm_2_ancestral``; diffusers'
KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler): DPM-Solver-2 (Lu et al. 2022, Alg. 1
with r1 = 1/2) written in the noise level sigma = sigma(t) / alpha(t) on x~ = x / alpha(t), with EDM's
churn (Karras et al. 2022, Alg. 2) or an ancestral noise split around it.

A DPM-2 step from sigma_a to sigma_b evaluates at the log-midpoint sigma_m = sqrt(sigma_a sigma_b)
(lambda_a + h / 2):

    d   = (x~ - D(x~; sigma_a)) / sigma_a                    (= eps)
    x~' = x~ + (sigma_m - sigma_a) d                          (DPM-Solver-1 = Euler to sigma_m)
    x~_b = x~ + (sigma_b - sigma_a) (x~' - D(x~'; sigma_m)) / sigma_m

which is Alg. 1's x_{i+1} = (alpha_b / alpha_a) x - sigma_b (e^h - 1) eps(u, s) (its r1 = 1/2 form)
divided by alpha_b; without churn ``dpm_2`` equals velodiff's ``dpm_solver_2``. Two evaluations per step;
the final jump to sigma = 0 is one Euler step (returns D).

``dpm_2`` runs the step from the churned (x~^, sigma^) of EDM Alg. 2 lines 4-6 (``churn.py``) to
sigma_{i+1}. ``dpm_2_ancestral`` splits the move to sigma_{i+1} as Euler ancestral does (k-diffusion's
get_ancestral_step): a DPM-2 step down to sigma_down, then fresh noise of std s_noise sigma_up. Where
the split sends sigma_down to 0 before the end (eta large) the step is the Euler jump to D and, unlike
k-diffusion (which then adds none), the noise sigma_up is still added, so the sample keeps its noise
level sigma_{i+1}.

A step starting where alpha = 0 (rectified flow at t = 1: sigma infinite) is the first-order DDIM /
Euler ancestral step, one evaluation.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import SolverSpec, StepContext
from .churn import CHURN_DEFAULTS, churn
from .ddim import ddim_step
from .euler_ancestral import ancestral_split, euler_ancestral_step


def dpm2_ve(ctx: StepContext, x_ve: Tensor, x0: Tensor, sig_a: float, sig_b: float) -> Tensor:
    """One DPM-2 step in x~ from sig_a (where D = x0) to sig_b > 0; one evaluation, at sqrt(sig_a sig_b)."""
    sig_m = math.exp(0.5 * (math.log(sig_a) + math.log(sig_b)))
    t_m = float(ctx.schedule.t_from_sigma_ve(sig_m))
    a_m = float(ctx.schedule.alpha(t_m))
    x_mid = x_ve + (sig_m - sig_a) * ((x_ve - x0) / sig_a)
    d_mid = (x_mid - ctx.denoise(a_m * x_mid, t_m)) / sig_m
    return x_ve + (sig_b - sig_a) * d_mid


def dpm_2_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    if ctx.a(i) == 0.0:
        return ddim_step(ctx, i, x, state)
    c = churn(ctx, i, x)
    x0 = ctx.denoise(c.a * c.x_ve, c.t)
    a_next, s_next = ctx.a(i + 1), ctx.s(i + 1)
    if s_next == 0.0:
        return x0, x0, state
    return a_next * dpm2_ve(ctx, c.x_ve, x0, c.sig, s_next / a_next), x0, state


def dpm_2_ancestral_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    if ctx.a(i) == 0.0:
        return euler_ancestral_step(ctx, i, x, state)
    x0 = ctx.denoise(x, ctx.t(i))
    a_i, a_next, s_next = ctx.a(i), ctx.a(i + 1), ctx.s(i + 1)
    if s_next == 0.0:
        return x0, x0, state
    sig, sig_next = ctx.s(i) / a_i, s_next / a_next
    down, up = ancestral_split(sig, sig_next, float(ctx.options["eta"]))
    x_ve = x0 if down == 0.0 else dpm2_ve(ctx, x / a_i, x0, sig, down)
    # the noise of the ancestral step, also where sigma_down = 0 (eta well above 1: the step is then
    # Euler-ancestral's); k-diffusion's sample_dpm_2_ancestral adds none there (its noise line sits in
    # the DPM-2 branch), so the two agree for eta up to where sigma_down reaches 0
    if up > 0:
        assert ctx.noise is not None
        x_ve = x_ve + (float(ctx.options["s_noise"]) * up) * ctx.noise(i)
    return a_next * x_ve, x0, state


DPM_2 = SolverSpec(
    name="dpm_2",
    step=dpm_2_step,
    order=2,
    nfe_per_step=2,
    noise="gaussian",
    saves_final_eval=True,
    defaults=CHURN_DEFAULTS,
    description="k-diffusion DPM-2: DPM-Solver-2 in sigma/alpha with EDM churn (diffusers KDPM2Discrete)",
)
DPM_2_ANCESTRAL = SolverSpec(
    name="dpm_2_ancestral",
    step=dpm_2_ancestral_step,
    order=1,
    nfe_per_step=2,
    noise="gaussian",
    stochastic=True,
    saves_final_eval=True,
    defaults={"eta": 1.0, "s_noise": 1.0},
    description="k-diffusion DPM-2 ancestral (diffusers KDPM2AncestralDiscrete)",
)

__all__ = ["DPM_2", "DPM_2_ANCESTRAL", "dpm2_ve"]
