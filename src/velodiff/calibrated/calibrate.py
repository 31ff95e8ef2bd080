"""``calibrate_solver``: fit the sampler to a model once, on a calibration batch, for a list of NFEs.

For each NFE and each solver in ``solvers`` (DPM-Solver-v3 among them when ``dpm_solver_v3`` is a method:
its model statistics are measured first, ``ems.measure_statistics``):

* ``grid``: the GITS grid and the named grids (``NAMED_GRIDS``) are scored; the best starts the
  Align-Your-Steps-style descent on the solver's final error (``grids.refine_grid``); DPM-Solver-v3 also
  keeps its corrector only where it lowers the error (on the shipped model at CFG 2.5 it does not);
* ``dc`` (UniPC): DC-Solver's compensation ratios, one per step, fitted on that grid by the same kind of
  coordinate descent on the final error against the reference (Zhao et al. 2024 fit them by gradient
  descent on the same target);
* ``search`` (UniPC): a per-step solver search in the spirit of USF / S3: for each step, the predictor
  order (1-3) and whether the corrector runs, kept where the final error drops.

Each (solver, NFE) keeps its best configuration; the result also records the best *uncalibrated*
configuration's error on the same batch. Every candidate is one run of the batch, so the cost is counted
in runs and network evaluations (``Problem.evaluations``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from ..errors import VelodiffError, unknown_name
from ..grids import make_grid
from ..solvers import SOLVERS, SolverSpec, get_solver
from .ems import measure_statistics
from .grids import gits_grid, gits_max_steps, refine_grid
from .problem import Problem

METHODS = ("grid", "dpm_solver_v3", "dc", "search")
#: the grids every calibration scores first (those that apply to the schedule); the best starts the descent
NAMED_GRIDS = ("karras", "logsnr", "uniform", "trailing", "sgm_uniform", "beta", "ays")
#: the fewest NFE each method can fit at (DC's compensation starts at the third step and leaves the last
#: alone, so it needs four); below a method's minimum the method is skipped at that NFE
MIN_NFE = {"grid": 3, "dpm_solver_v3": 3, "dc": 4, "search": 3}
#: solver options a calibration fits (an entry's own result); the others are the configuration it fits
FITTED_OPTIONS = ("ems", "dc_ratios", "orders", "disable_corrector", "use_corrector")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def configuration(spec: SolverSpec, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options a calibrated entry is fitted for (JSON-shaped): the solver's options, an alias's
    defaults (ComfyUI's ``uni_pc`` is UniPC with B(h) = h) and ``options``, that differ from velodiff's
    defaults for the solver, fitted ones aside. A run takes an entry only for the same configuration."""
    own = SOLVERS[spec.name].defaults
    merged = {**spec.defaults, **dict(options or {})}
    return {
        k: _plain(v)
        for k, v in sorted(merged.items())
        if k not in FITTED_OPTIONS and (k not in own or _plain(own[k]) != _plain(v))
    }


def _named_grids(problem: Problem, steps: int) -> list[tuple[str, Tensor]]:
    out = []
    for g in NAMED_GRIDS:
        try:
            out.append((g, make_grid(g, problem.schedule, steps)))
        except VelodiffError:  # a grid for another kind of schedule
            continue
    return out


def _tick(progress: Callable[[str], None] | None, what: str) -> Callable[[], None]:
    return (lambda: progress(what)) if progress is not None else (lambda: None)


def fit_ratios(
    problem: Problem,
    ts: Tensor,
    options: dict[str, Any],
    err: float,
    *,
    max_runs: int = 24,
    progress: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], float]:
    """DC ratios for UniPC on grid ``ts`` by coordinate descent from 1 (no compensation)."""
    steps = len(ts) - 1
    ratios = [1.0] * steps
    runs, delta = 0, 0.1
    while delta >= 0.02 and runs < max_runs:
        improved = False
        for k in range(2, steps - 1):  # compensation needs dc_order = 2 earlier points; none on the jump
            for sign in (1, -1):
                if runs >= max_runs:
                    break
                cand = list(ratios)
                cand[k] += sign * delta
                opts = {**options, "dc_ratios": tuple(cand)}
                e = problem.score(ts, "unipc", opts)
                runs += 1
                if progress is not None:
                    progress()
                if e < err:
                    ratios, err, improved = cand, e, True
                    break
        if not improved:
            delta /= 2
    return {**options, "dc_ratios": tuple(round(r, 6) for r in ratios)}, err


def search_steps(
    problem: Problem,
    ts: Tensor,
    options: dict[str, Any],
    err: float,
    *,
    progress: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], float]:
    """Per-step UniPC choices: predictor order 1-3 and the corrector, one step at a time."""
    steps = len(ts) - 1
    orders = [int(options.get("order", 2))] * steps  # the current choice; caps up to 3 are tried
    off: set[int] = set(options.get("disable_corrector", ()))
    base = {**options, "order": 3}
    best = dict(options)
    for k in range(steps - 1):
        for change in ("o1", "o2", "o3", "corrector"):
            cand_orders, cand_off = list(orders), set(off)
            if change == "corrector":
                cand_off ^= {k}
            else:
                cand_orders[k] = int(change[1])
            opts = {**base, "orders": tuple(cand_orders), "disable_corrector": tuple(sorted(cand_off))}
            e = problem.score(ts, "unipc", opts)
            if progress is not None:
                progress()
            if e < err:
                orders, off, err, best = cand_orders, cand_off, e, opts
    return best, err


