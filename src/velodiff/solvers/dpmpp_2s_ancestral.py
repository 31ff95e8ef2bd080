"""DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``; A1111's "DPM++ 2S a"):
the singlestep DPM-Solver++(2S) of Lu et al. 2022b (Alg. 1, r1 = 1/2) taken down to sigma_down,
then fresh noise of std s_noise sigma_up, with k-diffusion's ancestral split of the move from
sigma_i to sigma_{i+1} (sigma = sigma(t) / alpha(t), x~ = x / alpha(t); see ``euler_ancestral``):

    h    = log(sigma_i / sigma_down),  sigma_m = sqrt(sigma_i sigma_down)      (lambda_i + h / 2)
    u    = (sigma_m / sigma_i) x~_i - (e^{-h/2} - 1) D(x~_i; sigma_i)
    x~'  = (sigma_down / sigma_i) x~_i - (e^{-h} - 1) D(u; sigma_m)            (Alg. 1 with r1 = 1/2)
    x~_{i+1} = x~' + s_noise sigma_up z

(the data-prediction update x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D of
Lu et al. 2022b, Eq. 9, divided by alpha_{i+1}). ``eta`` scales sigma_up: eta = 0 is the deterministic
``dpmpp_2s``, eta = 1 (default) the ancestral sampler. The final jump to sigma = 0 returns D, one
evaluation; a step from alpha = 0 (flow at t = 1) is an Euler ancestral step.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import SolverSpec, StepContext
from .euler_ancestral import ancestral_split, euler_ancestral_step


def dpmpp_2s_ancestral_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    if ctx.a(i) == 0.0:
        return euler_ancestral_step(ctx, i, x, state)
    x0 = ctx.denoise(x, ctx.t(i))
    a_i, a_next, s_next = ctx.a(i), ctx.a(i + 1), ctx.s(i + 1)
    if s_next == 0.0:
        return x0, x0, state
    sig, sig_next = ctx.s(i) / a_i, s_next / a_next
    down, up = ancestral_split(sig, sig_next, float(ctx.options["eta"]))
    x_ve = x / a_i
    if down == 0.0:
        x_ve = x0
    else:
        h = math.log(sig) - math.log(down)
        sig_m = sig * math.exp(-0.5 * h)
        t_m = float(ctx.schedule.t_from_sigma_ve(sig_m))
        u = (sig_m / sig) * x_ve - math.expm1(-0.5 * h) * x0
        x0_m = ctx.denoise(float(ctx.schedule.alpha(t_m)) * u, t_m)
        x_ve = (down / sig) * x_ve - math.expm1(-h) * x0_m
    if up > 0:
        assert ctx.noise is not None
        x_ve = x_ve + (float(ctx.options["s_noise"]) * up) * ctx.noise(i)
    return a_next * x_ve, x0, state


DPMPP_2S_ANCESTRAL = SolverSpec(
    name="dpmpp_2s_ancestral",
    step=dpmpp_2s_ancestral_step,
    order=1,
    nfe_per_step=2,
    noise="gaussian",
    stochastic=True,
    saves_final_eval=True,
    defaults={"eta": 1.0, "s_noise": 1.0},
    description="DPM-Solver++(2S) ancestral (k-diffusion sample_dpmpp_2s_ancestral; eta=0 is dpmpp_2s)",
)

__all__ = ["DPMPP_2S_ANCESTRAL"]
