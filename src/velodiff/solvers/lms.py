"""Linear multistep (k-diffusion's ``sample_lms``; diffusers' LMSDiscreteScheduler): variable-step
Adams-Bashforth in rho = sigma / alpha (k-diffusion's sigma), where d(x / alpha) = eps drho:

    x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_j C_j eps_{i-j}),
    C_j = int_{rho_i}^{rho_{i+1}} l_j(rho) drho,

l_j the Lagrange basis through rho_i, rho_{i-1}, ... (k-diffusion's ``linear_multistep_coeff``). The
integrand is a polynomial, so Gauss-Legendre with ``order`` points gives C_j exactly (k-diffusion and
diffusers use scipy.integrate.quad, which is exact for it too). Order 4 by default with lower-order
warm-up, and, like both references, the last step integrates down to rho = 0 with the polynomial
instead of returning x0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from .base import SolverSpec, StepContext, usable_order
from .deis import lagrange_integrals


def lms_coefficients(ctx: StepContext, i: int, order: int) -> list[float]:
    rhos = [ctx.s(i - j) / ctx.a(i - j) for j in range(order)]
    rho_next = ctx.s(i + 1) / ctx.a(i + 1)
    u, w = np.polynomial.legendre.leggauss(order)
    rho = 0.5 * (rho_next + rhos[0]) + 0.5 * (rho_next - rhos[0]) * u
    return lagrange_integrals(rhos, rho, 0.5 * (rho_next - rhos[0]) * w)


def lms_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    eps = (x - ctx.a(i) * x0) / ctx.s(i)
    epss = (*(state or ()), eps)[-int(ctx.options["order"]) :]
    if ctx.a(i) == 0.0:  # pure noise (a flow's t = 1): rho is infinite, the first step is DDIM's
        return ctx.ddim(i, x, x0), x0, epss
    k = usable_order(ctx, i, len(epss))
    coeffs = lms_coefficients(ctx, i, k)
    eps_sum = sum(c * e for c, e in zip(coeffs, reversed(epss[-k:]), strict=True))
    x_next = ctx.a(i + 1) * (x / ctx.a(i) + eps_sum)
    return x_next, x0, epss


LMS = SolverSpec(
    name="lms",
    step=lms_step,
    order=4,
    defaults={"order": 4},
    description="Linear multistep in sigma/alpha (k-diffusion sample_lms, diffusers LMSDiscrete), order 4",
)
