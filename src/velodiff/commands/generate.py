"""`velodiff generate PROMPT --out out.png`: text to image with the shipped default model (offline) or
any model folder / .safetensors file (``--model``), through velodiff's sampling core."""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError
from ..files import save_image_atomic
from ..images import image_grid

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def quiet_libraries() -> None:
    """Keep diffusers / transformers chatter (and their Python warnings) off the CLI; velodiff's own
    warnings print as one ``warning:`` line each."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if issubclass(category, UserWarning) and "velodiff" in filename:
            print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    import logging

    from ..accel.quantize import TORCHAO_LOGGERS

    for name in TORCHAO_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity(dlog.CRITICAL)  # their failures reach the user as one VelodiffError line
        dlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - quieting is best-effort
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity(tlog.CRITICAL)
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def check_output_path(out: Path) -> str:
    """The PIL format for ``out``; refuse a missing folder or an unknown suffix before any work."""
    fmt = IMAGE_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise VelodiffError(
            f"output {str(out)!r}: unknown image type; use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise VelodiffError(f"output folder {str(parent)!r} does not exist; create it first")
    if out.is_dir():
        raise VelodiffError(f"output {str(out)!r} is a folder; give a file name like out.png")
    return fmt


@contextmanager
def user_errors(what: str):
    """Turn a library's failure while ``what`` into one VelodiffError line."""
    try:
        yield
    except VelodiffError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VelodiffError(f"{what}: {msg}") from None


#: help text of every command's --threads that loads a model through load_model
THREADS_HELP = "CPU threads (default: 1 for the shipped tiny model, torch's default for others)"


def load_model(
    model: Path | None, threads: int | None, device: str = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """The model (default: the shipped one) and its sampling defaults. ``threads=None``: one thread for
    the shipped model (a second saves ~15% on an idle 2-core machine, but beside a busy core its
    threads wait on each other: 100x slower, measured), torch's default for any other."""
    import torch

    from ..default_model import DEFAULT_SAMPLING, default_model_path

    if threads is None and model is None:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    path = Path(model).expanduser() if model is not None else default_model_path()
    if model is None and not (path / "model_index.json").is_file():
        raise VelodiffError(f"the default model is missing from the package ({path}); reinstall velodiff")
    from ..models import load

    with user_errors(f"cannot load model {str(path)!r}"):
        loaded = load(path, device=device)
    defaults = dict(DEFAULT_SAMPLING) if model is None else {}
    return loaded, defaults


def generate(
    prompt: str = typer.Argument(..., help="what to draw"),
    out: Path = typer.Option(..., "--out", "-o", help="image file to write (.png, .jpg, .webp)"),  # noqa: B008
    seed: int = typer.Option(0, help="seed of the first image (image i uses seed + i)"),
    steps: int = typer.Option(
        None, min=1, help="solver steps (default: the model's, 20 for the default model)"
    ),
    guidance: float = typer.Option(None, help="classifier-free guidance scale (>= 0; 1 = no guidance)"),
    solver: str = typer.Option(None, help="any solver of `velodiff solvers` (default dpmpp_2m)"),
    grid: str = typer.Option(None, help="time grid name (default: the model's)"),
    negative: str = typer.Option(None, help="negative prompt (replaces the unconditional branch of CFG)"),
    plan: str = typer.Option(None, help="step plan, e.g. ag:threshold=0.99+pag:scale=3 (see velodiff plans)"),
    attention_maps: Annotated[
        Path | None, typer.Option(help="also write the first image's cross-attention map per token (PNG)")
    ] = None,
    n: int = typer.Option(1, "--n", min=1, max=64, help="number of images, saved as one grid image"),
    model: Annotated[
        Path | None, typer.Option(help="a diffusers folder or .safetensors file (default: the shipped model)")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    """Generate an image from a text prompt (offline, CPU by default)."""
    t0 = time.perf_counter()
    if not prompt.strip():
        raise VelodiffError(
            'the prompt is empty; describe the image, e.g. "a red circle above a blue square"'
        )
    if guidance is not None and not guidance >= 0:
        raise VelodiffError(f"--guidance must be >= 0, got {guidance}")
    fmt = check_output_path(out)
    if solver is not None:
        from .names import check_solver

        check_solver(solver)
    if plan is not None:
        from ..plan import Plan

        Plan.parse(plan)  # refused in one line before the model loads
    if attention_maps is not None:
        check_output_path(attention_maps)
    quiet_libraries()
    loaded, defaults = load_model(model, threads)
    from ..pipelines import text2img

    rules: list[Any] = [plan] if plan else []
    if attention_maps is not None:
        from ..accel.attention import AttentionMaps

        rules.append(capture := AttentionMaps())
    res = text2img(
        loaded,
        prompt,
        negative=negative,
        steps=steps if steps is not None else defaults.get("steps"),
        solver=solver or defaults.get("solver"),
        grid=grid,
        guidance=guidance if guidance is not None else defaults.get("guidance"),
        seeds=[seed + i for i in range(n)],
        plan=rules,
    )
    save_image_atomic(image_grid(list(res.images)), out, fmt)
    typer.echo(
        f"wrote {out} ({n} image{'s' if n > 1 else ''}, {res.solver}, {res.steps} steps, {res.nfe} NFE, "
        f"{res.evals:g} evals/image, guidance {res.guidance:g}, plan {res.plan}) "
        f"in {time.perf_counter() - t0:.2f} s"
    )
    if attention_maps is not None:
        from ..accel.attention import attention_sheet

        tokens = loaded.components["tokenizer"].tokenize(prompt) if "tokenizer" in loaded.components else []
        sheet = attention_sheet(capture.maps, tokens, res.images[0], scale=2)
        save_image_atomic(sheet, attention_maps)
        typer.echo(f"wrote {attention_maps} (cross-attention per token, mean over the steps)")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("generate")(generate)
