"""Solver benchmark: error against an exact reference for every solver x grid x NFE on the mixture
oracle, side by side with diffusers' schedulers in their default configurations.

How it measures (DESIGN.md, "Measuring solvers honestly"):

* The oracle is an exact Gaussian-mixture denoiser (``velodiff.oracle``) under Stable Diffusion's
  scaled-linear VP schedule (1000 trained steps): a 2-D mixture and an image-shaped one (3x8x8).
* Every run starts from the same standard-normal noise. velodiff grids start at ``t_max``
  (k = 999) unless the grid itself starts elsewhere; diffusers' default spacings may start
  elsewhere (DDIM's "leading" starts at k = 801 for 5 steps). Each record keeps its start
  (``t_start``), and its error includes that mismatch, because the reference always starts at
  ``t_max``: it is what a user of that configuration gets.
* The reference is scipy's adaptive DOP853 solution of the probability-flow ODE from ``t_max`` to the
  smallest trained time ``t_min``, followed by the x0 jump when the run ends at t = 0
  (``oracle.reference_sample``): the limit of every sampler on this discrete schedule as its steps
  grow, never a solver under test at high NFE. A run that jumps to 0 from a larger time than
  ``t_min`` (diffusers' linspace spacing from k = 200 at 5 steps, a trailing grid) keeps that
  floor in its error. Runs ending at ``t_min`` without the jump (diffusers' DDIM and DEIS under
  SD's config) are compared with the reference that also ends there (record key ``final``).
* Error: the RMS over samples of the per-sample L2 error divided by sqrt(dim), i.e. the RMS error
  per coordinate, ``sqrt(mean_n ||x_n - ref_n||^2 / dim)``.
* diffusers' schedulers get SD's scheduler config (``SD_SCHEDULER_CONFIG``) and otherwise their
  defaults; they are fed the oracle's exact eps at their own timesteps (noise levels interpolated
  from their own ``alphas_cumprod`` as they do for fractional timesteps), and their own initial
  noise scaling (``init_noise_sigma``). Each is given the most inference steps whose model calls
  fit the NFE budget (Heun makes 2 n - 1 calls for n steps).

Everything here is a pure function of its arguments; ``velodiff bench solvers`` writes the files.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import VelodiffError, unknown_name
from ..grids import GRIDS, make_grid
from ..noise import prior_sample
from ..oracle import GaussianMixture, MixtureDenoiser, reference_sample, starting_noise
from ..sampling import sample
from ..schedules import F64, SD_SCHEDULER, DiscreteVP
from ..solvers import SOLVERS
from .tables import markdown_table

DEFAULT_NFES = (3, 4, 5, 6, 8, 10, 12, 15, 20)
BAR_NFES = (5, 6, 8, 10)
BAR_DATA = "mixture-2d"
BAR_BASELINE = "DPMSolverMultistep"
BAR_MAX_RATIO = 0.5
RECORD_KEYS = ("source", "solver", "grid", "nfe", "error", "t_start", "data")

#: Stable Diffusion 1.x's scheduler config; everything else (the timestep spacing too) stays at each
#: scheduler's default.
SD_SCHEDULER_CONFIG = {
    **{k: v for k, v in SD_SCHEDULER.items() if k != "timestep_spacing"},
    "clip_sample": False,
    "set_alpha_to_one": False,
}
#: record name -> diffusers class name
DIFFUSERS_SCHEDULERS = {
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "UniPCMultistep": "UniPCMultistepScheduler",
    "DEISMultistep": "DEISMultistepScheduler",
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
}
#: scipy tolerances of the reference: its error (~1e-9) is far below the smallest errors measured
REFERENCE_TOL = {"rtol": 1e-10, "atol": 1e-11}

Record = dict[str, object]
Progress = Callable[[], None]


def sd_schedule() -> DiscreteVP:
    """The schedule of ``SD_SCHEDULER_CONFIG`` (scaled-linear betas, 1000 trained steps)."""
    return DiscreteVP.from_diffusers_config(SD_SCHEDULER_CONFIG)


# --- the oracle --------------------------------------------------------------------------------


@dataclass
class Oracle:
    """One mixture, one schedule, one batch of starting noise, and its cached references."""

    data: str
    denoiser: MixtureDenoiser
    noise: Tensor
    _refs: dict[bool, Tensor] = field(default_factory=dict, repr=False)

    @property
    def schedule(self) -> DiscreteVP:
        return self.denoiser.schedule  # type: ignore[return-value]

    def reference(self, jump: bool) -> Tensor:
        """The exact sample: the ODE from ``t_max`` to ``t_min``, then the x0 jump to t = 0 if ``jump``
        (as ``oracle.reference_sample``); one ODE solve, cached."""
        if jump not in self._refs:
            if False not in self._refs:
                ts = torch.tensor([self.schedule.t_max, self.schedule.t_min], dtype=F64)
                self._refs[False] = reference_sample(self.denoiser, self.noise, ts, **REFERENCE_TOL)
            if jump:
                self._refs[True] = self.denoiser(self._refs[False], self.schedule.t_min)
        return self._refs[jump]

    def error(self, x: Tensor, jump: bool) -> float:
        return rms_error(x, self.reference(jump))


def rms_error(x: Tensor, ref: Tensor) -> float:
    """RMS over samples of the per-sample L2 error divided by sqrt(dim)."""
    d = (x.to(F64) - ref.to(F64)).flatten(1)
    return float((d.pow(2).sum(1).mean() / d.shape[1]).sqrt())


def mixture_2d() -> GaussianMixture:
    """4 components in 2-D: means ~ N(0, 1), per-coordinate variances in [0.05, 0.3]."""
    return GaussianMixture.random((2,), components=4, seed=0)


def mixture_image(shape: tuple[int, ...] = (3, 8, 8)) -> GaussianMixture:
    """16 components of image shape: means ~ N(0, 0.2^2) per pixel, variances in [0.05, 0.5]."""
    return GaussianMixture.random(shape, components=16, seed=0, spread=0.2, min_var=0.05, max_var=0.5)


def make_oracles(
    data: Sequence[str] = ("2d", "image"),
    samples: int = 512,
    image_samples: int = 64,
    image_shape: tuple[int, ...] = (3, 8, 8),
    seed: int = 0,
) -> list[Oracle]:
    """The benchmark's oracles under SD's schedule; ``data`` picks "2d" and/or "image"."""
    sched = sd_schedule()
    out = []
    for d in data:
        if d == "2d":
            mix, n, name = mixture_2d(), samples, BAR_DATA
        elif d == "image":
            name = "mixture-" + "x".join(map(str, image_shape))
            mix, n = mixture_image(image_shape), image_samples
        else:
            raise unknown_name("data", d, ("2d", "image"))
        if n < 1:
            raise VelodiffError(f"the {d} mixture needs at least 1 sample, got {n}")
        out.append(Oracle(name, MixtureDenoiser(mix, sched), starting_noise(mix.shape, n, seed=seed)))
    return out


# --- the velodiff side -------------------------------------------------------------------------


def deterministic_solvers() -> list[str]:
    """The solvers the benchmark compares at equal NFE: deterministic, with a planned NFE (not
    dpm_adaptive, whose error controller spends what it needs) and runnable without fitted options
    (not dpm_solver_v3, which needs the model's statistics)."""
    return [n for n, s in SOLVERS.items() if not (s.stochastic or s.adaptive or s.requires)]


def default_grids(sched: DiscreteVP, probe_steps: int = 7) -> list[str]:
    """Every registered grid that applies to ``sched``, leaving out those that give the same times
    as an earlier one on it (on VP, 'exponential' and 'polyexponential' equal 'logsnr', and
    'flow-shifted' equals 'uniform')."""
    seen: dict[tuple[float, ...], str] = {}
    for name in GRIDS:
        try:
            ts = make_grid(name, sched, probe_steps)
        except VelodiffError:
            continue
        seen.setdefault(tuple(round(v, 9) for v in ts.tolist()), name)
    return list(seen.values())


def _ending(ts: Tensor) -> tuple[float, bool]:
    """(last positive time, whether the run jumps from it to t = 0)."""
    jump = float(ts[-1]) == 0.0
    return float(ts[-2] if jump else ts[-1]), jump


def velodiff_records(
    oracle: Oracle,
    solvers: Iterable[str],
    grids: Iterable[str],
    nfes: Iterable[int],
    progress: Progress | None = None,
) -> list[Record]:
    """One record per (solver, grid, NFE) that fits: steps and options from ``SolverSpec.plan_nfe(nfe)``,
    skipped when even the fewest steps cost more than the NFE or fall below the solver's minimum."""
    sched = oracle.schedule
    records: list[Record] = []
    grids, nfes = list(grids), list(nfes)
    for name in solvers:
        spec = SOLVERS[name]
        for grid in grids:
            for nfe in nfes:
                if progress:
                    progress()
                steps, planned = spec.plan_nfe(nfe)
                if spec.stochastic or steps < spec.min_steps or (not planned and spec.nfe(steps) > nfe):
                    continue
                try:
                    ts = make_grid(grid, sched, steps)
                except VelodiffError:
                    continue
                # a grid may give another number of steps (ComfyUI's ddim_uniform can give one more): the
                # budget no longer fits a planned solver's orders, and more steps may spend more than it
                if len(ts) - 1 != steps and (planned or spec.nfe(len(ts) - 1) > nfe):
                    continue
                x = prior_sample(sched, float(ts[0]), oracle.noise)
                res = sample(oracle.denoiser, x, ts, spec, **planned)
                t_last, jump = _ending(ts)
                records.append({
                    "source": "velodiff", "solver": name, "grid": grid, "nfe": nfe,
                    "error": oracle.error(res.x, jump), "t_start": float(ts[0]),
                    "data": oracle.data, "nfe_used": res.nfe, "steps": steps, "t_last": t_last,
                    "final": "zero" if jump else "t_min",
                })
    return records


# --- the diffusers side ------------------------------------------------------------------------


def diffusers_scheduler(name: str):  # -> diffusers SchedulerMixin
    """A diffusers scheduler under SD's config, everything else at its default."""
    import inspect

    import diffusers

    if name not in DIFFUSERS_SCHEDULERS:
        raise unknown_name("diffusers scheduler", name, DIFFUSERS_SCHEDULERS)
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[name])
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k in accepted})


