"""`velodiff generate-set PROMPTS --out DIR`: a resumable image set (PNG files + manifest), in process or
over Ray (``--ray local`` / ``--ray ADDRESS``); and `velodiff eval --manifest DIR`: metrics of a
finished or partial set."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError
from ..limits import MAX_SET_IMAGES_PER_PROMPT, MAX_STEPS


def generate_set_cmd(
    prompts: Annotated[
        Path, typer.Argument(help="a text file (one prompt a line), a JSON list, or COCO captions")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="the set folder (created; a set there is resumed)")
    ],
    model: Annotated[str | None, typer.Option(
        metavar="<name|path>",
        help="a shipped model by name (default) or a diffusers folder / .safetensors file (default: the "
        "set's, else the shipped model)",
    )] = None,
    seed: Annotated[int | None, typer.Option(help="base seed; image i uses seed + i (default 0)")] = None,
    images_per_prompt: Annotated[
        int | None, typer.Option(min=1, max=MAX_SET_IMAGES_PER_PROMPT, help="images per prompt (default 1)")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, max=MAX_STEPS, help="solver steps (default: the model's)")
    ] = None,
    solver: Annotated[
        str | None, typer.Option(help="a solver of `velodiff solvers` (default: the model's)")
    ] = None,
    grid: Annotated[str | None, typer.Option(help="time grid name (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (default: the model's)")] = None,
    plan: Annotated[str | None, typer.Option(help="step plan (see velodiff plans)")] = None,
    negative: Annotated[str | None, typer.Option(help="negative prompt")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use only the first N prompts")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="images per batched call (default 4)")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads per process or worker (default 1)")
    ] = None,
    ray: Annotated[str | None, typer.Option("--ray", help="run on Ray: 'local' or a cluster address")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Ray workers (default: 2 local, else the CPUs)")
    ] = None,
) -> None:
    """Generate an image set from a prompt file; killed and run again, it finishes what is missing."""
    from ..sets.fingerprint import model_fingerprint
    from ..sets.prompts import load_prompt_file
    from ..sets.run import generate_set
    from ..sets.store import CONFIG_KEYS, read_header, resolve_config
    from .generate import quiet_libraries

    if guidance is not None and not guidance >= 0:
        raise VelodiffError(f"--guidance must be >= 0, got {guidance}")
    from .names import check_grid, check_solver

    if solver is not None:
        check_solver(solver)
    if grid is not None:
        check_grid(grid)
    if plan is not None:
        from ..plan import Plan

        plan = str(Plan.parse(plan))  # canonical: the set's config compares plans as strings
    plist = load_prompt_file(prompts, limit)
    header = read_header(out) if out.is_dir() else None
    previous = header["config"] if header else None
    if model is None and header is not None:
        model_path = Path(header["model"]["path"])
    else:
        from ..shipped import resolve_model

        model_path = resolve_model(model)
    from ..shipped import sampling_defaults

    defaults: dict[str, Any] = dict(
        seed=0, images_per_prompt=1, batch=4, threads=1, noise="velodiff", plan="none"
    )

    own = sampling_defaults(model_path) if model_path.is_dir() else {}
    defaults.update({k: own[k] for k in ("steps", "solver", "guidance") if k in own})
    requested = dict(seed=seed, images_per_prompt=images_per_prompt, steps=steps, solver=solver, grid=grid,
                     guidance=guidance, plan=plan, negative=negative, batch=batch, threads=threads)
    config = resolve_config(requested, previous, defaults)
    assert set(config) >= set(CONFIG_KEYS)
    quiet_libraries()
    fingerprint = model_fingerprint(model_path)
    bar = Progress()
    try:
        summary = generate_set(plist, out, model_path=model_path, config=config, prompt_file=str(prompts),
                               ray=ray, workers=workers, progress=bar, fingerprint=fingerprint)
    finally:
        bar.close()
    if summary.dropped_lines:
        typer.echo(f"note: dropped {summary.dropped_lines} unreadable manifest line(s) (a killed run); "
                   "their images were checked or made again", err=True)
    typer.echo("wrote " + summary.line())


class Progress:
    """A progress bar on a terminal, nothing otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_manifest_cmd(
    ctx: typer.Context,
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="a set made by velodiff generate-set")
    ] = None,
    real: Annotated[str | None, typer.Option(help="real images for FD/KID: 'shapes' (the shapes world "
                                             "drawn for the set's prompts), images, or a set")] = None,
    features: Annotated[str, typer.Option(help="FD features: 'fd-shapes' or the Inception "
                                          "TorchScript file (FID)")] = "fd-shapes",
    clip: Annotated[
        Path | None, typer.Option(help="a local CLIP folder (transformers) for CLIP score")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="a set of the same prompts and seeds: PSNR, SSIM")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the results here (JSON)")
    ] = None,
) -> None:
    """`velodiff eval --manifest DIR`: metrics of a finished or partial image set."""
    if ctx.invoked_subcommand is not None:
        return
    if manifest is None:
        typer.echo(ctx.get_help())
        return
    from ..eval.set_metrics import evaluate_set
    from ..files import output_file, write_atomic

    if json_out is not None:  # before the metrics; never inside a set (its manifest, its images)
        output_file(json_out, "--json")
        for folder in (manifest, reference):
            if folder is not None and folder.resolve() in json_out.resolve().parents:
                raise VelodiffError(
                    f"--json {str(json_out)!r} is inside the set {str(folder)!r}; write it elsewhere"
                )
    result = evaluate_set(manifest, real=real, features=features, clip=clip, reference=reference)
    text = json.dumps(result, indent=1)
    if json_out is not None:
        write_atomic(json_out, (text + "\n").encode())
    typer.echo(text)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    epilog = example("velodiff generate-set prompts.txt --out out/set --model default")
    app.command("generate-set", epilog=epilog, short_help="Generate a resumable image set from prompts.")(
        generate_set_cmd
    )
    from .eval_shapes import eval_app

    eval_app.callback(
        invoke_without_command=True, epilog=example("velodiff eval --manifest out/set --real shapes")
    )(eval_manifest_cmd)
