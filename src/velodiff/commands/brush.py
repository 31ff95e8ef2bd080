"""`velodiff brush PROMPT --layer "REGION;PROMPT;SEED;STRENGTH" --out OUT`: layered region brushes
(``velodiff.edit.brushes``): a base image, then each layer re-denoises its region from the cached
intermediate latents. Writes the painted picture (every layer applied); ``--sheet`` also writes the base
and each layer's composite side by side; times the base against the layers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError
from ..files import save_image_atomic
from ..images import image_grid
from . import options as o
from .image_run import ImageRun, read_image

EXAMPLE = o.example(
    'velodiff brush "a red circle above a blue square" \\',
    '    --layer "box=0,0.5,1,1;a blue square above a green triangle;1;0.8" \\',
    "    --out brushed.png",
)


def parse_layer(text: str) -> tuple[Any, str, int, float]:
    """'REGION;PROMPT;SEED;STRENGTH' with REGION a mask image or box=x0,y0,x1,y1 (fractions of the image),
    checked before the model loads: the region as a box (a tuple) or the mask (an image)."""
    parts = [p.strip() for p in text.split(";")]
    if len(parts) != 4:
        raise VelodiffError(f"--layer {text!r}: write REGION;PROMPT;SEED;STRENGTH (4 fields, ';' between)")
    region, prompt, seed, strength = parts
    try:
        seed_i, strength_f = int(seed), float(strength)
    except ValueError:
        raise VelodiffError(f"--layer {text!r}: SEED must be an integer and STRENGTH a number") from None
    if region.startswith("box="):
        try:
            x0, y0, x1, y1 = (float(v) for v in region[4:].split(","))
        except ValueError:
            raise VelodiffError(f"--layer {text!r}: write the box as box=x0,y0,x1,y1 in [0, 1]") from None
        from ..edit.layout import check_region_box

        check_region_box(text, (x0, y0, x1, y1), "--layer")
        return (x0, y0, x1, y1), prompt, seed_i, strength_f
    from pathlib import Path

    return read_image(Path(region), "mask").convert("L"), prompt, seed_i, strength_f


def layer_mask(region: Any, size: tuple[int, int]) -> Any:
    """A parsed layer's region as its mask at the image's size (h, w)."""
    from ..edit.layout import region_mask

    return region_mask(region, *size) if isinstance(region, tuple) else region


def brush_cmd(
    prompt: Annotated[str, typer.Argument(help="the base image's prompt")],
    out: o.Out,
    layer: Annotated[
        list[str],
        typer.Option(help="REGION;PROMPT;SEED;STRENGTH, REGION a mask file or box=x0,y0,x1,y1 (repeat)"),
    ],
    sheet: Annotated[
        Path | None,
        typer.Option(help="also write the base and each layer's composite side by side here"),
    ] = None,
    model: o.Model = None,
    device: o.Device = None,
    dtype: o.Dtype = None,
    seed: o.Seed = 0,
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
    """Paint regions over a base image with layered brushes.

    Each layer repaints its region from the cached latents of the layers below."""
    if not prompt.strip():
        raise VelodiffError("the prompt is empty; describe the base image")
    run = ImageRun.of(locals())
    run.check()
    from ..files import distinct_files
    from .generate import check_output_path

    fmt = check_output_path(out)
    sheet_fmt = check_output_path(sheet) if sheet is not None else None
    regions = [t.split(";")[0].strip() for t in layer]
    masks = {f"--layer {i + 1}'s mask": Path(r) for i, r in enumerate(regions) if not r.startswith("box=")}
    distinct_files(**{"--out": out, "--sheet": sheet, **masks})  # an output over an input mask destroys it
    parsed = [parse_layer(t) for t in layer]
    m = run.load()
    layers = [(layer_mask(region, tuple(m.default_size)), *rest) for region, *rest in parsed]
    from ..edit.brushes import Canvas

    kw = {k: v for k, v in run.sampling().items() if v is not None and k != "noise"}
    canvas = Canvas(
        m, prompt, seed=seed, plan=plan, **{k: v for k, v in kw.items() if k != "guidance_rescale"}
    )
    t0 = time.perf_counter()
    images = [canvas.render().images[0]]
    base_s, base_nfe = time.perf_counter() - t0, canvas.last_nfe
    costs = []
    for mask, text, s, strength in layers:
        canvas.add(mask, text, seed=s, strength=strength)
        t0 = time.perf_counter()
        images.append(canvas.render().images[0])
        costs.append(f"{canvas.last_nfe} NFE {time.perf_counter() - t0:.2f} s")
    save_image_atomic(images[-1], out, fmt)
    also = ""
    if sheet is not None:
        save_image_atomic(image_grid(images), sheet, sheet_fmt)
        also = f" and {sheet} (the base and each layer's composite)"
    typer.echo(f"wrote {out}{also} (base: {base_nfe} NFE {base_s:.2f} s; layers: {'; '.join(costs)})")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("brush", epilog=EXAMPLE)(brush_cmd)
