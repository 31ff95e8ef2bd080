"""`velodiff bench`: the quality-vs-speed sweep (plans x solvers x grids x NFE x guidance) of one model
on a prompt set; writes results.json, results.md, pareto.png and sample sheets into ``--out``.

    velodiff bench --solvers dpmpp_2m,unipc,ddim --nfe 4,8,16 --out bench/default-model
    velodiff bench --plans "none;ag:threshold=0.99" --solvers dpmpp_2m --nfe 20 --out bench/ag
    velodiff bench --sweep sweep.yaml --out bench/run1 --repeat 3

Registered as the callback of the ``bench`` group (``invoke_without_command``), so ``velodiff bench
solvers`` and the other subcommands keep working. See ``velodiff.eval.sweep``."""

from __future__ import annotations

# ruff: noqa: B008  (typer declares options as argument defaults)
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..limits import MAX_IMAGES_PER_PROMPT, MAX_RUNS, MAX_STEPS
from . import options as o
from .options import THREADS_HELP, check_threads


def bench_sweep(
    ctx: typer.Context,
    out: Path = typer.Option(Path("bench/sweep"), "--out", "-o", help="output folder"),
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    sweep_file: Path = typer.Option(None, "--sweep", help="YAML/JSON file of sweep keys (options override)"),
    solvers: str = typer.Option(None, "--solvers", help="comma list [default: dpmpp_2m,unipc,ddim]"),
    grids: str = typer.Option(None, "--grids", help="comma list of grid names [default: the model's]"),
    nfe: str = typer.Option(None, "--nfe", help="comma list of NFE budgets [default: 4,8,16]"),
    guidance: str = typer.Option(None, "--guidance", help="comma list of guidance scales [default: model's]"),
    plans: str = typer.Option(None, "--plans", help="step plans, ;-separated [default: none]"),
    prompts: str = typer.Option(None, "--prompts", help="v1, v1-holdout, or a .txt/.json file [default: v1]"),
    limit: int = typer.Option(None, "--limit", min=1, help="prompts used, spread over the set [default: 16]"),
    images_per_prompt: int = typer.Option(None, "--images-per-prompt", min=1, max=MAX_IMAGES_PER_PROMPT,
                                           help="images per prompt, seeds seed, seed + 1, ... [default: 1]"),
    seed: int = typer.Option(None, "--seed",
                             help="seed of the first image (image j uses seed + j) [default: 0]"),
    repeat: int = typer.Option(
        None, "--repeat", min=1, max=MAX_RUNS, help="timed runs per configuration (median) [default: 1]"
    ),
    batch: int = typer.Option(None, "--batch", min=1, help="images per batched call [default: 16]"),
    metrics: str = typer.Option(None, "--metrics",
                                help="comma list of shapes,fd,reference,clip, or none (time only) "
                                "[default: all that apply]"),
    reference_solver: str = typer.Option(None, "--reference-solver",
                                         help="solver of the reference images (PSNR, SSIM, latent MSE) "
                                         "[default: dpmpp_3m]"),
    reference_steps: int = typer.Option(
        None, "--reference-steps", min=1, max=MAX_STEPS, help="steps of the reference images [default: 100]"
    ),
    fd_features: str = typer.Option(None, "--fd-features",
                                    help="'fd-shapes' or an Inception TorchScript file for FID"),
    clip: Path = typer.Option(None, "--clip", help="local CLIP folder (transformers) for CLIP score"),
    quality: str = typer.Option(None, "--quality", help="quality axis of the Pareto plot"),
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, callback=check_threads, help=THREADS_HELP)
    ] = None,
    device: o.Device = None,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    replace: bool = typer.Option(
        False, "--replace", help="replace --out's finished configurations this sweep does not ask for"
    ),
) -> None:
    """Quality vs speed of every plan x solver x grid x NFE x guidance configuration, from the same seeds."""
    if ctx.invoked_subcommand is not None:
        return
    from ..eval.sweep import BENCH_FILES, is_bench_folder, load_sweep_file, make_sweep, run_sweep

    t0 = time.perf_counter()
    values: dict[str, Any] = load_sweep_file(sweep_file) if sweep_file is not None else {}
    cli = {
        "solvers": solvers, "grids": grids, "nfe": nfe, "guidance": guidance, "plans": plans,
        "prompts": prompts,
        "limit": limit, "images_per_prompt": images_per_prompt, "seed": seed, "repeat": repeat,
        "batch": batch,
        "metrics": metrics, "reference_solver": reference_solver, "reference_steps": reference_steps,
        "fd_features": fd_features, "clip": str(clip) if clip is not None else None, "quality": quality,
    }
    values.update({k: v for k, v in cli.items() if v is not None})
    sw = make_sweep(values)
    from ..files import check_results_folder

    check_results_folder(out, "--out", BENCH_FILES, is_bench_folder)
    from .generate import load_model, quiet_libraries

    quiet_libraries()
    from ..models.base import resolve_device

    loaded, defaults = load_model(model, threads, str(resolve_device(device)),
                                  config=config, family=family, prediction_type=prediction_type)
    from ..eval.reference import network_identity
    from .bench_solvers import _command_line

    res = run_sweep(
        loaded, sw, out, model_id=network_identity(loaded), model_name=str(model) if model else "default",
        defaults=defaults, progress=progress, log=lambda m: typer.echo(m, err=True),
        command=_command_line(ctx), replace=replace,
    )
    ok = [r for r in res["records"] if "error" not in r]
    front = [r["id"] for r in ok if r.get("pareto")]
    typer.echo(f"{len(ok)} of {len(res['records'])} configurations in {time.perf_counter() - t0:.0f} s; "
               f"Pareto front ({res.get('quality', '-')}): {', '.join(front) or '-'}")
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'pareto.png'}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.callback(
        invoke_without_command=True,
        epilog=o.example(
            "velodiff bench --model default --solvers dpmpp_2m,unipc --nfe 4,8 \\", "    --out bench/run1"
        ),
    )(bench_sweep)
