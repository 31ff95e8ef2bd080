"""`velodiff bench quantize`: each quantization rule's single-evaluation error on a model, the report a
user reads before trusting a quantized plan on their own weights.

    velodiff bench quantize --model default --plans "int8;int8:activations=dynamic;w4a8"

Relative L2 error |f_q(x) - f(x)| / |f(x)| of one conditional network evaluation (x0) of the quantized
network against the float one (``velodiff.accel.quantize.evaluation_error``), over prompts x times t x
noise seeds; median and max per rule. End-to-end quality goes through ``velodiff bench --sweep`` or
``velodiff tune`` with the same plans."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from .options import check_threads, example

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


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

    from ..accel.quantize import Quantize, evaluation_error
    from ..accel.w4a8 import W4A8
    from ..errors import VelodiffError
    from ..eval.shapes_eval import load_prompts
    from ..files import write_atomic
    from ..plan import Plan
    from .bench_solvers import _command_line, _output
    from .generate import load_model, quiet_libraries

    rules = []
    for text in (p.strip() for p in plans.split(";") if p.strip()):
        parsed = Plan.parse(text).rules
        if len(parsed) != 1 or not isinstance(parsed[0], (Quantize, W4A8)):
            raise VelodiffError(f"--plans: {text!r} is not one quantization rule (int8, fp8, int4, w4a8)")
        rules.append((text, parsed[0]))
    if not rules:
        raise VelodiffError("--plans needs at least one quantization rule, e.g. int8")
    if json_path is not None:
        json_path = _output(json_path, "--json")
    quiet_libraries()
    from ..models.base import resolve_device

    loaded, _ = load_model(model, threads, str(resolve_device(device)), config=config, family=family,
                           prediction_type=prediction_type)
    texts = [p.text for p in load_prompts("v1")][:prompts]
    records = []
    for text, rule in rules:
        errors = [evaluation_error(loaded, rule, t=t, seed=i, prompt=p)
                  for i, p in enumerate(texts) for t in TIMES]
        records.append({"plan": text, "median": statistics.median(errors), "max": max(errors),
                        "n": len(errors)})
    lines = ["| plan | relative error of one evaluation: median | max | evaluations |",
             "|---|---:|---:|---:|"]
    lines += [f"| `{r['plan']}` | {r['median']:.4f} | {r['max']:.4f} | {r['n']} |" for r in records]
    if json_path is not None:
        body = json.dumps({"command": _command_line(ctx), "records": records}, indent=1) + "\n"
        write_atomic(json_path, body)
    typer.echo("\n".join(lines))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command(
        "quantize",
        epilog=example('velodiff bench quantize --model default --plans "int8;w4a8"'),
        short_help="Single-evaluation error of each quantization rule on a model.",
    )(bench_quantize)
