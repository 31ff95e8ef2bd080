"""DEIS multistep (Zhang & Chen 2023, 'Fast Sampling of Diffusion Models with Exponential Integrator',
Eq. 14-15): an exponential integrator with eps extrapolated by a Lagrange polynomial through the last
``order`` evaluations.

For x_t = alpha x0 + sigma eps, the probability-flow ODE is d(x / alpha) = eps drho with
rho = sigma / alpha, so Eq. 14-15 read

    x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_j C_j eps_{i-j}),
    C_j = int_{rho_i}^{rho_{i+1}} l_j(v(rho)) drho,

where l_j is the Lagrange basis through the nodes v_{i-j} and v is the variable eps is interpolated in:

* ``interp="log_rho"`` (default): v = log rho = -lambda. This is what diffusers' DEISMultistepScheduler
  (algorithm_type "deis", its "log-rho" closed forms) integrates, so defaults give parity with it;
* ``interp="t"``: v = t, the paper's time-AB ("tAB"; Eq. 15 as written).

C_j is computed by 20-point Gauss-Legendre quadrature in lambda (drho = -e^-lambda dlambda); for
log_rho the integrand is e^-lambda times a polynomial, so this is exact to rounding at any practical
step size. ``order`` counts the evaluations used (diffusers' solver_order; a polynomial of degree r
uses r + 1 of them). Warm-up uses lower orders; ``lower_order_final`` lowers the last
steps of grids shorter than 15 steps, as diffusers does. diffusers' grids end at t_min; a final jump
to t = 0 returns x0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import unknown_name
from .base import SolverSpec, StepContext, lower_order_final

_GAUSS = np.polynomial.legendre.leggauss(20)
INTERPS = ("log_rho", "t")


def lagrange_integrals(nodes: Sequence[float], v: np.ndarray, w: np.ndarray) -> list[float]:
    """sum_q w_q l_j(v_q) for each Lagrange basis polynomial l_j through ``nodes``: the quadrature
    (points v, weights w) of int l_j."""
    out = []
    for j, vj in enumerate(nodes):
        ell = np.ones_like(v)
        for m, vm in enumerate(nodes):
            if m != j:
                ell = ell * (v - vm) / (vj - vm)
        out.append(float(np.sum(w * ell)))
    return out


def deis_coefficients(ctx: StepContext, i: int, order: int, interp: str) -> list[float]:
    """C_j, j = 0..order-1, for the step t_i -> t_{i+1} (Eq. 15 in rho, VP form)."""
    lam_i, lam_n = ctx.lam(i), ctx.lam(i + 1)
    u, w = _GAUSS
    lam = 0.5 * (lam_n + lam_i) + 0.5 * (lam_n - lam_i) * u
    drho = -np.exp(-lam) * 0.5 * (lam_n - lam_i) * w
    if interp == "log_rho":
        v, nodes = -lam, [-ctx.lam(i - j) for j in range(order)]
    elif interp == "t":
        v = ctx.schedule.t_from_log_snr(lam).numpy()
        nodes = [ctx.t(i - j) for j in range(order)]
    else:
        raise unknown_name("DEIS interp", interp, INTERPS)
    return lagrange_integrals(nodes, v, drho)


def deis_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    eps = (x - ctx.a(i) * x0) / ctx.s(i)
    epss = (*(state or ()), eps)[-int(ctx.options["order"]) :]
    if ctx.ends_at_zero(i):
        return x0, x0, epss
    p = lower_order_final(ctx, i, len(epss))
    coeffs = deis_coefficients(ctx, i, p, ctx.options["interp"])  # Eq. 15
    eps_sum = sum(c * e for c, e in zip(coeffs, reversed(epss[-p:]), strict=True))
    x_next = ctx.a(i + 1) * (x / ctx.a(i) + eps_sum)  # Eq. 14
    return x_next, x0, epss


DEIS = SolverSpec(
    name="deis",
    step=deis_step,
    order=2,
    defaults={"order": 2, "interp": "log_rho", "lower_order_final": True},
    description="DEIS-2 multistep exponential integrator (Zhang & Chen 2023), eps in log rho as diffusers",
)
DEIS_3 = SolverSpec(
    name="deis_3",
    step=deis_step,
    order=3,
    defaults={"order": 3, "interp": "log_rho", "lower_order_final": True},
    description="DEIS-3 multistep exponential integrator (Zhang & Chen 2023), eps in log rho as diffusers",
)
