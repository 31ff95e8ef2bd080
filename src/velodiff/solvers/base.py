"""The solver contract.

A solver is a pure step function ``step(ctx, i, x, state) -> (x_next, x0, state)`` that advances
the sample from ``ctx.ts[i]`` to ``ctx.ts[i + 1]``. Everything constant over a run lives in the
:class:`StepContext`; everything carried between steps (previous x0 predictions, a pending
corrector) lives in the explicit ``state`` the solver returns, which starts as ``None``.
The sampling loop (``velodiff.sampling.sample``) owns iteration, callbacks, NaN checks and
NFE accounting, so a solver file contains only its paper's update equations.

Approximate evaluations. A plan may answer an evaluation with an estimate (a cached feature, an
extrapolated branch); the loop notes it in ``ctx.record``. Multistep solvers ask
:func:`usable_order`: a step combines only the run of exact evaluations that ends at its own, so the
difference of an estimate and an exact prediction (dominated by the estimate's error, not by the
curvature a higher-order term models) never enters a higher-order term; after an approximate
evaluation the order builds up again as a warm-up does. UniPC also skips its corrector when the
evaluation it would correct with is approximate. Single-step solvers (DDIM / Euler, Heun,
singlestep DPM-Solver, ancestral samplers) keep no history and use every evaluation as given.
With no plan every evaluation is exact and nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import VelodiffError
from ..limits import is_number
from ..schedules import NoiseSchedule

#: ``denoise(x, t) -> x0`` with the conditioning already bound; every call is counted.
DenoiseFn = Callable[[Tensor, float], Tensor]
#: ``noise(i) -> standard normal tensor`` for the step from ts[i] to ts[i + 1].
NoiseFn = Callable[[int], Tensor]


@dataclass
class EvalRecord:
    """What the loop learned of the evaluations so far: per step, whether all were exact, and the
    latest evaluation's ``renoise_x0`` (CFG++), which the solvers that honour it read."""

    exact: list[bool] = field(default_factory=list)
    renoise: Tensor | None = None

    def note(self, step: int, exact: bool, renoise: Tensor | None) -> None:
        while len(self.exact) <= step:
            self.exact.append(True)
        self.exact[step] = self.exact[step] and exact
        self.renoise = renoise


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
    record: EvalRecord = field(default_factory=EvalRecord)

    def exact(self, i: int) -> bool:
        """True when every evaluation of step i was exact (or step i made none yet)."""
        return i >= len(self.record.exact) or self.record.exact[i]

    def renoise_x0(self, x0: Tensor) -> Tensor:
        """The x0 whose implied noise the step re-adds: the latest evaluation's ``renoise_x0`` when a
        rule gave one (CFG++, Chung et al. 2024), else ``x0``."""
        r = self.record.renoise
        return x0 if r is None else r

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

    def ddim(self, i: int, x: Tensor, x0: Tensor) -> Tensor:
        """The deterministic first-order step from ts[i] to ts[i + 1] given the clean estimate x0
        (DDIM, Song et al. 2021, Eq. 12 with eta = 0): x0 itself where the step ends at t = 0. The
        step every solver takes where its higher-order formula has no finite h."""
        if self.ends_at_zero(i):
            return x0
        return self.a(i + 1) * x0 + self.s(i + 1) * (x - self.a(i) * x0) / self.s(i)


def usable_order(ctx: StepContext, i: int, order: int) -> int:
    """``order`` limited to the run of exact evaluations ending at step i (at least 1); see the
    module docstring."""
    run = 0  # an evaluation at alpha = 0 (a flow's or a zero-SNR schedule's t_max) has no finite
    while run < order and i - run >= 0 and ctx.exact(i - run) and ctx.a(i - run) > 0:  # rho or lambda
        run += 1
    return max(1, min(order, run))


#: the values of the ``lower_order_final`` option: off, diffusers' documented rule, or "always"
LOWER_ORDER_FINAL = (False, True, "always")
#: diffusers' rule lowers the last steps' order of grids shorter than this
LOWER_ORDER_FINAL_BELOW = 15


