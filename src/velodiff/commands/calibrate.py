"""`velodiff calibrate cache --model M`: measure how fast the model's block features change along the
sampling path and save it keyed by the model's hash (``velodiff.accel.calibration``), for cache
schedules fitted to the model (``--plan deepcache:schedule=budget``)."""

from __future__ import annotations

# ruff: noqa: B008  (typer declares options as argument defaults)
import time

import typer

from . import options as o

calibrate_app = typer.Typer(no_args_is_help=True)


@calibrate_app.callback(epilog=o.example("velodiff calibrate cache --model default"))
def calibrate() -> None:
    """Fit accelerators to a model, once."""


@calibrate_app.command(
    "cache",
    epilog=o.example("velodiff calibrate cache --model default",
                     "velodiff generate \"a red circle\" -o a.png \\",
                     "    --plan deepcache:schedule=budget,interval=3"),
)
def calibrate_cache(
    model: o.Model = None,
    prompts: str = typer.Option("v1-holdout", "--prompts", help="prompt set or file to calibrate on"),
    limit: int = typer.Option(16, "--limit", min=1, help="prompts used, spread over the set"),
    steps: int = typer.Option(50, "--steps", min=3, help="steps of the fine calibration run"),
    solver: str = typer.Option("dpmpp_2m", "--solver", help="solver of the calibration run"),
    seed: int = typer.Option(1000, "--seed", help="seed of the first image"),
    threads: o.Threads = None,
) -> None:
    """Measure the model's feature changes per step for cache schedules."""
    t0 = time.perf_counter()
    from .names import check_solver

    check_solver(solver)
    from ..eval.sweep import resolve_prompts

    texts = resolve_prompts(prompts, limit)
    from .generate import load_model, quiet_libraries

    quiet_libraries()
    loaded, defaults = load_model(model, threads)
    from ..accel.calibration import calibrate_cache as measure
    from ..accel.calibration import save_cache_calibration

    art = measure(loaded, texts, [seed + i for i in range(len(texts))], steps=steps, solver=solver,
                  guidance=defaults.get("guidance"))
    path = save_cache_calibration(art)
    typer.echo(f"wrote {path} ({art['images']} images, {steps} {solver} steps, {len(art['rate'])} blocks) "
               f"in {time.perf_counter() - t0:.1f} s")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(calibrate_app, name="calibrate")