def _fit_steps(sched, nfe: int) -> int | None:
    """The most inference steps whose model calls (len(timesteps)) fit in ``nfe``."""
    for n in range(nfe, 0, -1):
        sched.set_timesteps(n)
        if len(sched.timesteps) <= nfe:
            return n
    return None


def _final_is_zero(sched) -> bool:
    if getattr(sched, "sigmas", None) is not None:
        return float(sched.sigmas[-1]) == 0.0
    return float(getattr(sched, "final_alpha_cumprod", 1.0)) == 1.0  # DDIM


def run_diffusers(oracle: Oracle, name: str, nfe: int) -> tuple[Tensor, dict[str, object]] | None:
    """Run one diffusers scheduler on the oracle within ``nfe`` model calls: (final x, info)."""
    sched = diffusers_scheduler(name)
    steps = _fit_steps(sched, nfe)
    if steps is None:
        return None
    n_train = sched.config.num_train_timesteps
    abar = sched.alphas_cumprod.to(F64)
    sig_table = ((1 - abar) / abar).sqrt().numpy()
    mixture = oracle.denoiser.mixture

    def eps(x: Tensor, timestep: Tensor) -> Tensor:
        # The scheduler's own noise level at its (possibly fractional) timestep, as Euler/Heun
        # interpolate it; exact for integer timesteps. Model input x is on the VP scale.
        s = float(np.interp(float(timestep), np.arange(n_train), sig_table))
        a = 1.0 / math.sqrt(1.0 + s * s)
        x0 = mixture.x0(x, torch.tensor(a, dtype=F64), torch.tensor(s * a, dtype=F64))
        return (x - a * x0) / (s * a)

    x = oracle.noise.clone() * float(sched.init_noise_sigma)
    calls = 0
    for t in sched.timesteps:
        e = eps(sched.scale_model_input(x, t), t)
        calls += 1
        x = sched.step(e, t, x).prev_sample
    zero = _final_is_zero(sched)
    info = {"steps": steps, "nfe_used": calls, "t_start": (float(sched.timesteps[0]) + 1.0) / n_train,
            "t_last": (float(sched.timesteps[-1]) + 1.0) / n_train if zero else oracle.schedule.t_min,
            "final": "zero" if zero else "t_min", "grid": str(sched.config.timestep_spacing)}
    return x, info


