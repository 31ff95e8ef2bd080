"""DPM-Solver-v3's empirical model statistics (Zheng et al. 2023, Sec. 3.2-3.3 and App. C), measured on a
calibration batch.

On K = ``points`` log-SNR times uniform from t_max to t_min, the batch is solved with a multistep solver
whose grid is those times, so each evaluation the solver makes is the model at a point of the trajectory
(``Problem.run`` with a callback; no extra call). At each point, with N = sigma eps = x - alpha x0:

* l (Eq. 9): the mean diagonal of the Jacobian dN/dx, by Hutchinson's estimator with one Rademacher probe
  v per sample, v * (N(x + d v) - N(x - d v)) / (2 d) (central differences: two evaluations per point);
* s, b (Eq. 11): the least-squares fit f' = s f + b of the derivative of f = (N - l x) / alpha along the
  trajectory (central differences in lambda) on f, over the samples.

With a few dozen samples the per-element estimates the paper makes from 1024 samples are noise, so by
default each statistic is shared per channel (``share="channel"``: the fit pools the spatial positions);
``share="none"`` keeps one value per element, as the paper does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..grids import make_grid
from ..schedules import F64
from ..solvers.dpm_solver_v3 import ModelStatistics
from .problem import Problem

SHARES = ("channel", "none")


def _reduce_dims(x: Tensor, share: str) -> tuple[int, ...]:
    """The dims a statistic is averaged over: samples, and the spatial ones when shared per channel."""
    if share == "channel" and x.ndim > 2:
        return (0, *range(2, x.ndim))
    return (0,)


def measure_statistics(
    problem: Problem,
    points: int = 100,
    share: str = "channel",
    delta: float = 0.05,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> ModelStatistics:
    """The EMS of the problem's (guided) model at ``points`` log-SNR times; costs about 3 * points
    evaluations of the batch (the trajectory, then two for each Jacobian probe)."""
    if share not in SHARES:
        from ..errors import unknown_name

        raise unknown_name("statistics share", share, SHARES)
    if points < 4:
        raise VelodiffError(f"model statistics need at least 4 points, got {points}")
    sched = problem.schedule
    grid = make_grid("logsnr", sched, points)  # points times t_max .. t_min, then 0
    trajectory = problem.trajectory(grid, "dpmpp_2m", progress)
    finite = [k for k in range(len(grid) - 1) if float(sched.alpha(grid[k])) > 0]  # not a flow's t = 1
    xs, x0s = [trajectory.xs[k] for k in finite], [trajectory.x0s[k] for k in finite]
    ts = grid[finite]
    lams = sched.log_snr(ts)
    alphas, sigmas = sched.alpha(ts), sched.sigma(ts)
    dims = _reduce_dims(xs[0], share)
    g = torch.Generator().manual_seed(seed)
    ls, fs = [], []
    for k in range(len(ts)):
        x, x0, a = xs[k], x0s[k], float(alphas[k])
        v = torch.randint(0, 2, x.shape, generator=g, dtype=F64) * 2 - 1
        d = delta * float((a * a + float(sigmas[k]) ** 2) ** 0.5)
        plus = problem.denoise((x + d * v).float(), float(ts[k]))
        minus = problem.denoise((x - d * v).float(), float(ts[k]))
        problem.evaluations += 2
        # N(x) = x - alpha x0(x): dN v = v - alpha dx0 v
        jv = v - a * (plus - minus) / (2 * d)
        l_k = (v * jv).mean(dim=dims, keepdim=True)[0]
        ls.append(l_k)
        fs.append(((1 - l_k) * x) / a - x0)
        if progress is not None:
            progress()
    lam = lams.tolist()
    s_list, b_list = [], []
    for k in range(len(ts)):
        lo, hi = max(k - 1, 0), min(k + 1, len(ts) - 1)
        df = (fs[hi] - fs[lo]) / (lam[hi] - lam[lo])
        f = fs[k]
        fm, dm = f.mean(dim=dims, keepdim=True), df.mean(dim=dims, keepdim=True)
        cov = ((f - fm) * (df - dm)).mean(dim=dims, keepdim=True)
        var = ((f - fm) ** 2).mean(dim=dims, keepdim=True).clamp_min(1e-12)
        s = cov / var
        s_list.append(s[0])
        b_list.append((dm - s * fm)[0])
    return ModelStatistics(lams, torch.stack(ls), torch.stack(s_list), torch.stack(b_list))