def lower_order_final(ctx: StepContext, i: int, order: int) -> int:
    """The order a multistep step may use: 1 for the final jump to t = 0; at most the run of exact
    evaluations ending at step i (:func:`usable_order`); and near the end of the grid at most
    steps - i, per the ``lower_order_final`` option: True (default) is diffusers' documented rule,
    grids shorter than 15 steps only (its DPM-Solver++ and DEIS code); "always" lowers at every step
    count, as UniPC's code does (Zhao et al.'s uni_pc.py, which A1111 and ComfyUI port, and diffusers'
    UniPCMultistepScheduler.step: min(solver_order, len(timesteps) - step_index)); False never."""
    if ctx.ends_at_zero(i):
        return 1
    order = usable_order(ctx, i, order)
    lof = ctx.options.get("lower_order_final", True)
    if lof not in LOWER_ORDER_FINAL:  # (1 == True: an int 0 / 1 is accepted as the bool)
        raise VelodiffError(f"lower_order_final must be true, false or 'always', got {lof!r}")
    if lof == "always" or (lof and ctx.steps < LOWER_ORDER_FINAL_BELOW):
        order = min(order, ctx.steps - i)
    return order


StepFn = Callable[[StepContext, int, Tensor, Any], tuple[Tensor, Tensor, Any]]


#: options that make a deterministic solver draw step noise when above 0
NOISE_OPTIONS = ("eta", "s_churn")

#: the values a solver option may take, by name, whatever the solver (``SolverSpec.limits`` narrows
#: them): (kind, lo, hi, lo excluded); "real" is finite (inf allowed where hi is inf), "int" an integer,
#: "bool" True or False. A value outside is one line, never a silently other run (eta = nan ran as 0).
OPTION_VALUES: dict[str, tuple[str, float, float, bool]] = {
    "eta": ("real", 0.0, 100.0, False),  # ComfyUI's bound for its samplers' eta
    "s_noise": ("real", 0.0, 100.0, False),
    "s_churn": ("real", 0.0, math.inf, False),
    "s_tmin": ("real", 0.0, math.inf, False),
    "s_tmax": ("real", 0.0, math.inf, False),
    "r": ("real", 0.0, 1.0, True),  # DPM++ SDE's intermediate point (DPM-Solver's r1 / r2: its _r)
    "rtol": ("real", 0.0, 1.0, False),
    "atol": ("real", 0.0, 1.0, False),
    "h_init": ("real", 1e-6, 10.0, False),
    "accept_safety": ("real", 0.0, 1.0, True),
    "pcoeff": ("real", -10.0, 10.0, False),
    "icoeff": ("real", -10.0, 10.0, False),
    "dcoeff": ("real", -10.0, 10.0, False),
    "timestep_scaling": ("real", 0.0, 1e4, True),
    "order": ("int", 1, 10, False),
    "dc_order": ("int", 1, 10, False),
    "use_corrector": ("bool", 0, 1, False),
    "boundary": ("bool", 0, 1, False),
    "half": ("bool", 0, 1, False),
    "corrector_pseudo": ("bool", 0, 1, False),
    "predictor_pseudo": ("bool", 0, 1, False),
    "orders": ("ints", 1, 10, False),  # per step
    "disable_corrector": ("ints", 0, math.inf, False),  # step indices
    "dc_ratios": ("reals", -10.0, 10.0, False),  # per step
}


