"""DPM-Solver++ SDE, the second-order singlestep stochastic sampler (k-diffusion's
``sample_dpmpp_sde``; A1111's "DPM++ SDE"; diffusers' DPMSolverSDEScheduler): DPM-Solver++(2S)
(Lu et al. 2022b, Alg. 1) whose two stages each end with an ancestral noise split, the noise being
Brownian increments of one path, so a stage-one increment is part of the step's.

In sigma = sigma(t) / alpha(t) on x~ = x / alpha(t), with lambda = -log sigma, h = lambda_{i+1} -
lambda_i, the intermediate level sigma_s = sigma_i e^{-r h} (``r`` = 1/2) and (down, up) the ancestral
split of a move (k-diffusion's get_ancestral_step, ``euler_ancestral``):

    stage 1: (d1, u1) = split(sigma_i -> sigma_s)
             x~' = (d1 / sigma_i) x~_i - (d1 / sigma_i - 1) D_i + s_noise u1 W(sigma_i, sigma_s)
    stage 2: (d2, u2) = split(sigma_i -> sigma_{i+1}),  D' = (1 - 1 / (2 r)) D_i + 1 / (2 r) D(x~'; sigma_s)
             x~_{i+1} = (d2 / sigma_i) x~_i - (d2 / sigma_i - 1) D' + s_noise u2 W(sigma_i, sigma_{i+1})

each update being DPM-Solver++'s data-prediction step (Lu et al. 2022b, Eq. 9) divided by alpha, and
W(a, b) the normalized Brownian increment over [b, a] (the solver's noise source must offer
``between(t_from, t_to)``: velodiff's Brownian tree over schedule time does; k-diffusion's is over
sigma). eta = 0 is the deterministic DPM-Solver++(2S) (velodiff's ``dpmpp_2s`` for r = 1/2). Two
evaluations per step; the final jump to sigma = 0 returns D, one evaluation; a step from alpha = 0
(flow at t = 1) is an Euler ancestral step with the increment of the whole step.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..errors import VelodiffError
from .base import SolverSpec, StepContext
from .euler_ancestral import ancestral_split


def _increment(ctx: StepContext, t_from: float, t_to: float) -> Tensor:
    between = getattr(ctx.noise, "between", None)
    if between is None:
        raise VelodiffError(
            "dpmpp_sde draws Brownian increments over part of a step: its noise source needs a method "
            "between(t_from, t_to) (velodiff's BrownianNoise has one), not only noise(i)"
        )
    return between(t_from, t_to)


def _stage(x_ve: Tensor, x0: Tensor, sig: float, down: float) -> Tensor:
    """DPM-Solver++(1) from sig to down in x~ (down = 0 returns x0)."""
    if down == 0.0:
        return x0
    return (down / sig) * x_ve - math.expm1(math.log(down) - math.log(sig)) * x0


def dpmpp_sde_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    a_i, a_next, s_next = ctx.a(i), ctx.a(i + 1), ctx.s(i + 1)
    if s_next == 0.0:
        return x0, x0, state
    eta, s_noise, r = float(ctx.options["eta"]), float(ctx.options["s_noise"]), float(ctx.options["r"])
    if not 0 < r <= 1:
        raise VelodiffError(f"dpmpp_sde: r must lie in (0, 1], got {r:g}")
    sig_next = s_next / a_next
    if a_i == 0.0:  # sigma_i = inf: Euler ancestral with the whole step's increment
        down, up = ancestral_split(math.inf, sig_next, eta)
        x_ve = x0 + down * (x - a_i * x0) / ctx.s(i)
        if up > 0:
            x_ve = x_ve + (s_noise * up) * _increment(ctx, ctx.t(i), ctx.t(i + 1))
        return a_next * x_ve, x0, state
    sig = ctx.s(i) / a_i
    x_ve = x / a_i
    sig_s = sig * math.exp(-r * (math.log(sig) - math.log(sig_next)))
    t_s = float(ctx.schedule.t_from_sigma_ve(sig_s))
    # Stage 1: to sigma_s, with its share of the noise.
    down, up = ancestral_split(sig, sig_s, eta)
    x_s = _stage(x_ve, x0, sig, down)
    if up > 0:
        x_s = x_s + (s_noise * up) * _increment(ctx, ctx.t(i), t_s)
    x0_s = ctx.denoise(float(ctx.schedule.alpha(t_s)) * x_s, t_s)
    # Stage 2: the whole step with the combined prediction.
    fac = 1.0 / (2.0 * r)
    down, up = ancestral_split(sig, sig_next, eta)
    x_ve = _stage(x_ve, (1.0 - fac) * x0 + fac * x0_s, sig, down)
    if up > 0:
        x_ve = x_ve + (s_noise * up) * _increment(ctx, ctx.t(i), ctx.t(i + 1))
    return a_next * x_ve, x0, state


DPMPP_SDE = SolverSpec(
    name="dpmpp_sde",
    step=dpmpp_sde_step,
    order=1,
    nfe_per_step=2,
    noise="brownian",
    stochastic=True,
    saves_final_eval=True,
    defaults={"eta": 1.0, "s_noise": 1.0, "r": 0.5},
    description="DPM-Solver++ SDE, 2nd-order singlestep with Brownian noise (k-diffusion sample_dpmpp_sde)",
)

__all__ = ["DPMPP_SDE"]
