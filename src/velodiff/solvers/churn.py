"""Churn: the stochastic part of Karras et al. 2022 ("EDM"), Alg. 2 lines 4-6, shared by the
single-step samplers that offer it (``heun``, ``euler``, ``dpm_2``; k-diffusion's ``s_churn``,
``s_tmin``, ``s_tmax``, ``s_noise``).

In the noise level sigma = sigma(t) / alpha(t) on x~ = x / alpha(t), before step i of N:

    gamma  = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_i <= s_tmax else 0     (l. 4)
    sigma^ = sigma_i (1 + gamma)                                                       (l. 5)
    x~^    = x~_i + sqrt(sigma^^2 - sigma_i^2) s_noise z                               (l. 6)

and the step then runs from (x~^, sigma^) instead of (x~_i, sigma_i). sigma^ is capped at the
schedule's top (t <= t_max), so churn never asks the network for a time it was not trained on; a step
that starts there draws no noise (k-diffusion does not cap: with churn on its first step it evaluates
the network above sigma_max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .base import StepContext

CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


@dataclass(frozen=True)
class Churned:
    """Where a step starts after churn: time, alpha, sigma / alpha and x / alpha."""

    t: float
    a: float
    sig: float
    x_ve: Tensor


def churn(ctx: StepContext, i: int, x: Tensor) -> Churned:
    """Lines 4-6 of Alg. 2 for step i (no noise drawn when gamma = 0). Needs alpha(t_i) > 0."""
    sched, opts = ctx.schedule, ctx.options
    a_i = ctx.a(i)
    sig = ctx.s(i) / a_i
    x_ve = x / a_i
    s_churn, s_tmin, s_tmax = float(opts["s_churn"]), float(opts["s_tmin"]), float(opts["s_tmax"])
    gamma = min(s_churn / ctx.steps, math.sqrt(2.0) - 1.0) if s_churn > 0 and s_tmin <= sig <= s_tmax else 0.0
    if gamma <= 0 or ctx.t(i) >= sched.t_max:
        return Churned(ctx.t(i), a_i, sig, x_ve)
    t_hat = min(float(sched.t_from_sigma_ve(sig * (1.0 + gamma))), sched.t_max)
    sig_hat = float(sched.sigma_ve(t_hat))
    assert ctx.noise is not None
    z = ctx.noise(i) * float(opts["s_noise"])
    x_ve = x_ve + math.sqrt(max(sig_hat**2 - sig**2, 0.0)) * z
    return Churned(t_hat, float(sched.alpha(t_hat)), sig_hat, x_ve)


__all__ = ["CHURN_DEFAULTS", "Churned", "churn"]
