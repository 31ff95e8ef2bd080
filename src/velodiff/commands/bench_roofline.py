"""`velodiff bench roofline`: each plan's time per network evaluation against the machine's physical
limit (FLOPs per evaluation over the measured matmul peak), and its distance to the plain run.

    velodiff bench roofline --plans "none;compile;compile:channels_last=true;int8" --batch 1,8

See ``velodiff.eval.roofline`` for what is measured and how."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..limits import MAX_BATCH, MAX_STEPS
from . import options as o
from .options import check_threads, example


def bench_roofline(
    ctx: typer.Context,
    json_path: Annotated[Path, typer.Option("--json", help="JSON records (a list)")] = Path(
        "out/roofline.json"
    ),
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    plans: Annotated[str, typer.Option(help="';'-separated plans ('none': no plan)")] = "none;compile",
    batch: Annotated[str, typer.Option(help="comma list of images per call")] = "1,8",
    steps: Annotated[int, typer.Option(min=1, max=MAX_STEPS, help="sampling steps per timed run")] = 10,
    rounds: Annotated[
        int, typer.Option(min=1, help="timed runs per plan (alternating, after a warm-up)")
    ] = 7,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: the best available)")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, callback=check_threads, help="torch CPU threads (default: 1)")
    ] = 1,
) -> None:
    """Milliseconds per evaluation row, GFLOP per row, matmul peak, limit, x limit, per plan and batch."""
    import json

    from ..errors import VelodiffError
    from ..eval.roofline import roofline, roofline_table
    from ..files import write_atomic
    from ..plan import Plan
    from .bench_solvers import _command_line, _output
    from .generate import load_model, quiet_libraries

    names = [p.strip() for p in plans.split(";") if p.strip()]
    if not names:
        raise VelodiffError("--plans needs at least one plan ('none' for no plan)")
    for p in names:
        if p != "none":
            Plan.parse(p)
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise VelodiffError(f"--batch must be a comma list of integers, got {batch!r}") from None
    if not batches or min(batches) < 1 or max(batches) > MAX_BATCH:
        raise VelodiffError(f"--batch must list integers in [1, {MAX_BATCH}], got {batch!r}")
    json_path = _output(json_path, "--json")
    if json_path.suffix.lower() == ".md":
        raise VelodiffError(f"--json {str(json_path)!r}: the markdown table goes beside it as .md; use .json")
    quiet_libraries()
    from ..models.base import resolve_device

    loaded, _ = load_model(model, threads, str(resolve_device(device)), config=config, family=family,
                           prediction_type=prediction_type)
    records = [r for b in batches for r in roofline(loaded, names, batch=b, steps=steps, rounds=rounds)]
    command = _command_line(ctx)
    write_atomic(json_path, (json.dumps({"command": command, "records": records}, indent=1) + "\n").encode())
    table = roofline_table(records)
    write_atomic(json_path.with_suffix(".md"), (table + f"\n    {command}\n").encode())
    typer.echo(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command(
        "roofline",
        epilog=example('velodiff bench roofline --plans "none;compile" --batch 1,8'),
        short_help="Time per evaluation against FLOPs / matmul peak, per plan.",
    )(bench_roofline)
