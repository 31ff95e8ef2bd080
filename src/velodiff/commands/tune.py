"""`velodiff tune --budget 0.02 --metric shapes_eval --out DIR`: the fastest plan (solver, NFE, guidance
rule, cache, quantization) whose quality loss against the 20-step DPM-Solver++ 2M baseline is within the
budget on calibration prompts, confirmed on held-out prompts; writes DIR/plan.txt (use it with
``--plan @DIR/plan.txt``), report.md, pareto.png and tune.json. See ``velodiff.eval.tune``."""

from __future__ import annotations

# ruff: noqa: B008  (typer declares options as argument defaults)
import time
from pathlib import Path

import typer

from ..limits import MAX_IMAGES_PER_PROMPT, MAX_RUNS
from . import options as o


def tune(
    budget: float = typer.Option(..., "--budget", help="quality loss allowed against the baseline (>= 0)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (resumes a tune found there)"),
    metric: str = typer.Option(
        "shapes_eval", "--metric", help="shapes_eval, fd_shapes, clip_score, psnr, ..."
    ),
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    baseline_model: str = typer.Option(
        None, "--baseline-model", help="the baseline's model, if not --model (e.g. a student's teacher)"
    ),
    space: Path = typer.Option(None, "--space", help="YAML/JSON search space: solvers, nfe, grids, axes"),
    beam: int = typer.Option(3, "--beam", min=1, help="plans kept after each stage"),
    calibration: str = typer.Option("v1-holdout", "--calibration", help="calibration prompt set or file"),
    holdout: str = typer.Option("v1", "--holdout", help="held-out prompt set or file"),
    calibration_images: int = typer.Option(
        4, "--calibration-images", min=1, max=MAX_IMAGES_PER_PROMPT, help="images per prompt"
    ),
    images_per_prompt: int = typer.Option(
        2, "--images-per-prompt", min=1, max=MAX_IMAGES_PER_PROMPT, help="held-out images per prompt"
    ),
    limit: int = typer.Option(1000, "--limit", min=1, help="prompts used from each set"),
    repeat: int = typer.Option(1, "--repeat", min=1, max=MAX_RUNS, help="timed runs per plan (median)"),
    rank: str = typer.Option("evals", "--rank", help="fastest by: evals (counted per image) or time"),
    threads: o.Threads = None,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Find the fastest plan within a quality budget."""
    t0 = time.perf_counter()
    from ..eval.tune import TUNE_FILES, SearchSpace, TuneConfig, check_config, is_tune_folder

    cfg = TuneConfig(
        budget=budget,
        metric=metric,
        beam=beam,
        calibration_prompts=calibration,
        holdout_prompts=holdout,
        images_per_prompt=images_per_prompt,
        calibration_images=calibration_images,
        rank=rank,
        limit=limit,
        repeat=repeat,
    )
    check_config(cfg)
    values = {}
    if space is not None:
        from ..eval.sweep import load_sweep_file

        values = load_sweep_file(space, SearchSpace.__dataclass_fields__, "search space")
    sp = SearchSpace.of(values)
    from ..files import check_results_folder

    check_results_folder(out, "--out", TUNE_FILES, is_tune_folder)
    from .generate import load_model, quiet_libraries

    quiet_libraries()
    loaded, defaults = load_model(model, threads,
                                  config=config, family=family, prediction_type=prediction_type)
    from ..eval.reference import network_identity
    from ..eval.tune import tune as run_tune

    base = None
    if baseline_model is not None:
        bm, bdefaults = load_model(baseline_model, threads)
        base = (bm, network_identity(bm), baseline_model, bdefaults)

    res = run_tune(
        loaded,
        cfg,
        sp,
        out,
        model_id=network_identity(loaded),
        model_name=model or "default",
        defaults=defaults,
        progress=progress,
        log=lambda m: typer.echo(m, err=True),
        baseline_model=base,
    )
    typer.echo(
        f"plan {res['plan']}: {res['speedup']:.2f}x faster than the baseline on {holdout}, "
        f"in {time.perf_counter() - t0:.0f} s; wrote {out / 'plan.txt'}, {out / 'report.md'}"
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command(
        "tune",
        epilog=o.example(
            "velodiff tune --budget 0.02 --out tuned",
            'velodiff generate "a red circle" -o a.png \\',
            "    --plan @tuned/plan.txt",
        ),
    )(tune)
