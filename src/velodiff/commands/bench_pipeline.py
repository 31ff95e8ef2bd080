"""`velodiff bench pipeline`: seconds per image, peak memory and output difference of velodiff's
text2img beside diffusers' pipeline, on identical weights, prompts, noise, time steps and NFE.

    velodiff bench pipeline --json out/bench_pipeline.json
    velodiff bench pipeline --device cuda --dtype bfloat16 --json out/bench_pipeline_cuda.json

See ``velodiff.eval.pipeline_bench`` for what is measured and how."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..files import write_atomic
from .bench_solvers import _command_line, _output
from .options import check_threads, example

DEFAULT_JSON = Path("out/bench_pipeline.json")


def bench_pipeline(
    ctx: typer.Context,
    json_path: Annotated[Path, typer.Option("--json", help="JSON records (a list)")] = DEFAULT_JSON,
    markdown: Annotated[Path | None, typer.Option(help="markdown table (default: beside the JSON)")] = None,
    models: Annotated[
        str,
        typer.Option(
            "--models",
            "--model",
            help="comma-separated: shipped models by name (default, default-4step, ...), model folders or "
            ".safetensors files, and sd15, sdxl, sd3, flux (tiny random models built into --cache)",
        ),
    ] = "default,sd15,sdxl,sd3,flux",
    nfe: Annotated[int, typer.Option(min=1, help="network calls per image (steps of a 1-call solver)")] = 20,
    runs: Annotated[int, typer.Option(min=1, help="paired runs per model (after a warm-up)")] = 5,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    cache: Annotated[Path, typer.Option(help="where the tiny models are built")] = Path("out/tiny-models"),
    seed: Annotated[int, typer.Option(help="seed of the starting noise")] = 0,
    threads: Annotated[
        int | None, typer.Option(min=1, callback=check_threads, help="torch CPU threads (default: torch's)")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
) -> None:
    """End-to-end seconds per image (median of paired, alternating runs), peak memory and max abs
    output difference, velodiff vs diffusers, per model."""
    import json

    import torch
    from tqdm import tqdm

    from ..errors import VelodiffError
    from ..eval import pipeline_bench as pb
    from .generate import quiet_libraries

    quiet_libraries()
    if threads is not None:
        torch.set_num_threads(threads)
    names = [n.strip() for n in models.split(",") if n.strip()]
    if not names:
        raise VelodiffError("--models needs at least one name")
    from ..shipped import resolve_model

    for n in names:
        if n not in pb.TINY:
            resolve_model(n)  # a shipped name or an existing path, else one line naming the shipped ones
    json_path = _output(json_path, "--json")
    md_path = _output(markdown or json_path.with_suffix(".md"), "--markdown")
    from ..files import distinct_files

    distinct_files(**{"--json": json_path, "--markdown": md_path})
    if cache.exists() and not cache.is_dir():
        raise VelodiffError(f"--cache {str(cache)!r} is a file; give a folder")
    cache.mkdir(parents=True, exist_ok=True)
    folders = pb.model_folders(names, cache)
    skipped = [n for n in names if n not in folders]
    records: list[dict] = []
    with tqdm(
        total=len(folders) * runs, desc="bench pipeline", unit="pair", disable=not progress, file=sys.stderr
    ) as bar:
        for name, path in folders.items():
            records += pb.bench_model(
                name, path, nfe=nfe, runs=runs, device=device, dtype=dtype, seed=seed, progress=bar.update
            )
            write_atomic(json_path, json.dumps(records, indent=1) + "\n")  # partial results survive
    command = _command_line(ctx)
    table = pb.pipeline_table(records, command=command)
    write_atomic(md_path, table)
    typer.echo(table)
    if skipped:
        typer.echo(f"skipped (not installed): {', '.join(skipped)}")
    typer.echo(
        f"bar: velodiff / diffusers seconds per image <= {pb.BAR_MAX_RATIO:.2f} and outputs within "
        f"tolerance, on every model"
    )
    typer.echo(f"wrote {json_path}, {md_path}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    bench.command(
        "pipeline",
        epilog=example("velodiff bench pipeline --model default --nfe 8 --runs 3"),
        short_help="Seconds per image and output, velodiff vs diffusers.",
    )(bench_pipeline)
