"""DPM-Solver-fast and DPM-Solver-12 / 23 adaptive (Lu et al. 2022, "DPM-Solver", Sec. 3.4 and
App. C; k-diffusion's ``sample_dpm_fast`` and ``sample_dpm_adaptive``, A1111's "DPM fast" /
"DPM adaptive").

Both take singlestep DPM-Solver-1/2/3 steps (``dpm_solver.py``; Eq. 3.7, Alg. 1, Alg. 2) in
k-diffusion's variables x~ = x / alpha and lambda = -log(sigma / alpha) (velodiff's log-SNR), where
with eps = (x~ - D(x~)) sigma~^-1 and h = lambda_b - lambda_a

    DPM-Solver-1:  x~_b = x~_a - sigma~_b (e^h - 1) eps_a,

the same update as the x form divided by alpha_b.

``dpm_fast`` (Sec. 3.4): for an NFE budget N, K = floor(N / 3) + 1 steps, all of order 3 but the
last, which is of order N mod 3, or the last two of orders 2 and 1 when 3 divides N. The grid gives
the K steps (the paper and k-diffusion: uniform in lambda, ``logsnr``); the option ``nfe`` gives N
(0: N = 3 K - 2, orders 3, ..., 3, 1); a grid of K steps fits N in [3 K - 3, 3 K - 1].

``dpm_adaptive`` (Sec. 3.5 / App. C): on each grid interval, steps of order ``order`` (3: DPM-Solver-23,
2: DPM-Solver-12) with the lower-order solution x_low of the same evaluations as the error estimate,

    E = || (x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|)) ||_2 / sqrt(numel),

accepted or retried by k-diffusion's PID step-size controller (h_init, pcoeff, icoeff, dcoeff,
accept_safety; h *= 1 + atan(factor - 1)), until the interval is covered. k-diffusion integrates one
interval from sigma_max to sigma_min; a grid of one step (``steps=1, final="t_min"``) is that run.
Its NFE is whatever the controller spends (``sample`` counts it); the spec says so (``adaptive``) and
its ``nfe_per_step`` is a placeholder.

Boundary steps as in ``dpm_solver``: the final jump to t = 0 returns D(x_i), one evaluation; a step
from alpha = 0 is the first-order DDIM step. ``eta`` (k-diffusion's ancestral variant of both) is not
offered.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from .base import SolverSpec, StepContext

#: the evaluations of one step, by stage
Cache = dict[str, Tensor]


class _Stepper:
    """Singlestep DPM-Solver in x~ and lambda over one context, caching eps per stage as k-diffusion's
    DPMSolver does (the evaluations a low- and a high-order solution share are made once)."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def eps(self, cache: Cache, key: str, x: Tensor, lam: float, t: float | None = None) -> Tensor:
        if key not in cache:
            sched = self.ctx.schedule
            t = float(sched.t_from_log_snr(lam)) if t is None else t
            a = float(sched.alpha(t))
            cache[key] = (x - self.ctx.denoise(a * x, t)) / math.exp(-lam)
        return cache[key]

    def order1(self, x: Tensor, lam: float, lam_next: float, cache: Cache) -> Tensor:
        eps = self.eps(cache, "eps", x, lam)
        return x - math.exp(-lam_next) * math.expm1(lam_next - lam) * eps  # Eq. 3.7

    def order2(self, x: Tensor, lam: float, lam_next: float, cache: Cache, r1: float = 0.5) -> Tensor:
        h = lam_next - lam
        eps = self.eps(cache, "eps", x, lam)
        s1 = lam + r1 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        d1 = self.eps(cache, "eps_r1", u1, s1) - eps
        s_next = math.exp(-lam_next)
        return x - s_next * math.expm1(h) * eps - s_next / (2 * r1) * math.expm1(h) * d1  # Alg. 1

    def order3(self, x: Tensor, lam: float, lam_next: float, cache: Cache) -> Tensor:
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        h = lam_next - lam
        eps = self.eps(cache, "eps", x, lam)
        s1, s2 = lam + r1 * h, lam + r2 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        d1 = self.eps(cache, "eps_r1", u1, s1) - eps
        u2 = x - math.exp(-s2) * math.expm1(r2 * h) * eps
        u2 = u2 - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * d1
        d2 = self.eps(cache, "eps_r2", u2, s2) - eps
        s_next = math.exp(-lam_next)
        return x - s_next * math.expm1(h) * eps - s_next / r2 * (math.expm1(h) / h - 1) * d2  # Alg. 2


