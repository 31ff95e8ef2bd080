"""`velodiff calibrate cache --model M`: measure how fast the model's block features change along the
sampling path and save it keyed by the model's hash (``velodiff.accel.calibration``), for cache
schedules fitted to the model (``--plan deepcache:schedule=budget``).

`velodiff calibrate solver --model M --nfe 5,6,8 --guidance 2.5`: fit grids, DC ratios, per-step solver
choices and DPM-Solver-v3's statistics to the model (``velodiff.calibrated``), saved keyed by the
model's hash and guidance scale, for ``--grid calibrated`` and ``--solver dpm_solver_v3``."""

from __future__ import annotations

# ruff: noqa: B008  (typer declares options as argument defaults)
import sys
import time
from pathlib import Path

import typer

from ..limits import MAX_STEPS
from . import options as o

calibrate_app = typer.Typer(no_args_is_help=True)


@calibrate_app.callback(epilog=o.example("velodiff calibrate cache --model default"))
def calibrate() -> None:
    """Fit accelerators to a model, once."""


@calibrate_app.command(
    "cache",
    epilog=o.example(
        "velodiff calibrate cache --model default",
        'velodiff generate "a red circle" -o a.png \\',
        "    --plan deepcache:schedule=budget,interval=3",
    ),
)
def calibrate_cache(
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    prompts: str = typer.Option("v1-holdout", "--prompts", help="prompt set or file to calibrate on"),
    limit: int = typer.Option(16, "--limit", min=1, help="prompts used, spread over the set"),
    steps: int = typer.Option(50, "--steps", min=3, help="steps of the fine calibration run"),
    solver: str = typer.Option("dpmpp_2m", "--solver", help="solver of the calibration run"),
    seed: int = typer.Option(1000, "--seed", help="seed of the first image"),
    guidance: o.Guidance = None,
    threads: o.Threads = None,
) -> None:
    """Measure feature changes and fbcache reuse for cache rules.

    The feature changes fit cache schedules (deepcache:schedule=budget); on a transformer the reuse
    table maps fbcache:reuse=F to this model's threshold."""
    t0 = time.perf_counter()
    from .names import check_solver_name

    check_solver_name(solver)
    from ..eval.sweep import resolve_prompts

    texts = resolve_prompts(prompts, limit)
    from .generate import load_model, quiet_libraries

    quiet_libraries()
    loaded, defaults = load_model(model, threads,
                                  config=config, family=family, prediction_type=prediction_type)
    from ..accel.calibration import cache_calibration_path, save_cache_calibration
    from ..accel.calibration import calibrate_cache as measure
    from ..eval.reference import model_identity
    from ..files import writable_folder

    writable_folder(cache_calibration_path(model_identity(loaded)).parent, "the calibration cache")
    art = measure(
        loaded,
        texts,
        [seed + i for i in range(len(texts))],
        steps=steps,
        solver=solver,
        guidance=defaults.get("guidance") if guidance is None else guidance,
    )
    path = save_cache_calibration(art)
    fb = art.get("fbcache")
    table = (
        f"; fbcache at {fb['steps']} steps reuses "
        + ", ".join(f"{r:.0%} at {t:g}" for t, r in zip(fb["thresholds"], fb["reuse"], strict=True))
        if fb
        else ""
    )
    typer.echo(
        f"wrote {path} ({art['images']} images, {steps} {solver} steps, {len(art['rate'])} blocks{table}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


@calibrate_app.command(
    "solver",
    epilog=o.example(
        "velodiff calibrate solver --model default --nfe 5,6,8 --guidance 2.5",
        'velodiff generate "a red circle" -o a.png --guidance 2.5 \\',
        "    --solver unipc --grid calibrated --nfe 6",
    ),
)
def calibrate_solver(
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    nfe: str = typer.Option("5,6,8,10", "--nfe", help="NFE values to calibrate, comma-separated"),
    guidance: float = typer.Option(..., "--guidance", min=0.0, help="guidance scale the runs will use"),
    methods: str = typer.Option(
        "grid,dpm_solver_v3,dc,search", "--methods", help="grid, dpm_solver_v3, dc, search (comma-separated)"
    ),
    solvers: str = typer.Option("dpmpp_2m,unipc", "--solvers", help="solvers to fit grids for"),
    prompts: str = typer.Option(
        "world", "--prompts", help="world (shapes-world captions in no eval set), a prompt set or a file"
    ),
    limit: int = typer.Option(12, "--limit", min=2, help="calibration images (one per prompt)"),
    seed: int = typer.Option(1000, "--seed", help="seed of the first image"),
    max_runs: int = typer.Option(20, "--max-runs", min=1, help="runs of each grid descent"),
    objective: str = typer.Option("geomean", "--objective", help="geomean (of each image's MSE) or mse"),
    reference_steps: int = typer.Option(
        200, "--reference-steps", min=10, max=MAX_STEPS, help="steps of the reference"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="write the artefact here instead of the cache, to compare or inspect: runs find "
        "only the cache's and the one beside the model (Python: load_solver_calibration(path=))"
    ),
    beside_model: bool = typer.Option(False, "--beside-model", help="write it beside the model (it travels)"),
    threads: o.Threads = None,
) -> None:
    """Fit solvers and grids to a model (grids, DC, DPM-Solver-v3)."""
    t0 = time.perf_counter()
    from ..errors import VelodiffError

    try:
        nfes = [int(v) for v in nfe.split(",") if v.strip()]
    except ValueError:
        raise VelodiffError(f"--nfe takes integers separated by commas, got {nfe!r}") from None
    if not nfes:
        raise VelodiffError(f"--nfe {nfe!r} names no NFE; give one or more, e.g. 5,6,8")
    if len(set(nfes)) != len(nfes):
        raise VelodiffError(f"--nfe {nfe!r} names an NFE twice")
    if max(nfes) > MAX_STEPS:
        raise VelodiffError(f"--nfe {max(nfes)} is more than {MAX_STEPS}")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    solver_list = [s.strip() for s in solvers.split(",") if s.strip()]
    if objective not in ("geomean", "mse"):  # what is refused, before the model loads
        raise VelodiffError(f"unknown objective {objective!r}; valid: geomean, mse")
    from ..calibrated import METHODS
    from .names import check_name, check_solver_name

    for m in method_list:
        check_name("calibration method", m, METHODS)

    for s in solver_list:
        check_solver_name(s)
    from ..eval.sweep import resolve_prompts

    texts = resolve_prompts(prompts, limit)
    if out is not None and beside_model:
        raise VelodiffError("give --out or --beside-model, not both (the artefact goes to one place)")
    if out is not None:  # before the minutes of calibration, not after
        from ..files import output_file

        output_file(out, "--out")
    from .generate import load_model, quiet_libraries

    quiet_libraries()
    loaded, _ = load_model(model, threads,
                           config=config, family=family, prediction_type=prediction_type)
    from tqdm import tqdm

    from ..calibrated import calibrate_solver as fit
    from ..calibrated import model_problem, save_solver_calibration
    from ..calibrated.artefact import beside_model_path, solver_calibration_path
    from ..eval.reference import model_identity
    from ..files import writable_folder

    if beside_model:
        out = beside_model_path(loaded.path, guidance)
    writable_folder(
        (out or solver_calibration_path(model_identity(loaded), guidance)).parent,
        "--beside-model" if beside_model else "--out" if out is not None else "the calibration cache",
    )
    problem = model_problem(loaded, texts, [seed + i for i in range(len(texts))], guidance)
    problem.reference_steps = reference_steps
    problem.objective = objective
    bar = tqdm(unit="run", file=sys.stderr, disable=None, leave=False)

    def progress(what: str) -> None:
        bar.set_description(what, refresh=False)
        bar.update(1)

    try:
        res = fit(problem, nfes, method_list, solver_list, max_runs=max_runs, progress=progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    artefact = {
        "version": 1,
        "kind": "solver",
        "model_hash": model_identity(loaded),
        "model": model or "default",  # as given (a shipped name or a path), not this machine's folder
        "guidance": float(guidance),
        "size": list(loaded.default_size),
        "prompts": prompts,
        "images": len(texts),
        "seed": seed,
        "reference_steps": reference_steps,
        "methods": method_list,
        "evaluations": res["evaluations"],
        "seconds": round(seconds, 1),
        "entries": res["entries"],
        "baselines": res["baselines"],
    }
    path = save_solver_calibration(artefact, res["ems"], out)
    for e in res["entries"]:
        b = res["baselines"].get(str(e["nfe"]))  # none when DPM-Solver-v3 alone was calibrated
        versus = f" (best uncalibrated {b['solver']}/{b['grid']}: {b['error']:.3g})" if b else ""
        fit = f"{e['method']:<10} {objective} {e['error']:.3g}"
        typer.echo(f"  {e['solver']:>13} NFE {e['nfe']:>2}: {fit}{versus}")
    from ..calibrated.calibrate import MIN_NFE

    for m in method_list:  # a method below its minimum at some NFE was left out there: say so
        low = [n for n in nfes if n < MIN_NFE[m]]
        if low:
            typer.echo(f"  {m} left out at NFE {', '.join(map(str, low))} (it needs at least {MIN_NFE[m]})")
    typer.echo(
        f"wrote {path} ({len(texts)} images, {res['evaluations']} batch evaluations) in {seconds:.0f} s"
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(calibrate_app, name="calibrate")
