"""DPM-Solver++ multistep, data-prediction form (Lu et al. 2022b, 'DPM-Solver++', Alg. 2 and App. B).

With h_i = lambda_{i+1} - lambda_i and r_i = h_{i-1} / h_i:

    D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1}                      (2M)
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i

``solver_type="heun"`` (diffusers' flag) weights the difference by the exact integral of a linear x0
instead: x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) x0_i + alpha_{i+1} phi_2 D1_0
(phi_2 and D1_0 as below); both are second order. "midpoint" (default) is the form above.

3M adds a second divided difference. With r0 = h_{i-1} / h_i, r1 = h_{i-2} / h_i,

    D1_0 = (x0_i - x0_{i-1}) / r0,   D1_1 = (x0_{i-1} - x0_{i-2}) / r1
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)            (= h x0'(lambda_i) + O(h^3))
    D2 = 2 (D1_0 - D1_1) / (r0 + r1)                    (= h^2 x0''(lambda_i) + O(h^3))
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) x0_i
              + alpha_{i+1} phi_2 D1 - alpha_{i+1} phi_3 D2,
    phi_2 = (e^{-h} - 1) / h + 1,   phi_3 = (e^{-h} - 1 + h) / h^2 - 1/2,

the third-order Taylor expansion of the exact solution x_{i+1} = (sigma_{i+1} / sigma_i) x_i +
sigma_{i+1} int e^lambda x0(lambda) dlambda (Lu et al. 2022b, Eq. 9). The reference code (DPM-Solver's
multistep_dpm_solver_third_update, diffusers' DPMSolverMultistepScheduler solver_order=3, and
k-diffusion) uses D2 without the factor 2, i.e. half the x0'' term; its step is then only second-order
accurate and the method converges at order 2 (measured on the oracle: slope 2.0 against 3.0 with the
factor). ``variant="diffusers"`` reproduces it exactly; the default ``"taylor"`` is third order.

Warm-up: a step uses the history it has (its exact part: ``base.usable_order``), so the first
step is first order (DDIM) and the second of 3M is 2M. The final jump to t = 0 (h = inf) is first
order too and returns x0;
``lower_order_final`` also lowers the last steps of grids shorter than 15 steps (3M: the last two
to orders 2 and 1), as diffusers does. A first step from alpha = 0 (h_0 = inf) is harmless: the
later ratios r = inf make its difference terms vanish.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..errors import unknown_name
from .base import SolverSpec, StepContext, lower_order_final

#: variants of the 3M step: the factor on its second divided difference D2 (see the docstring)
D2_FACTORS = {"taylor": 2.0, "diffusers": 1.0}


def dpmpp_2m_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if ctx.ends_at_zero(i):
        return x0, x0, (x0,)
    h = ctx.h(i)
    order = lower_order_final(ctx, i, 2 if state else 1)
    d = x0
    kind = ctx.options.get("solver_type", "midpoint")
    if kind not in ("midpoint", "heun"):
        raise unknown_name("solver_type", kind, ("heun", "midpoint"))
    heun = kind == "heun"
    if order == 2 and not heun:
        (x0_prev,) = state
        r = ctx.h(i - 1) / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    x_next = (ctx.s(i + 1) / ctx.s(i)) * x - ctx.a(i + 1) * math.expm1(-h) * d
    if order == 2 and heun:  # diffusers' solver_type="heun": + alpha phi_2 D1_0, phi_2 = (e^-h - 1) / h + 1
        x_next = x_next + ctx.a(i + 1) * (math.expm1(-h) / h + 1.0) * (x0 - state[0]) * (h / ctx.h(i - 1))
    return x_next, x0, (x0,)


def dpmpp_3m_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    d2_factor = _d2_factor(ctx)
    x0 = ctx.denoise(x, ctx.t(i))
    hist = (x0, *(state or ()))  # x0_i, x0_{i-1}, x0_{i-2}
    if ctx.ends_at_zero(i):
        return x0, x0, hist[:2]
    h, a_next = ctx.h(i), ctx.a(i + 1)
    order = lower_order_final(ctx, i, len(hist))
    phi_1 = math.expm1(-h)
    x_next = (ctx.s(i + 1) / ctx.s(i)) * x - a_next * phi_1 * x0
    if order >= 2:
        r0 = ctx.h(i - 1) / h
        d1_0 = (x0 - hist[1]) / r0
        if order == 2:  # 2M
            x_next = x_next - 0.5 * a_next * phi_1 * d1_0
        else:
            r1 = ctx.h(i - 2) / h
            d1_1 = (hist[1] - hist[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = d2_factor * (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = (phi_1 + h) / h**2 - 0.5
            x_next = x_next + a_next * (phi_2 * d1 - phi_3 * d2)
    return x_next, x0, hist[:2]


def _d2_factor(ctx: StepContext, variants: dict[str, float] = D2_FACTORS) -> float:
    variant = ctx.options["variant"]
    if variant not in variants:
        raise unknown_name("variant", variant, variants)
    return variants[variant]


DPMPP_2M = SolverSpec(
    name="dpmpp_2m",
    step=dpmpp_2m_step,
    order=2,
    defaults={"lower_order_final": True, "solver_type": "midpoint"},
    description="DPM-Solver++(2M), multistep data prediction (Lu et al. 2022b, Alg. 2)",
)
DPMPP_3M = SolverSpec(
    name="dpmpp_3m",
    step=dpmpp_3m_step,
    order=3,
    defaults={"lower_order_final": True, "variant": "taylor"},
    description="DPM-Solver++(3M), multistep data prediction (Lu et al. 2022b, App. B; diffusers order 3)",
)
