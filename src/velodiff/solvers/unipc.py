"""UniPC, data-prediction form (Zhao et al. 2023, 'UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models', Sec. 3 and Algs. 2-3; diffusers' ``predict_x0=True``).

With h = lambda_{i+1} - lambda_i, hh = -h, r_k = (lambda_{i-k} - lambda_i) / h and
D_k = (x0_{i-k} - x0_i) / r_k, both halves share one update from t_i to t_{i+1}:

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^hh - 1) x0_i - alpha_{i+1} B(h) sum_k c_k D_k

* UniP-p (predictor) uses the p - 1 older points k = 1..p-1;
* UniC-p (corrector) adds the new point D_p = x0(x~_{i+1}) - x0_i at r_p = 1, so it raises the order
  to p + 1 for free: the model evaluation at the predicted x~_{i+1} is the one the next step needs anyway.

The c solve the order conditions R c = g with R_{mk} = r_k^m and g_m = hh phi_{m+2}(hh) (m+1)! / B(h),
phi_{m+1}(z) = (phi_m(z) - 1/m!) / z; a single unknown is set to 1/2 instead (UniP-2 and UniC-1, as
the authors' code and diffusers do). B(h) = hh ('bh1') or e^hh - 1 ('bh2').

As in diffusers, the corrected sample is what the next predictor starts from, while the returned x0
is the evaluation at the predicted sample; ``disable_corrector`` lists the step indices whose result is
left uncorrected, and so is a step whose correcting evaluation was approximate (a plan's estimate).
The final jump to t = 0 returns x0 (diffusers' lower_order_final does the same).

Calibrated options (``velodiff calibrate solver`` fits them; empty = off): ``orders`` caps each step's
predictor order (a per-step solver choice, as USF / S3 search it); ``dc_ratios`` applies DC-Solver's
dynamic compensation (Zhao et al. 2024, Eq. 11): the new evaluation x0_i is replaced by the Lagrange
polynomial through the last ``dc_order`` + 1 evaluations taken at t_i + (rho_i - 1)(t_i - t_{i-1}), with
rho_i = ``dc_ratios[i]`` (1 = no change); the predictor and the corrector both use the compensated value.
``lower_order_final`` (True) follows diffusers' documented rule (grids below 15 steps), which keeps the
order on long grids that end at t_min. UniPC's own code (Zhao et al.'s uni_pc.py: step_order =
min(order, steps + 1 - step); the ports in A1111 and ComfyUI) and diffusers' UniPCMultistepScheduler
lower the last steps' order at every step count: ``lower_order_final="always"``, which the aliases of
those tools set so that they reproduce them at 15 steps and more.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import unknown_name
from .base import SolverSpec, StepContext, lower_order_final


def _uni_update(
    ctx: StepContext, i: int, x: Tensor, x0s: tuple[Tensor, ...], order: int, x0_new: Tensor | None = None
) -> Tensor:
    """UniP-``order`` from t_i to t_{i+1} (x0s[-1] at t_i, x0s[-2] at t_{i-1}, ...), or UniC-``order``
    when ``x0_new``, the evaluation at the predicted x_{i+1}, is given."""
    h = ctx.h(i)
    hh = -h
    kind = ctx.options["solver_type"]
    if kind not in ("bh1", "bh2"):
        raise unknown_name("UniPC solver_type", kind, ("bh1", "bh2"))
    b_h = hh if kind == "bh1" else math.expm1(hh)
    m0 = x0s[-1]
    rks = [(ctx.lam(i - k) - ctx.lam(i)) / h for k in range(1, order)]
    ds = [(x0s[-1 - k] - m0) / r for k, r in enumerate(rks, 1)]
    if x0_new is not None:
        rks.append(1.0)
        ds.append(x0_new - m0)
    x_next = (ctx.s(i + 1) / ctx.s(i)) * x - ctx.a(i + 1) * math.expm1(hh) * m0
    if not ds or not math.isfinite(b_h):  # B(h) = h from pure noise (h = inf): the first-order step
        return x_next
    if len(ds) == 1:
        rhos = [0.5]
    else:
        g, h_phi, fact = [], math.expm1(hh) / hh - 1.0, 1.0  # h_phi = hh phi_2(hh)
        for m in range(1, len(ds) + 1):
            g.append(h_phi * fact / b_h)
            fact *= m + 1
            h_phi = h_phi / hh - 1.0 / fact  # hh phi_{m+2}(hh)
        r = torch.tensor(rks, dtype=torch.float64)
        mat = torch.stack([r**m for m in range(len(ds))])
        rhos = torch.linalg.solve(mat, torch.tensor(g, dtype=torch.float64)).tolist()
    return x_next - ctx.a(i + 1) * b_h * sum(c * d for c, d in zip(rhos, ds, strict=True))


def compensate(ctx: StepContext, i: int, x0s: tuple[Tensor, ...], x0: Tensor, ratio: float, k: int) -> Tensor:
    """DC-Solver's compensation (module docstring): the Lagrange polynomial through x0 at t_i, t_{i-1},
    ..., t_{i-k} evaluated at ratio * t_i + (1 - ratio) * t_{i-1}."""
    ts = [ctx.t(i - j) for j in range(k + 1)]
    vals = [x0, *reversed(x0s[-k:])]
    at = ratio * ts[0] + (1 - ratio) * ts[1]
    out = torch.zeros_like(x0)
    for a, (ta, va) in enumerate(zip(ts, vals, strict=True)):
        w = 1.0
        for b, tb in enumerate(ts):
            if b != a:
                w *= (at - tb) / (ta - tb)
        out = out + w * va
    return out


def unipc_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    x0 = ctx.denoise(x, ctx.t(i))
    x0s, x_prev, p_prev = state if state is not None else ((), None, 0)
    if ctx.ends_at_zero(i):
        return x0, x0, ((*x0s, x0), x, 1)
    opts = ctx.options
    ratios, k = opts["dc_ratios"], int(opts["dc_order"])
    if i < len(ratios) and float(ratios[i]) != 1.0 and len(x0s) >= k and ctx.exact(i):
        x0 = compensate(ctx, i, x0s, x0, float(ratios[i]), k)
    corrector = opts["use_corrector"] and (i - 1) not in opts["disable_corrector"]
    if x_prev is not None and corrector and ctx.exact(i):  # no correction from an estimate
        x = _uni_update(ctx, i - 1, x_prev, x0s, p_prev, x0_new=x0)  # UniC on the last prediction
    x0s = (*x0s, x0)[-max(int(opts["order"]), k) :]
    cap = int(opts["orders"][i]) if i < len(opts["orders"]) else int(opts["order"])
    p = lower_order_final(ctx, i, min(len(x0s), int(opts["order"]), cap))  # warm-up: the points there are
    x_next = _uni_update(ctx, i, x, x0s, p)  # UniP
    return x_next, x0, (x0s, x, p)


_DEFAULTS = {
    "order": 2,
    "solver_type": "bh2",
    "use_corrector": True,
    "disable_corrector": (),
    "lower_order_final": True,
    "orders": (),
    "dc_ratios": (),
    "dc_order": 2,
}

UNIPC = SolverSpec(
    name="unipc",
    step=unipc_step,
    order=3,
    defaults=_DEFAULTS,
    description="UniPC-2 with B(h)=e^h-1 (Zhao et al. 2023): UniP predictor + free UniC corrector, order 3",
)
UNIPC_BH1 = SolverSpec(
    name="unipc_bh1",
    step=unipc_step,
    order=3,
    defaults={**_DEFAULTS, "solver_type": "bh1"},
    description="UniPC-2 with B(h)=h (Zhao et al. 2023), order 3; for few-step unconditional sampling",
)
UNIPC_3 = SolverSpec(
    name="unipc_3",
    step=unipc_step,
    order=4,
    defaults={**_DEFAULTS, "order": 3},
    description="UniPC-3 with B(h)=e^h-1 (Zhao et al. 2023), order 4",
)
