"""DDIM (Song et al. 2021, Eq. 12), which is also Euler's method on the probability-flow ODE
in the noise level sigma/alpha (Karras et al. 2022, Alg. 1 without the correction).

    x_{i+1} = alpha_{i+1} x0 + sqrt(sigma_{i+1}^2 - c^2) eps + c z,
    c = eta * sigma_{i+1} * sqrt(1 - exp(-2 h)),   h = lambda_{i+1} - lambda_i.

c is DDIM's sigma_t(eta) written in log-SNR so it holds for any schedule: for VP it equals
eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}); eta = 1 is DDPM's
ancestral step (Ho et al. 2020, Eq. 6-7) and eta = 0 the deterministic DDIM/Euler step.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import SolverSpec, StepContext


def ddim_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    a_next, s_next = ctx.a(i + 1), ctx.s(i + 1)
    if s_next == 0.0:
        return x0, x0, state
    eps = (x - ctx.a(i) * ctx.renoise_x0(x0)) / ctx.s(i)  # CFG++ renoises with another x0
    eta = float(ctx.options.get("eta", 0.0))
    c = eta * s_next * math.sqrt(-math.expm1(-2.0 * ctx.h(i))) if eta > 0 else 0.0
    x_next = a_next * x0 + math.sqrt(max(s_next**2 - c**2, 0.0)) * eps
    if c > 0:
        assert ctx.noise is not None
        x_next = x_next + c * ctx.noise(i)
    return x_next, x0, state


DDIM = SolverSpec(
    name="ddim",
    step=ddim_step,
    order=1,
    defaults={"eta": 0.0},
    noise="gaussian",
    renoises=True,
    description="DDIM (Song et al. 2021); eta=0 deterministic, eta=1 DDPM ancestral",
)
DDPM = SolverSpec(
    name="ddpm",
    step=ddim_step,
    order=1,
    defaults={"eta": 1.0},
    noise="gaussian",
    stochastic=True,
    renoises=True,
    description="DDPM ancestral sampling (Ho et al. 2020) = DDIM with eta=1",
)
