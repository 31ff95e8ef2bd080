"""LCM sampling: multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1;
Luo et al. 2023, "Latent Consistency Models", Alg. 3; ComfyUI's ``lcm`` sampler).

Each step takes the model's clean prediction and noises it afresh to the next level:

    x0 = D(x_i, t_i),    x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z,    z ~ N(0, I)

so the sample keeps nothing of x_i but what x0 carries (a consistency model's f(x, t) maps any point
of a trajectory to its origin). The final jump to t = 0 returns x0.

On a discrete schedule x0 is the consistency function of diffusers' LCMScheduler (and of the students
``velodiff distill lcm`` trains): f = c_skip(k) x_i + c_out(k) F(x_i, t) at the integer timestep k, with
c_skip = sd^2 / ((s k)^2 + sd^2), c_out = s k / sqrt((s k)^2 + sd^2), sd = 0.5 and ``timestep_scaling``
s = 10 (option ``boundary=False`` leaves F as it is; at k >= 1 the two differ by under 0.3%). With the
``lcm`` grid (LCMScheduler's timesteps) and the same noise the steps are LCMScheduler.step's.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..schedules import DiscreteVP
from .base import SolverSpec, StepContext

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(
    k: Any, sigma_data: float = SIGMA_DATA, scaling: float = TIMESTEP_SCALING
) -> tuple[Any, Any]:
    """diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete at integer timesteps k (a
    number or a tensor): c_skip = sd^2 / ((s k)^2 + sd^2), c_out = s k / sqrt((s k)^2 + sd^2)."""
    sk = k * scaling
    c_skip = sigma_data**2 / (sk**2 + sigma_data**2)
    c_out = sk / (sk**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if ctx.options.get("boundary", True) and isinstance(ctx.schedule, DiscreteVP):
        k = round(float(ctx.schedule.timestep(ctx.t(i))))  # diffusers' integer timestep
        scaling = float(ctx.options.get("timestep_scaling", TIMESTEP_SCALING))
        c_skip, c_out = boundary_scalings(k, scaling=scaling)
        x0 = c_skip * x + c_out * x0
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
    defaults={"boundary": True, "timestep_scaling": TIMESTEP_SCALING},
    description="LCM / consistency multistep sampling: x0, then fresh noise to the next level",
)

__all__ = ["LCM"]
