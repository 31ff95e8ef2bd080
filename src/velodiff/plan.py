"""The step plan: the seam where accelerators decide, per network evaluation, what to run.

Every evaluation the solver asks for becomes an :class:`EvalRequest` (step index, stage within the
step, t, x, the run's named conditionings and the branches to evaluate) and comes back as an
:class:`EvalResult` (x0, the per-branch predictions, the cost actually spent, whether it is exact).
Between the solver and the network sits a stack of :class:`Accelerator` objects, each with a per-run
lifecycle::

    begin(run)               fresh state for this run (nothing leaks from one run to the next)
    evaluate(req, inner)     call inner (the rest of the stack), reuse, add or drop a branch, combine
    after_step(info)         optionally return an edited x (inpainting, layout steering)
    redo(info)               optionally return an x at the step's start to take the step again from
                             (universal guidance's self-recurrence)
    end()                    remove hooks, release state (also when the run fails)

A :class:`Plan` is one string and one object: ``name[:key=value,...]`` joined by ``+``, e.g.
``ag:threshold=0.99+pag:scale=3``; ``none`` is the empty plan. A plan may also set the run itself
(``solver=unipc+nfe=8+grid=karras+guidance=2.5+ag``: :data:`SETTINGS`), overriding the command's or
the sweep's own values for that run, so one plan is a whole recipe (``velodiff tune`` writes such a
plan); ``@FILE`` reads a plan from a file (one item per line or joined by ``+``, ``#`` comments).
Rules stack by their declared ``layer`` (lower = closer to the network; among rules of one layer the
plan string's order, read inner to outer: in ``pag+compose`` compose wraps pag; ``str(plan)`` writes the
same order, so a run's recorded plan string reproduces it), so a guidance rule always combines what the
caches below it returned. Two rules may not claim the same branch.

The base evaluator at the bottom of the stack batches the requested branches of one request into a
single network call, in request order, one block of B rows per branch (``EvalRequest.rows``): one
NFE, and as many network-sample evaluations per image as there are branches.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import VelodiffError, unknown_name
from .limits import MAX_STEPS, check_guidance

if TYPE_CHECKING:  # torch loads with the first evaluation, so plan strings parse without it (CLI errors)
    from torch import Tensor

    from .denoisers import Denoiser

#: conditioning handed to the network (see velodiff.denoisers)
Cond = Any


@dataclass(frozen=True)
class Cost:
    """What one evaluation cost: ``nfe`` batched network calls, ``evals`` network-sample evaluations per
    image (CFG batched as one call: nfe = 1, evals = 2; a fraction when a branch ran for some images)."""

    nfe: int = 1
    evals: float = 1

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.nfe + other.nfe, self.evals + other.evals)


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation the solver asked for. ``t`` is a float64 scalar (or per-sample) tensor; ``conds``
    holds every conditioning of the run (``cond``, ``uncond``, and any a rule added); ``branches``
    names the ones to evaluate, batched in this order."""

    step: int
    stage: int
    t: Tensor
    x: Tensor
    conds: Mapping[str, Cond]
    branches: tuple[str, ...] = ("cond",)
    #: branch -> the sample rows (a long tensor) it is evaluated for; absent: every row
    subsets: Mapping[str, Tensor] = field(default_factory=dict)
    #: branch -> its own input (all B rows, shaped like x); absent: x
    inputs: Mapping[str, Tensor] = field(default_factory=dict)

    def with_branch(
        self, name: str, cond: Cond | None = None, rows: Tensor | None = None, x: Tensor | None = None
    ) -> EvalRequest:
        """This request with branch ``name`` added (its conditioning ``cond`` when it is new), for the
        sample ``rows`` only when given (its part then holds those rows, in that order), evaluated at
        its own input ``x`` when given (a new branch only)."""
        conds = self.conds if cond is None else {**self.conds, name: cond}
        if name not in conds:
            raise VelodiffError(f"no conditioning for branch {name!r}; the run has {sorted(conds)}")
        if x is not None and (name in self.branches or x.shape != self.x.shape):
            raise VelodiffError(f"branch {name!r}: an own input needs a new branch and the shape of x")
        branches = self.branches if name in self.branches else (*self.branches, name)
        subsets = dict(self.subsets)
        if rows is not None and not (name in self.branches and name not in self.subsets):
            subsets[name] = rows  # (a branch already asked for every row keeps them all)
        inputs = self.inputs if x is None else {**self.inputs, name: x}
        return replace(self, conds=conds, branches=branches, subsets=subsets, inputs=inputs)

    def size(self, name: str) -> int:
        """How many rows branch ``name`` has in the batched call."""
        rows = self.subsets.get(name)
        return self.x.shape[0] if rows is None else int(rows.numel())

    def rows(self, name: str) -> slice:
        """The rows of branch ``name`` in the batched network call."""
        start = sum(self.size(b) for b in self.branches[: self.branches.index(name)])
        return slice(start, start + self.size(name))


