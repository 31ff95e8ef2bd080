"""The sampling loop: one function that runs any solver over any grid with any denoiser and plan.

    result = sample(denoiser, x_T, ts, "dpmpp_2m", cond=GuidedCond(c, u), plan="cfg:scale=5")

Every evaluation the solver asks for goes through the plan's stack of accelerators
(``velodiff.plan``) down to one batched call of the denoiser per request; NFE and network-sample
evaluations are counted from what each evaluation reports after the call. The loop stops with the
step index on NaN/inf or a shape mismatch. After every step the plan's rules may edit x
(``after_step``) or have the step taken again from a new x (``redo``: self-recurrence), then
``callback(StepInfo)`` is called: it may return an edited x (a tensor) or True to stop the run, which
then returns the latest x0 estimate.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from .denoisers import Cond, Denoiser
from .errors import VelodiffError
from .grids import check_grid
from .guidance.cfg import GuidedCond
from .noise import BrownianNoise, GaussianNoise
from .plan import Accelerator, EvalRequest, EvalResult, Plan, RunInfo, branch_evaluator
from .schedules import F64
from .solvers import SolverSpec, StepContext, get_solver
from .solvers.base import EvalRecord


@dataclass(frozen=True)
class StepInfo:
    """After step ``i``: ``x`` is the sample at time ``t`` (= ts[i + 1]); ``x0`` is the clean-data
    prediction the step made at time ``t_from`` (= ts[i])."""

    i: int
    t: float
    x: Tensor
    x0: Tensor
    t_from: float


#: what a callback may return: None (go on), True (stop), or an edited x
Callback = Callable[[StepInfo], "bool | Tensor | None"]


@dataclass
class SampleResult:
    x: Tensor
    nfe: int
    evals: int
    steps: int
    stopped: bool = False
    #: the canonical plan string of the run ("none" without one)
    plan: str = "none"


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


def branches_of(cond: Cond) -> dict[str, Cond]:
    """The named conditionings of a run: a GuidedCond gives ``cond`` and ``uncond``; anything else (a
    tensor, or a mapping such as SDXL's embeddings and added conditions) is the single ``cond`` branch."""
    if isinstance(cond, GuidedCond):
        return {"cond": cond.cond, "uncond": cond.uncond}
    return {"cond": cond}


def check_denoiser(denoiser: object) -> None:
    """Refuse, in one line, what is not a denoiser: a plain function or a network has no noise schedule,
    so the loop could not place the grid's times on it."""
    if not callable(denoiser) or not hasattr(getattr(denoiser, "schedule", None), "alpha"):
        what = getattr(denoiser, "__name__", type(denoiser).__name__)
        raise VelodiffError(
            f"sample() needs a denoiser with a noise schedule (denoiser.schedule), got {what!r}; wrap a "
            "network or function f(x, timestep, cond) as velodiff.ModelDenoiser(f, schedule, "
            "prediction_type='epsilon' | 'v_prediction' | 'sample' | 'flow')"
        )


def check_arguments(x: Any, seed: Any, noise: Any, callback: Any, grad: Any) -> None:
    """:func:`sample`'s own arguments, refused in one line: a sample that is no floating-point tensor
    with a batch axis (a bool or complex one ran), a seed that is no integer in torch's range (2**64 ran
    as 0), a noise or callback that cannot be called, a ``grad`` that is not True or False ("no" ran
    with gradients)."""
    from .noise import check_seed

    if not isinstance(x, Tensor):
        raise VelodiffError(f"x is a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.ndim < 1 or x.is_meta:
        what = "a meta tensor" if x.is_meta else f"{x.dtype} of shape {tuple(x.shape)}"
        raise VelodiffError(f"x is a floating-point tensor with a batch axis, got {what}")
    check_seed(seed)
    for name, fn in (("noise", noise), ("callback", callback)):
        if fn is not None and not callable(fn):
            raise VelodiffError(f"{name} is a function of the step, got {type(fn).__name__}")
    if not isinstance(grad, bool):
        raise VelodiffError(f"grad is True or False, got {grad!r}")


def check_context(context: Any) -> None:
    """A run's ``context``: None or a mapping of ``RunInfo`` fields (one line otherwise)."""
    if context is not None and not isinstance(context, Mapping):
        raise VelodiffError(f"context maps RunInfo fields to values, got {type(context).__name__}")


def check_run(
    denoiser: Denoiser,
    ts: Tensor,
    spec: SolverSpec,
    plan: Plan,
    batch: int,
    conds: Mapping[str, Cond],
    context: Mapping[str, Any] | None = None,
    options: Mapping[str, object] | None = None,
) -> RunInfo:
    """What :func:`sample` refuses before its first step (the solver's options and minimum steps, the
    grid, each plan rule's ``check`` on this run), without sampling; returns the run's RunInfo. A
    server calls it when a job is submitted, so a run that cannot start is refused there."""
    check_context(context)
    spec.check_options(options or {})
    check_grid(denoiser.schedule, ts)
    if len(ts) - 1 < spec.min_steps:
        raise VelodiffError(f"solver {spec.name!r} needs at least {spec.min_steps} steps, got {len(ts) - 1}")
    if plan.settings:
        raise VelodiffError(
            f"plan settings ({', '.join(plan.settings)}) choose the solver and grid of a pipeline run "
            "(text2img, img2img, inpaint, the CLI); sample() and denoise_once() take them as arguments"
        )
    known = [f.name for f in fields(RunInfo)]
    unknown = sorted(set(context or {}) - set(known))
    if unknown:
        raise VelodiffError(f"context has no field {unknown[0]!r}; RunInfo's fields: {', '.join(known)}")
    run = RunInfo(
        schedule=denoiser.schedule,
        ts=ts,
        solver=spec,
        batch=batch,
        conds=conds,
        prediction_type=getattr(denoiser, "prediction_type", None),
        options=dict(options or {}),
        **dict(context or {}),
    )
    for rule in plan.rules:
        rule.check(run)
    return run


def sample(
    denoiser: Denoiser,
    x: Tensor,
    ts: Tensor,
    solver: str | SolverSpec = "dpmpp_2m",
    *,
    cond: Cond = None,
    seed: int = 0,
    noise: Callable[[int], Tensor] | None = None,
    callback: Callback | None = None,
    plan: str | Plan | Accelerator | Sequence[Accelerator | str] | None = None,
    context: Mapping[str, Any] | None = None,
    grad: bool = False,
    **options: object,
) -> SampleResult:
    """Integrate from ``x`` at ``ts[0]`` down to ``ts[-1]`` with ``solver`` under ``plan``.

    ``options`` are the solver's own (e.g. ``eta``, ``order``); unknown ones are refused.
    Stochastic solvers draw noise from ``noise`` or, by default, from ``seed``. ``context`` adds what
    a rule may need of the model (``RunInfo`` fields: model, network, encode, prompts). ``grad=True``
    (or a rule that needs it) runs with gradients enabled; otherwise sampling runs under
    ``torch.inference_mode``."""
    spec = get_solver(solver)
    check_denoiser(denoiser)
    check_arguments(x, seed, noise, callback, grad)
    try:
        ts = torch.as_tensor(ts, dtype=F64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise VelodiffError(f"ts is a list or tensor of times, got {type(ts).__name__}") from None
    if not bool(torch.isfinite(x).all()):
        raise VelodiffError("the initial sample contains NaN or inf")
    plan = Plan.parse(plan)
    check_context(context)
    context = {"seeds": (seed,), **dict(context or {})}
    run = check_run(denoiser, ts, spec, plan, x.shape[0], branches_of(cond), context, options)
    grad = grad or plan.needs_grad
    with contextlib.ExitStack() as mode:
        if grad:  # also inside a caller's no_grad or inference_mode: grad=True is asked for explicitly
            mode.enter_context(torch.inference_mode(False))
            mode.enter_context(torch.enable_grad())
        else:
            mode.enter_context(torch.inference_mode())
        return _loop(denoiser, x, ts, spec, plan, run, seed, noise, callback, options)


def _loop(
    denoiser: Denoiser,
    x: Tensor,
    ts: Tensor,
    spec: SolverSpec,
    plan: Plan,
    run: RunInfo,
    seed: int,
    noise: Callable[[int], Tensor] | None,
    callback: Callback | None,
    options: Mapping[str, object],
) -> SampleResult:
    counts = {"nfe": 0, "evals": 0, "step": 0, "stage": 0}
    check = FiniteCheck(lazy=x.device.type != "cpu")
    record = EvalRecord()
    evaluate = plan.chain(branch_evaluator(denoiser))

    w = plan.fixed_guidance()
    w = w if w is not None else run.guidance
    scale = f" (guidance scale {w:g})" if w is not None else ""
    made = f"the plan's rules{scale} made NaN or inf of finite predictions"

    def denoise(x_in: Tensor, t: float) -> Tensor:
        step = counts["step"]
        req = EvalRequest(step, counts["stage"], torch.as_tensor(t, dtype=F64), x_in, run.conds)
        counts["stage"] += 1
        res = evaluate(req)
        counts["nfe"] += res.cost.nfe
        counts["evals"] += res.cost.evals
        record.note(step, res.exact, res.renoise_x0)
        x0 = res.x0
        if x0.shape != x_in.shape:
            raise VelodiffError(
                f"the model returned shape {tuple(x0.shape)} for input {tuple(x_in.shape)} at step {step}"
            )
        where = f"at step {step} (t={float(t):.4g})"
        for name, part in res.parts.items():  # each branch's prediction, then what the rules made of them
            branch = f" for branch {name!r}" if name != "cond" else ""
            check(part, f"the model returned NaN or inf {where}{branch}")
        if not any(x0 is part for part in res.parts.values()):  # (a part itself is checked above)
            check(x0, f"{made if res.parts else 'the model returned NaN or inf'} {where}")
        return x0

    if noise is None and spec.noise != "none":
        noise = BrownianNoise(x, seed, ts) if spec.noise == "brownian" else GaussianNoise(x, seed)
    elif noise is not None:  # the caller's: one draw of the sample's shape per step (not broadcast)
        noise = _ShapedNoise(noise, x.shape)
    sched = run.schedule
    ctx = StepContext(
        denoise=denoise,
        schedule=sched,
        ts=ts,
        alphas=sched.alpha(ts),
        sigmas=sched.sigma(ts),
        lambdas=sched.log_snr(ts),
        noise=noise,
        options={**spec.defaults, **options},
        record=record,
    )
    with running(plan, run):
        state = None
        for i in range(ctx.steps):
            counts["step"] = i
            start, history = x, state
            while True:  # once, or again from the x a rule's redo gives (self-recurrence)
                counts["stage"] = 0
                x, x0, taken = spec.step(ctx, i, start, history)
                check(x, f"the sample became NaN or inf at step {i} (t={ctx.t(i):.4g})")
                info = StepInfo(i, ctx.t(i + 1), x, x0, ctx.t(i))
                for rule in reversed(plan.rules):  # innermost first, as the evaluations ran
                    edited = rule.after_step(info)
                    if edited is not None:
                        info = replace(info, x=_edited(edited, x, f"plan rule {rule.name!r}"))
                    extra = rule.extra_cost()
                    counts["nfe"] += extra.nfe
                    counts["evals"] += extra.evals
                again = next(((rule, y) for rule in plan.rules if (y := rule.redo(info)) is not None), None)
                if again is None:
                    break
                # a new trajectory through the new x: the solver takes it without history, as a first step
                start, history = _edited(again[1], start, f"plan rule {again[0].name!r}"), None
            x, state = info.x, taken
            reply = callback(info) if callback is not None else None
            if isinstance(reply, Tensor):
                x = _edited(reply, x, "the callback")
                if not bool(torch.isfinite(x).all()):  # named here, not later as "the model returned NaN"
                    raise VelodiffError(f"the callback returned an x holding NaN or inf at step {i}")
            elif reply is not None and not isinstance(reply, bool):  # "no" or 1 stopped the run
                raise VelodiffError(f"the callback returns None or False (go on), True (stop) or a tensor "
                                    f"(the new x); got {type(reply).__name__} at step {i}")
            elif reply:
                check.raise_first()
                return SampleResult(x0, counts["nfe"], counts["evals"], i + 1, stopped=True, plan=str(plan))
        check.raise_first()
        return SampleResult(x, counts["nfe"], counts["evals"], ctx.steps, plan=str(plan))


@contextlib.contextmanager
def running(plan: Plan, run: RunInfo):
    """The rules' lifecycle around a run: begin each (outermost first), end those begun (innermost
    first) however the run ends. A rule whose ``begin`` raises is ended at once (what it installed before
    the error, hooks or processors, must not stay on the network); an error of that ``end`` is dropped
    for the ``begin``'s own. Every begun rule is ended even when another's ``end`` raises, and an error
    of the run itself propagates, not one of an ``end``. Runs of one network take turns (a lock)."""
    started: list[Accelerator] = []
    run = replace(run, plan=str(plan))
    with network_lock(run.network):
        try:
            for rule in plan.rules:
                try:
                    rule.begin(run)
                except BaseException:
                    with contextlib.suppress(Exception):
                        rule.end()
                    raise
                started.append(rule)
            yield
        except BaseException:
            _end(started)  # the run's own error propagates, not an end's
            raise
        errors = _end(started)
        if errors:
            raise errors[0]


#: one lock per network: a run's rules swap weights, processors and hooks on the network it shares with
#: every other run of the model, so runs of one network (other threads) take turns; re-entrant for the
#: runs a rule starts inside its own (weakly keyed: a dropped model drops its lock)
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def network_lock(network: Any) -> contextlib.AbstractContextManager:
    """The lock runs of ``network`` take turns with (also taken by what reads or copies the network
    outside a run: the diffusion classifier, concept erasure), re-entrant."""
    if network is None:
        return contextlib.nullcontext()
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(network, threading.RLock())


def _end(rules: list[Accelerator]) -> list[Exception]:
    """End every rule (innermost first), each even if another's ``end`` raised; their errors."""
    errors: list[Exception] = []
    for rule in reversed(rules):
        try:
            rule.end()
        except Exception as e:  # noqa: BLE001 - the other rules must still come off the network
            errors.append(e)
    return errors


class _ShapedNoise:
    """A caller's noise source whose draws are checked to have the sample's shape (one of another shape
    was broadcast over the batch); its ``between`` (a Brownian source's) too where it has one."""

    def __init__(self, noise: Callable[[int], Tensor], shape: torch.Size) -> None:
        self.noise, self.shape = noise, shape
        if hasattr(noise, "between"):
            self.between = lambda t_from, t_to: self._checked(noise.between(t_from, t_to), "between()")

    def __call__(self, i: int) -> Tensor:
        return self._checked(self.noise(i), f"noise({i})")

    def _checked(self, z: Any, call: str) -> Tensor:
        if not isinstance(z, Tensor) or z.shape != self.shape:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise VelodiffError(f"{call} returned {got}; a step's noise has the sample's shape "
                                f"{tuple(self.shape)}")
        return z


def _edited(new: Tensor, old: Tensor, who: str) -> Tensor:
    if new.shape != old.shape:
        raise VelodiffError(f"{who} returned x of shape {tuple(new.shape)}; the sample is {tuple(old.shape)}")
    return new


def denoise_once(
    denoiser: Denoiser,
    x: Tensor,
    t: float | Tensor,
    cond: Cond = None,
    plan: str | Plan | Accelerator | Sequence[Accelerator | str] | None = None,
    *,
    step: int = 0,
    ts: Tensor | None = None,
    context: Mapping[str, Any] | None = None,
) -> EvalResult:
    """One evaluation at (x, t) through ``plan``, as step ``step`` of a run over ``ts`` (default: the
    one step from t to 0) would get it: the rules begin, evaluate once and end."""
    check_denoiser(denoiser)
    check_arguments(x, 0, None, None, False)
    if not bool(torch.isfinite(x).all()):
        raise VelodiffError("x contains NaN or inf")
    plan = Plan.parse(plan)
    t = torch.as_tensor(t, dtype=F64)
    if t.ndim > 1 or (t.ndim == 1 and len(t) not in (1, x.shape[0])):
        raise VelodiffError(f"t is one time or one per sample ({x.shape[0]}), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):  # (a NaN time gave a NaN prediction, 5.0 one of 1e11)
        raise VelodiffError("t must be finite")
    denoiser.schedule.check_range(t.reshape(-1))
    ts = torch.tensor([float(t.max()), 0.0], dtype=F64) if ts is None else torch.as_tensor(ts, dtype=F64)
    # sample()'s checks of a run: the context's fields, no plan settings, each rule's own check
    run = check_run(denoiser, ts, get_solver("ddim"), plan, x.shape[0], branches_of(cond), context)
    with running(plan, run):
        return plan.chain(branch_evaluator(denoiser))(EvalRequest(step, 0, t, x, run.conds))
