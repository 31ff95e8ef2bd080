"""The sampling loop: one function that runs any solver over any grid with any denoiser.

    result = sample(denoiser, x_T, ts, "dpmpp_2m", cond=cond)

It binds the conditioning, counts NFE and network-sample evaluations as each denoiser declares,
stops with the step index on NaN/inf or a shape mismatch, and calls ``callback(StepInfo)`` after
every step; a callback returning True stops the run, which then returns the latest x0 estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .denoisers import Cond, Denoiser
from .errors import VelodiffError
from .grids import check_grid
from .noise import BrownianNoise, GaussianNoise
from .schedules import F64
from .solvers import SolverSpec, StepContext, get_solver


@dataclass(frozen=True)
class StepInfo:
    i: int
    t: float
    x: Tensor
    x0: Tensor


@dataclass
class SampleResult:
    x: Tensor
    nfe: int
    evals: int
    steps: int
    stopped: bool = False


class FiniteCheck:
    """NaN/inf checks that name the step where they fail.

    On the CPU each check is immediate. On an accelerator (``lazy``) a check only records, on the device,
    the index of the first failing check, and ``raise_first`` reads it once after the loop: one host sync
    per run instead of two per step, with the same error."""

    NONE = 2**62

    def __init__(self, lazy: bool) -> None:
        self.lazy = lazy
        self.messages: list[str] = []
        self.first: Tensor | None = None

    def __call__(self, value: Tensor, message: str) -> None:
        finite = torch.isfinite(value).all()
        if not self.lazy:
            if not bool(finite):
                raise VelodiffError(message)
            return
        code = torch.where(finite, self.NONE, len(self.messages))
        self.messages.append(message)
        self.first = code if self.first is None else torch.minimum(self.first, code)

    def raise_first(self) -> None:
        if self.first is not None and (k := int(self.first)) != self.NONE:
            raise VelodiffError(self.messages[k])


def sample(
    denoiser: Denoiser,
    x: Tensor,
    ts: Tensor,
    solver: str | SolverSpec = "dpmpp_2m",
    *,
    cond: Cond = None,
    seed: int = 0,
    noise: Callable[[int], Tensor] | None = None,
    callback: Callable[[StepInfo], bool | None] | None = None,
    **options: object,
) -> SampleResult:
    """Integrate from ``x`` at ``ts[0]`` down to ``ts[-1]`` with ``solver``.

    ``options`` are the solver's own (e.g. ``eta``, ``order``); unknown ones are refused.
    Stochastic solvers draw noise from ``noise`` or, by default, from ``seed``."""
    spec = get_solver(solver)
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise VelodiffError(
            f"solver {spec.name!r} has no option {sorted(unknown)[0]!r}; "
            f"options: {sorted(spec.defaults) or 'none'}"
        )
    sched = denoiser.schedule
    ts = torch.as_tensor(ts, dtype=F64).cpu()
    check_grid(sched, ts)
    if len(ts) - 1 < spec.min_steps:
        raise VelodiffError(f"solver {spec.name!r} needs at least {spec.min_steps} steps, got {len(ts) - 1}")
    if not bool(torch.isfinite(x).all()):
        raise VelodiffError("the initial sample contains NaN or inf")

    counts = {"nfe": 0, "evals": 0, "step": 0}
    check = FiniteCheck(lazy=x.device.type != "cpu")

    def denoise(x_in: Tensor, t: float) -> Tensor:
        cost = denoiser.cost(float(t))
        counts["nfe"] += cost.nfe
        counts["evals"] += cost.evals
        x0 = denoiser(x_in, t, cond)
        if x0.shape != x_in.shape:
            raise VelodiffError(
                f"the model returned shape {tuple(x0.shape)} for input {tuple(x_in.shape)} "
                f"at step {counts['step']}"
            )
        check(x0, f"the model returned NaN or inf at step {counts['step']} (t={float(t):.4g})")
        return x0

    if noise is None and spec.noise != "none":
        noise = BrownianNoise(x, seed, ts) if spec.noise == "brownian" else GaussianNoise(x, seed)
    ctx = StepContext(
        denoise=denoise,
        schedule=sched,
        ts=ts,
        alphas=sched.alpha(ts),
        sigmas=sched.sigma(ts),
        lambdas=sched.log_snr(ts),
        noise=noise,
        options={**spec.defaults, **options},
    )
    state = None
    for i in range(ctx.steps):
        counts["step"] = i
        x, x0, state = spec.step(ctx, i, x, state)
        check(x, f"the sample became NaN or inf at step {i} (t={ctx.t(i):.4g})")
        if callback is not None and callback(StepInfo(i, ctx.t(i), x, x0)):
            check.raise_first()
            return SampleResult(x0, counts["nfe"], counts["evals"], i + 1, stopped=True)
    check.raise_first()
    return SampleResult(x, counts["nfe"], counts["evals"], ctx.steps)
