"""`velodiff img2img PROMPT --image IN --strength S --out OUT`: re-generate an image toward a prompt
(SDEdit, ``velodiff.pipelines.img2img``), with generate's model, size, device, precision, solver, grid,
guidance and seed options."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import VelodiffError
from ..files import distinct_files, save_image_atomic
from ..images import image_grid
from ..limits import check_strength
from . import options as o
from .generate import check_output_path
from .image_run import ImageRun, fit_size, read_rgb

EXAMPLE = o.example(
    'velodiff img2img "a watercolor lighthouse" --image photo.png \\',
    "    --strength 0.6 --out watercolor.png",
)


def img2img_cmd(
    prompt: Annotated[str, typer.Argument(help="what the image should become")],
    image: o.Image,
    out: o.Out,
    strength: Annotated[
        float,
        typer.Option(help="how much to change: 0 returns the image, 1 draws anew (diffusers' strength)"),
    ] = 0.8,
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
    """Re-draw an image toward a prompt (SDEdit). --steps counts the whole grid, of which the last
    --strength part runs."""
    if not prompt.strip():
        raise VelodiffError('the prompt is empty; describe the image, e.g. "a watercolor lighthouse"')
    check_strength(strength, "--strength")
    run = ImageRun.of(locals())
    run.check()
    fmt = check_output_path(out)
    distinct_files(**{"--image": image, "--out": out})
    picture = read_rgb(image)
    run.load()
    size = fit_size(run, picture)
    if size != picture.size:
        from PIL import Image

        picture = picture.resize(size, Image.Resampling.LANCZOS)
    from ..pipelines import img2img

    res = run.run(img2img, prompt, picture, strength)
    strength_field = {"Denoising strength": f"{strength:g}"}  # A1111's name
    save_image_atomic(image_grid(list(res.images)), out, fmt, run.infotext(prompt, res, strength_field))
    typer.echo(run.summary(out, res) + f" (strength {strength:g})")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("img2img", epilog=EXAMPLE)(img2img_cmd)