def diffusers_records(
    oracle: Oracle, schedulers: Iterable[str], nfes: Iterable[int], progress: Progress | None = None
) -> list[Record]:
    records: list[Record] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2's __array__ notice, from diffusers
        for name in schedulers:
            for nfe in nfes:
                if progress:
                    progress()
                out = run_diffusers(oracle, name, nfe)
                if out is None:
                    continue
                x, info = out
                records.append({
                    "source": "diffusers", "solver": name, "grid": info["grid"], "nfe": nfe,
                    "error": oracle.error(x, info["final"] == "zero"),
                    "t_start": info["t_start"], "data": oracle.data, "nfe_used": info["nfe_used"],
                    "steps": info["steps"], "t_last": info["t_last"], "final": info["final"],
                })
    return records


# --- the sweep ---------------------------------------------------------------------------------


def sweep_size(oracles: Sequence[Oracle], solvers: Sequence[str], grids: Sequence[str],
               nfes: Sequence[int], schedulers: Sequence[str]) -> int:
    """How many progress ticks ``run_sweep`` makes."""
    return len(oracles) * len(nfes) * (len(solvers) * len(grids) + len(schedulers))


def run_sweep(
    oracles: Sequence[Oracle],
    solvers: Sequence[str] | None = None,
    grids: Sequence[str] | None = None,
    nfes: Sequence[int] = DEFAULT_NFES,
    schedulers: Sequence[str] = tuple(DIFFUSERS_SCHEDULERS),
    progress: Progress | None = None,
) -> list[Record]:
    """All records: velodiff solvers x grids x NFE and diffusers' schedulers x NFE, per oracle."""
    solvers = deterministic_solvers() if solvers is None else list(solvers)
    records: list[Record] = []
    for oracle in oracles:
        g = default_grids(oracle.schedule) if grids is None else list(grids)
        records += velodiff_records(oracle, solvers, g, nfes, progress)
        records += diffusers_records(oracle, schedulers, nfes, progress)
    return records


