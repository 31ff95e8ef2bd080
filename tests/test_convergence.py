"""Every deterministic solver converges to the exact probability-flow ODE solution at its order.

Oracle: a 2-D Gaussian mixture's exact denoiser under the smooth continuous VP schedule; reference
by scipy's DOP853 at rtol 1e-11. The grid ends at t_min (no final jump) so the measured slope is
the solver's own; the log-log slope of error vs NFE must be within 0.35 of the order."""

import math

import numpy as np
import pytest
import torch

from velodiff import ContinuousVP, make_grid, sample
from velodiff.oracle import GaussianMixture, MixtureDenoiser, reference_sample, starting_noise
from velodiff.solvers import SOLVERS

SCHED = ContinuousVP()
MIX = GaussianMixture.random((2,), components=3, seed=1, min_var=0.2, max_var=0.5)
DEN = MixtureDenoiser(MIX, SCHED)
X = starting_noise((2,), 32, seed=3)
NFES = (16, 24, 32, 48)
#: solvers whose asymptotic regime starts later: LMS(4)'s Lagrange coefficients on a grid uneven in
#: sigma/alpha reach slope 3.6 at 48-128 NFE and 3.8 at 128-256 (it matches diffusers to 1e-15)
#: DPM-Solver-3 at 16 NFE takes 5 steps of log-SNR length ~1.9; error * NFE^3 settles from 16 steps on
NFES_FOR = {"lms": (128, 192, 256), "dpm_solver_3": (48, 72, 96)}

_refs: dict[tuple, torch.Tensor] = {}


def _error(name: str, nfe: int) -> float:
    spec = SOLVERS[name]
    steps = spec.steps_for_nfe(nfe, ends_at_zero=False)
    ts = make_grid("logsnr", SCHED, steps, final="t_min")
    key = tuple(ts.tolist())
    if key not in _refs:
        _refs[key] = reference_sample(DEN, X, ts)
    out = sample(DEN, X, ts, spec).x
    return float((out - _refs[key]).flatten(1).norm(dim=1).mean()), spec.nfe(steps, ends_at_zero=False)


DETERMINISTIC = [n for n, s in SOLVERS.items() if not s.stochastic]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_order_of_convergence(name):
    spec = SOLVERS[name]
    errs, nfes = zip(*(_error(name, n) for n in NFES_FOR.get(name, NFES)), strict=True)
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert all(math.isfinite(e) for e in errs)
    assert abs(slope - spec.order) <= 0.35, f"{name}: slope {slope:.2f}, order {spec.order}, errors {errs}"


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("final", ["zero", "t_min"])
def test_declared_nfe_matches_counted(name, final):
    """SolverSpec.nfe(steps) is what sample() counts, so NFE budgets are planned honestly."""
    spec = SOLVERS[name]
    for steps in (3, 7):
        ts = make_grid("logsnr", SCHED, steps, final=final)
        result = sample(DEN, X[:4], ts, spec)
        assert result.nfe == spec.nfe(steps, ends_at_zero=final == "zero"), (steps, result.nfe)
