"""The options the image commands (generate, img2img, inpaint) share, declared once. Each command
lists them as parameters typed with these aliases, so their names, help and defaults cannot drift
apart; ``velodiff.commands.image_run`` turns the values into a loaded model and pipeline keywords."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError

#: help text of every --threads that loads a model through load_model
THREADS_HELP = "CPU threads (default: 1 for the shipped tiny model, torch's default for others)"

Out = Annotated[Path, typer.Option("--out", "-o", help="image file to write (.png, .jpg, .webp)")]
Model = Annotated[
    str | None,
    typer.Option(
        metavar="<name|path>",
        help="a shipped model by name (default) or a diffusers folder / .safetensors file "
        "(default: the shipped model)",
    ),
]
Eta = Annotated[
    float | None,
    typer.Option("--eta", min=0.0, help="the solver's noise per step (diffusers' eta: 0 for DDIM, 1 for "
                 "DDPM; ancestral samplers' eta); only solvers that take it"),
]
Family = Annotated[
    str | None,
    typer.Option(help="the model family (sd1, sd2, sdxl, sd3, flux, pixart, ...) instead of detecting it "
                 "from the file"),
]
PredictionType = Annotated[
    str | None,
    typer.Option("--prediction-type", help="override the scheduler config's: epsilon, v_prediction, sample "
                 "(e.g. an SD 2.x 768 v-model as a single file)"),
]
Config = Annotated[
    Path | None,
    typer.Option(
        help="diffusers folder with the configs a single .safetensors file needs (default: velodiff's "
        "bundled SD 1.5 / SDXL configs)"
    ),
]
Lora = Annotated[
    list[Path] | None,
    typer.Option(
        help="a LoRA: a peft folder (adapter_config.json + adapter_model.safetensors), its .safetensors, "
        "or a diffusers / kohya (A1111) LoRA file; safetensors only; repeat for several"
    ),
]
LoraScale = Annotated[
    list[float] | None,
    typer.Option(
        help="the LoRA's strength (diffusers' lora_scale, ComfyUI's strength, A1111's <lora:name:S>): one "
        "for every --lora, or one per --lora in their order [default: 1]"
    ),
]
Device = Annotated[
    str | None, typer.Option(help="cpu, cuda, cuda:1 or mps (default: the best available)")
]
#: the short names diffusers users write (``velodiff.load`` takes them too)
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def dtype_name(value: str | None) -> str | None:
    return DTYPE_ALIASES.get(value, value) if value is not None else None


Dtype = Annotated[
    str | None,
    typer.Option(help="weights' precision: float32, float16 or bfloat16 (or fp32, fp16, bf16; default: "
                 "float32 on the CPU, float16 on a GPU)", callback=dtype_name),
]


#: below this many columns a table too wide for the terminal is printed as one block per row
NARROW_TERMINAL = 120


def print_table(table: Any) -> None:
    """Print a rich table at the terminal's width (COLUMNS first; 160 columns when piped to a file or
    grep, so rows stay whole), folding long cells onto more lines instead of cutting them with '…';
    the first column (the names) is never broken. In a narrow terminal (80 columns) a table that does not
    fit is printed as one block per row instead: the name, then each cell as ``header: value``, wrapped
    at spaces (a column a few characters wide would break every word)."""
    import shutil
    import textwrap

    from rich.console import Console
    from rich.measure import Measurement

    for k, column in enumerate(table.columns):
        column.overflow = "fold"
        column.no_wrap = k == 0
    console = Console(width=shutil.get_terminal_size((160, 24)).columns)
    width = console.width
    natural = Measurement.get(console, console.options.update(max_width=10**6), table).maximum
    if width >= NARROW_TERMINAL or natural <= width:
        console.print(table)
        return
    def fill(text: str, indent: str) -> str:
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "  ",
                             break_long_words=False, break_on_hyphens=False)

    cells = [[str(c) for c in column.cells] for column in table.columns]
    headers = [str(column.header) for column in table.columns]
    for i, title in enumerate(cells[0]):
        print(title)
        short = [f"{h}: {v[i]}" for h, v in zip(headers[1:], cells[1:], strict=True) if _short(v[i])]
        if short:  # the one-word cells on one line: "order: 1, NFE/step: 1, stochastic: no"
            print(fill(", ".join(short), "  "))
        for header, values in zip(headers[1:], cells[1:], strict=True):
            value = values[i]
            if value and not _short(value):
                lines = value.splitlines()  # a cell of several lines (one option per line) keeps them
                print(fill(f"{header}: {lines[0]}", "  "))
                for line in lines[1:]:
                    print(fill(line, "    "))


def _short(cell: str) -> bool:
    return 0 < len(cell) <= 16 and "\n" not in cell


def check_threads(value: int | None) -> int | None:
    """--threads at most the machine's CPUs: more threads only wait on each other, and a huge number
    crashes the OpenMP runtime (100 000: 'Thread creation failed', then a segmentation fault)."""
    cpus = os.cpu_count() or 1
    if value is not None and value > cpus:
        raise typer.BadParameter(f"{value} is more than this machine's {cpus} CPUs")
    return value


Threads = Annotated[int | None, typer.Option(min=1, callback=check_threads, help=THREADS_HELP)]
Width = Annotated[
    int | None,
    typer.Option(help="image width in pixels, a multiple of the model's latent factor (8 for SD) "
                 "(default: the model's)"),
]
Height = Annotated[int | None, typer.Option(help="image height in pixels, as --width (default: the model's)")]
#: img2img and inpaint: the output size, the input resized to it
InputWidth = Annotated[
    int | None,
    typer.Option("--width", help="output width in pixels, the input resized to it; a multiple of the model's "
                 "latent factor (default: the input image's)"),
]
InputHeight = Annotated[
    int | None, typer.Option("--height", help="output height, as --width (default: the input image's)")
]
Seed = Annotated[int, typer.Option(help="seed of the first image (image i uses seed + i)")]
N = Annotated[int, typer.Option("--n", min=1, max=64, help="number of images, saved as one grid image")]
Batch = Annotated[
    int | None, typer.Option(min=1, help="images per network call (default: all --n at once)")
]
Steps = Annotated[
    int | None, typer.Option(min=1, help="solver steps (default: the model's, 20 for the default model)")
]
Nfe = Annotated[
    int | None, typer.Option(min=1, help="network calls instead of --steps: the most steps that fit")
]
Solver = Annotated[str | None, typer.Option(
    help="any solver of `velodiff solvers`, options after a colon: unipc:order=2 (default: the model's)")]
Grid = Annotated[str | None, typer.Option(
    help="time grid name, options after a colon: karras:sigma_min=0.1,sigma_max=10 (default: the model's)")]
Guidance = Annotated[
    float | None, typer.Option(help="classifier-free guidance scale (>= 0; 1 = no guidance)")
]
EmbeddedGuidance = Annotated[
    float | None,
    typer.Option(help="the scale a guidance-distilled model takes as input (one pass; Flux-dev, students)"),
]
GuidanceRescale = Annotated[
    float, typer.Option(help="guidance rescale phi in [0, 1] (Lin et al. 2023; 0.7 for v-prediction)")
]
Negative = Annotated[
    str | None, typer.Option(help="negative prompt (replaces the unconditional branch of CFG)")
]
PlanOpt = Annotated[
    str | None, typer.Option("--plan", help="step plan, e.g. ag:threshold=0.99+pag:scale=3 (velodiff plans)")
]
ClipSkip = Annotated[
    int | None,
    typer.Option(help="skip the text encoder's last k layers, as diffusers' clip_skip (1: the penultimate "
                 "layer, A1111's 'clip skip 2'; default 0)"),
]
Noise = Annotated[
    str,
    typer.Option(help="velodiff: noise per image from its own seed (same on every device and batch); "
                 "torch: one CPU generator for the batch, as diffusers and ComfyUI; cuda: the same as an "
                 "NVIDIA GPU draws it (diffusers with a CUDA generator); a1111-cpu: one CPU "
                 "generator per image, its starting and step noise, as A1111's 'RNG: CPU' and diffusers with "
                 "a generator per image; a1111-nv: the same drawn as an NVIDIA GPU draws it (A1111's "
                 "default GPU and its NV source)"),
]
Image = Annotated[
    Path, typer.Option("--image", help="the input image (resized to --width / --height if given)")
]


def example(*lines: str) -> str:
    """A command's help epilog: one example, kept as written (click's \\b: no re-wrapping), each line
    short enough for an 80-column terminal (tests/test_cli_checkpoint.py checks)."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


def refuse_ignored(ctx: typer.Context, applies: dict[str, tuple[bool, str]]) -> None:
    """Refuse an option typed on the command line that this run would ignore: ``applies`` maps a
    parameter name to (whether the run reads it, when it does), e.g. ``{"eta": (method == "rf",
    "--method rf")}`` -> ``--eta is read only with --method rf``."""
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    for name, (read, when) in applies.items():
        source = ctx.get_parameter_source(name)
        if not read and source is not None and source.name == "COMMANDLINE":
            raise VelodiffError(f"{flags[name]} is read only with {when}; this run would ignore it")