@dataclass
class EvalResult:
    """``x0``: the prediction the solver uses; ``parts``: x0 of every requested branch (a rule that
    answers without the network still gives each, e.g. from a cache); ``cost``: what was
    spent (counted after the call); ``exact``: False when x0 is an estimate (reused, extrapolated);
    ``renoise_x0``: the x0 whose implied noise a solver re-adds (CFG++: the unconditional one), None = x0."""

    x0: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    cost: Cost = field(default_factory=lambda: Cost(0, 0))
    exact: bool = True
    renoise_x0: Tensor | None = None


Evaluate = Callable[[EvalRequest], EvalResult]


@dataclass(frozen=True)
class RunInfo:
    """What an accelerator may know of a run, given at ``begin``. ``model`` is the loaded model
    (None for a bare denoiser), ``network`` its diffusers module (for hooks), ``encode`` encodes extra
    prompts into conditionings (None without a text encoder)."""

    schedule: Any
    ts: Tensor
    solver: Any
    batch: int
    conds: Mapping[str, Cond]
    prediction_type: str | None = None
    model: Any = None
    network: Any = None
    encode: Callable[[list[str]], Cond] | None = None
    prompts: tuple[str, ...] = ()
    #: the run's classifier-free guidance scale (the default of the rules' ``scale``)
    guidance: float | None = None
    #: the seeds a rule draws its own noise from: one per image (pipelines), or one for the batch
    seeds: tuple[int, ...] = ()
    #: the solver's options for this run
    options: Mapping[str, Any] = field(default_factory=dict)
    #: the run's whole plan, as its canonical string (given by the loop when the rules begin)
    plan: str = ""

    @property
    def steps(self) -> int:
        return len(self.ts) - 1


