"""`velodiff edit SOURCE --to TARGET --out OUT`: prompt-to-prompt editing (``velodiff.edit.p2p``): the source
prompt and its edits from one noise, the source's attention maps injected; from a drawn seed, or from an
image inverted under the source prompt (``--image``, ddim or fixed-point inversion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import VelodiffError
from ..files import save_image_atomic
from ..images import image_grid
from . import options as o
from .image_run import ImageRun, fit_size, read_rgb

EXAMPLE = o.example(
    'velodiff edit "a red circle" --to "a blue circle" --to "a green circle" \\',
    "    --mode replace --out edits.png",
)


def edit_cmd(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="the source prompt")],
    out: o.Out,
    to: Annotated[list[str], typer.Option("--to", help="an edited prompt (repeat for several)")],
    mode: Annotated[str, typer.Option(help="replace (word swap), refine (added words) or auto")] = "auto",
    cross_steps: Annotated[
        float, typer.Option(help="share of steps with the source's cross-attention")
    ] = 0.8,
    self_steps: Annotated[float, typer.Option(help="share of steps with the source's self-attention")] = 0.4,
    words: Annotated[
        list[str] | None, typer.Option("--word", help="a word to re-weight, or word=c: its own c (repeat)")
    ] = None,
    weight: Annotated[float, typer.Option(help="the re-weighting factor of --word")] = 1.0,
    blend: Annotated[
        list[str] | None, typer.Option("--blend", help="local blend: a word bounding the edit (repeat)")
    ] = None,
    threshold: Annotated[float, typer.Option(help="local blend: share of a map's maximum inside")] = 0.3,
    image: Annotated[Path | None, typer.Option(help="edit this image: invert it under SOURCE first")] = None,
    method: Annotated[
        str, typer.Option(help="inversion for --image: fixed-point (of --solver, default ddim) or ddim")
    ] = "fixed-point",
    model: o.Model = None,
    width: o.Width = None,
    height: o.Height = None,
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
    """Edit by prompt, keeping the layout (prompt-to-prompt).

    Hertz et al. 2022: writes the source, then each edit, as one grid."""
    if not source.strip() or not all(t.strip() for t in to):
        raise VelodiffError("a prompt is empty; give the source prompt and each --to prompt")
    if method not in ("fixed-point", "ddim"):
        raise VelodiffError(
            f"--method {method!r}: prompt-to-prompt starts from one noise; use fixed-point or ddim inversion"
        )
    o.refuse_ignored(ctx, {
        "weight": (any("=" not in w for w in words or ()), "a --word without its own factor"),
        "threshold": (bool(blend), "--blend"),
        "method": (image is not None, "--image"),
        "seed": (image is None, "a generated source (an --image starts from its inversion)"),
        "solver": (image is None or method == "fixed-point", "a generated source or --method fixed-point"),
    })
    check_rule_flags(mode=mode, cross_steps=cross_steps, self_steps=self_steps, weight=weight,
                     threshold=threshold)
    run = ImageRun.of(locals())
    run.check()
    from ..files import distinct_files
    from .generate import check_output_path

    fmt = check_output_path(out)
    distinct_files(**{"--image": image, "--out": out})
    picture = read_rgb(image) if image is not None else None
    m = run.load()
    kw = {k: v for k, v in run.sampling().items() if v is not None and k != "noise"}
    latents, size = None, (height, width)
    if picture is not None:
        w_h = fit_size(run, picture)
        if w_h != picture.size:
            from PIL import Image

            picture = picture.resize(w_h, Image.Resampling.LANCZOS)
        from ..pipelines.invert import invert

        if method == "ddim" or solver is None:
            # fixed-point inversion converges best on DDIM's step under guidance (bench/edit: 25.5 dB
            # against 16.9 for DPM-Solver++ 2M at guidance 2.5); the edit samples with the same solver
            kw["solver"] = "ddim"
        inv_kw = {k: v for k, v in kw.items() if not (method == "ddim" and k == "solver")}
        inv = invert(m, picture, source, method, measure=False, plan=plan, **inv_kw)
        latents, size = inv.latents, inv.size
    from ..edit.p2p import edit_prompt

    try:
        res = edit_prompt(
            m,
            source,
            to,
            seed=seed,
            mode=mode,
            cross_steps=cross_steps,
            self_steps=self_steps,
            words=tuple(words or ()),
            weight=weight,
            blend=tuple(blend or ()),
            threshold=threshold,
            latents=latents,
            plan=plan,
            height=size[0],
            width=size[1],
            **kw,
        )
    except VelodiffError as e:  # the rule's words for its options, as this command's flags
        text = str(e).replace("plan rule 'p2p': ", "").replace("use mode=refine", "use --mode refine")
        raise VelodiffError(text) from None
    save_image_atomic(image_grid(list(res.images)), out, fmt)
    rebuilt = ""
    if picture is not None:  # the grid's source is the inverted noise regenerated: the round trip
        from ..eval.metrics import psnr

        rebuilt = f"; source rebuilt at {float(psnr([res.images[0]], [picture])[0]):.1f} dB PSNR"
    typer.echo(
        f"wrote {out} (source + {len(to)} edit{'s' if len(to) > 1 else ''}, {res.solver}, {res.steps} steps, "
        f"plan {res.plan}{rebuilt})"
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("edit", epilog=EXAMPLE)(edit_cmd)


def check_rule_flags(**values: object) -> None:
    """The p2p rule's options the flags set, checked before the model loads and named as typed
    (``--cross-steps``, not the plan rule's ``cross_steps``)."""
    from ..edit.p2p import PromptToPrompt
    from ..plan import check_option

    for key, value in values.items():
        try:
            check_option(PromptToPrompt.name, key, PromptToPrompt.options[key], value)
        except VelodiffError as e:
            flag = "--" + key.replace("_", "-")
            raise VelodiffError(str(e).replace(f"plan rule 'p2p' option {key!r}", flag)) from None
