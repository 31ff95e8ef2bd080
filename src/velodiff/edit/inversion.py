"""Inversion on the denoiser level: find the noise a deterministic sampler maps to a given clean latent.

Four methods, each with its regeneration (the sampler it inverts), on any :class:`~velodiff.denoisers.
Denoiser` with any conditioning and plan (guidance included); the grid ``ts`` is the sampling grid
(descending, ``ts[0]`` the noisiest time) and inversion walks it backwards, from ``z0`` at ``ts[-1]``.

* ``ddim``: DDIM inversion (Song et al. 2021, Eq. 12 run from t_{i+1} up to t_i; Dhariwal & Nichol 2021,
  App. F): the noise of the unknown x_i is approximated by the prediction at the known x_{i+1},
  eps(x_i, t_i) ~ eps(x_{i+1}, t_{i+1}) (at t_{i+1} = 0, where eps is undefined, at time t_i). One
  evaluation per step; the round trip is not exact, the more so with guidance.
* ``edict``: EDICT (Wallace et al. 2023, 'EDICT: Exact Diffusion Inversion via Coupled
  Transformations', Sec. 3.2): two coupled sequences (x, y), each DDIM step split into affine coupling
  layers and a mixing layer with weight p (0.93); every layer is inverted in closed form, so the round
  trip is exact up to floating-point round-off. Two evaluations per step.
* ``fixed-point``: per-step fixed-point inversion of *any* deterministic solver's step (the implicit
  equation x_{i+1} = step_i(x_i), solved for x_i; Pan et al. 2023 'Effective Real Image Editing with
  Accelerated Iterative Diffusion Inversion' (AIDI), Garibi et al. 2024 'ReNoise'). The iteration is
  x_i <- x_i + g_i (x_{i+1} - step_i(x_i)) with g_i = alpha_i / alpha_{i+1}: for DDIM this is exactly
  AIDI's iteration with eps held fixed (x0' = (x_{i+1} - sigma_{i+1} eps(x_i)) / alpha_{i+1},
  x_i = alpha_i x0' + sigma_i eps(x_i)), a contraction with factor about sigma_i (sigma_i -
  alpha_i sigma_{i+1} / alpha_{i+1}) < 1; where alpha_i = 0 (a flow model's t = 1) it holds x0 fixed
  instead, g_i = sigma_i / sigma_{i+1}. The solver is a black box, so multistep solvers
  (DPM-Solver++ 2M, UniPC, ...) work: a multistep step also depends on the history of the noisier
  steps, unknown when it is inverted; the first sweep inverts each step with no history (the solver's
  warm-up order), every further sweep with the history replayed from the previous sweep's trajectory
  (a Jacobi iteration over the history terms: the history's error moves about one step per sweep,
  so it converges slowly, faster on log-SNR grids; measured in bench/edit/README.md), until the whole
  trajectory inverts the solver's own. Such a sweep can also make things worse (with strong guidance
  the per-step solves leave errors the next sweep's history amplifies), so after each sweep the solver
  is run forward from the noise found (one more evaluation per step) and the best sweep is kept; two
  worse sweeps in a row end the iteration.
* ``rf``: RF-Inversion (Rout et al. 2024, 'Semantic Image Inversion and Editing using Rectified
  Stochastic Differential Equations', Eq. 8 and Alg. 1) for flow models: the controlled forward ODE
  dY/dt = v(Y, t) + gamma ((y1 - Y) / (1 - t) - v(Y, t)) toward a drawn noise y1 (gamma = 0: plain
  Euler inversion of the flow), and the controlled reverse ODE (Eq. 15, Alg. 2)
  dX/dt = v(X, t) + eta ((X - y0) / t - v(X, t)) toward the image y0 for the first ``stop`` fraction
  of the steps. In velodiff's time (t = 0 data, v = dx/dt = eps - x0) both are integrated with Euler.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..denoisers import Cond, Denoiser
from ..errors import VelodiffError, unknown_name
from ..limits import is_integer, is_number
from ..plan import EvalRequest, Plan, RunInfo, branch_evaluator
from ..schedules import F64
from ..solvers import SolverSpec, StepContext, get_solver

METHODS = ("ddim", "edict", "fixed-point", "rf")
#: fixed-point sweeps for a solver with history, unless the noise stops changing before (``sweeps=None``)
MAX_SWEEPS = 6
#: the methods that are their own sampler (the solver option is for fixed-point only)
OWN_SAMPLER = {"ddim": "ddim", "edict": "ddim", "rf": "euler"}


@dataclass
class InversionResult:
    """``latents``: the inverted sample at ``ts[0]`` (for EDICT, the x of the pair; ``pair`` holds y);
    ``nfe``: batched network calls the inversion made; ``info``: the method's settings and, for
    fixed-point, the largest step residual left after the last sweep."""

    method: str
    latents: Tensor
    ts: Tensor
    solver: str
    nfe: int
    pair: Tensor | None = None
    #: RF-Inversion's reference (the clean latent its reverse controller steers toward)
    reference: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """One network evaluation at (x, t) through the plan, as step ``step`` of a run over ``ts``; counts
    NFE and network-sample evaluations. Use as a context manager (the plan's rules begin and end)."""

    def __init__(
        self,
        denoiser: Denoiser,
        ts: Tensor,
        cond: Cond,
        plan: Any,
        batch: int,
        context: Mapping[str, Any] | None = None,
        solver: str = "ddim",
    ) -> None:
        from ..sampling import branches_of

        self.plan = Plan.parse(plan)
        if self.plan.settings:
            raise VelodiffError(
                "plan settings (solver=, steps=, ...) are not taken here; pass them as arguments"
            )
        self.run = RunInfo(
            schedule=denoiser.schedule,
            ts=ts,
            solver=get_solver(solver),
            batch=batch,
            conds=branches_of(cond),
            prediction_type=getattr(denoiser, "prediction_type", None),
            **dict(context or {}),
        )
        for rule in self.plan.rules:
            rule.check(self.run)
        self.evaluate = self.plan.chain(branch_evaluator(denoiser))
        #: the stage of the next evaluation within its step (0 again at each new step)
        self.nfe, self.evals, self.stage, self._step = 0, 0.0, 0, None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Evaluator:
        from ..sampling import running

        if not self.plan.needs_grad:
            self._stack.enter_context(torch.inference_mode())
        self._stack.enter_context(running(self.plan, self.run))
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self._stack.__exit__(*exc)  # the rules see the run's own error, which propagates

    def x0(self, x: Tensor, t: float, step: int) -> Tensor:
        if step != self._step:
            self.stage, self._step = 0, step
        res = self.evaluate(EvalRequest(step, self.stage, torch.as_tensor(t, dtype=F64), x, self.run.conds))
        self.stage += 1
        self.nfe += res.cost.nfe
        self.evals += res.cost.evals
        if not bool(torch.isfinite(res.x0).all()):
            raise VelodiffError(f"the model returned NaN or inf during inversion at step {step} (t={t:.4g})")
        return res.x0

    def eps(self, x: Tensor, t: float, step: int) -> Tensor:
        """eps = (x - alpha x0) / sigma at t > 0."""
        s = self.run.schedule
        a, sg = float(s.alpha(t)), float(s.sigma(t))
        return (x - a * self.x0(x, t, step)) / sg


def _coeffs(sched: Any, t_from: float, t_to: float) -> tuple[float, float]:
    """DDIM from t_from to t_to in eps form: x_to = a x_from + b eps (Song et al. 2021, Eq. 12 with
    sigma_t = 0): a = alpha_to / alpha_from, b = sigma_to - alpha_to sigma_from / alpha_from; EDICT's
    a_t, b_t (Wallace et al. 2023, Sec. 3.1)."""
    af, sf = float(sched.alpha(t_from)), float(sched.sigma(t_from))
    at, st = float(sched.alpha(t_to)), float(sched.sigma(t_to))
    return at / af, st - at * sf / af


def check_method(method: str, schedule: Any, solver: str | SolverSpec | None) -> str:
    if method not in METHODS:
        raise unknown_name("inversion method", method, METHODS)
    if method == "rf" and getattr(schedule, "kind", "") != "flow":
        raise VelodiffError(
            "inversion method 'rf' (RF-Inversion) needs a flow model (SD3, Flux); this model's schedule is "
            f"{type(schedule).__name__}: use ddim, edict or fixed-point"
        )
    if method in ("ddim", "edict") and float(schedule.alpha(schedule.t_max)) <= 0:
        raise VelodiffError(
            f"inversion method {method!r} divides by alpha(t), which is 0 at this flow model's t = 1; "
            "use rf or fixed-point"
        )
    if solver is not None and method in OWN_SAMPLER and get_solver(solver).name != OWN_SAMPLER[method]:
        raise VelodiffError(
            f"inversion method {method!r} inverts its own sampler ({OWN_SAMPLER[method]}); "
            "a solver is chosen with method fixed-point"
        )
    return method


def check_deterministic(spec: SolverSpec, options: Mapping[str, Any]) -> None:
    if spec.draws_noise(options):
        raise VelodiffError(
            f"solver {spec.name!r} is stochastic (with these options) and cannot be inverted; "
            "use a deterministic one (ddim, euler, dpmpp_2m, unipc, heun, ...)"
        )


def invert_latents(
    denoiser: Denoiser,
    z0: Tensor,
    ts: Tensor,
    method: str = "edict",
    *,
    cond: Cond = None,
    plan: Any = None,
    solver: str | SolverSpec | None = None,
    context: Mapping[str, Any] | None = None,
    p: float = 0.93,
    iters: int = 8,
    tol: float = 1e-5,
    sweeps: int | None = None,
    gamma: float = 0.5,
    seed: int = 0,
    exact: bool = True,
    progress: Callable[[int], None] | None = None,
    **solver_options: Any,
) -> InversionResult:
    """Invert the clean latent ``z0`` (at ``ts[-1]``) to ``ts[0]`` with ``method`` (module docstring).
    ``solver`` (+ ``solver_options``) is the sampler fixed-point inverts (default dpmpp_2m); ``p``:
    EDICT's mixing weight; ``iters`` / ``tol``: fixed-point iterations per step and the residual (max
    abs) that ends them early; ``sweeps``: fixed-point sweeps (default 1 for a solver without history;
    otherwise up to MAX_SWEEPS, until the inverted noise changes by at most ``tol``); ``gamma``:
    RF-Inversion's controller strength, ``seed`` its target noise y1; ``exact``: EDICT's coupling and
    mixing layers in float64 (the network still runs in its own dtype; its input is rounded to it the
    same way both ways, so a float32 model round-trips to float32 round-off)."""
    sched = denoiser.schedule
    check_method(method, sched, solver)
    ts = torch.as_tensor(ts, dtype=F64).cpu()
    if len(ts) < 2:
        raise VelodiffError("inversion needs at least one step")
    for name, v, integral in (("p", p, False), ("gamma", gamma, False), ("tol", tol, False),
                              ("iters", iters, True), ("sweeps", 1 if sweeps is None else sweeps, True)):
        if not (is_integer(v) if integral else is_number(v)) or not math.isfinite(v):
            raise VelodiffError(f"{name} must be {'an integer' if integral else 'a number'}, got {v!r}")
    if not 0.0 < p < 1.0:
        raise VelodiffError(f"EDICT's mixing weight p must be in (0, 1), got {p}")
    if not 0.0 <= gamma <= 1.0:
        raise VelodiffError(f"RF-Inversion's gamma must be in [0, 1], got {gamma}")
    if iters < 1 or (sweeps is not None and sweeps < 1):
        raise VelodiffError("fixed-point iters and sweeps must be >= 1")
    # the solver as named, with the options its name carries ('ddim:eta=1' draws noise: refused below)
    spec = get_solver(solver if solver is not None else OWN_SAMPLER.get(method, "dpmpp_2m"))
    check_deterministic(spec, solver_options)
    spec.check_options(solver_options)
    stateful = [r.spec() for r in Plan.parse(plan).rules if r.stateful]
    if stateful:
        raise VelodiffError(
            f"plan rule {stateful[0]!r} carries state from step to step (or retakes steps from fresh "
            "noise); an inversion runs the steps the other way and cannot undo it: leave it out of its plan"
        )
    z0 = z0.detach()
    with Evaluator(denoiser, ts, cond, plan, z0.shape[0], context, spec.name) as ev:
        info: dict[str, Any] = {}
        pair = ref = None
        if method == "ddim":
            x = _ddim_invert(ev, z0, ts, progress)
        elif method == "edict":  # the coupling arithmetic in float64 (the network keeps its dtype)
            x, pair = _edict_invert(ev, z0.double() if exact else z0, ts, p, progress)
            info["p"] = p
        elif method == "rf":
            x = _rf_invert(ev, z0, ts, gamma, seed, progress)
            ref = z0
            info.update(gamma=gamma, seed=seed)
        else:
            x, info = _fixed_point_invert(ev, spec, z0, ts, iters, tol, sweeps, solver_options, progress)
        return InversionResult(method, x, ts, spec.name, ev.nfe, pair, ref, info)


def _ddim_invert(ev: Evaluator, z0: Tensor, ts: Tensor, progress: Any) -> Tensor:
    sched, n = ev.run.schedule, len(ts) - 1
    x = z0
    for i in reversed(range(n)):  # from ts[i + 1] up to ts[i]
        t_lo, t_hi = float(ts[i + 1]), float(ts[i])
        t_eval = t_lo if float(sched.sigma(t_lo)) > 0 else t_hi
        eps = ev.eps(x, t_eval, i)  # eps(x_i, t_i) ~ eps(x_{i+1}, t_{i+1})
        # DDIM (Song et al. 2021, Eq. 12, eta = 0) from t_hi to t_lo, solved for x at t_hi:
        # x_lo = a x_hi + b eps  =>  x_hi = (x_lo - b eps) / a
        a, b = _coeffs(sched, t_hi, t_lo)
        x = (x - b * eps) / a
        if progress:
            progress(1)
    return x


def _edict_invert(ev: Evaluator, z0: Tensor, ts: Tensor, p: float, progress: Any) -> tuple[Tensor, Tensor]:
    sched = ev.run.schedule
    x, y = z0, z0.clone()
    for i in reversed(range(len(ts) - 1)):
        t = float(ts[i])  # the noisier time of the step: both evaluations are made there
        a, b = _coeffs(sched, t, float(ts[i + 1]))
        # EDICT inversion (Wallace et al. 2023, Sec. 3.2): undo the mixing layers, then the coupling
        # layers, in reverse order of the denoising step below
        y_inter = (y - (1 - p) * x) / p
        x_inter = (x - (1 - p) * y_inter) / p
        y = (y_inter - b * ev.eps(x_inter, t, i)) / a
        x = (x_inter - b * ev.eps(y, t, i)) / a
        if progress:
            progress(1)
    return x, y


def edict_regenerate(ev: Evaluator, x: Tensor, y: Tensor, ts: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """EDICT's denoising (Wallace et al. 2023, Sec. 3.2): x_inter = a x + b eps(y, t); y_inter = a y +
    b eps(x_inter, t); x' = p x_inter + (1 - p) y_inter; y' = p y_inter + (1 - p) x'."""
    sched = ev.run.schedule
    for i in range(len(ts) - 1):
        t = float(ts[i])
        a, b = _coeffs(sched, t, float(ts[i + 1]))
        x_inter = a * x + b * ev.eps(y, t, i)
        y_inter = a * y + b * ev.eps(x_inter, t, i)
        x = p * x_inter + (1 - p) * y_inter
        y = p * y_inter + (1 - p) * x
    return x, y


def _rf_invert(ev: Evaluator, z0: Tensor, ts: Tensor, gamma: float, seed: int, progress: Any) -> Tensor:
    from ..noise import randn

    y1 = torch.cat([randn((1, *z0.shape[1:]), seed + k) for k in range(z0.shape[0])]).to(z0)
    y = z0
    for i in reversed(range(len(ts) - 1)):
        t, t_next = float(ts[i + 1]), float(ts[i])  # t increases: data -> noise
        v = (y - ev.x0(y, t, i)) / t if t > 0 else None  # flow velocity v = (x - x0) / t = eps - x0
        if v is None:  # at t = 0: x = x0, v = eps - x0 needs eps; evaluate at the step's far end
            x0 = ev.x0(y, t_next, i)
            v = (y - x0) / t_next
        # Rout et al. 2024, Eq. 8: u = v + gamma (u(Y | y1) - v), u(Y | y1) = (y1 - Y) / (1 - t)
        u = v + gamma * ((y1 - y) / (1.0 - t) - v)
        y = y + (t_next - t) * u
        if progress:
            progress(1)
    return y


def rf_regenerate(ev: Evaluator, x: Tensor, ts: Tensor, y0: Tensor | None, eta: float, stop: float) -> Tensor:
    """Euler on the flow ODE from ts[0] down; for the first ``stop`` fraction of the steps, Rout et al.
    2024's controlled reverse field (Eq. 15): v + eta ((x - y0) / t - v)."""
    n = len(ts) - 1
    for i in range(n):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v = (x - ev.x0(x, t, i)) / t
        if y0 is not None and eta > 0 and i < stop * n:
            v = v + eta * ((x - y0) / t - v)
        x = x + (t_next - t) * v
    return x


def _fixed_point_invert(
    ev: Evaluator,
    spec: SolverSpec,
    z0: Tensor,
    ts: Tensor,
    iters: int,
    tol: float,
    sweeps: int | None,
    options: Mapping[str, Any],
    progress: Any,
) -> tuple[Tensor, dict[str, Any]]:
    sched, n = ev.run.schedule, len(ts) - 1
    alphas, sigmas = sched.alpha(ts), sched.sigma(ts)
    depth = 3
    cache: dict[int, Tensor] = {}  # step -> the x0 its solve evaluated last (its stage-0 prediction)
    at = {"step": 0}  # the step the solver is on: set before each spec.step call

    def live(x: Tensor, t: float) -> Tensor:
        out = ev.x0(x, t, at["step"])
        if ev.stage == 1:
            cache[at["step"]] = out
        return out

    def replayed(x: Tensor, t: float) -> Tensor:
        return cache[at["step"]]

    def ctx_with(fn: Any) -> StepContext:
        return StepContext(
            denoise=fn,
            schedule=sched,
            ts=ts,
            alphas=alphas,
            sigmas=sigmas,
            lambdas=sched.log_snr(ts),
            noise=None,
            options={**spec.defaults, **options},
        )

    live_ctx, replay_ctx = ctx_with(live), ctx_with(replayed)

    def plain(x: Tensor, t: float) -> Tensor:
        return ev.x0(x, t, at["step"])

    plain_ctx = ctx_with(plain)

    def forward_error(noise: Tensor) -> float:
        """Max error of the solver's own run from ``noise`` against z0 (n more evaluations)."""
        x, state = noise, None
        for j in range(n):
            at["step"], ev.stage = j, 0
            x, _, state = spec.step(plain_ctx, j, x, state)
        return float((x - z0).abs().max())

    best: tuple[float, Tensor | None, int] = (math.inf, None, 0)
    worse = 0
    traj: list[Tensor] = [z0] * (n + 1)  # traj[i]: x at ts[i]; traj[n] = z0
    states: list[Any] = [None] * n
    has_history = False
    worst, total_iters, done = 0.0, 0, 0
    limit = sweeps or 1
    while done < limit:
        worst = 0.0
        new = list(traj)
        for i in reversed(range(n)):
            a_i, a_n = float(alphas[i]), float(alphas[i + 1])
            g = a_i / a_n if a_i > 0 else float(sigmas[i]) / float(sigmas[i + 1])
            target = new[i + 1]
            x = traj[i] if done else target  # the previous sweep's x_i, or x_{i+1} as first guess
            res = None
            mix = Anderson(depth)
            for _ in range(iters):
                at["step"], ev.stage = i, 0
                x_next, _, state = spec.step(live_ctx, i, x, states[i])
                has_history = has_history or state is not None and spec.order > 1
                r = target - x_next
                res = float(r.abs().max())
                total_iters += 1
                if res <= tol:
                    break
                x = mix(x, g * r)
            worst = max(worst, res or 0.0)
            new[i] = x
            if progress:
                progress(1)
        change = float((new[0] - traj[0]).abs().max()) if done else math.inf
        traj = new
        done += 1
        if sweeps is None and done == 1 and has_history:
            limit = MAX_SWEEPS
        if has_history:  # a sweep may make the trajectory worse (the history's error): keep the best
            err = forward_error(traj[0])
            if err < best[0]:
                best, worse = (err, traj[0], done), 0
            else:
                worse += 1
            if sweeps is None and worse >= 2:
                break
        if sweeps is None and change <= tol:
            break
        if done < limit:  # the history each step sees in the next sweep: replayed on this trajectory
            state = None
            for j in range(n):
                states[j] = state
                at["step"] = j
                _, _, state = spec.step(replay_ctx, j, traj[j], state)
    info = {"iters": iters, "sweeps": done, "residual": worst, "iterations": total_iters}
    if best[1] is not None:
        info.update(kept_sweep=best[2], forward_error=best[0])
        return best[1], info
    return traj[0], info


def regenerate_latents(
    denoiser: Denoiser,
    inv: InversionResult,
    *,
    cond: Cond = None,
    plan: Any = None,
    context: Mapping[str, Any] | None = None,
    latents: Tensor | None = None,
    eta: float = 0.0,
    stop: float = 0.25,
    callback: Any = None,
    solver_options: Mapping[str, Any] | None = None,
) -> tuple[Tensor, int, float]:
    """Run the sampler ``inv`` inverts from its latents (or ``latents``, e.g. an edited copy), with
    ``cond`` (the inversion's, or another prompt's: an edit) and ``plan``; returns (x at ts[-1], NFE,
    network-sample evaluations per image). ``eta`` / ``stop``: RF-Inversion's reverse controller toward
    the inverted image (0: plain flow), apart from the solver's own options (its ``eta`` too). A
    ``callback`` (the sampling loop's contract) runs with the ddim and fixed-point regenerations; EDICT
    and RF-Inversion run their own coupled steps, which take none (refused, not silently skipped)."""
    solver_options = dict(solver_options or {})
    if latents is not None and not (isinstance(latents, Tensor) and latents.shape == inv.latents.shape):
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise VelodiffError(f"latents must be a tensor of the inverted latents' shape "
                            f"{tuple(inv.latents.shape)}, got {got}")
    x = inv.latents if latents is None else latents.to(inv.latents.device)  # a caller's copy: maybe the CPU
    if callback is not None and inv.method not in ("ddim", "fixed-point"):
        raise VelodiffError(f"a callback runs with the ddim and fixed-point regenerations; {inv.method} "
                            "regenerates with its own coupled steps, which take none")
    if inv.method in ("ddim", "fixed-point"):
        from ..sampling import sample

        res = sample(
            denoiser,
            x,
            inv.ts,
            inv.solver,
            cond=cond,
            plan=plan,
            context=context,
            callback=callback,
            **solver_options,
        )
        return res.x, res.nfe, res.evals
    if not 0.0 <= eta <= 1.0 or not 0.0 <= stop <= 1.0:
        raise VelodiffError(f"RF-Inversion's eta and stop must be in [0, 1], got {eta} and {stop}")
    with Evaluator(denoiser, inv.ts, cond, plan, x.shape[0], context, inv.solver) as ev:
        if inv.method == "edict":
            y = inv.pair if inv.pair is not None else x
            out, _ = edict_regenerate(ev, x, y, inv.ts, float(inv.info.get("p", 0.93)))
            out = out.to(inv.latents.dtype if latents is None else latents.dtype)
        else:
            out = rf_regenerate(ev, x, inv.ts, inv.reference, eta, stop)
        return out, ev.nfe, ev.evals


class Anderson:
    """Anderson acceleration (type II, Walker & Ni 2011, Eq. 2.2 'Anderson acceleration for fixed-point
    iterations'; the accelerator AIDI (Pan et al. 2023, Sec. 3.2) uses for inversion) of the iteration
    x <- x + f(x), per sample: with the last ``depth`` differences dX of iterates and dF of their
    updates, gamma = argmin ||f - dF gamma||, and x <- x + f - (dX + dF) gamma. Guidance makes the
    plain iteration's map expansive near t_max (the guided prediction's Jacobian grows with the scale);
    the mixing converges where it does not."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.xs: list[Tensor] = []
        self.fs: list[Tensor] = []

    def __call__(self, x: Tensor, f: Tensor) -> Tensor:
        b = x.shape[0]
        xf, ff = x.reshape(b, -1).double(), f.reshape(b, -1).double()
        self.xs.append(xf)
        self.fs.append(ff)
        if len(self.xs) > self.depth + 1:
            self.xs.pop(0)
            self.fs.pop(0)
        if len(self.xs) == 1:
            return x + f
        dx = torch.stack([self.xs[k + 1] - self.xs[k] for k in range(len(self.xs) - 1)], -1)  # (B, D, m)
        df = torch.stack([self.fs[k + 1] - self.fs[k] for k in range(len(self.fs) - 1)], -1)
        gram = df.transpose(1, 2) @ df  # (B, m, m): the normal equations, lightly regularized
        reg = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram + reg * eye, df.transpose(1, 2) @ ff[..., None])  # (B, m, 1)
        out = xf + ff - ((dx + df) @ gamma)[..., 0]
        return out.reshape(x.shape).to(x.dtype)
