"""`velodiff bench quantize`: each quantization rule's single-evaluation error on a model, the report a
user reads before trusting a quantized plan on their own weights.

    velodiff bench quantize --model default --plans "int8;int8:activations=dynamic;w4a8"

Relative L2 error |f_q(x) - f(x)| / |f(x)| of one conditional network evaluation (x0) of the quantized
network against the float one, over prompts x times t x noise seeds; median and max per rule
(in Python: ``velodiff.accel.quantize.evaluation_report``). End-to-end quality goes through
``velodiff bench --sweep`` or ``velodiff tune`` with the same plans."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from .options import check_threads, example


def bench_quantize(
    ctx: typer.Context,
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    plans: Annotated[str, typer.Option(help="';'-separated quantization rules")] = "int8;w4a8",
    prompts: Annotated[int, typer.Option(min=1, max=100, help="ShapesEval v1 prompts, a seed each")] = 4,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the records as JSON")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: the best available)")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, callback=check_threads, help="torch CPU threads (default: 1)")
    ] = 1,
) -> None:
    """Median and max relative error of one network evaluation per quantization rule."""
    import json

    from ..accel.quantize import evaluation_report, quantization_rules
    from ..errors import VelodiffError
    from ..eval.shapes_eval import load_prompts
    from ..eval.tables import markdown_table
    from ..files import write_atomic
    from .bench_solvers import _command_line, _output
    from .generate import load_model, quiet_libraries

    texts_of_plans = [p.strip() for p in plans.split(";") if p.strip()]
    try:
        quantization_rules(texts_of_plans)  # one line before the model loads
    except VelodiffError as e:
        raise VelodiffError(f"--plans: {e}") from None
    if json_path is not None:
        json_path = _output(json_path, "--json")
    quiet_libraries()
    from ..models.base import resolve_device

    loaded, _ = load_model(model, threads, str(resolve_device(device)), config=config, family=family,
                           prediction_type=prediction_type)
    texts = [p.text for p in load_prompts("v1")][:prompts]
    records = evaluation_report(loaded, texts_of_plans, texts)
    table = markdown_table(
        ["plan", "relative error of one evaluation: median", "max", "evaluations"],
        [[f"`{r['plan']}`", f"{r['median']:.4f}", f"{r['max']:.4f}", r["n"]] for r in records],
        align="lrrr",
    )
    if json_path is not None:
        body = json.dumps({"command": _command_line(ctx), "records": records}, indent=1) + "\n"
        write_atomic(json_path, body)
    typer.echo(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command(
        "quantize",
        epilog=example('velodiff bench quantize --model default --plans "int8;w4a8"'),
        short_help="Single-evaluation error of each quantization rule on a model.",
    )(bench_quantize)
