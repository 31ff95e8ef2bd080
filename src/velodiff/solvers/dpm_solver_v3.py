"""DPM-Solver-v3 (Zheng et al. 2023, 'DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics'), multistep predictor-corrector with pseudo-order.

The solver is told three empirical model statistics (EMS) on a log-SNR grid, measured once per model
(``velodiff.calibrated.ems``): l, s and b, tensors that broadcast against x. With lambda = log(alpha/sigma),
N = sigma eps = x - alpha x0 and the cumulative integrals from the noisiest statistics time
L = int l, S = int s, B = int e^-S b, I = int e^(L+S), C = int e^(L+S) B (all d lambda), the model output
is rewritten as (Eq. 8)

    f = (N - l x) / alpha,    g_s(lambda) = e^(S_s - S) f - e^(S_s) (B - B_s),

which the statistics make as flat in lambda as the data allow (s, b: least squares of df/dlambda on f;
l: the mean diagonal of the Jacobian of N). The exact solution from lambda_s to lambda_t is then (Eq. 10)

    x_t = alpha_t/alpha_s e^(L_s - L_t) x_s - alpha_t e^(L_s - L_t) sum_k E_k g_s^(k)(lambda_s)
          - alpha_t e^-L_t (C_t - C_s - B_s (I_t - I_s)),
    E_k = int_s^t e^((L+S)(lambda) - (L+S)_s) (lambda - lambda_s)^k / k! dlambda,

and a step truncates the sum at its order, estimating the derivatives g^(k) from the previous points
(multistep) by solving the Taylor conditions, or, with ``predictor_pseudo`` / ``corrector_pseudo``, by
divided differences (pseudo-order, Sec. 3.4: more stable at very few steps). The corrector recomputes
x_s with the new evaluation included (one order higher with ``corrector_pseudo``) and moves the stored
output with it, keeping N - l x fixed (the authors' code). With l = 1, s = b = 0 the method is
DPM-Solver++ (first order: DDIM), which the tests check. The global order is 2 (measured on the oracle
grids of tests/test_convergence.py): the pseudo-order corrector's first derivative is the secant through
the step, so it lowers the error constant (about 2x) without raising the order.

The integrals are tabulated on a fine log-SNR grid and interpolated linearly at the step times, so any
grid works; the final jump to t = 0 returns x0. Options: ``ems`` (the statistics, required), ``order``
(2), ``predictor_pseudo`` (False), ``use_corrector`` (True), ``corrector_pseudo`` (True),
``half`` (False: True corrects only while t > t_max / 2, the authors' option for guided sampling),
``lower_order_final`` (True).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..schedules import F64, interp
from .base import SolverSpec, StepContext, lower_order_final


def _cumtrapz(y: Tensor, x: Tensor) -> Tensor:
    """Cumulative trapezoid integral of y (first dim along x) from x[0]."""
    shape = (-1,) + (1,) * (y.ndim - 1)
    dx = (x[1:] - x[:-1]).reshape(shape)
    out = torch.cumsum(0.5 * dx * (y[1:] + y[:-1]), dim=0)
    return torch.cat([torch.zeros_like(y[:1]), out])


#: points of the fine log-SNR grid the integrals are tabulated on
FINE = 4001


@dataclass
class ModelStatistics:
    """EMS on an increasing log-SNR grid ``lambdas`` (K,): ``l``, ``s``, ``b`` of shape (K, *stat_shape),
    where stat_shape broadcasts against one sample (e.g. (C, 1, 1) per channel, or (C, H, W))."""

    lambdas: Tensor
    l: Tensor  # noqa: E741 - the paper's name
    s: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        lam = self.lambdas.to(F64)
        if lam.ndim != 1 or len(lam) < 2 or not bool((lam[1:] > lam[:-1]).all()):
            raise VelodiffError("model statistics need an increasing log-SNR grid of at least two points")
        if not bool(torch.isfinite(lam).all()):  # a flow's t = 1 (lambda = -inf) has no statistics
            raise VelodiffError("model statistics need finite log-SNR times (leave out alpha = 0)")
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if v.shape[0] != len(lam) or not bool(torch.isfinite(v).all()):
                raise VelodiffError(f"model statistic {name!r} must be finite with {len(lam)} rows")
        # the integrals on a fine grid (the statistics interpolated linearly), so the trapezoid rule is
        # exact to ~1e-6 however coarse the statistics are
        self.raw = {"lambdas": lam, "l": self.l.to(F64), "s": self.s.to(F64), "b": self.b.to(F64)}
        fine = torch.linspace(float(lam[0]), float(lam[-1]), FINE, dtype=F64)
        self.lambdas = fine
        self.l, self.s, self.b = (interp(fine, lam, getattr(self, n).to(F64)) for n in ("l", "s", "b"))
        self.L = _cumtrapz(self.l, fine)
        self.S = _cumtrapz(self.s, fine)
        self.B = _cumtrapz(torch.exp(-self.S) * self.b, fine)
        self.I = _cumtrapz(torch.exp(self.L + self.S), fine)
        self.C = _cumtrapz(torch.exp(self.L + self.S) * self.B, fine)

    @classmethod
    def degenerate(cls, lambdas: Tensor, shape: tuple[int, ...] = (1,)) -> ModelStatistics:
        """l = 1, s = b = 0: the statistics under which DPM-Solver-v3 is DPM-Solver++."""
        k = len(lambdas)
        return cls(lambdas, torch.ones(k, *shape), torch.zeros(k, *shape), torch.zeros(k, *shape))

    def at(self, name: str, lam: float) -> Tensor:
        """Table ``name`` linearly interpolated at log-SNR ``lam`` (held at the ends)."""
        table = getattr(self, name)
        lams = self.lambdas
        lam = min(max(lam, float(lams[0])), float(lams[-1]))
        j = int(torch.searchsorted(lams, torch.tensor(lam, dtype=F64)).clamp(1, len(lams) - 1))
        w = (lam - float(lams[j - 1])) / float(lams[j] - lams[j - 1])
        return table[j - 1] * (1 - w) + table[j] * w

    def exp_coefficient(self, lam_s: float, lam_t: float, k: int, points: int = 65) -> Tensor:
        """E_k of the module docstring, by the trapezoid rule on ``points`` times in [lam_s, lam_t]."""
        grid = torch.linspace(lam_s, lam_t, points, dtype=F64)
        ls_s = self.at("L", lam_s) + self.at("S", lam_s)
        vals = torch.stack([torch.exp(self.at("L", float(g)) + self.at("S", float(g)) - ls_s) for g in grid])
        poly = ((grid - lam_s) ** k / math.factorial(k)).reshape((-1,) + (1,) * (vals.ndim - 1))
        return _cumtrapz(vals * poly, grid)[-1]


def _move(v: Tensor, like: Tensor) -> Tensor:
    return v.to(device=like.device, dtype=like.dtype)


def _derivatives(lams: list[float], gs: list[Tensor], pseudo: bool) -> list[Tensor]:
    """g^(1..n)(lams[0]) from the values gs at lams (n = len - 1): Taylor conditions, or divided
    differences times k! (pseudo-order)."""
    n = len(gs) - 1
    if pseudo:
        table = [list(gs)]
        for i in range(1, n + 1):
            prev = table[-1]
            table.append([(prev[j] - prev[j + 1]) / (lams[j] - lams[i + j]) for j in range(n - i + 1)])
        return [table[i][0] * math.factorial(i) for i in range(1, n + 1)]
    r = torch.tensor(
        [[(lams[k] - lams[0]) ** i for i in range(1, n + 1)] for k in range(1, n + 1)], dtype=F64
    )
    inv = torch.linalg.inv(r)
    diffs = [g - gs[0] for g in gs[1:]]
    return [sum(float(inv[i, k]) * diffs[k] for k in range(n)) * math.factorial(i + 1) for i in range(n)]


#: one point of the history: (lambda, alpha, x, f)
Point = tuple[float, float, Tensor, Tensor]


def _update(
    ems: ModelStatistics, pts: list[Point], a_t: float, lam_t: float, order: int, pseudo: bool
) -> Tensor:
    """x at log-SNR ``lam_t`` (alpha ``a_t``) from the base point pts[0], with the derivatives of g
    estimated from pts[:order] (Eq. 10 truncated at ``order``)."""
    lam_s, a_s, x_s, _ = pts[0]
    S_s, B_s = ems.at("S", lam_s), ems.at("B", lam_s)
    gs = [
        _move(torch.exp(S_s - ems.at("S", lam_k)), x_s) * f_k
        - _move(torch.exp(S_s) * (ems.at("B", lam_k) - B_s), x_s)
        for lam_k, _, _, f_k in pts[:order]
    ]
    L_s, L_t = ems.at("L", lam_s), ems.at("L", lam_t)
    I_s, I_t = ems.at("I", lam_s), ems.at("I", lam_t)
    decay = _move(torch.exp(L_s - L_t), x_s)
    x = (a_t / a_s) * decay * x_s
    x = x - a_t * _move(torch.exp(-L_t - S_s) * (I_t - I_s), x_s) * gs[0]
    x = x - a_t * _move(torch.exp(-L_t) * (ems.at("C", lam_t) - ems.at("C", lam_s) - B_s * (I_t - I_s)), x_s)
    if order > 1:
        ders = _derivatives([p[0] for p in pts[:order]], gs, pseudo)
        for k, d in enumerate(ders, 1):
            x = x - a_t * decay * _move(ems.exp_coefficient(lam_s, lam_t, k), x_s) * d
    return x


def dpm_solver_v3_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    opts = ctx.options
    ems = opts["ems"]
    if not isinstance(ems, ModelStatistics):
        raise VelodiffError(
            "dpm_solver_v3 needs its model statistics (solver option ems); measure them with "
            "velodiff.calibrated.measure_statistics or: velodiff calibrate solver --methods dpm_solver_v3"
        )
    x0 = ctx.denoise(x, ctx.t(i))
    if ctx.ends_at_zero(i) or ctx.a(i) == 0.0:  # (from pure noise: no statistic at lambda = -inf)
        return ctx.ddim(i, x, x0), x0, None
    lam, a_i = ctx.lam(i), ctx.a(i)
    l_i = _move(ems.at("l", lam), x)
    f = ((1 - l_i) * x) / a_i - x0  # (N - l x) / alpha with N = x - alpha x0
    pts, p_prev = state if state is not None else ([], 0)
    pts = [(lam, a_i, x, f), *pts]  # newest first
    correct = opts["use_corrector"] and not (opts["half"] and ctx.t(i) <= 0.5 * ctx.schedule.t_max)
    if correct and p_prev > 0 and ctx.exact(i):
        pseudo = bool(opts["corrector_pseudo"])
        c_order = p_prev + int(pseudo)
        if c_order > 1:  # x_i again from the previous point, the new evaluation as its first extra point
            x = _update(ems, [pts[1], pts[0], *pts[2:]], a_i, lam, c_order, pseudo)
            pts[0] = (lam, a_i, x, f)  # N - l x = alpha f is kept: the stored output moves with x
    pts = pts[: int(opts["order"]) + 1]
    p = lower_order_final(ctx, i, min(len(pts), int(opts["order"])))
    x_next = _update(ems, pts, ctx.a(i + 1), ctx.lam(i + 1), p, bool(opts["predictor_pseudo"]))
    return x_next, x0, (pts, p)


DPM_SOLVER_V3 = SolverSpec(
    name="dpm_solver_v3",
    step=dpm_solver_v3_step,
    order=2,
    requires=("ems",),
    defaults={
        "ems": None,
        "order": 2,
        "predictor_pseudo": False,
        "use_corrector": True,
        "corrector_pseudo": True,
        "half": False,
        "lower_order_final": True,
    },
    description="DPM-Solver-v3 (Zheng et al. 2023): multistep predictor-corrector on empirical model "
    "statistics measured per model (velodiff calibrate solver)",
)
