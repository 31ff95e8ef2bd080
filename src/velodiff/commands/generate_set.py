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
from ..limits import MAX_SET_IMAGES_PER_PROMPT, MAX_STEPS, SEED_END, SEED_MIN
from . import options as o


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
    nfe: o.Nfe = None,
    solver: Annotated[
        str | None, typer.Option(help="a solver of `velodiff solvers` (default: the model's)")
    ] = None,
    grid: Annotated[str | None, typer.Option(help="time grid name (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (default: the model's)")] = None,
    plan: Annotated[str | None, typer.Option(help="step plan (see velodiff plans)")] = None,
    negative: Annotated[str | None, typer.Option(help="negative prompt")] = None,
    solver_eta: o.Eta = None,
    guidance_rescale: Annotated[float | None, typer.Option(
        help="guidance rescale phi in [0, 1] (Lin et al. 2023; 0.7 for v-prediction)")] = None,
    clip_skip: o.ClipSkip = None,
    width: o.Width = None,
    height: o.Height = None,
    noise: Annotated[str | None, typer.Option(
        help="velodiff: noise per image from its own seed (default); torch / cuda: one CPU / NVIDIA "
        "generator per batch, as diffusers; a1111-cpu / a1111-nv: one per image, as A1111"
    )] = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    lora: o.Lora = None,
    lora_scale: o.LoraScale = None,
    device: o.Device = None,
    dtype: o.Dtype = None,
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
    from ..plan import Plan
    from ..sets.fingerprint import load_fingerprint
    from ..sets.prompts import load_prompt_file
    from ..sets.run import generate_set
    from ..sets.store import CONFIG_KEYS, read_header, resolve_config
    from ..shipped import resolve_model, sampling_defaults
    from .generate import quiet_libraries
    from .image_run import ImageRun

    header = read_header(out) if out.is_dir() else None
    previous = header["config"] if header else None
    resumed = model is None and header is not None
    model_path = Path(header["model"]["path"]) if resumed else resolve_model(model)
    given = {k: v for k, v in locals().items() if v is not None and k not in ("model", "seed")}
    ImageRun.of({**given, "model": str(model_path)}).check()  # generate's checks, before any model work
    if plan is not None:
        parsed = Plan.parse(plan)
        plan = str(parsed)  # canonical: the set's config compares plans as strings
        fixed = parsed.settings  # the plan's own solver / grid / steps / guidance win, as in generate:
        solver, grid, guidance = (fixed.get(k, v) for k, v in  # the set records what draws its images
                                  (("solver", solver), ("grid", grid), ("guidance", guidance)))
        if "steps" in fixed or "nfe" in fixed:
            steps, nfe = fixed.get("steps"), fixed.get("nfe")
    plist = load_prompt_file(prompts, limit)
    defaults: dict[str, Any] = dict(
        seed=0, images_per_prompt=1, batch=4, threads=1, noise="velodiff", plan="none"
    )
    if previous is None:  # a new set records the device and precision it is drawn with
        from ..models.base import default_dtype, resolve_device

        dev = resolve_device(device)
        defaults.update(device=str(dev), dtype=default_dtype(dev))
    own = sampling_defaults(model_path) if model_path.is_dir() else {}
    defaults.update({k: own[k] for k in ("steps", "solver", "guidance") if k in own})
    if nfe is not None:  # network calls instead of steps: the steps follow from them
        defaults["steps"] = None
    requested = dict(
        seed=seed, images_per_prompt=images_per_prompt, steps=steps, nfe=nfe, solver=solver, grid=grid,
        guidance=guidance, plan=plan, negative=negative, eta=solver_eta,
        guidance_rescale=guidance_rescale or None, clip_skip=clip_skip or None, batch=batch, threads=threads,
        height=height,
        width=width, noise=noise, config=_absolute(config), family=family, prediction_type=prediction_type,
        lora=[_absolute(p) for p in lora] if lora else None, lora_scale=lora_scale or None, device=device,
        dtype=dtype,
    )
    config = resolve_config(requested, previous, defaults)
    assert set(config) >= set(CONFIG_KEYS)
    total = len(plist) * int(config["images_per_prompt"])
    if not SEED_MIN <= config["seed"] or not config["seed"] + total - 1 < SEED_END:
        raise VelodiffError(
            f"--seed {config['seed']} (.. {config['seed'] + total - 1} for {total} images) is outside "
            "torch's seed range [-2**63, 2**64)"
        )
    quiet_libraries()
    fingerprint = load_fingerprint(model_path, config["config"], config["lora"])
    from ..sets.fingerprint import calibration_fingerprint, uses_calibration

    calibration = (calibration_fingerprint(model_path, config)
                   if uses_calibration(config, own.get("solver")) else None)
    bar = Progress()
    try:
        summary = generate_set(plist, out, model_path=model_path, config=config, prompt_file=str(prompts),
                               ray=ray, workers=workers, progress=bar, fingerprint=fingerprint,
                               calibration=calibration)
    finally:
        bar.close()
    if summary.dropped_lines:
        typer.echo(f"note: dropped {summary.dropped_lines} unreadable manifest line(s) (a killed run); "
                   "their images were checked or made again", err=True)
    typer.echo("wrote " + summary.line())


def _absolute(path: Path | None) -> str | None:
    """A path as the set's config records it (absolute: a resume may run from another folder)."""
    return None if path is None else str(path.expanduser().resolve())


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
    if real is None and clip is None and reference is None:  # the set's state only: say how to measure
        typer.echo("no metric asked for: --real shapes (FD / KID), --clip DIR (CLIP score) or --reference "
                   "SET (PSNR, SSIM)", err=True)


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