# --- accelerators and their options ---------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of a rule: its default (None: given by the run, e.g. the guidance scale), a range or
    choices, the kind its string parses to, and a line of help."""

    default: Any
    help: str
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    #: a tuple of regular expressions (layer or block names), each checked to compile
    patterns: bool = False


class Accelerator:
    """Base of every plan rule. Subclasses declare ``name``, ``layer``, ``options`` (name -> Option),
    ``claims`` (branches they own), ``cost`` (a line for ``velodiff plans``) and override what they need.
    Option values are attributes; ``values`` holds those the user gave (the canonical string)."""

    name: ClassVar[str] = ""
    layer: ClassVar[int] = 0
    options: ClassVar[dict[str, Option]] = {}
    claims: ClassVar[tuple[str, ...]] = ()
    cost: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: branches the rule reads without owning them (the pipelines then provide their conditioning)
    uses: ClassVar[tuple[str, ...]] = ()
    #: True when the rule differentiates through the network (sampling runs with gradients)
    needs_grad: ClassVar[bool] = False
    #: rules that change or hook the same part of the network share a group; a plan holds at most one
    #: of each ("" = no group; a tuple: every group named)
    exclusive: ClassVar[str | tuple[str, ...]] = ""
    #: True when the rule's effect at a step depends on the steps before it (a feature cache, adaptive
    #: guidance's switch, a momentum): an inversion runs the steps the other way and cannot undo it exactly
    stateful: ClassVar[bool] = False
    #: True when one decision covers the whole batch (FBCache skips the blocks for every row or none):
    #: an image then depends on the others batched with it, so a server never batches such jobs
    couples_batch: ClassVar[bool] = False

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(self.options)
        if unknown:
            raise unknown_option(self.name, sorted(unknown)[0], self.options)
        self.values = {k: check_option(self.name, k, self.options[k], v) for k, v in values.items()}
        for k, opt in self.options.items():
            setattr(self, k, self.values.get(k, opt.default))

    def __repr__(self) -> str:
        return f"<plan rule {self.spec()}>"

    def spec(self) -> str:
        """The rule as ``name[:key=value,...]`` with the options the user gave."""
        if not self.values:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in self.values.items())

    # -- the lifecycle --

    def check(self, run: RunInfo) -> None:
        """Refuse a run this rule cannot serve (one line); called before ``begin``."""

    def refuse_ignored(self, applies: Mapping[str, tuple[bool, str]]) -> None:
        """Refuse an option given in the plan that this run would ignore: ``applies`` maps an option to
        (whether the rule reads it, with what), e.g. ``{"center": (schedule == "nonuniform",
        "schedule=nonuniform")}``."""
        for name, (read, when) in applies.items():
            if name in self.values and not read:
                raise VelodiffError(
                    f"plan rule {self.name!r}: {name} is read only with {when}; this run would ignore it"
                )

    def begin(self, run: RunInfo) -> None:
        self.run = run

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        return inner(req)

    def after_step(self, info: Any) -> Tensor | None:
        return None

    def redo(self, info: Any) -> Tensor | None:
        """After step ``info.i`` (and every rule's ``after_step``): an x at ``info.t_from`` to take the
        step again from, or None to go on (the loop asks until every rule says None)."""
        return None

    def extra_cost(self) -> Cost:
        """Network evaluations the rule ran itself since the last call, outside ``evaluate`` (layout
        guidance's gradient passes in ``after_step``); the loop adds them to the run's counts after
        each step, so the reported cost is what was spent."""
        return Cost(0, 0)

    def end(self) -> None:
        """Undo what ``begin`` installed; also called after a ``begin`` that raised half-way."""


def unknown_option(rule: str, key: str, options: Iterable[str]) -> VelodiffError:
    return VelodiffError(f"plan rule {rule!r} has no option {key!r}; options: {', '.join(options) or 'none'}")


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):  # short where exact, else every digit; no "e+": "+" joins plan items
        text = f"{v:g}" if float(f"{v:g}") == v else repr(v)
        return text.replace("e+", "e")
    if isinstance(v, (tuple, list)):
        return "|".join(format_value(x) for x in v)
    return str(v)


def check_option(rule: str, key: str, opt: Option, value: Any) -> Any:
    """Parse (from a string) and range-check one option value; errors are one line."""
    where = f"plan rule {rule!r} option {key!r}"
    if isinstance(value, str) and opt.kind is not str:
        text = value.strip()
        try:
            if opt.kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1", "yes")
            elif opt.kind is tuple:
                value = tuple(p.strip() for p in text.split("|") if p.strip())
            else:
                value = opt.kind(text)
        except ValueError:
            raise VelodiffError(f"{where}: {value!r} is not a {opt.kind.__name__}") from None
    elif opt.kind is tuple and isinstance(value, str):
        value = tuple(p.strip() for p in value.split("|") if p.strip())
    elif opt.kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif opt.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif opt.kind is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, opt.kind) or (opt.kind is int and isinstance(value, bool)):
        raise VelodiffError(f"{where}: {value!r} is not a {opt.kind.__name__}")
    if opt.kind in (int, float):
        if not math.isfinite(value):
            raise VelodiffError(f"{where} must be finite, got {value}")
        below = opt.lo is not None and value < opt.lo
        if below or (opt.hi is not None and value > opt.hi):
            lo = "-inf" if opt.lo is None else f"{opt.lo:g}"
            hi = "inf" if opt.hi is None else f"{opt.hi:g}"
            raise VelodiffError(f"{where} must be in [{lo}, {hi}], got {value:g}")
    if opt.kind is str or opt.kind is tuple:  # the plan string's own separators: no canonical string
        bad = next((c for c in "+,#" for v in ((value,) if opt.kind is str else value) if c in v), None)
        if bad is not None:
            raise VelodiffError(f"{where}: {value!r} holds {bad!r}, which separates a plan's rules, options "
                                "or comments; the plan could not be written back as a string")
    if opt.choices and value not in opt.choices:
        raise unknown_name(f"value of {where}", str(value), opt.choices)
    for p in value if opt.patterns else ():
        try:
            re.compile(p)
        except re.error as e:
            raise VelodiffError(f"{where}: {p!r} is not a regular expression ({e})") from None
    return value


# --- the registry and the plan string ---------------------------------------------------------------

RULES: dict[str, type[Accelerator]] = {}


def register_rule(cls: type[Accelerator]) -> type[Accelerator]:
    """Class decorator: make ``cls`` available to plan strings under ``cls.name``."""
    RULES[cls.name] = cls
    return cls


def _load_rules() -> None:
    from . import guidance  # noqa: F401 - registers the guidance family
    from .accel import attention, block_cache, compile, deepcache, hooks, quantize, tome, w4a8  # noqa: F401
    from .edit import layout, p2p, regional  # noqa: F401 - layout, prompt-to-prompt, regions


def parse_rule(text: str) -> Accelerator:
    _load_rules()
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise VelodiffError(f"plan item {text.strip()!r} names no rule (a '+' with nothing after it?)")
    if name not in RULES:
        raise unknown_name("plan rule", name, [*RULES, "none"])
    cls = RULES[name]
    aliases = {a: k for k, o in cls.options.items() for a in o.aliases}
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))) if rest.strip() else ():
        key, eq, value = item.partition("=")
        key = aliases.get(key.strip(), key.strip())
        if not eq:
            raise VelodiffError(f"plan rule {name!r}: write options as key=value, got {item!r}")
        if key in values:
            raise VelodiffError(f"plan rule {name!r}: option {key!r} given twice")
        if key not in cls.options:
            raise unknown_option(name, key, cls.options)
        values[key] = value
    return cls(**values)


#: run settings a plan may carry (``key=value`` items), with the kind each parses to
SETTINGS: dict[str, type] = {"solver": str, "grid": str, "steps": int, "nfe": int, "guidance": float}


def parse_setting(text: str) -> tuple[str, Any]:
    """``key=value`` of :data:`SETTINGS`, checked (solver names without importing the registry)."""
    key, _, raw = (p.strip() for p in text.partition("="))
    if key not in SETTINGS:
        raise unknown_name("plan setting", key, SETTINGS)
    kind = SETTINGS[key]
    try:
        value = kind(raw)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise VelodiffError(f"plan setting {key}={raw!r}: not {what}") from None
    if kind is str and not value:
        raise VelodiffError(f"plan setting {key!r} is empty")
    if key in ("steps", "nfe") and not 1 <= value <= MAX_STEPS:
        raise VelodiffError(f"plan setting {key} must be in [1, {MAX_STEPS}], got {value}")
    if key == "guidance":
        check_guidance(value, "plan setting guidance")
    if key in ("solver", "grid"):
        from .commands.names import check_grid_name, check_solver_name

        (check_solver_name if key == "solver" else check_grid_name)(value)
    return key, value


def read_plan_file(path: str) -> str:
    """The plan in a file: its items, one per line or joined by ``+``; blank lines and ``#`` comments
    are skipped."""
    from pathlib import Path

    from .files import read_text

    p = Path(path).expanduser()
    text = read_text(p, "plan file")
    items = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    plan = "+".join(i for i in items if i)
    if not plan:
        raise VelodiffError(f"the plan file {str(p)!r} holds no plan (e.g. 'ag:threshold=0.99' or 'none')")
    return plan


class Plan:
    """An ordered stack of accelerators (outermost first) and the run settings the plan fixes, built
    from a plan string, a list of rules, or both. ``str(plan)`` is its canonical string (``none`` when
    empty; settings first)."""

    def __init__(self, rules: Iterable[Accelerator] = (), settings: Mapping[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})
        if "steps" in self.settings and "nfe" in self.settings:
            raise VelodiffError("a plan sets steps or nfe, not both")
        rules = list(rules)
        for r in rules:
            if not isinstance(r, Accelerator):
                raise VelodiffError(f"a plan holds plan rules, got {type(r).__name__}")
        # kept outermost first: higher layer outside; among equals, the given order read inner to outer,
        # as the plan string is written ("cfg+pag": pag wraps cfg), so str() and parse() round-trip
        self.rules = sorted(reversed(rules), key=lambda r: -r.layer)
        claimed: dict[str, str] = {}
        for r in rules:  # (conflicts named in the order given)
            for b in r.claims:
                if b in claimed:
                    raise VelodiffError(
                        f"plan rules {claimed[b]!r} and {r.name!r} both claim the {b!r} branch; keep one"
                    )
                claimed[b] = r.name
        groups: dict[str, str] = {}
        for r in rules:
            for group in (r.exclusive,) if isinstance(r.exclusive, str) else r.exclusive:
                if group and group in groups:
                    raise VelodiffError(
                        f"plan rules {groups[group]!r} and {r.name!r} are both {group}; keep one"
                    )
                if group:
                    groups[group] = r.name

    @classmethod
    def parse(cls, plan: str | Plan | Accelerator | Sequence[Accelerator | str] | None) -> Plan:
        if plan is None:
            return cls()
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, Accelerator):
            return cls([plan])
        if isinstance(plan, str):
            text = plan.strip()
            if text.startswith("@"):
                text = read_plan_file(text[1:])
            if text in ("", "none"):
                return cls()
            items = [p.strip() for p in _ITEMS.split(text)]
            pairs = [parse_setting(p) for p in items if _is_setting(p)]
            for key, n in Counter(k for k, _ in pairs).items():
                if n > 1:  # steps=2+steps=5: the last silently won
                    raise VelodiffError(f"plan setting {key!r} given twice; keep one")
            rules = [parse_rule(p) for p in items if not _is_setting(p) and p != "none"]
            _refuse_twice(rules)
            return cls(rules, dict(pairs))
        if not isinstance(plan, (list, tuple)):
            raise VelodiffError(
                f"a plan is a plan string, a plan rule or a list of them, got {type(plan).__name__}"
            )
        rules, settings, named = [], {}, []
        for r in plan:
            if isinstance(r, Accelerator):
                rules.append(r)  # objects may repeat a rule (two classifiers to steer by)
            else:
                sub = cls.parse(r)
                rules += list(reversed(sub.rules))
                named += sub.rules
                for key in sub.settings.keys() & settings.keys():
                    raise VelodiffError(f"plan setting {key!r} given twice; keep one")
                settings.update(sub.settings)
        _refuse_twice(named)
        return cls(rules, settings)

    def __str__(self) -> str:
        items = [f"{k}={format_value(v)}" for k, v in self.settings.items()]
        return "+".join(items + [r.spec() for r in reversed(self.rules)]) or "none"

    def __repr__(self) -> str:
        return f"Plan({str(self)!r})"

    def __bool__(self) -> bool:
        return bool(self.rules or self.settings)

    def find(self, name: str) -> Accelerator | None:
        return next((r for r in self.rules if r.name == name), None)

    def claims(self, branch: str) -> bool:
        return any(branch in r.claims for r in self.rules)

    def needs(self, branch: str) -> bool:
        """Whether a rule owns or reads ``branch`` (the pipelines encode the unconditional prompt then)."""
        return any(branch in r.claims or branch in r.uses for r in self.rules)

    @property
    def needs_grad(self) -> bool:
        return any(r.needs_grad for r in self.rules)

    def fixed_guidance(self) -> float | None:
        """The guidance scale the plan itself fixes, whatever the run's: that of the rule owning the
        unconditional branch (``cfg:scale=4``), else a ``guidance=`` setting; None when it fixes none."""
        owner = next((r for r in self.rules if "uncond" in r.claims), None)
        scale = getattr(owner, "scale", None)
        if scale is None:
            scale = self.settings.get("guidance")
        return None if scale is None else float(scale)

    def with_rules(self, extra: Iterable[Accelerator]) -> Plan:
        return Plan([*reversed(self.rules), *extra], self.settings)

    def without(self, rule: Accelerator) -> Plan:
        """The plan less ``rule`` (a command that gives the rule its own input takes it out)."""
        return Plan([r for r in reversed(self.rules) if r is not rule], self.settings)

    def without_settings(self) -> Plan:
        """The rules alone (what the sampling loop runs once a pipeline has applied the settings)."""
        return Plan(list(reversed(self.rules)))

    def chain(self, base: Evaluate) -> Evaluate:
        """The evaluation function of the whole stack: the outermost rule's evaluate, whose inner is
        the next rule's, ..., down to ``base``."""
        fn = base
        for r in reversed(self.rules):
            fn = _bind(r, fn)
        return fn


def _refuse_twice(rules: list[Accelerator]) -> None:
    """A rule named twice is a typo (rescale+rescale applied it twice); a group's rules: its own line."""
    for rule in rules:
        if not rule.exclusive and sum(r.name == rule.name for r in rules) > 1:
            raise VelodiffError(f"plan rule {rule.name!r} given twice; keep one (with its options)")


#: "+" joins plan items, but not the "+" of an exponent ("scale=1e+3": after a digit and e, before a
#: digit); a text value ending in a digit and e ("concept=type 1e+pag") ends its item
_ITEMS = re.compile(r"(?<!\d[eE])\+|\+(?!\d)")


def _is_setting(item: str) -> bool:
    """``key=value`` (a run setting) rather than ``name[:options]`` (a rule)."""
    name, eq, _ = item.partition("=")
    return bool(eq) and ":" not in name


def _bind(rule: Accelerator, inner: Evaluate) -> Evaluate:
    return lambda req: rule.evaluate(req, inner)


def branch_evaluator(denoiser: Denoiser) -> Evaluate:
    """The bottom of every stack: the requested branches as one batched call of ``denoiser``."""
    import torch

    from .denoisers import concat_cond, index_cond

    def evaluate(req: EvalRequest) -> EvalResult:
        names = req.branches
        if not req.subsets and not req.inputs:
            if len(names) == 1:
                x0 = denoiser(req.x, req.t, req.conds[names[0]])
                return EvalResult(x0, {names[0]: x0}, Cost(1, 1))
            n = len(names)
            cond = req.conds[names[0]]
            for name in names[1:]:
                cond = concat_cond(cond, req.conds[name])
            t = req.t.repeat(n) if req.t.ndim else req.t
            out = denoiser(torch.cat([req.x] * n), t, cond)
            parts = dict(zip(names, out.chunk(n), strict=True))
            return EvalResult(parts.get("cond", parts[names[0]]), parts, Cost(1, n))
        xs, ts, conds = [], [], []
        for name in names:
            rows, x = req.subsets.get(name), req.inputs.get(name, req.x)
            xs.append(x if rows is None else x[rows.to(x.device)])
            ts.append(req.t if rows is None or not req.t.ndim else req.t[rows.to(req.t.device)])
            conds.append(req.conds[name] if rows is None else index_cond(req.conds[name], rows))
        cond = conds[0]
        for c in conds[1:]:
            cond = concat_cond(cond, c)
        t = (
            torch.cat([t.reshape(-1).expand(len(x)) for t, x in zip(ts, xs, strict=True)])
            if req.t.ndim
            else req.t
        )
        out = denoiser(torch.cat(xs), t, cond)
        parts = dict(zip(names, out.split([len(x) for x in xs]), strict=True))
        rows_total = sum(len(x) for x in xs)
        b = req.x.shape[0]
        evals = rows_total // b if rows_total % b == 0 else rows_total / b
        return EvalResult(parts.get("cond", parts[names[0]]), parts, Cost(1, evals))

    return evaluate


def rule_table() -> list[dict[str, Any]]:
    """Every registered rule with its options, for ``velodiff plans`` and the docs."""
    _load_rules()
    out = []
    for cls in RULES.values():
        opts = [
            {"name": k, "default": o.default, "help": o.help, "aliases": list(o.aliases)}
            for k, o in cls.options.items()
        ]
        out.append(
            {
                "name": cls.name,
                "summary": cls.summary,
                "cost": cls.cost,
                "options": opts,
                "claims": list(cls.claims),
                "layer": cls.layer,
            }
        )
    return out


__all__ = [
    "RULES",
    "Accelerator",
    "EvalRequest",
    "EvalResult",
    "Evaluate",
    "Option",
    "Plan",
    "RunInfo",
    "branch_evaluator",
    "check_option",
    "parse_rule",
    "register_rule",
    "rule_table",
]
