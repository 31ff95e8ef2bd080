"""Singlestep DPM-Solver-1/2/3 (Lu et al. 2022, 'DPM-Solver', noise prediction) and
DPM-Solver++(2S) (Lu et al. 2022b, 'DPM-Solver++', data prediction).

With h = lambda_{i+1} - lambda_i, eps_0 = eps(x_i, t_i) and x0_0 = x0(x_i, t_i), a step of order k
spends k evaluations: k - 1 at intermediate times s_j = t_lambda(lambda_i + r_j h) (the schedule's
exact inverse of log-SNR, Sec. 3.1) and one at t_i.

DPM-Solver-1 (Eq. 3.7, = DDIM):
    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} (e^h - 1) eps_0

DPM-Solver-2 (Alg. 1, r1 = 0.5):
    u   = (alpha_s / alpha_i) x_i - sigma_s (e^{r1 h} - 1) eps_0
    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} (e^h - 1) eps_0
              - sigma_{i+1} / (2 r1) (e^h - 1) (eps(u, s) - eps_0)

DPM-Solver-3 (Alg. 2, r1 = 1/3, r2 = 2/3):
    u1  = (alpha_s1 / alpha_i) x_i - sigma_s1 (e^{r1 h} - 1) eps_0,           D1 = eps(u1, s1) - eps_0
    u2  = (alpha_s2 / alpha_i) x_i - sigma_s2 (e^{r2 h} - 1) eps_0
          - sigma_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) D1,               D2 = eps(u2, s2) - eps_0
    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} (e^h - 1) eps_0
              - sigma_{i+1} / r2 ((e^h - 1) / h - 1) D2

DPM-Solver++(2S) (Alg. 1 of 2022b, r1 = 0.5):
    u   = (sigma_s / sigma_i) x_i - alpha_s (e^{-r1 h} - 1) x0_0
    D   = (1 - 1 / (2 r1)) x0_0 + 1 / (2 r1) x0(u, s)
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D

Options: ``r1`` (and ``r2`` for order 3, r1 < r2 <= 1) place the intermediate times; each is a number
or one number per step, the final jump's unused (so a grid whose intermediate points are prescribed,
e.g. diffusers' DPMSolverSinglestep timesteps, can be reproduced exactly).

DPM-Solver-3's ``variant="diffusers"`` computes u2 as diffusers' DPMSolverSinglestepScheduler
(solver_type="midpoint") does: its 2nd-order singlestep update from x_i through u1, coefficient
0.5 sigma_s2 (r2 / r1) (e^{r2 h} - 1) on D1; the default "paper" is Alg. 2. Both are third order;
they differ by O(h^4) per step.

Boundary steps:

* the final jump to t = 0 (h = inf) is first order and returns x0(x_i, t_i), one evaluation, as
  diffusers does (its singlestep order plan ends with order 1 for final_sigmas_type="zero");
* a step starting where alpha = 0 (lambda = -inf: rectified flow at t = 1) has no finite
  intermediate log-SNR; it is the first-order (DDIM) step x_{i+1} = alpha_{i+1} x0_0 +
  sigma_{i+1} eps_0, one evaluation. Its error, alpha_{i+1} times the change of x0 over the step,
  is small with alpha_{i+1}, and the observed orders hold (tests/test_dpm_solver.py).

``sample()`` counts the evaluations actually made. ``SolverSpec.nfe`` knows only that the final jump
saves one evaluation: exact for order 2; for order 3 it counts one more than is made, and a start at
alpha = 0 saves k - 1 more.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..errors import VelodiffError, unknown_name
from .base import SolverSpec, StepContext

VARIANTS = ("paper", "diffusers")


def _r(ctx: StepContext, name: str, i: int, lo: float = 0.0) -> float:
    """Option ``name`` for step i: a number, or a sequence with one number per step; in (lo, 1]."""
    r = ctx.options[name]
    if not isinstance(r, (int, float)):
        if len(r) != ctx.steps:
            raise VelodiffError(f"option {name!r} has {len(r)} values for {ctx.steps} steps")
        r = r[i]
    if not lo < float(r) <= 1.0:
        raise VelodiffError(f"option {name!r} must lie in ({lo:g}, 1], got {float(r):g} at step {i}")
    return float(r)


def _at(ctx: StepContext, lam: float) -> tuple[float, float, float]:
    """(t, alpha, sigma) at log-SNR lam: an intermediate time of a singlestep solver."""
    t = ctx.schedule.t_from_log_snr(lam)
    return float(t), float(ctx.schedule.alpha(t)), float(ctx.schedule.sigma(t))


def _eps(ctx: StepContext, x: Tensor, t: float, a: float, s: float) -> Tensor:
    return (x - a * ctx.denoise(x, t)) / s


def _boundary(ctx: StepContext, i: int, x: Tensor, x0: Tensor) -> Tensor | None:
    """The first-order step where h is infinite (the jump to t = 0, or a start at alpha = 0)."""
    if ctx.ends_at_zero(i) or not math.isfinite(ctx.h(i)):
        return ctx.ddim(i, x, x0)
    return None


def dpm_solver_1_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if (x_b := _boundary(ctx, i, x, x0)) is not None:
        return x_b, x0, state
    a, h = ctx.a(i), ctx.h(i)
    eps0 = (x - a * x0) / ctx.s(i)
    return (ctx.a(i + 1) / a) * x - ctx.s(i + 1) * math.expm1(h) * eps0, x0, state  # Eq. 3.7


def dpm_solver_2_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if (x_b := _boundary(ctx, i, x, x0)) is not None:
        return x_b, x0, state
    a, h, r1 = ctx.a(i), ctx.h(i), _r(ctx, "r1", i)
    eps0 = (x - a * x0) / ctx.s(i)
    t1, a1, s1 = _at(ctx, ctx.lam(i) + r1 * h)
    u = (a1 / a) * x - s1 * math.expm1(r1 * h) * eps0
    d1 = _eps(ctx, u, t1, a1, s1) - eps0
    s_next, phi1 = ctx.s(i + 1), math.expm1(h)
    x_next = (ctx.a(i + 1) / a) * x - s_next * phi1 * eps0 - s_next / (2 * r1) * phi1 * d1
    return x_next, x0, state


def dpm_solver_3_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    if ctx.options["variant"] not in VARIANTS:
        raise unknown_name("variant", ctx.options["variant"], VARIANTS)
    x0 = ctx.denoise(x, ctx.t(i))
    if (x_b := _boundary(ctx, i, x, x0)) is not None:
        return x_b, x0, state
    a, lam, h = ctx.a(i), ctx.lam(i), ctx.h(i)
    r1 = _r(ctx, "r1", i)
    r2 = _r(ctx, "r2", i, lo=r1)
    eps0 = (x - a * x0) / ctx.s(i)
    t1, a1, s1 = _at(ctx, lam + r1 * h)
    u1 = (a1 / a) * x - s1 * math.expm1(r1 * h) * eps0
    d1 = _eps(ctx, u1, t1, a1, s1) - eps0
    t2, a2, s2 = _at(ctx, lam + r2 * h)
    if ctx.options["variant"] == "diffusers":  # its 2nd-order singlestep update from x_i to s2
        c = 0.5 * (r2 / r1) * s2 * math.expm1(r2 * h)
    else:  # Alg. 2
        c = (r2 / r1) * s2 * (math.expm1(r2 * h) / (r2 * h) - 1.0)
    u2 = (a2 / a) * x - s2 * math.expm1(r2 * h) * eps0 - c * d1
    d2 = _eps(ctx, u2, t2, a2, s2) - eps0
    s_next, phi1 = ctx.s(i + 1), math.expm1(h)
    x_next = (ctx.a(i + 1) / a) * x - s_next * phi1 * eps0 - s_next / r2 * (phi1 / h - 1.0) * d2
    return x_next, x0, state


def dpmpp_2s_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    if (x_b := _boundary(ctx, i, x, x0)) is not None:
        return x_b, x0, state
    s, h, r1 = ctx.s(i), ctx.h(i), _r(ctx, "r1", i)
    t1, a1, s1 = _at(ctx, ctx.lam(i) + r1 * h)
    u = (s1 / s) * x - a1 * math.expm1(-r1 * h) * x0
    d = (1 - 1 / (2 * r1)) * x0 + 1 / (2 * r1) * ctx.denoise(u, t1)
    return (ctx.s(i + 1) / s) * x - ctx.a(i + 1) * math.expm1(-h) * d, x0, state


DPM_SOLVER_1 = SolverSpec(
    name="dpm_solver_1",
    step=dpm_solver_1_step,
    order=1,
    description="DPM-Solver-1, noise prediction (Lu et al. 2022, Eq. 3.7; = DDIM)",
)
DPM_SOLVER_2 = SolverSpec(
    name="dpm_solver_2",
    step=dpm_solver_2_step,
    order=2,
    nfe_per_step=2,
    saves_final_eval=True,
    defaults={"r1": 0.5},
    description="DPM-Solver-2, singlestep noise prediction (Lu et al. 2022, Alg. 1)",
)
DPM_SOLVER_3 = SolverSpec(
    name="dpm_solver_3",
    step=dpm_solver_3_step,
    order=3,
    nfe_per_step=3,
    saves_final_eval=True,
    defaults={"r1": 1.0 / 3.0, "r2": 2.0 / 3.0, "variant": "paper"},
    description="DPM-Solver-3, singlestep noise prediction (Lu et al. 2022, Alg. 2)",
)
DPMPP_2S = SolverSpec(
    name="dpmpp_2s",
    step=dpmpp_2s_step,
    order=2,
    nfe_per_step=2,
    saves_final_eval=True,
    defaults={"r1": 0.5},
    description="DPM-Solver++(2S), singlestep data prediction (Lu et al. 2022b, Alg. 1)",
)

__all__ = ["DPMPP_2S", "DPM_SOLVER_1", "DPM_SOLVER_2", "DPM_SOLVER_3"]
