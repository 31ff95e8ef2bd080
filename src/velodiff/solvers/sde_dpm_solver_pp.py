"""SDE-DPM-Solver++(2M) and (3M): multistep data-prediction solvers of the reverse diffusion SDE
(Lu et al. 2022b, 'DPM-Solver++', App. / Gonzalez et al. 2023, 'SEEDS'), as diffusers'
algorithm_type="sde-dpmsolver++" (2M) and k-diffusion's sample_dpmpp_2m_sde / sample_dpmpp_3m_sde.

With h = lambda_{i+1} - lambda_i, the variance-reduced step h_eta = (1 + eta) h and z ~ N(0, I) the
Brownian increment of the step (``noise="brownian"``), the exponential integrator of the SDE reads

    x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta h} x_i + alpha_{i+1} (1 - e^{-h_eta}) x0_i
              + [multistep correction] + s_noise sigma_{i+1} sqrt(1 - e^{-2 eta h}) z

with the corrections, r0 = h_{i-1} / h, r1 = h_{i-2} / h, D1_0 = (x0_i - x0_{i-1}) / r0:

    2M, solver_type "midpoint":  + alpha_{i+1} (1 - e^{-h_eta}) D1_0 / 2
    2M, solver_type "heun":      + alpha_{i+1} phi_2 D1_0   (diffusers' / k-diffusion's "heun")
    3M (k-diffusion):             + alpha_{i+1} (phi_2 D1 - phi_3 D2),
        phi_2 = (e^{-h_eta} - 1) / h_eta + 1,  phi_3 = phi_2 / h_eta - 1/2,
        D1_1 = (x0_{i-1} - x0_{i-2}) / r1,  D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
        D2 = 2 (D1_0 - D1_1) / (r0 + r1);  its 2nd step (one x0 of history) adds alpha_{i+1} phi_2 D1_0.

k-diffusion's D2 lacks the factor 2 (as diffusers' and DPM-Solver's 3M, see ``dpm_solver_pp``), which
halves the x0'' term and makes its eta = 0 limit second order only; ``variant="k-diffusion"``
reproduces it exactly, the default ``"taylor"`` keeps the factor (third order at eta = 0).

eta = 1 (default) is the reverse SDE of Lu et al. 2022b; eta = 0 is the deterministic DPM-Solver++
(2M exactly ``dpmpp_2m``). Written in k-diffusion's variables x~ = x / alpha, sigma~ = sigma / alpha,
the same update is k-diffusion's line for line. The first step is first order; the final jump to
t = 0 (h = inf) returns x0 and draws no noise. 2M lowers the order of the last steps of short
grids as diffusers does (``lower_order_final``); 3M does not, as k-diffusion.

Order: the multistep terms make the drift 2nd/3rd order, but the noise enters through one Brownian
increment per step, which limits pathwise (strong) convergence; ``order=1`` records that. Measured on
the oracle: the distance between a seed's paths at N and 2N steps halves or better as N doubles.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..errors import unknown_name
from .base import SolverSpec, StepContext, lower_order_final, usable_order
from .dpm_solver_pp import _d2_factor

#: the factor on 3M's D2: "taylor" is the third-order drift, "k-diffusion" reproduces sample_dpmpp_3m_sde
SDE_D2_FACTORS = {"taylor": 2.0, "k-diffusion": 1.0}


def _sde_base(ctx: StepContext, i: int, x: Tensor, x0: Tensor) -> tuple[Tensor, float, float]:
    """The first-order SDE step without noise; returns it with h_eta and eta h."""
    h, eta = ctx.h(i), float(ctx.options["eta"])
    eta_h = eta * h if eta > 0 else 0.0  # avoids 0 * inf for a first step from alpha = 0
    h_eta = h + eta_h
    x_next = (ctx.s(i + 1) / ctx.s(i)) * math.exp(-eta_h) * x - ctx.a(i + 1) * math.expm1(-h_eta) * x0
    return x_next, h_eta, eta_h


def _add_noise(ctx: StepContext, i: int, x: Tensor, eta_h: float) -> Tensor:
    if eta_h <= 0:
        return x
    assert ctx.noise is not None
    c = float(ctx.options["s_noise"]) * ctx.s(i + 1) * math.sqrt(-math.expm1(-2.0 * eta_h))
    return x + c * ctx.noise(i)


def sde_dpmpp_2m_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if ctx.ends_at_zero(i):
        return x0, x0, (x0,)
    x_next, h_eta, eta_h = _sde_base(ctx, i, x, x0)
    if lower_order_final(ctx, i, 2 if state else 1) == 2:
        d1 = (x0 - state[0]) / (ctx.h(i - 1) / ctx.h(i))
        x_next = x_next + ctx.a(i + 1) * _c1(ctx, h_eta) * d1
    return _add_noise(ctx, i, x_next, eta_h), x0, (x0,)


SOLVER_TYPES = ("midpoint", "heun")


def _c1(ctx: StepContext, h_eta: float) -> float:
    """The weight of D1_0 in 2M: "midpoint" (1 - e^{-h_eta}) / 2, or "heun" phi_2 = (e^{-h_eta} - 1) /
    h_eta + 1 (the exact integral of a linear x0; diffusers' and k-diffusion's solver_type)."""
    kind = ctx.options.get("solver_type", "midpoint")
    if kind not in SOLVER_TYPES:
        raise unknown_name("solver_type", kind, SOLVER_TYPES)
    return -0.5 * math.expm1(-h_eta) if kind == "midpoint" else math.expm1(-h_eta) / h_eta + 1.0


def sde_dpmpp_3m_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    d2_factor = _d2_factor(ctx, SDE_D2_FACTORS)
    x0 = ctx.denoise(x, ctx.t(i))
    hist = (x0, *(state or ()))  # x0_i, x0_{i-1}, x0_{i-2}
    if ctx.ends_at_zero(i):
        return x0, x0, hist[:2]
    order = usable_order(ctx, i, len(hist))
    x_next, h_eta, eta_h = _sde_base(ctx, i, x, x0)
    h, a_next = ctx.h(i), ctx.a(i + 1)
    phi_2 = math.expm1(-h_eta) / h_eta + 1.0
    if order >= 2:
        r0 = ctx.h(i - 1) / h
        d1_0 = (x0 - hist[1]) / r0
        if order == 2:
            x_next = x_next + a_next * phi_2 * d1_0
        else:
            r1 = ctx.h(i - 2) / h
            d1_1 = (hist[1] - hist[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = d2_factor * (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x_next = x_next + a_next * (phi_2 * d1 - phi_3 * d2)
    return _add_noise(ctx, i, x_next, eta_h), x0, hist[:2]


SDE_DPMPP_2M = SolverSpec(
    name="sde_dpmpp_2m",
    step=sde_dpmpp_2m_step,
    order=1,
    noise="brownian",
    stochastic=True,
    defaults={"eta": 1.0, "s_noise": 1.0, "lower_order_final": True, "solver_type": "midpoint"},
    description="SDE-DPM-Solver++(2M) (Lu et al. 2022b; diffusers sde-dpmsolver++, k-diffusion dpmpp_2m_sde)",
)
SDE_DPMPP_3M = SolverSpec(
    name="sde_dpmpp_3m",
    step=sde_dpmpp_3m_step,
    order=1,
    noise="brownian",
    stochastic=True,
    defaults={"eta": 1.0, "s_noise": 1.0, "variant": "taylor"},
    description="SDE-DPM-Solver++(3M) (k-diffusion sample_dpmpp_3m_sde; variant='k-diffusion' exactly)",
)

__all__ = ["SDE_DPMPP_2M", "SDE_DPMPP_3M"]