def _boundary(ctx: StepContext, i: int, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """The final jump to t = 0 (returns D) and a step from alpha = 0 (DDIM): one evaluation each."""
    if not (ctx.ends_at_zero(i) or ctx.a(i) == 0.0):
        return None
    x0 = ctx.denoise(x, ctx.t(i))
    return ctx.ddim(i, x, x0), x0


def fast_orders(steps: int, nfe: int) -> list[int]:
    """DPM-Solver-fast's orders for a budget of ``nfe`` evaluations (Lu et al. 2022, Sec. 3.4)."""
    if nfe == 0:
        nfe = 3 * steps - 2
    if nfe < 1 or nfe // 3 + 1 != steps:
        raise VelodiffError(
            f"dpm_fast with nfe={nfe} takes {nfe // 3 + 1} steps (floor(nfe / 3) + 1), the grid has {steps}; "
            f"a grid of {steps} steps takes nfe {max(3 * steps - 3, 1)} to {3 * steps - 1}"
        )
    if nfe % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [nfe % 3]


def dpm_fast_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    order = fast_orders(ctx.steps, int(ctx.options["nfe"]))[i]
    if (b := _boundary(ctx, i, x)) is not None:
        return b[0], b[1], state
    a, lam, lam_next = ctx.a(i), ctx.lam(i), ctx.lam(i + 1)
    stepper, cache = _Stepper(ctx), {}
    x_ve = x / a
    eps = stepper.eps(cache, "eps", x_ve, lam, ctx.t(i))
    x0 = x_ve - math.exp(-lam) * eps  # x~ - sigma~ eps is D itself (data units; no alpha)
    step = {1: stepper.order1, 2: stepper.order2, 3: stepper.order3}[order]
    return ctx.a(i + 1) * step(x_ve, lam, lam_next, cache), x0, state


class PIDController:
    """k-diffusion's PIDStepSizeController: h scaled by a limited PID factor of the inverse errors."""

    def __init__(self, h: float, p: float, i: float, d: float, order: float, safety: float) -> None:
        self.h, self.safety, self.errs = h, safety, [0.0, 0.0, 0.0]
        self.b = ((p + i + d) / order, -(p + 2 * d) / order, d / order)
        self.started = False

    def propose(self, error: float) -> bool:
        inv = 1.0 / (error + 1e-8)
        if not self.started:
            self.errs, self.started = [inv, inv, inv], True
        self.errs[0] = inv
        factor = self.errs[0] ** self.b[0] * self.errs[1] ** self.b[1] * self.errs[2] ** self.b[2]
        factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def dpm_adaptive_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    o = ctx.options
    order = int(o["order"])
    if order not in (2, 3):
        raise VelodiffError(f"dpm_adaptive: order must be 2 or 3, got {order}")
    if (b := _boundary(ctx, i, x)) is not None:
        return b[0], b[1], state
    a, lam, lam_end = ctx.a(i), ctx.lam(i), ctx.lam(i + 1)
    atol, rtol = float(o["atol"]), float(o["rtol"])
    if atol == 0 and rtol == 0:
        raise VelodiffError("dpm_adaptive: rtol and atol are both 0, a tolerance no step meets; raise one")
    pid = PIDController(abs(float(o["h_init"])), float(o["pcoeff"]), float(o["icoeff"]), float(o["dcoeff"]),
                        order, float(o["accept_safety"]))  # fmt: skip
    stepper = _Stepper(ctx)
    x_ve = x / a
    x_prev, s, x0 = x_ve, lam, None
    for attempt in itertools.count():
        if s >= lam_end - 1e-5:
            break
        if attempt == MAX_ATTEMPTS:  # k-diffusion has no bound: a tolerance never met looped forever
            raise VelodiffError(f"dpm_adaptive: step {i} reached only log-SNR {s:.4g} of {lam_end:.4g} in "
                                f"{MAX_ATTEMPTS} tries; raise rtol / atol or lower accept_safety")
        t = min(lam_end, s + pid.h)
        cache: Cache = {}
        eps = stepper.eps(cache, "eps", x_ve, s, ctx.t(i) if s == lam else None)
        if x0 is None:
            x0 = x_ve - math.exp(-s) * eps
        if order == 2:
            low, high = stepper.order1(x_ve, s, t, cache), stepper.order2(x_ve, s, t, cache)
        else:
            low, high = stepper.order2(x_ve, s, t, cache, r1=1.0 / 3.0), stepper.order3(x_ve, s, t, cache)
        delta = torch.clamp(rtol * torch.maximum(low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((low - high) / delta)) / low.numel() ** 0.5
        if pid.propose(error):
            x_prev, x_ve, s = low, high, t
    if x0 is None:  # the interval was shorter than the tolerance: nothing to integrate
        x0 = ctx.denoise(x, ctx.t(i))
    return ctx.a(i + 1) * x_ve, x0, state


def fast_suffix(options: dict[str, Any], steps: int, start: int) -> dict[str, Any]:
    """The budget of the grid's last steps from ``start`` on: the orders the whole grid planned there."""
    nfe = int(options.get("nfe") or 0)
    return {**options, "nfe": sum(fast_orders(steps, nfe)[start:])} if nfe else options


DPM_FAST = SolverSpec(
    name="dpm_fast",
    step=dpm_fast_step,
    suffix=fast_suffix,
    order=3,
    nfe_per_step=3,
    saves_final_eval=True,
    defaults={"nfe": 0},
    description="DPM-Solver-fast: orders 3,..,3 then N mod 3 for an NFE budget N (Lu et al. 2022, Sec. 3.4)",
)
#: the tries (each 2-3 evaluations) dpm_adaptive makes to cross one grid interval before giving up
MAX_ATTEMPTS = 1000

DPM_ADAPTIVE = SolverSpec(
    name="dpm_adaptive",
    step=dpm_adaptive_step,
    order=3,
    nfe_per_step=3,
    saves_final_eval=True,
    adaptive=True,
    defaults={
        "order": 3,
        "rtol": 0.05,
        "atol": 0.0078,
        "h_init": 0.05,
        "pcoeff": 0.0,
        "icoeff": 1.0,
        "dcoeff": 0.0,
        "accept_safety": 0.81,
    },  # fmt: skip
    limits={"order": (2, 3)},
    description="DPM-Solver-12/23 with adaptive step size per grid interval (Lu et al. 2022, Sec. 3.5)",
)

__all__ = ["DPM_ADAPTIVE", "DPM_FAST", "fast_orders"]
