"""`velodiff generate PROMPT --out out.png`: text to image with the shipped default model (offline) or
any model folder / .safetensors file (``--model``), through velodiff's sampling core."""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError, first_line
from ..files import distinct_files, save_image_atomic
from ..images import image_grid
from ..limits import check_strength
from . import options as o
from .image_run import ImageRun

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def quiet_libraries() -> None:
    """Keep diffusers / transformers chatter (and their Python warnings) off the CLI; velodiff's own
    warnings print as one ``warning:`` line each, a message once (an inversion and its regeneration, or a
    brush's layers, set up the same run more than once)."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

    shown: set[str] = set()

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if issubclass(category, UserWarning) and "velodiff" in filename and str(message) not in shown:
            shown.add(str(message))
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
    check_output_file(out, "like out.png")
    return fmt


def check_output_file(out: Path, example: str = "") -> None:
    """Check an output file before any work (``files.output_file``: its folder made if only that one is
    missing; not a folder itself)."""
    from ..files import output_file

    output_file(out, "output", example)


@contextmanager
def user_errors(what: str):
    """Turn a library's failure while ``what`` into one VelodiffError line."""
    try:
        yield
    except VelodiffError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = first_line(e)
        raise VelodiffError(f"{what}: {msg}") from None


def load_model(
    model: str | Path | None,
    threads: int | None,
    device: str = "cpu",
    *,
    dtype: str = "float32",
    config: Path | None = None,
    lora: list[Path] | None = None,
    lora_scale: list[float] | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The model (a shipped name, a path; default: the shipped one) and its sampling defaults.
    ``threads=None``: one thread for a shipped model (a second saves ~15% on an idle 2-core machine, but
    beside a busy core its threads wait on each other: 100x slower, measured), torch's default for any
    other."""
    import torch

    from ..shipped import is_shipped, resolve_model

    shipped = is_shipped(model)
    if threads is None and shipped:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    path = resolve_model(model)
    from ..models import load

    with user_errors(f"cannot load model {str(path)!r}"):
        loaded = load(path, device=device, dtype=dtype, config=config, lora=lora,
                      lora_scale=lora_scale or 1.0, family=family, prediction_type=prediction_type)
    defaults = (
        {"steps": loaded.default_steps, "solver": loaded.default_solver, "guidance": loaded.default_guidance}
        if shipped
        else {}
    )
    return loaded, defaults


def generate(
    prompt: Annotated[str, typer.Argument(help="what to draw")],
    out: o.Out,
    model: o.Model = None,
    width: o.Width = None,
    height: o.Height = None,
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
    attention_maps: Annotated[
        Path | None,
        typer.Option(help="also write an image's cross-attention map per token (PNG; the first image of the "
                     "last batch)"),
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(help="layout guidance boxes: 'red circle: 0.1,0.1,0.45,0.45; blue square: ...' "
                     "(fractions x0,y0,x1,y1, y down; or a mask image's path, white = the region; its "
                     "options: --plan layout:scale=...)"),
    ] = None,
    layout_mode: Annotated[
        str,
        typer.Option(help="how --layout places the objects: guidance (steer the attention) or collage "
                     "(draw each object, paste it into its box, harmonise by SDEdit; without --layout "
                     "the boxes come from the prompt's relation, counts and lists)"),
    ] = "guidance",
    strength: Annotated[
        float | None,
        typer.Option(help="with --layout-mode collage: the share of the steps re-run over the collage "
                     "[default: 0.5]"),
    ] = None,
    regions: Annotated[
        str | None,
        typer.Option(help="regional prompts: 'a red circle: 0,0,0.5,1; a blue square: 0.5,0,1,1' (each "
                     "region its own prompt, a box or a mask image's path; plan rule regional)"),
    ] = None,
) -> None:
    """Generate images from a text prompt. Offline; the shipped model unless --model says otherwise, on
    the best device there is."""
    if not prompt.strip():
        raise VelodiffError(
            'the prompt is empty; describe the image, e.g. "a red circle above a blue square"'
        )
    run = ImageRun.of(locals())
    run.check()
    boxes = None
    collage = check_layout_mode(layout_mode, strength, attention_maps)
    layout_options: dict[str, Any] | None = None
    if layout is not None:
        from ..edit.layout import check_boxes, parse_layout

        boxes = parse_layout(layout, masks=True)
        check_boxes(boxes, prompt)
        layout_options = take_rule(run, "layout")  # --plan layout:scale=... sets the options of --layout
        if collage and layout_options is not None:
            raise VelodiffError("--layout-mode collage places the objects itself; drop layout from --plan")
    if collage:
        from ..edit.collage import collage_boxes

        boxes = collage_boxes(prompt, boxes)  # checked before the model loads
    regional = None
    if regions is not None:
        from ..edit.regional import RegionalPrompting, parse_regions

        regional = RegionalPrompting(regions=parse_regions(regions), **(take_rule(run, "regional") or {}))
    fmt = check_output_path(out)
    if attention_maps is not None:
        check_output_path(attention_maps)
        distinct_files(**{"--out": out, "--attention-maps": attention_maps})
    loaded = run.load()
    from ..pipelines import text2img

    extra: list[Any] = []
    if attention_maps is not None:
        from ..accel.attention import AttentionMaps

        extra.append(capture := AttentionMaps())
    if boxes is not None and not collage:
        from ..edit.layout import LayoutGuidance

        extra.append(LayoutGuidance(boxes=boxes, **(layout_options or {})))
    if regional is not None:
        extra.append(regional)
    if collage:
        from ..edit.collage import collage as pipeline

        given = {} if strength is None else {"strength": strength}
        res = run.run(pipeline, prompt, boxes, plan=extra, width=width, height=height, **given)
    else:
        res = run.run(text2img, prompt, plan=extra, width=width, height=height)
    asked = {"Layout": layout, "Layout mode": layout_mode if collage else None, "Collage strength": strength,
             "Regions": regions}
    save_image_atomic(image_grid(list(res.images)), out, fmt, run.infotext(prompt, res, asked))
    typer.echo(run.summary(out, res))
    if attention_maps is not None:
        from ..accel.attention import attention_sheet

        step = batch or n  # the rule saw each batch in turn: its maps are the last batch's
        image = res.images[(n - 1) // step * step]
        sheet = attention_sheet(capture.maps, loaded.context_tokens(prompt), image, scale=2)
        save_image_atomic(sheet, attention_maps)
        typer.echo(f"wrote {attention_maps} (cross-attention per token, mean over the steps)")


def take_rule(run: ImageRun, name: str) -> dict[str, Any] | None:
    """The options of the rule ``name`` in --plan, the rule taken out of the plan: an option such as
    --layout or --regions gives the rule its input, the plan its options (None: the plan has none)."""
    from ..plan import Plan

    parsed = Plan.parse(run.plan)
    given = parsed.find(name)
    if given is None:
        return None
    run.plan = str(parsed.without(given))
    return dict(given.values)


def check_layout_mode(mode: str, strength: float | None, maps: Path | None) -> bool:
    """Whether --layout-mode asks for the collage; one line for a combination that cannot run."""
    if mode not in ("guidance", "collage"):
        raise VelodiffError(f"--layout-mode {mode!r}: use guidance or collage")
    if strength is not None and mode != "collage":
        raise VelodiffError("--strength applies to --layout-mode collage (use velodiff img2img for SDEdit)")
    if strength is not None:
        check_strength(strength, "--strength", zero=False)
    if mode == "collage" and maps is not None:
        raise VelodiffError("--attention-maps records one generation; the collage runs one per object")
    return mode == "collage"


EXAMPLE = o.example(
    'velodiff generate "a lighthouse at dusk" --model sd15.safetensors \\',
    "    --width 512 --height 768 --steps 20 --out lighthouse.png",
)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("generate", epilog=EXAMPLE)(generate)
