"""Euler ancestral (k-diffusion's sample_euler_ancestral; diffusers' EulerAncestralDiscreteScheduler).

In the noise level sigma = sigma(t) / alpha(t) on x~ = x / alpha(t), each step splits the move from
sigma_i to sigma_{i+1} into a deterministic Euler step down to sigma_down and fresh noise of
std sigma_up back up to sigma_{i+1} (k-diffusion's get_ancestral_step):

    sigma_up   = min(sigma_{i+1}, eta sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2))
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    d          = (x~_i - x0) / sigma_i                      (= eps)
    x~_{i+1}   = x~_i + (sigma_down - sigma_i) d + s_noise sigma_up z

With eta = 1 this is DDPM's ancestral step (Ho et al. 2020) and equals velodiff's ``ddpm``; with
eta = 0 it is the deterministic Euler/DDIM step. Written as x~_i + (sigma_down - sigma_i) d =
x0 + sigma_down eps, the step stays finite where alpha(t_i) = 0 (sigma_i = inf: flow at t = 1).
The final jump to sigma = 0 returns x0 and draws no noise.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import SolverSpec, StepContext


def ancestral_split(sig_from: float, sig_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sig_from to sig_to (k-diffusion's
    get_ancestral_step, in sigma / alpha; sig_from may be inf)."""
    if eta <= 0 or sig_to == 0.0:
        return sig_to, 0.0
    frac = -math.expm1(2.0 * (math.log(sig_to) - math.log(sig_from)))  # 1 - (sig_to / sig_from)^2
    up = min(sig_to, eta * sig_to * math.sqrt(max(frac, 0.0)))
    return math.sqrt(max(sig_to**2 - up**2, 0.0)), up


def euler_ancestral_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    a_next, s_next = ctx.a(i + 1), ctx.s(i + 1)
    if s_next == 0.0:
        return x0, x0, state
    eta, s_noise = float(ctx.options["eta"]), float(ctx.options["s_noise"])
    eps = (x - ctx.a(i) * x0) / ctx.s(i)
    sig_next = s_next / a_next
    # (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2 = 1 - exp(-2 h), finite also for sigma_i = inf.
    sig_up = min(sig_next, eta * sig_next * math.sqrt(-math.expm1(-2.0 * ctx.h(i))))
    sig_down = math.sqrt(max(sig_next**2 - sig_up**2, 0.0))
    x_ve_next = x0 + sig_down * eps
    if sig_up > 0:
        assert ctx.noise is not None
        x_ve_next = x_ve_next + (s_noise * sig_up) * ctx.noise(i)
    return a_next * x_ve_next, x0, state


EULER_ANCESTRAL = SolverSpec(
    name="euler_ancestral",
    step=euler_ancestral_step,
    order=1,
    noise="gaussian",
    stochastic=True,
    defaults={"eta": 1.0, "s_noise": 1.0},
    description="Euler ancestral (k-diffusion sample_euler_ancestral; diffusers EulerAncestralDiscrete)",
)
