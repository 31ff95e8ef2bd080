"""Step grids fitted to a model: a GITS dynamic program over the reference trajectory, then an
Align-Your-Steps-style descent on the final error of the solver that will use the grid.

GITS (Chen et al. 2024, 'On the Trajectory Regularity of ODE-based Diffusion Sampling', Sec. 4): on a
fine grid of the reference trajectory, the cost of one step from fine time i to j is the error of a
first-order (DDIM) step taken from the reference sample x_i with the reference prediction x0_i,

    C[i, j] = || (sigma_j / sigma_i) x_i + (alpha_j - alpha_i sigma_j / sigma_i) x0_i - x_j ||  (RMS),

which costs no network call: the reference already evaluated the model at every x_i. A dynamic program
finds the path of exactly N steps from t_max to 0 with the least summed cost.

Align Your Steps (Sabour et al. 2024) optimizes the grid for the sampler that uses it; here by a
coordinate descent on the quantity the grid is for, the final latent MSE to the reference of the given
solver from the same noise: each interior time moves towards a neighbour (in log sigma) by a fraction
of the gap; a move that lowers the error is kept; the fraction halves after a sweep with no gain.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..schedules import F64
from .problem import Problem, Trajectory

#: about how many of the reference's times a GITS grid picks its times among
GITS_POINTS = 100


def gits_indices(n: int, points: int = GITS_POINTS) -> list[int]:
    """The indices, among a reference trajectory's ``n`` times, of the fine times a GITS grid is picked
    from: about ``points``, always with t_max, t_min and 0."""
    stride = max(1, (n - 1) // points)
    return sorted(set(range(0, n - 1, stride)) | {n - 2, n - 1})


def gits_max_steps(reference_steps: int, points: int = GITS_POINTS) -> int:
    """The most steps a GITS grid can have on a reference of ``reference_steps`` steps."""
    return len(gits_indices(reference_steps + 1, points)) - 1


def gits_costs(problem: Problem, traj: Trajectory, points: int = GITS_POINTS) -> tuple[Tensor, Tensor]:
    """The fine times (``gits_indices``) and the cost matrix C[i, j] (inf where j <= i) of one DDIM step
    between them."""
    idx = gits_indices(len(traj.ts), points)
    ts = traj.ts[idx]
    sched = problem.schedule
    a, s = sched.alpha(ts), sched.sigma(ts)
    m = len(idx)
    cost = torch.full((m, m), math.inf, dtype=F64)
    for i in range(m - 1):
        xi, x0i = traj.xs[idx[i]], traj.x0s[idx[i]]
        for j in range(i + 1, m):
            ratio = float(s[j] / s[i])
            pred = ratio * xi + (float(a[j]) - float(a[i]) * ratio) * x0i
            cost[i, j] = float(((pred - traj.xs[idx[j]]) ** 2).mean().sqrt())
    return ts, cost


def gits_grid(problem: Problem, steps: int, points: int = GITS_POINTS) -> Tensor:
    """The N-step grid from t_max to 0 with the least summed GITS cost (a shortest path of exactly
    ``steps`` edges through the fine times)."""
    ts, cost = gits_costs(problem, problem.reference(), points)
    m = len(ts)
    if steps >= m:
        raise VelodiffError(f"a GITS grid of {steps} steps needs a finer reference than its {m} times")
    best = torch.full((steps + 1, m), math.inf, dtype=F64)
    back = torch.zeros((steps + 1, m), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + cost  # [i, j]: reach i in k-1 steps, then i -> j
        best[k], back[k] = total.min(dim=0)
    path = [m - 1]
    for k in range(steps, 0, -1):
        path.append(int(back[k, path[-1]]))
    return ts[list(reversed(path))].clone()


def refine_grid(
    problem: Problem,
    solver: str,
    ts: Tensor,
    options: dict | None = None,
    *,
    max_runs: int = 60,
    fraction: float = 0.4,
    min_fraction: float = 0.05,
    progress: Callable[[], None] | None = None,
) -> tuple[Tensor, float]:
    """Coordinate descent on ``solver``'s final error over the interior times of ``ts`` (the first,
    t_max, and a final 0 stay); returns the grid and its error. At most ``max_runs`` runs."""
    sched = problem.schedule
    ts = ts.clone().to(F64)
    last = len(ts) - 2 if float(ts[-1]) == 0.0 else len(ts) - 1  # the last movable index
    u = torch.log(sched.sigma_ve(ts[: last + 1]))
    lo = float(torch.log(sched.sigma_ve(torch.tensor(sched.t_min, dtype=F64))))

    def grid(uu: Tensor) -> Tensor:
        out = ts.clone()
        out[1 : last + 1] = sched.t_from_sigma_ve(torch.exp(uu[1:]))
        out[last] = max(float(out[last]), sched.t_min)
        return out

    err = problem.score(grid(u), solver, options)
    runs = 1
    while fraction >= min_fraction and runs < max_runs:
        improved = False
        for k in range(1, last + 1):
            below = float(u[k + 1]) if k < last else lo
            for target in (float(u[k - 1]), below):
                if runs >= max_runs:
                    break
                cand = u.clone()
                cand[k] = u[k] + fraction * (target - u[k])
                if not cand[k] < cand[k - 1] or (k < last and not cand[k] > cand[k + 1]) or cand[k] < lo:
                    continue
                e = problem.score(grid(cand), solver, options)
                runs += 1
                if progress is not None:
                    progress()
                if e < err:
                    u, err, improved = cand, e, True
                    break
        if not improved:
            fraction /= 2
    return grid(u), err
