"""`velodiff inpaint PROMPT --image IN --mask MASK --out OUT`: repaint where the mask is white
(``velodiff.pipelines.inpaint``), with generate's model, size, device, precision, solver, grid,
guidance and seed options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError
from ..files import distinct_files, save_image_atomic
from ..images import image_grid
from ..limits import check_strength
from . import options as o
from .generate import check_output_path
from .image_run import ImageRun, fit_size, read_image, read_rgb

EXAMPLE = o.example(
    'velodiff inpaint "a red sailboat" --image sea.png --mask boat-mask.png \\',
    "    --out sailboat.png",
)


def inpaint_cmd(
    prompt: Annotated[str, typer.Argument(help="what to paint where the mask is white")],
    image: o.Image,
    mask: Annotated[
        Path,
        typer.Option(help="the mask, the image's size: white repaints, black keeps (gray: white above half)"),
    ],
    out: o.Out,
    strength: Annotated[
        float, typer.Option(help="1 repaints from pure noise; below 1 starts from the noised image")
    ] = 1.0,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep/--no-keep",
            help="paste the input's pixels back where the mask is black (default; the autoencoder's round "
            "trip would otherwise change them, most near the mask's edge)",
        ),
    ] = True,
    model: o.Model = None,
    width: o.InputWidth = None,
    height: o.InputHeight = None,
    device: o.Device = None,
    dtype: o.Dtype = None,
    seed: o.Seed = 0,
    n: o.N = 1,
    batch: o.Batch = None,
    steps: o.Steps = None,
    nfe: o.Nfe = None,
    solver: o.Solver = None,
    grid: o.Grid = None,
    guidance: o.Guidance = None,
    solver_eta: o.Eta = None,
    guidance_rescale: o.GuidanceRescale = 0.0,
    embedded_guidance: o.EmbeddedGuidance = None,
    negative: o.Negative = None,
    plan: o.PlanOpt = None,
    clip_skip: o.ClipSkip = None,
    noise: o.Noise = "velodiff",
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    lora: o.Lora = None,
    lora_scale: o.LoraScale = None,
    threads: o.Threads = None,
) -> None:
    """Repaint the white part of a mask toward a prompt. An inpainting checkpoint gets the mask as
    input; any other model inpaints by masked re-noising."""
    if not prompt.strip():
        raise VelodiffError('the prompt is empty; describe what to paint, e.g. "a red sailboat"')
    check_strength(strength, "--strength")
    run = ImageRun.of(locals())
    run.check()
    fmt = check_output_path(out)
    for given in (image, mask):  # the output over an input (image and mask may be one file)
        distinct_files(**{"--image" if given is image else "--mask": given, "--out": out})
    picture = read_rgb(image)
    holes = read_image(mask, "mask").convert("L")
    if holes.size != picture.size:
        raise VelodiffError(
            f"the mask is {holes.size[0]}x{holes.size[1]} but the image is "
            f"{picture.size[0]}x{picture.size[1]}; give a mask of the image's size"
        )
    if holes.getextrema()[1] < 128:  # the pipeline's rule (>= 0.5 repaints), before the model loads
        raise VelodiffError("the mask covers nothing (no pixel >= 0.5): white marks what to repaint")
    run.load()
    size = fit_size(run, picture)
    if size != picture.size:
        from PIL import Image

        picture = picture.resize(size, Image.Resampling.LANCZOS)
        holes = holes.resize(size, Image.Resampling.NEAREST)
    from ..pipelines import inpaint

    res = run.run(inpaint, prompt, picture, holes, strength)
    if keep:
        res.images = [paste_outside(im, picture, holes) for im in res.images]
    strength_field = {"Denoising strength": f"{strength:g}"}  # A1111's name
    save_image_atomic(image_grid(list(res.images)), out, fmt, run.infotext(prompt, res, strength_field))
    typer.echo(run.summary(out, res) + f" (strength {strength:g})")


def paste_outside(generated: Any, original: Any, mask: Any) -> Any:
    """``generated`` where the mask is white (>= 128, the pipeline's binarization), ``original`` elsewhere,
    as diffusers' ``apply_overlay`` and A1111's inpainting do."""
    from PIL import Image

    keep = mask.point(lambda v: 0 if v >= 128 else 255)
    return Image.composite(original, generated, keep)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("inpaint", epilog=EXAMPLE)(inpaint_cmd)
