"""`velodiff bench solvers`: error vs NFE for every solver x grid on the mixture oracle, beside
diffusers' schedulers; writes JSON records, a markdown report and a PNG plot, and prints the bar.

    velodiff bench solvers --json out/bench_solvers.json

See ``velodiff.eval.solver_bench`` for what is measured and how."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..files import write_atomic
from ..limits import MAX_BATCH, MAX_SAMPLE_ELEMENTS, MAX_STEPS
from .options import check_threads

DEFAULT_JSON = Path("out/bench_solvers.json")


def _names(value: str | None, valid, kind: str) -> list[str] | None:
    from ..errors import VelodiffError, unknown_name

    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise VelodiffError(f"--{kind}s needs at least one name")
    for n in names:
        if n not in valid:
            raise unknown_name(kind, n, valid)
    return names


def _ints(value: str, option: str) -> list[int]:
    from ..errors import VelodiffError

    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise VelodiffError(f"{option} takes comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1 or max(out) > MAX_STEPS:
        raise VelodiffError(f"{option} takes comma-separated integers in [1, {MAX_STEPS}], got {value!r}")
    return sorted(set(out))


def _output(path: Path, option: str) -> Path:
    """``files.output_file``: the folder made if only it is missing, before any work."""
    from ..files import output_file

    return output_file(path, option)


def _command_line(ctx: typer.Context) -> str:
    """The command as the user typed it: the options given on the command line."""
    parts = ctx.command_path.split()
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if isinstance(value, bool):
            flag = param.opts[0] if value else param.secondary_opts[0]
            parts.append(flag)
        else:
            parts += [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def bench_solvers(
    ctx: typer.Context,
    json_path: Annotated[Path, typer.Option("--json", help="JSON records (a list)")] = DEFAULT_JSON,
    markdown: Annotated[Path | None, typer.Option(help="markdown report (default: beside the JSON)")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG of error vs NFE (default: beside the JSON)")] = None,
    solvers: Annotated[str | None, typer.Option(help="comma-separated (default: all deterministic)")] = None,
    grids: Annotated[str | None, typer.Option(help="comma-separated (default: all but duplicates)")] = None,
    nfe: Annotated[str, typer.Option(help="comma-separated NFE budgets")] = "3,4,5,6,8,10,12,15,20",
    samples: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="starting samples of the 2-D mixture")
    ] = 512,
    image_samples: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="starting samples of the image mixture")
    ] = 64,
    image_shape: Annotated[str, typer.Option(help="shape of the image mixture, CxHxW")] = "3x8x8",
    data: Annotated[str, typer.Option(help="which mixtures: 2d, image")] = "2d,image",
    schedulers: Annotated[str, typer.Option(help="diffusers schedulers, comma-separated, or 'none'")] = (
        "DPMSolverMultistep, UniPCMultistep, DEISMultistep, DDIM, Euler, Heun"),  # wraps at the commas
    seed: Annotated[int, typer.Option(help="seed of the starting noise")] = 0,
    threads: Annotated[
        int, typer.Option(min=1, callback=check_threads, help="torch threads (tiny tensors: 1 is fastest)")
    ] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
) -> None:
    """Error against an exact reference for every solver x grid x NFE on the mixture oracle, with
    diffusers' schedulers (default configs, SD's schedule) side by side."""
    import torch
    from tqdm import tqdm

    from ..errors import VelodiffError
    from ..eval import solver_bench as sb
    from ..grids import GRIDS
    from ..solvers import SOLVERS

    solver_names = _names(solvers, SOLVERS, "solver")
    for n in solver_names or ():
        if SOLVERS[n].stochastic:
            raise VelodiffError(f"solver {n!r} is stochastic; the benchmark compares deterministic solvers")
        if SOLVERS[n].adaptive:
            raise VelodiffError(f"solver {n!r} spends the evaluations its error control needs; the benchmark "
                                "compares solvers at equal NFE")
        if SOLVERS[n].requires:
            raise VelodiffError(f"solver {n!r} runs on fitted options ({', '.join(SOLVERS[n].requires)}); "
                                "the benchmark compares solvers that run without them")
    grid_names = _names(grids, GRIDS, "grid")
    sched_names = [] if schedulers.strip() == "none" else _names(schedulers, sb.DIFFUSERS_SCHEDULERS,
                                                                 "scheduler")
    nfes = _ints(nfe, "--nfe")
    datas = _names(data, ("2d", "image"), "data")
    try:
        shape = tuple(int(v) for v in image_shape.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1 or math.prod(shape) > MAX_SAMPLE_ELEMENTS:
        raise VelodiffError(
            f"--image-shape takes sizes joined by 'x' (at most {MAX_SAMPLE_ELEMENTS} elements), e.g. 3x8x8; "
            f"got {image_shape!r}"
        )

    from ..files import distinct_files

    json_path = _output(json_path, "--json")
    md_path = _output(markdown or json_path.with_suffix(".md"), "--markdown")
    png_path = _output(plot or json_path.with_suffix(".png"), "--plot")
    distinct_files(**{"--json": json_path, "--markdown": md_path, "--plot": png_path})

    torch.set_num_threads(threads)
    oracles = sb.make_oracles(datas, samples, image_samples, shape, seed)
    solver_list = solver_names or sb.deterministic_solvers()
    grid_list = grid_names or sb.default_grids(oracles[0].schedule)
    total = sb.sweep_size(oracles, solver_list, grid_list, nfes, sched_names)
    with tqdm(total=total, desc="bench solvers", unit="run", disable=not progress, file=sys.stderr) as bar:
        records = sb.run_sweep(oracles, solver_list, grid_list, nfes, sched_names, progress=bar.update)

    import json

    command = _command_line(ctx)
    write_atomic(json_path, json.dumps(records, indent=1) + "\n")
    write_atomic(md_path, sb.markdown_report(records, command=command))
    write_atomic(png_path, sb.plot_png(records))

    typer.echo(sb.markdown_report(records, command=command, best_only=True))
    rows = sb.bar_ratios(records)
    typer.echo(f"bar: velodiff's best / diffusers {sb.BAR_BASELINE} on {sb.BAR_DATA} "
               f"(must be <= {sb.BAR_MAX_RATIO}):")
    for r in rows:
        ratio = "not measured" if r["ratio"] is None else f"{float(r['ratio']):.3f}"
        which = f"  ({r['solver']} / {r['grid']})" if r["solver"] else ""
        typer.echo(f"  NFE {r['nfe']:>2}: {ratio}{which}")
    typer.echo(f"  {sb.bar_verdict(rows)}")
    typer.echo(f"wrote {json_path}, {md_path} (full tables), {png_path}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    bench.command(
        "solvers",
        epilog=example("velodiff bench solvers --solvers ddim,dpmpp_2m --nfe 5,10,20"),
        short_help="Solver error vs NFE on the exact mixture oracle.",
    )(bench_solvers)