def calibrate_solver(
    problem: Problem,
    nfes: Sequence[int],
    methods: Sequence[str] = METHODS,
    solvers: Sequence[str] = ("dpmpp_2m", "unipc"),
    *,
    max_runs: int = 20,
    ems_points: int = 100,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Calibrate; returns ``{"entries": [...], "baselines": {nfe: best uncalibrated}, "ems": stats or
    None, "evaluations": ...}`` (entries: solver, nfe, method, ts, options, error)."""
    for m in methods:
        if m not in METHODS:
            raise unknown_name("calibration method", m, METHODS)
    # another tool's name calibrates its velodiff solver, under the name runs look it up by, with the
    # alias's options (saved in the entry, so a run of the plain name reproduces them)
    aliased: dict[str, dict[str, Any]] = {}
    for s in solvers:
        spec = get_solver(s)
        if spec.nfe_per_step != 1 or spec.stochastic:
            raise VelodiffError(
                f"solver {s!r}: calibrated grids are for deterministic one-call-per-step solvers"
            )
        if spec.name == "dpm_solver_v3" and "dpm_solver_v3" not in methods:
            raise VelodiffError(
                f"solver {s!r} runs on the model statistics the dpm_solver_v3 method measures: add "
                "dpm_solver_v3 to the methods"
            )
        extra = configuration(spec)
        if aliased.setdefault(spec.name, extra) != extra:
            raise VelodiffError(
                f"solvers {', '.join(map(repr, solvers))} name {spec.name!r} twice with different options; "
                "a calibration keeps one configuration per solver: calibrate them separately"
            )
    solvers = list(aliased)
    if not nfes:
        raise VelodiffError("no NFE to calibrate; give one or more, e.g. 5,6,8")
    for n in nfes:
        if not any(int(n) >= MIN_NFE[m] for m in methods):
            least = ", ".join(f"{m} {MIN_NFE[m]}" for m in methods)
            raise VelodiffError(f"NFE {n} is below the calibration's minimum (by method: {least})")
    most = gits_max_steps(problem.reference_steps)
    for n in nfes:
        for s in [*solvers, *(["unipc"] if {"dc", "search"} & set(methods) else [])]:
            steps = get_solver(s).plan_nfe(int(n))[0]
            if steps > most:
                raise VelodiffError(
                    f"NFE {n}: {s} takes {steps} steps; a calibration on a {problem.reference_steps}-step "
                    f"reference fits at most {most} (its GITS grid picks times among the reference's)"
                )
    problem.reference()
    ems = None
    if "dpm_solver_v3" in methods:
        ems = measure_statistics(problem, points=ems_points, progress=_tick(progress, "statistics"))
        if "dpm_solver_v3" not in solvers:
            solvers.append("dpm_solver_v3")
    if ("dc" in methods or "search" in methods) and "unipc" not in solvers:
        solvers.append("unipc")
    entries: list[dict[str, Any]] = []
    baselines: dict[int, dict[str, Any]] = {}
    for nfe in nfes:
        tick = _tick(progress, f"NFE {nfe}")
        for solver in solvers:
            spec = get_solver(solver)
            steps, planned = spec.plan_nfe(int(nfe))
            base_opts = {**aliased.get(solver, {}), **planned}
            if solver == "dpm_solver_v3":
                base_opts["ems"] = ems
            named = [(g, ts, problem.score(ts, solver, base_opts)) for g, ts in _named_grids(problem, steps)]
            for g, _, e in named:
                if solver != "dpm_solver_v3":  # uncalibrated baselines: fixed solvers on named grids
                    b = baselines.get(int(nfe))
                    if b is None or e < b["error"]:
                        baselines[int(nfe)] = {"solver": solver, "grid": g, "error": e}
            gits = gits_grid(problem, steps)
            start = min(
                [(ts, e) for _, ts, e in named] + [(gits, problem.score(gits, solver, base_opts))],
                key=lambda c: c[1],
            )
            if solver == "dpm_solver_v3":  # its corrector helps on some models and hurts on others
                plain = {**base_opts, "use_corrector": False}
                e = problem.score(start[0], solver, plain)
                if e < start[1]:
                    base_opts, start = plain, (start[0], e)
            method, options = "grid", dict(base_opts)
            ts, err = start
            if "grid" in methods or solver == "dpm_solver_v3":
                ts, err = refine_grid(problem, solver, start[0], base_opts, max_runs=max_runs, progress=tick)
            if solver == "unipc" and "dc" in methods and int(nfe) >= MIN_NFE["dc"]:
                o, e = fit_ratios(problem, ts, options, err, progress=tick)
                if e < err:
                    method, options, err = "dc", o, e
            if solver == "unipc" and "search" in methods:
                o, e = search_steps(problem, ts, options, err, progress=tick)
                if e < err:
                    method, options, err = ("search" if method == "grid" else f"{method}+search"), o, e
            saved = {k: v for k, v in options.items() if k != "ems"}
            entries.append(
                {
                    "solver": solver,
                    "nfe": int(nfe),
                    "method": method,
                    "ts": ts.tolist(),
                    "options": {k: _plain(v) for k, v in saved.items()},
                    "configuration": aliased.get(solver, {}),
                    "error": err,
                }
            )
    return {
        "entries": entries,
        "baselines": {str(k): v for k, v in baselines.items()},
        "ems": ems,
        "evaluations": problem.evaluations,
    }


def entry_options(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry's solver options as the solver takes them (lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in entry.get("options", {}).items()}
