"""`velodiff eval shapes --json FILE`: ShapesEval accuracy (overall and by category) of a model on a
fixed prompt set, with the configuration used, a markdown table and a contact sheet of samples.

A comma list of guidance scales (``--guidance 1.5,3,5``) runs a sweep; the top-level numbers are the
best scale's, and every scale's are under ``sweep``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError
from ..eval import tables
from ..files import save_image_atomic, write_atomic
from ..limits import MAX_IMAGES_PER_PROMPT, MAX_RUNS, MAX_STEPS, check_guidance
from . import options as o
from .options import THREADS_HELP, check_threads

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models.")  # example: on its callback


def parse_scales(text: str | None, default: float | None) -> list[float | None]:
    if text is None:
        return [default]
    try:
        scales = [float(s) for s in text.split(",")]  # an empty item (1,,2) is not a number either
    except ValueError:
        raise VelodiffError(f"--guidance must be a number or a comma list of numbers, got {text!r}") from None
    for s in scales:
        check_guidance(s, "guidance")
    if len(set(scales)) < len(scales):
        raise VelodiffError(f"--guidance {text!r} lists a scale twice; each is one run")
    return scales


def generate_for_prompts(
    model: Any, texts: list[str], k: int, *, seed: int, batch: int, collage: float | None = None, **kw: Any
) -> tuple[list[Any], float, dict[str, Any]]:
    """k images per prompt (prompt-major), seeds seed + j*k + i; returns images, seconds, last result info.
    ``collage`` (a strength): prompts naming several objects (a relation, a count, a list) are drawn by
    collage with the boxes from the prompt (``velodiff.edit.collage``), one image at a time; the others
    as without it."""
    from ..edit.collage import boxes_from_prompt
    from ..edit.collage import collage as draw_collage
    from ..pipelines import text2img

    prompts = [t for t in texts for _ in range(k)]
    seeds = [seed + j for j in range(len(prompts))]
    images: list[Any] = []
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    evals = 0.0
    shown = None  # the result the info describes: a plain generation's where there is one
    for i in range(0, len(prompts), batch):
        chunk, chunk_seeds = prompts[i : i + batch], seeds[i : i + batch]
        collaged = [j for j, p in enumerate(chunk) if collage is not None and boxes_from_prompt(p)]
        plain = [j for j in range(len(chunk)) if j not in collaged]
        out: dict[int, Any] = {}
        results = []
        if plain:
            res = text2img(model, [chunk[j] for j in plain], seeds=[chunk_seeds[j] for j in plain], **kw)
            out.update(zip(plain, res.images, strict=True))
            results.append(res)
        for j in collaged:
            res = draw_collage(model, chunk[j], None, strength=collage, seeds=[chunk_seeds[j]], **kw)
            out[j] = res.images[0]
            results.append(res)
        images.extend(out[j] for j in range(len(chunk)))
        evals += sum(r.evals * len(r.images) for r in results)
        shown = results[0] if plain or shown is None else shown
        res = shown
        info = {
            "nfe": res.nfe,
            "evals": round(evals / len(images), 4),  # per image, over every batch
            "steps": res.steps,
            "solver": res.solver,
            "guidance": res.guidance,
            "embedded_guidance": model.embedded_guidance,
            "plan": res.plan if collage is None else f"{res.plan} (collage:strength={collage:g})",
        }
    return images, time.perf_counter() - t0, info


def measure_speed(model: Any, runs: int, **kw: Any) -> dict[str, Any]:
    """Seconds for one 64x64 image end to end in process (text encoding, sampling with CFG, decoding)."""
    import statistics

    import torch

    from ..pipelines import text2img

    text2img(model, "a red circle", seeds=[0], **kw)  # warm-up
    times, res = [], None
    for i in range(runs):
        t0 = time.perf_counter()
        res = text2img(model, "a red circle above a blue square", seeds=[i], **kw)
        times.append(time.perf_counter() - t0)
    assert res is not None
    return {
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "runs": runs,
        "nfe": res.nfe,
        "evals": res.evals,
        "solver": res.solver,
        "threads": torch.get_num_threads(),
    }


def shapes_table(result: dict[str, Any]) -> str:
    cats = list(result["by_category"])
    rows = []
    for row in result["sweep"]:
        mark = " **(best)**" if row["guidance"] == result["config"]["guidance"] else ""
        rows.append([f"{row['guidance']:g}{mark}", f"{row['overall']:.3f}",
                     *(f"{row['by_category'][c]:.3f}" for c in cats)])
    lines = [tables.markdown_table(["guidance", "overall", *cats], rows, align="rr" + "r" * len(cats))]
    c = result["config"]
    lines.append("")
    lines.append(
        f"Model `{c['model']}`, prompt set `{c['prompts']}` ({c['n_prompts']} prompts x "
        f"{c['images_per_prompt']} images), solver `{c['solver']}`, {c['steps']} steps ({c['nfe']} NFE), "
        f"grid `{c['grid']}`, seed {c['seed']}{_plan_note(c)}."
    )
    return "\n".join(lines) + "\n"


def _plan_note(c: dict[str, Any]) -> str:
    """The plan (layout mode included) and an embedded guidance scale, which tell two runs apart."""
    note = f", plan `{c['plan']}`" if c.get("plan") else ""
    if c.get("embedded_guidance") is not None:
        note += f", embedded guidance {c['embedded_guidance']:g}"
    return note


def contact_sheet(images: list[Any], records: list[dict[str, Any]], cols: int = 8, scale: int = 2) -> Any:
    """Samples with their prompts; a green bar under correct ones, red under wrong ones."""
    from ..images import image_grid

    marks = [(40, 170, 60) if rec["correct"] else (210, 40, 40) for rec in records]
    return image_grid(images, cols, gap=4, margin=4, scale=scale, captions=[rec["text"] for rec in records],
                      caption_lines=2, caption_height=30, marks=marks)


@eval_app.command(
    "shapes",
    epilog=o.example("velodiff eval shapes --json out/shapes.json --limit 8"),
    short_help="ShapesEval accuracy of a model on a fixed prompt set.",
)
def shapes(
    json_out: Path = typer.Option(..., "--json", help="write the results here (JSON)"),  # noqa: B008
    markdown: Annotated[
        Path | None, typer.Option(help="markdown table (default: beside --json, .md)")
    ] = None,
    sheet: Annotated[
        Path | None, typer.Option(help="contact sheet PNG of samples (default: beside --json, .png)")
    ] = None,
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    prompts: str = typer.Option("v1", help="prompt set: v1 or v1-holdout"),
    images_per_prompt: int = typer.Option(2, min=1, max=MAX_IMAGES_PER_PROMPT, help="images per prompt"),
    solver: str = typer.Option(None, help="solver (default: the model's, dpmpp_2m for the default model)"),
    steps: int = typer.Option(
        None, min=1, max=MAX_STEPS, help="solver steps (default: the model's, 20 for the default model)"
    ),
    grid: str = typer.Option(None, help="time grid name (default: the model's)"),
    guidance: str = typer.Option(None, help="guidance scale, or a comma list to sweep"),
    embedded_guidance: float = typer.Option(
        None, min=0.0, help="the scale a guidance-distilled model takes as input (one pass per step)"
    ),
    plan: str = typer.Option(None, help="step plan, e.g. ag:threshold=0.99 (velodiff plans)"),
    seed: int = typer.Option(0, help="seed of the first image (prompt j's image i: seed + j * k + i)"),
    batch: int = typer.Option(16, min=1, help="images per batched call"),
    threads: Annotated[int | None, typer.Option(min=1, callback=check_threads, help=THREADS_HELP)] = None,
    device: o.Device = None,
    limit: int = typer.Option(
        None, min=1, help="use only this many prompts, spread over the set (quick checks)"
    ),
    speed_runs: int = typer.Option(
        0, min=0, max=MAX_RUNS, help="also time this many single-image generations (median)"
    ),
    layout_mode: str = typer.Option(
        "guidance", help="collage: prompts naming several objects drawn by collage (velodiff "
        "generate's)"
    ),
    strength: float = typer.Option(None, help="with --layout-mode collage: its SDEdit strength (0.5)"),
) -> None:
    """Generate for a fixed prompt set and report ShapesEval accuracy (JSON, markdown, contact sheet)."""
    from .generate import check_output_file, check_output_path, load_model, quiet_libraries

    if plan is not None:
        from ..plan import Plan

        plan = str(Plan.parse(plan))  # refused in one line before any work
    from ..edit.collage import DEFAULT_STRENGTH
    from .generate import check_layout_mode

    collage = None  # the collage's strength when the mode is on
    if check_layout_mode(layout_mode, strength, None):
        collage = DEFAULT_STRENGTH if strength is None else strength

    markdown = markdown or json_out.with_suffix(".md")
    sheet = sheet or json_out.with_suffix(".png")
    from ..files import distinct_files

    for p in (json_out, markdown):  # every output, before the run: a failed write must not come last
        check_output_file(p)
    check_output_path(sheet)
    distinct_files(**{"--json": json_out, "--markdown": markdown, "--sheet": sheet})
    from ..eval.shapes_eval import evaluate, load_prompts

    try:
        plist = load_prompts(prompts)
    except ValueError as e:
        raise VelodiffError(str(e)) from None
    if limit is not None and limit < len(plist):
        plist = [plist[int(i * len(plist) / limit)] for i in range(limit)]
    quiet_libraries()
    from ..models.base import resolve_device

    device = str(resolve_device(device))
    loaded, defaults = load_model(model, threads, device,
                                  config=config, family=family, prediction_type=prediction_type)
    if embedded_guidance is not None:
        from .image_run import set_embedded_guidance

        set_embedded_guidance(loaded, embedded_guidance)
    import torch

    scales = parse_scales(guidance, defaults.get("guidance"))
    if len(scales) > 1:
        from ..eval.sweep import check_fixed_guidance

        check_fixed_guidance([plan], scales)
    texts = [p.text for p in plist]
    kw = dict(steps=steps or defaults.get("steps"), solver=solver or defaults.get("solver"), grid=grid,
              plan=plan)
    from ..pipelines.common import check_setup
    from ..pipelines.setup import Sampling, make_setup

    for g in scales:  # every scale's run checked (its calibration found) before the first image is drawn
        setup = make_setup(loaded, Sampling.of("eval shapes", {**kw, "guidance": g}))
        check_setup(loaded, setup, texts[:1], loaded.default_size)
    sweep, best = [], None
    for g in scales:
        images, secs, info = generate_for_prompts(
            loaded, texts, images_per_prompt, seed=seed, batch=batch, guidance=g, collage=collage, **kw
        )
        res = evaluate(images, plist)
        row = {
            "guidance": info["guidance"],
            "overall": res["overall"],
            "by_category": res["by_category"],
            "counts": res["counts"],
            "seconds": round(secs, 2),
            "seconds_per_image": round(secs / len(images), 4),
            "evals": info["evals"],
        }
        sweep.append(row)
        typer.echo(
            f"guidance {info['guidance']:g}: overall {res['overall']:.3f} "
            + " ".join(f"{c} {v:.3f}" for c, v in res["by_category"].items())
            + f" ({secs:.0f} s)"
        )
        if best is None or res["overall"] > best[0]["overall"]:
            best = (res, images, info)
    assert best is not None
    res, images, info = best
    result = {
        "overall": res["overall"],
        "by_category": res["by_category"],
        "counts": res["counts"],
        "config": {
            "model": str(model) if model is not None else "default",
            "prompts": prompts,
            "n_prompts": len(plist),
            "images_per_prompt": images_per_prompt,
            "solver": info["solver"],
            "steps": info["steps"],
            "nfe": info["nfe"],
            "evals": info["evals"],
            "plan": info["plan"],
            "grid": grid or "model default",
            "guidance": info["guidance"],
            "embedded_guidance": info.get("embedded_guidance"),
            "seed": seed,
            "threads": torch.get_num_threads(),
            "device": device,
        },
        "sweep": sweep,
        "speed": measure_speed(loaded, speed_runs, guidance=info["guidance"], **kw) if speed_runs else None,
        "per_prompt": [{k: v for k, v in r.items() if k != "detections"} for r in res["per_prompt"]],
    }
    write_atomic(json_out, (json.dumps(result, indent=1) + "\n").encode())
    write_atomic(markdown, shapes_table(result).encode())
    k = images_per_prompt
    pick = list(range(0, len(images), k))  # the first image of every prompt
    sheet_img = contact_sheet([images[i] for i in pick], [res["per_prompt"][i] for i in pick])
    save_image_atomic(sheet_img, sheet, "PNG")
    if result["speed"]:
        sp = result["speed"]
        typer.echo(
            f"one image, {sp['nfe']} NFE: median {sp['median_s']:.3f} s over {sp['runs']} runs"
        )
    typer.echo(
        f"best guidance {info['guidance']:g}: overall {res['overall']:.3f}; "
        f"wrote {json_out}, {markdown}, {sheet}"
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
