"""DPM-Solver++ multistep, data-prediction form (Lu et al. 2022, 'DPM-Solver++', Alg. 2).

With h_i = lambda_{i+1} - lambda_i and r_i = h_{i-1} / h_i:

    D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1}                      (2M)
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i

The first step has no history and is first order (DDIM). The final jump to t = 0 (h = inf) is
first order too and returns x0; ``lower_order_final`` also lowers the last steps for short
grids, as diffusers does below 15 steps.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .base import SolverSpec, StepContext


def _lower_order_final(ctx: StepContext, i: int, order: int) -> int:
    """diffusers' rule: near the end of grids shorter than 15 steps, use lower orders."""
    if ctx.ends_at_zero(i):
        return 1
    if ctx.options.get("lower_order_final", True) and ctx.steps < 15:
        order = min(order, ctx.steps - i)
    return order


def dpmpp_2m_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if ctx.ends_at_zero(i):
        return x0, x0, (x0,)
    h = ctx.h(i)
    order = _lower_order_final(ctx, i, 2 if state else 1)
    d = x0
    if order == 2:
        (x0_prev,) = state
        r = ctx.h(i - 1) / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    x_next = (ctx.s(i + 1) / ctx.s(i)) * x - ctx.a(i + 1) * math.expm1(-h) * d
    return x_next, x0, (x0,)


DPMPP_2M = SolverSpec(
    name="dpmpp_2m",
    step=dpmpp_2m_step,
    order=2,
    defaults={"lower_order_final": True},
    description="DPM-Solver++(2M), multistep data prediction (Lu et al. 2022b, Alg. 2)",
)
