"""Where one `velodiff generate` (the shipped model, defaults) spends its time, stage by stage, in one
process: each stage's imports happen before it is timed, in the order the command needs them.

    PYTHONPATH=$PWD/src python bench/startup/stages.py

Process start and exit are not in it (bench/startup/run.py times the whole command)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

PROMPT = "a red circle above a blue square"


def main() -> None:
    rows: list[tuple[str, float]] = []
    t = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        rows.append((name, now - t))
        t = now

    from velodiff import cli

    cli._register()
    stage("velodiff.cli + command registration (typer)")
    import torch  # noqa: F401

    stage("import torch")
    from velodiff.commands.generate import image_grid, load_model, quiet_libraries, save_atomic

    quiet_libraries()
    stage("quiet_libraries: diffusers.utils (imports torch._dynamo), transformers")
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

    stage("diffusers AutoencoderKL, UNet2DConditionModel (all of diffusers.models' subpackages)")
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    stage("transformers CLIPTextModel, CLIPTokenizer")
    loaded, defaults = load_model(None, None)
    stage("load the shipped model (from_pretrained x4, velodiff's model families)")
    from velodiff.pipelines import text2img

    stage("import velodiff.pipelines (sampling, solvers)")
    res = text2img(loaded, PROMPT, steps=defaults.get("steps"), solver=defaults.get("solver"),
                   guidance=defaults.get("guidance"), seeds=[0])
    stage(f"text2img: encode, {res.nfe} NFE with CFG, decode")
    with tempfile.TemporaryDirectory() as d:
        save_atomic(image_grid(list(res.images)), Path(d) / "x.png", "PNG")
    stage("save the PNG")
    total = sum(s for _, s in rows)
    print("| stage | s |\n|---|---:|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} |")
    print(f"| total | {total:.3f} |")


if __name__ == "__main__":
    main()
