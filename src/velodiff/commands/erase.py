"""`velodiff erase --concept triangle --preserve circle,square,cross --out DIR`: erase a concept from a
model's cross-attention in closed form (UCE, ``velodiff.edit.erase``) and write the edited model folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from ..errors import VelodiffError
from ..limits import check_guidance
from . import options as o
from .image_run import ImageRun

EXAMPLE = o.example(
    "velodiff erase --concept triangle --preserve circle,square,cross \\",
    "    --target circle --out erased/",
    'velodiff generate "a red triangle" --model erased/ --out t.png',
)


def erase_cmd(
    concept: Annotated[
        str, typer.Option(help="the word to erase, or comma-separated words: triangle,triangles")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="the model folder to write (replaced if it exists)")
    ],
    preserve: Annotated[
        str, typer.Option(help="comma-separated words whose keys and values are kept, e.g. circle,square")
    ] = "",
    target: Annotated[
        str,
        typer.Option(
            help="the word the concept is mapped to ('': left out; an anchor such as circle), or one per "
            "concept word: circle,circles"
        ),
    ] = "",
    erase_scale: Annotated[float, typer.Option(min=0.0, help="weight of the erase term")] = 1.0,
    preserve_scale: Annotated[
        float, typer.Option(min=0.0, help="weight of the preserve term (lambda)")
    ] = 1.0,
    lamb: Annotated[float, typer.Option(help="ridge weight ||W - W_old||^2 (> 0)")] = 0.1,
    projections: Annotated[
        str, typer.Option(help="which projections to edit: to_k,to_v or to_v")
    ] = "to_k,to_v",
    templates: Annotated[
        str | None,
        typer.Option(
            help="'|'-separated prompt templates with {concept} (and {color}, {size}, {count}); default: "
            "the shapes world's"
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write what was done")] = None,
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    device: o.Device = None,
    threads: o.Threads = None,
) -> None:
    """Erase a concept in closed form (UCE)."""
    words = [w.strip() for w in preserve.split(",") if w.strip()]
    tpl = [t.strip() for t in templates.split("|") if t.strip()] if templates is not None else None
    if tpl is not None:
        from ..edit.erase import check_templates

        check_templates(tpl, "--templates")
    check_guidance(erase_scale, "--erase-scale")  # before the model loads (inf passed typer's min)
    check_guidance(preserve_scale, "--preserve-scale")
    if not 0 < lamb < math.inf:
        raise VelodiffError(f"--lamb must be a finite number > 0, got {lamb}")
    from ..files import check_model_out

    check_model_out(out)
    if json_out is not None:  # checked before the model is written
        from .generate import check_output_file

        check_output_file(json_out)
    run = ImageRun.of(locals())
    run.check()
    if run.path is not None and Path(run.path).expanduser().resolve() == out.expanduser().resolve():
        raise VelodiffError(f"--out {str(out)!r} is the folder of the model being edited, which writing the "
                            "erased model would replace: give another --out")
    if run.path is not None and Path(run.path).is_file():  # before the load and the solve, not after
        raise VelodiffError(
            f"erase writes a diffusers folder that shares the model's other components; {run.path} is a "
            "single file: give its diffusers folder (e.g. saved by diffusers' save_pretrained)"
        )
    m = run.load()
    from ..edit.erase import SHAPES_TEMPLATES, erase_concept, save_erased

    e = erase_concept(
        m,
        concept,
        words,
        target,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        lamb=lamb,
        projections=[p.strip() for p in projections.split(",") if p.strip()],
        templates=tpl or SHAPES_TEMPLATES,
    )
    save_erased(m, e, out)
    info = {
        "concept": e.concept,
        "target": e.target,
        "preserve": list(e.preserve),
        "layers": e.layers,
        "erase_residual": e.erase_residual,
        "preserve_residual": e.preserve_residual,
        "settings": e.settings,
        "out": str(out),
        "model": str(run.path),
    }
    if json_out is not None:
        from ..files import write_atomic

        write_atomic(json_out, json.dumps(info, indent=2) + "\n")
    typer.echo(
        f"erased {e.concept!r} -> {e.target or '(left out)'!r} in {len(e.layers)} projections, preserving "
        f"{', '.join(e.preserve) or 'the empty prompt only'}; "
        f"relative residuals erase {e.erase_residual:.3g}, "
        f"preserve {e.preserve_residual:.3g}; wrote {out}"
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("erase", epilog=EXAMPLE)(erase_cmd)