def _check_value(solver: str, key: str, value: Any, rule: tuple[str, float, float, bool]) -> None:
    """One line unless ``value`` is of the rule's kind in [lo, hi] (lo excluded when the rule says)."""
    kind, lo, hi, open_lo = rule
    if kind in ("ints", "reals"):  # a list of such numbers
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise VelodiffError(f"solver {solver!r}: option {key} must be a list of numbers, got {value!r}")
        for v in value:
            _check_value(solver, f"{key}'s entry", v, (kind[:-1], lo, hi, open_lo))
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise VelodiffError(f"solver {solver!r}: option {key} must be true or false, got {value!r}")
        return
    ok = is_number(value)
    if kind == "int":
        ok = ok and float(value).is_integer()
    else:
        ok = ok and (math.isfinite(value) or (value == math.inf and hi == math.inf))
    ok = ok and (lo < value if open_lo else lo <= value) and value <= hi
    if not ok:
        what = "an integer" if kind == "int" else "a number"
        bounds = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise VelodiffError(f"solver {solver!r}: option {key} must be {what} in {bounds}, got {value!r}")


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
    #: the step re-adds noise from ``ctx.renoise_x0`` (the rules that set it, CFG++, need such a solver)
    renoises: bool = False
    #: an error controller decides the evaluations of each step (dpm_adaptive): ``nfe`` does not plan them
    adaptive: bool = False
    #: options with no usable default, fitted to the model (DPM-Solver-v3's statistics ``ems``)
    requires: tuple[str, ...] = ()
    #: a solver that plans its steps from the whole grid (an NFE budget): ``suffix(options, steps, start)``
    #: gives the options of the grid's last steps from ``start`` on (img2img and inpainting run those)
    suffix: Callable[[dict[str, Any], int, int], dict[str, Any]] | None = None
    #: this solver's narrower (lo, hi) of an option of :data:`OPTION_VALUES` (DEIS: orders 1-3)
    limits: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def nfe(self, steps: int, ends_at_zero: bool = True) -> int:
        saved = self.nfe_per_step - 1 if self.saves_final_eval and ends_at_zero else 0
        return self.nfe_per_step * steps - saved

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse, in one line, an option this solver does not have (listing those it has)."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            from . import SOLVERS

            key = sorted(unknown)[0]
            takers = sorted(name for name, s in SOLVERS.items() if key in s.defaults)
            where = f"; {key!r} is an option of {', '.join(takers)}" if takers else ""
            raise VelodiffError(
                f"solver {self.name!r} has no option {key!r} (its options: "
                f"{', '.join(sorted(self.defaults)) or 'none'}){where}"
            )
        for key, value in options.items():  # and the values (OPTION_VALUES)
            if key in OPTION_VALUES:
                kind, lo, hi, open_lo = OPTION_VALUES[key]
                _check_value(self.name, key, value, (kind, *self.limits.get(key, (lo, hi)), open_lo))

    def draws_noise(self, options: Mapping[str, Any]) -> bool:
        """True when a run with these options draws step noise (an ancestral or SDE solver, or eta or
        s_churn above 0)."""
        opts = {**self.defaults, **options}
        return self.stochastic or any(float(opts.get(k, 0) or 0) > 0 for k in NOISE_OPTIONS)

    def missing(self, options: Mapping[str, Any]) -> list[str]:
        """The required options (``requires``) that ``options`` leave unset."""
        return [k for k in self.requires if options.get(k) is None]

    def plan_nfe(self, nfe: int, ends_at_zero: bool = True) -> tuple[int, dict[str, Any]]:
        """Steps, and the options that go with them, spending at most ``nfe`` evaluations: the most
        steps that fit, or, for a solver that plans its orders from the budget (an ``nfe`` option:
        DPM-Solver-fast, Lu et al. 2022, Sec. 3.4), floor(nfe / nfe_per_step) + 1 steps and the budget."""
        if "nfe" in self.defaults:
            return int(nfe) // self.nfe_per_step + 1, {"nfe": int(nfe)}
        return self.steps_for_nfe(int(nfe), ends_at_zero), {}

    def steps_for_nfe(self, nfe: int, ends_at_zero: bool = True) -> int:
        """The most steps whose NFE does not exceed ``nfe``, at least 1 (a budget below one step's NFE
        gets one step; ``sample`` then refuses a solver whose ``min_steps`` is more)."""
        steps = max(1, nfe // self.nfe_per_step)
        while self.nfe(steps + 1, ends_at_zero) <= nfe:
            steps += 1
        while steps > 1 and self.nfe(steps, ends_at_zero) > nfe:
            steps -= 1
        return steps
