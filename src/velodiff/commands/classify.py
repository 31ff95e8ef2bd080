"""`velodiff classify IMAGE --labels "a red circle,a blue square"`: the diffusion model as a zero-shot
classifier (Li et al. 2023, ``velodiff.edit.classify``): the label whose prompt denoises the image best."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import VelodiffError, unknown_name
from . import options as o
from .image_run import ImageRun, read_rgb

EXAMPLE = o.example(
    'velodiff classify scene.png --labels "a red circle,a blue cross"',
    "velodiff classify scene.png --labels-file labels.txt --json out.json",
)


def classify_cmd(
    image: Annotated[Path, typer.Argument(help="the image to classify (the model's size, RGB)")],
    labels: Annotated[str | None, typer.Option(help="comma-separated candidate prompts")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="a text file, one candidate prompt a line")] = None,
    rounds: Annotated[
        str, typer.Option(help="adaptive pruning, samples:keep per round (the last round's best wins)")
    ] = "4:6,16:2,48:1",
    weighting: Annotated[str, typer.Option(help="error weighting: eps (the paper's), v or x0")] = "eps",
    seed: Annotated[int, typer.Option(help="seed of the shared noises")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the ranking and the cost")] = None,
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    device: o.Device = None,
    dtype: o.Dtype = None,
    threads: o.Threads = None,
) -> None:
    """Pick the prompt that best denoises an image (zero-shot)."""
    from ..edit.classify import check_labels, check_rounds

    if (labels is None) == (labels_file is None):
        raise VelodiffError("give the candidates with --labels or --labels-file (one of them)")
    if labels_file is not None:
        if not labels_file.exists():
            raise VelodiffError(f"--labels-file {str(labels_file)!r} does not exist")
        from ..files import read_text

        cands = [ln.strip() for ln in read_text(labels_file, "labels file").splitlines() if ln.strip()]
    else:
        cands = [s.strip() for s in (labels or "").split(",")]
    cands = check_labels(cands)
    pruning = check_rounds(rounds)
    if json_out is not None:  # before the model runs, not after
        from ..files import distinct_files, output_file

        output_file(json_out, "--json")
        distinct_files(**{"IMAGE": image, "--labels-file": labels_file, "--json": json_out})
    from ..edit.classify import WEIGHTINGS, classify

    if weighting not in WEIGHTINGS:  # before the model loads
        raise unknown_name("weighting", weighting, WEIGHTINGS)
    picture = read_rgb(image)
    run = ImageRun.of(locals())
    run.check()
    m = run.load()

    r = classify(m, picture, cands, rounds=pruning, weighting=weighting, seed=seed)
    info = r.as_dict() | {"image": str(image), "model": str(run.path)}
    if json_out is not None:
        from ..files import write_atomic

        write_atomic(json_out, json.dumps(info, indent=2) + "\n")
    typer.echo(
        f"{r.label} ({r.evaluations} network evaluations, {r.seconds:.2f} s)"
        + (f"; wrote {json_out}" if json_out else "")
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("classify", epilog=EXAMPLE)(classify_cmd)
