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
* ``interp="t"``: v = t, the paper's time-AB ("tAB"; Eq. 15 as written);
* ``interp="vp_t"``: v = the time of the VP-SDE with linear beta(t) fitted so that rho(1e-3) = 0.002 and
  rho(1) = 80 (EDM's range), t(rho) = (sqrt(beta_min^2 + 2 beta_d log(1 + rho^2)) - beta_min) / beta_d:
  the 'tab' DEIS of Zhang & Chen's code as diff-solvers (Zhou et al. 2024) and ComfyUI's ``deis`` sampler
  run it on any model's sigmas (they integrate with a 10 000-point Riemann sum in t, this with the
  quadrature below: ~1e-4 relative apart in the coefficients).

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
INTERPS = ("log_rho", "t", "vp_t")
#: the VP-SDE behind interp="vp_t" (diff-solvers' edm2t: epsilon_s = 1e-3, sigma_min = 0.002, sigma_max = 80)
_EPS_S, _RHO_MIN, _RHO_MAX = 1e-3, 0.002, 80.0
VP_BETA_D = 2 * (np.log1p(_RHO_MIN**2) / _EPS_S - np.log1p(_RHO_MAX**2)) / (_EPS_S - 1)
VP_BETA_MIN = np.log1p(_RHO_MAX**2) - 0.5 * VP_BETA_D


def vp_time(rho: np.ndarray | float) -> np.ndarray:
    """The fitted VP-SDE's time of rho = sigma / alpha: log(1 + rho^2) = beta_min t + beta_d t^2 / 2."""
    return (np.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * np.log1p(np.square(rho))) - VP_BETA_MIN) / VP_BETA_D


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
    elif interp == "vp_t":
        v = vp_time(np.exp(-lam))
        nodes = [float(vp_time(np.exp(-ctx.lam(i - j)))) for j in range(order)]
    else:
        raise unknown_name("DEIS interp", interp, INTERPS)
    return lagrange_integrals(nodes, v, drho)


def deis_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    eps = (x - ctx.a(i) * x0) / ctx.s(i)
    epss = (*(state or ()), eps)[-int(ctx.options["order"]) :]
    if ctx.ends_at_zero(i) or ctx.a(i) == 0.0:  # (from pure noise, lambda = -inf: DDIM's step)
        return ctx.ddim(i, x, x0), x0, epss
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
    limits={"order": (1, 3)},  # the closed forms of Eq. 15 velodiff (and diffusers) has
    description="DEIS-2 multistep exponential integrator (Zhang & Chen 2023), eps in log rho as diffusers",
)
DEIS_3 = SolverSpec(
    name="deis_3",
    step=deis_step,
    order=3,
    defaults={"order": 3, "interp": "log_rho", "lower_order_final": True},
    limits={"order": (1, 3)},  # the closed forms of Eq. 15 velodiff (and diffusers) has
    description="DEIS-3 multistep exponential integrator (Zhang & Chen 2023), eps in log rho as diffusers",
)
