"""`velodiff parameters IMAGE`: the generation settings inside an image (velodiff's or A1111's infotext,
``velodiff.infotext``), and the `velodiff generate` command that makes a text-to-image picture again."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError

#: request keys -> `velodiff generate` options, in the order the command line shows them
OPTIONS = {"negative": "--negative", "model": "--model", "width": "--width", "height": "--height",
           "seed": "--seed", "n": "--n", "steps": "--steps", "solver": "--solver", "grid": "--grid",
           "guidance": "--guidance", "plan": "--plan", "noise": "--noise", "layout": "--layout",
           "layout_mode": "--layout-mode", "collage_strength": "--strength", "regions": "--regions",
           "eta": "--eta", "embedded_guidance": "--embedded-guidance", "clip_skip": "--clip-skip"}


def generate_command(request: dict[str, Any]) -> str:
    """The `velodiff generate` command line of a text-to-image request (``infotext.generation_request``)."""
    words = ["velodiff", "generate", request["prompt"]]
    for key, flag in OPTIONS.items():
        if key in request:
            words += [flag, f"{request[key]:g}" if isinstance(request[key], float) else str(request[key])]
    return " ".join(shlex.quote(w) for w in [*words, "--out", "again.png"])


def parameters(
    image: Annotated[Path, typer.Argument(help="a PNG, JPEG or WebP image")],
    as_json: Annotated[
        bool, typer.Option("--json", help="the text, its fields and the request as JSON")
    ] = False,
) -> None:
    """Show the settings an image was made with.

    They are read from the image (its PNG parameters chunk or EXIF comment: velodiff's, A1111's), with
    the `velodiff generate` command that makes a text-to-image file again."""
    from ..infotext import generation_request, image_infotext, not_drawn, parse_infotext
    from .image_run import read_image

    text = image_infotext(read_image(image))
    if text is None:
        raise VelodiffError(
            f"{image} holds no generation settings (no PNG 'parameters' chunk, no EXIF UserComment)"
        )
    fields = parse_infotext(text)
    request = generation_request(fields)
    if as_json:
        typer.echo(json.dumps({"parameters": text, "fields": fields, "request": request}, indent=1))
        return
    typer.echo(text)
    if "prompt" not in request:
        return
    if "strength" in request:  # made from an input image the file does not hold
        typer.echo(f"\n(made from an input image by img2img or inpaint at strength {request['strength']:g})")
        return
    missing = not_drawn(fields)
    if missing:  # the command still runs; its noise is not the image's
        said = ", ".join(f"{k}: {v}" for k, v in missing.items())
        typer.echo(f"\n(its noise also depends on {said}, which velodiff does not draw: another picture)")
    if "loras" in request:  # the file names a text holds are no paths: the user gives them
        typer.echo(f"\n(made with the LoRAs {request['loras']}: add --lora FILE --lora-scale S for each)")
    typer.echo("\n" + generate_command(request))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    from .options import example

    app.command("parameters", epilog=example("velodiff parameters out.png"))(parameters)