# --- summaries ---------------------------------------------------------------------------------


def _series(records: Iterable[Record]) -> dict[tuple[str, str, str, str], dict[int, Record]]:
    """(data, source, solver, grid) -> {nfe: record}, in first-seen order."""
    out: dict[tuple[str, str, str, str], dict[int, Record]] = {}
    for r in records:
        key = (str(r["data"]), str(r["source"]), str(r["solver"]), str(r["grid"]))
        out.setdefault(key, {})[int(r["nfe"])] = r
    return out


def _geomean(errors: Iterable[float]) -> float:
    errs = [max(e, 1e-300) for e in errors]
    return math.exp(sum(map(math.log, errs)) / len(errs)) if errs else math.inf


def best_grids(records: Sequence[Record], data: str) -> dict[str, str]:
    """Per velodiff solver, its grid with the smallest geometric-mean error over the NFEs that
    every grid of that solver ran."""
    series = {k: v for k, v in _series(records).items() if k[0] == data and k[1] == "velodiff"}
    best: dict[str, tuple[float, str]] = {}
    by_solver: dict[str, list[tuple[str, dict[int, Record]]]] = {}
    for (_, _, solver, grid), rows in series.items():
        by_solver.setdefault(solver, []).append((grid, rows))
    for solver, grids in by_solver.items():
        common = set.intersection(*(set(rows) for _, rows in grids))
        for grid, rows in grids:
            score = _geomean(float(rows[n]["error"]) for n in common)
            if solver not in best or score < best[solver][0]:
                best[solver] = (score, grid)
    return {s: g for s, (_, g) in best.items()}


