"""`velodiff invert IMAGE --prompt P --method edict --json OUT`: invert an image to the noise a
deterministic sampler maps back to it (``velodiff.pipelines.invert``), regenerate it, and report the
round trip's error; optionally regenerate under another prompt (an edit)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from ..errors import VelodiffError
from ..files import save_image_atomic, write_atomic
from ..images import image_grid
from . import options as o
from .image_run import ImageRun, fit_size, read_rgb

METHODS = ("ddim", "edict", "fixed-point", "rf")

EXAMPLE = o.example(
    'velodiff invert scene.png --prompt "a red circle" --method edict \\',
    '    --steps 20 --json out/invert.json --edit "a blue circle" --out edit.png',
)


def invert_cmd(
    ctx: typer.Context,
    image: Annotated[
        Path, typer.Argument(help="the image to invert (its sides multiples of the latent factor)")
    ],
    prompt: Annotated[str, typer.Option(help="the prompt the image is inverted under")],
    method: Annotated[str, typer.Option(help="ddim, edict, fixed-point (of --solver), rf (flow)")] = (
        "edict"
    ),
    json_out: Annotated[Path | None, typer.Option("--json", help="write the round trip's metrics")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="image: the regeneration (the edit, with --edit)"),
    ] = None,
    edit: Annotated[str | None, typer.Option(help="regenerate under this prompt instead (an edit)")] = None,
    p: Annotated[float, typer.Option(help="EDICT's mixing weight (Wallace et al. 2023: 0.93)")] = 0.93,
    iters: Annotated[int, typer.Option(min=1, help="fixed-point iterations per step")] = 8,
    sweeps: Annotated[
        int | None, typer.Option(min=1, help="fixed-point sweeps (default: until stable)")
    ] = None,
    gamma: Annotated[float, typer.Option(help="RF-Inversion's forward controller strength in [0, 1]")] = 0.5,
    eta: Annotated[float, typer.Option(help="RF-Inversion's reverse controller strength in [0, 1]")] = 0.0,
    stop: Annotated[
        float, typer.Option(help="RF-Inversion: share of steps the reverse controller acts")
    ] = 0.25,
    model: o.Model = None,
    width: o.Width = None,
    height: o.Height = None,
    device: o.Device = None,
    dtype: o.Dtype = None,
    steps: o.Steps = None,
    solver: o.Solver = None,
    grid: o.Grid = None,
    guidance: o.Guidance = None,
    negative: o.Negative = None,
    plan: o.PlanOpt = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    threads: o.Threads = None,
) -> None:
    """Invert an image to noise; report the round trip's error.

    Methods: DDIM, EDICT, fixed-point (of any deterministic solver), RF-Inversion (flow models)."""
    if not prompt.strip():
        raise VelodiffError('the prompt is empty; describe the image, e.g. "a red circle"')
    if method not in METHODS:
        raise VelodiffError(f"unknown inversion method {method!r}; choose one of: {', '.join(METHODS)}")
    if edit is not None and not edit.strip():
        raise VelodiffError("--edit is empty; give the prompt to regenerate under")
    if out is None and json_out is None:
        raise VelodiffError("nothing to write: give --json and/or --out")
    rf, fixed = (method == "rf", "--method rf"), (method == "fixed-point", "--method fixed-point")
    controller = (method == "rf" and eta > 0, "--method rf and --eta > 0")
    o.refuse_ignored(ctx, {"p": (method == "edict", "--method edict"), "iters": fixed, "sweeps": fixed,
                           "gamma": rf, "eta": rf, "stop": controller})
    run = ImageRun.of(locals())
    run.check()
    from ..files import distinct_files, output_file
    from .generate import check_output_path

    fmt = check_output_path(out) if out is not None else None
    if json_out is not None:
        output_file(json_out, "--json")  # before the inversion, not after
    distinct_files(IMAGE=image, **{"--json": json_out, "--out": out})
    picture = read_rgb(image)
    run.load()
    size = fit_size(run, picture)
    if size != picture.size:
        from PIL import Image

        picture = picture.resize(size, Image.Resampling.LANCZOS)
    from ..pipelines.invert import invert

    kw = {k: v for k, v in run.sampling().items() if v is not None and k not in ("noise",)}
    if method != "fixed-point":
        kw.pop("solver", None)
        if solver is not None:
            kw["solver"] = solver  # refused in one line unless it is the method's own sampler
    inv = invert(
        run.loaded,
        picture,
        prompt,
        method,
        p=p,
        iters=iters,
        sweeps=sweeps,
        gamma=gamma,
        eta=eta,
        stop=stop,
        plan=plan,
        **kw,
    )
    metrics = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in inv.metrics.items()}
    metrics.update(image=str(image), prompt=prompt, model=str(run.path))
    if out is not None:
        res = inv.regenerate(edit, eta=eta, stop=stop) if edit else inv.regenerate(eta=eta, stop=stop)
        save_image_atomic(image_grid(list(res.images)), out, fmt)
        metrics["out"] = str(out)
        if edit:
            metrics["edit"] = edit
    if json_out is not None:
        write_atomic(json_out, json.dumps(metrics, indent=2) + "\n")
    typer.echo(
        f"{method} ({inv.result.solver}, {metrics['steps']} steps, guidance {inv.guidance:g}): "
        f"latent max error {inv.metrics['latent_max_error']:.3g}, "
        f"rms {inv.metrics['latent_rms_error']:.3g}, PSNR {inv.metrics['psnr']:.1f} dB; "
        f"{inv.result.nfe} NFE to invert"
        + (f"; wrote {json_out}" if json_out else "")
        + (f", {out}" if out else "")
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("invert", epilog=EXAMPLE)(invert_cmd)
