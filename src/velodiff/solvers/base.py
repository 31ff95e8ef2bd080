"""The solver contract.

A solver is a pure step function ``step(ctx, i, x, state) -> (x_next, x0, state)`` that advances
the sample from ``ctx.ts[i]`` to ``ctx.ts[i + 1]``. Everything constant over a run lives in the
:class:`StepContext`; everything carried between steps (previous x0 predictions, a pending
corrector) lives in the explicit ``state`` the solver returns, which starts as ``None``.
The sampling loop (``velodiff.sampling.sample``) owns iteration, callbacks, NaN checks and
NFE accounting, so a solver file contains only its paper's update equations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..schedules import NoiseSchedule

#: ``denoise(x, t) -> x0`` with the conditioning already bound; every call is counted.
DenoiseFn = Callable[[Tensor, float], Tensor]
#: ``noise(i) -> standard normal tensor`` for the step from ts[i] to ts[i + 1].
NoiseFn = Callable[[int], Tensor]


@dataclass(frozen=True)
class StepContext:
    """What a solver sees of a run. ``alphas``, ``sigmas`` and ``lambdas`` (log-SNR) are the
    schedule at each grid time, float64; ``lambdas[-1]`` is +inf when the grid ends at t = 0."""

    denoise: DenoiseFn
    schedule: NoiseSchedule
    ts: Tensor
    alphas: Tensor
    sigmas: Tensor
    lambdas: Tensor
    noise: NoiseFn | None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.ts) - 1

    def t(self, i: int) -> float:
        return float(self.ts[i])

    def a(self, i: int) -> float:
        return float(self.alphas[i])

    def s(self, i: int) -> float:
        return float(self.sigmas[i])

    def lam(self, i: int) -> float:
        return float(self.lambdas[i])

    def h(self, i: int) -> float:
        """Step size in log-SNR from ts[i] to ts[i + 1] (inf for the final jump to t = 0)."""
        return float(self.lambdas[i + 1] - self.lambdas[i])

    def ends_at_zero(self, i: int) -> bool:
        return float(self.sigmas[i + 1]) == 0.0


StepFn = Callable[[StepContext, int, Tensor, Any], tuple[Tensor, Tensor, Any]]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its step function and what it promises.

    ``order`` is the global order of convergence; ``nfe_per_step`` the denoiser calls per step;
    ``noise`` is the noise it draws when its options make it stochastic: "none", "gaussian"
    (fresh noise per step) or "brownian" (a Brownian tree, so the same seed gives consistent
    paths across step counts); ``stochastic`` says whether its default options draw noise."""

    name: str
    step: StepFn
    order: int
    nfe_per_step: int = 1
    noise: str = "none"
    stochastic: bool = False
    min_steps: int = 1
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    #: the final jump to t = 0 costs one evaluation, not nfe_per_step (Heun: Karras et al. 2022,
    #: Alg. 1 line 9; singlestep DPM-Solver: the jump returns x0)
    saves_final_eval: bool = False

    def nfe(self, steps: int, ends_at_zero: bool = True) -> int:
        saved = self.nfe_per_step - 1 if self.saves_final_eval and ends_at_zero else 0
        return self.nfe_per_step * steps - saved

    def steps_for_nfe(self, nfe: int, ends_at_zero: bool = True) -> int:
        """The most steps whose NFE does not exceed ``nfe`` (at least ``min_steps``)."""
        steps = max(1, nfe // self.nfe_per_step)
        while self.nfe(steps + 1, ends_at_zero) <= nfe:
            steps += 1
        while steps > 1 and self.nfe(steps, ends_at_zero) > nfe:
            steps -= 1
        return steps