def bar_ratios(
    records: Sequence[Record],
    data: str = BAR_DATA,
    nfes: Sequence[int] = BAR_NFES,
    baseline: str = BAR_BASELINE,
) -> list[dict[str, object]]:
    """Per NFE: velodiff's best solver+grid, its error, the baseline's error and their ratio
    (None where either side was not measured)."""
    out = []
    for n in nfes:
        ours = [r for r in records if r["data"] == data and r["source"] == "velodiff" and r["nfe"] == n]
        base = [r for r in records if r["data"] == data and r["source"] == "diffusers"
                and r["solver"] == baseline and r["nfe"] == n]
        row: dict[str, object] = {"nfe": n, "solver": None, "grid": None, "error": None,
                                  "baseline_error": None, "ratio": None}
        if ours:
            b = min(ours, key=lambda r: float(r["error"]))
            row.update(solver=b["solver"], grid=b["grid"], error=float(b["error"]))
        if base:
            row["baseline_error"] = float(base[0]["error"])
        if ours and base:
            row["ratio"] = float(row["error"]) / float(row["baseline_error"])
        out.append(row)
    return out


def bar_verdict(rows: Sequence[dict[str, object]], max_ratio: float = BAR_MAX_RATIO) -> str:
    """The bar's line: "met", "NOT met" (a measured NFE above the ratio), or, for a run that left out
    some of the bar's NFEs (``--nfe 5,10``), which ones it could not judge."""
    if any(r["ratio"] is not None and float(r["ratio"]) > max_ratio for r in rows):
        return "NOT met"
    missing = [str(r["nfe"]) for r in rows if r["ratio"] is None]
    if missing or not rows:
        return f"not judged (NFE {', '.join(missing)} not measured)" if missing else "not judged"
    return "met"


def _fmt(e: float | None) -> str:
    return "—" if e is None else f"{e:.3g}"


def bar_table(rows: Sequence[dict[str, object]], baseline: str = BAR_BASELINE) -> str:
    table_rows = []
    for r in rows:
        cfg = f"{r['solver']} / {r['grid']}" if r["solver"] else "—"
        ratio = "—" if r["ratio"] is None else f"{float(r['ratio']):.3f}"
        table_rows.append([r["nfe"], cfg, _fmt(r["error"]), _fmt(r["baseline_error"]), ratio])
    headers = ["NFE", "best velodiff (solver / grid)", "error", f"diffusers {baseline}", "ratio"]
    return markdown_table(headers, table_rows, align="rlrrr")


