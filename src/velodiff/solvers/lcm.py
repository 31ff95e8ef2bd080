"""LCM sampling: multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1;
Luo et al. 2023, "Latent Consistency Models", Alg. 3; ComfyUI's ``lcm`` sampler).

Each step takes the model's clean prediction and noises it afresh to the next level:

    x0 = D(x_i, t_i),    x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z,    z ~ N(0, I)

so the sample keeps nothing of x_i but what x0 carries (a consistency model's f(x, t) maps any point
of a trajectory to its origin). The final jump to t = 0 returns x0. diffusers' LCMScheduler also
mixes x_i into x0 with the consistency boundary condition c_skip(t) x_i + c_out(t) F(x_i, t); that
is part of an LCM network's parametrization (its denoiser), not of the sampler.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import SolverSpec, StepContext


def lcm_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if ctx.ends_at_zero(i):
        return x0, x0, state
    assert ctx.noise is not None
    return ctx.a(i + 1) * x0 + ctx.s(i + 1) * ctx.noise(i), x0, state


LCM = SolverSpec(
    name="lcm",
    step=lcm_step,
    order=1,
    noise="gaussian",
    stochastic=True,
    description="LCM / consistency multistep sampling: x0, then fresh noise to the next level",
)

__all__ = ["LCM"]
