"""Euler's method on the probability-flow ODE with optional churn (Karras et al. 2022, Alg. 2 with
Euler steps; k-diffusion's ``sample_euler``; diffusers' EulerDiscreteScheduler with ``s_churn``).

Without churn this is the DDIM step (``ddim.py``; Song et al. 2021, Eq. 12 = Euler in sigma / alpha,
EDM Eq. 4 with s = 1), and ``eta`` keeps DDIM's stochastic form. With ``s_churn > 0`` a step first
raises the noise level to sigma^ (``churn.py``, Alg. 2 lines 4-6), then takes one Euler step of
dx~/dsigma = (x~ - D(x~; sigma)) / sigma from sigma^ to sigma_{i+1} (line 7-8):

    x~_{i+1} = x~^ + (sigma_{i+1} - sigma^) (x~^ - D(x~^; sigma^)) / sigma^

Churn and eta are two ways to inject noise; a step takes one of them, not both. The final jump to
sigma = 0 returns D(x~^; sigma^).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import VelodiffError
from .base import SolverSpec, StepContext
from .churn import CHURN_DEFAULTS, churn
from .ddim import ddim_step


def euler_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    if float(ctx.options["s_churn"]) <= 0 or ctx.a(i) == 0.0:
        return ddim_step(ctx, i, x, state)
    if float(ctx.options["eta"]) > 0:
        raise VelodiffError("euler: give eta (DDIM noise) or s_churn (EDM churn), not both")
    c = churn(ctx, i, x)
    x0 = ctx.denoise(c.a * c.x_ve, c.t)
    a_next, s_next = ctx.a(i + 1), ctx.s(i + 1)
    if s_next == 0.0:
        return x0, x0, state
    d = (c.x_ve - x0) / c.sig
    return a_next * (c.x_ve + (s_next / a_next - c.sig) * d), x0, state


EULER = SolverSpec(
    name="euler",
    step=euler_step,
    order=1,
    defaults={"eta": 0.0, **CHURN_DEFAULTS},
    noise="gaussian",
    renoises=True,
    description="Euler on the probability-flow ODE in sigma/alpha (= DDIM; flow Euler); churn as EDM Alg. 2",
)

__all__ = ["EULER", "euler_step"]