def results_table(records: Sequence[Record], data: str, best_only: bool = False) -> str:
    """A markdown table for one data set: a row per (source, solver, grid), a column per NFE; the
    best velodiff error of each column in bold. ``best_only`` keeps each solver's best grid."""
    series = {k: v for k, v in _series(records).items() if k[0] == data}
    nfes = sorted({n for rows in series.values() for n in rows})
    keep = best_grids(records, data) if best_only else None
    col_best = {n: min((float(rows[n]["error"]) for (_, src, _, _), rows in series.items()
                        if src == "velodiff" and n in rows), default=None) for n in nfes}
    rows_out = []
    order = sorted(series, key=lambda k: (k[1] != "diffusers",))  # diffusers rows first, stable
    for key in order:
        _, src, solver, grid = key
        if keep is not None and src == "velodiff" and keep.get(solver) != grid:
            continue
        rows = series[key]
        starts = sorted({round(float(r["t_start"]), 3) for r in rows.values()})
        t_start = f"{starts[0]:.3f}" if len(starts) == 1 else f"{starts[0]:.3f}–{starts[-1]:.3f}"
        cells = []
        for n in nfes:
            if n not in rows:
                cells.append("—")
                continue
            e = float(rows[n]["error"])
            cells.append(f"**{e:.3g}**" if src == "velodiff" and e == col_best[n] else f"{e:.3g}")
        rows_out.append([src, solver, grid, t_start, *cells])
    headers = ["source", "solver", "grid", "t_start", *nfes]
    return markdown_table(headers, rows_out, align="lllr" + "r" * len(nfes))


def markdown_report(records: Sequence[Record], command: str = "", best_only: bool = False) -> str:
    """The whole report: method, the bar table, and a results table per data set."""
    datas = list(dict.fromkeys(str(r["data"]) for r in records))
    rows = bar_ratios(records)
    parts = [
        "# Solver benchmark: error vs NFE on the mixture oracle",
        "",
        "Exact Gaussian-mixture denoiser under Stable Diffusion's scaled-linear VP schedule (1000 trained "
        "steps). Error = RMS over samples of the per-sample L2 error / sqrt(dim), against scipy's adaptive "
        "DOP853 solution of the probability-flow ODE from t_max to t_min (then the x0 jump for runs that end "
        "at 0). All runs start from the same noise; `t_start` is where each run starts (t = (k + 1) / 1000). "
        "diffusers' schedulers use SD's scheduler config and otherwise their defaults.",
    ]
    if command:
        parts += ["", f"Command: `{command}`"]
    parts += ["", f"## Bar: best velodiff vs diffusers {BAR_BASELINE} ({BAR_DATA})", "", bar_table(rows), "",
              f"Bar (ratio <= {BAR_MAX_RATIO} at NFE {', '.join(map(str, BAR_NFES))}): "
              + bar_verdict(rows)]
    for d in datas:
        parts += ["", f"## {d}" + (" (each velodiff solver's best grid)" if best_only else ""), "",
                  results_table(records, d, best_only=best_only)]
    return "\n".join(parts) + "\n"


def plot_png(records: Sequence[Record], top: int = 6, always: Sequence[str] = ("dpmpp_2m",)) -> bytes:
    """Error vs NFE, one panel per data set: the ``top`` velodiff solvers by geometric-mean error and
    those in ``always``, each on its best grid (solid), and every diffusers scheduler (dashed).
    Returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = list(dict.fromkeys(str(r["data"]) for r in records))
    series = _series(records)
    palette = [plt.cm.tab10(i) for i in range(10)] + ["black", "goldenrod", "teal", "indigo"]
    fig, axes = plt.subplots(1, max(1, len(datas)), figsize=(6.5 * max(1, len(datas)), 5), squeeze=False)
    for ax, d in zip(axes[0], datas, strict=False):
        best = best_grids(records, d)
        ranked = sorted(best, key=lambda s: _geomean(
            float(r["error"]) for r in series[(d, "velodiff", s, best[s])].values()))
        shown = ranked[:top] + [s for s in always if s in best and s not in ranked[:top]]
        lines = [(series[(d, "velodiff", s, best[s])], f"{s} ({best[s]})", "-o") for s in shown]
        lines += [(rows, f"diffusers {k[2]}", "--s") for k, rows in series.items()
                  if k[0] == d and k[1] == "diffusers"]
        for (rows, label, style), color in zip(lines, palette * 2, strict=False):
            ns = sorted(rows)
            ax.plot(ns, [float(rows[n]["error"]) for n in ns], style, ms=3, color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        nfes = sorted({n for k, rows in series.items() if k[0] == d for n in rows})
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error per coordinate vs reference")
        ax.set_title(d)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
