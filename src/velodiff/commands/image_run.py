"""What generate, img2img and inpaint do alike with the options of ``commands.options``: refuse bad
values before any model work, load the model on the chosen device and precision, hand the sampling
keywords to the pipeline in batches of ``--batch`` images, and describe the run in one line."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..limits import MAX_SIDE, MAX_STEPS, SEED_END, SEED_MIN, check_guidance


@dataclass
class ImageRun:
    """The shared options' values (``None``: the model's default)."""

    model: str | None = None
    config: Path | None = None
    family: str | None = None
    prediction_type: str | None = None
    lora: list[Path] | None = None
    lora_scale: list[float] | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    width: int | None = None
    height: int | None = None
    seed: int = 0
    n: int = 1
    batch: int | None = None
    steps: int | None = None
    nfe: int | None = None
    solver: str | None = None
    grid: str | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    #: --eta (the solver's; a command's own ``eta`` is another thing, e.g. RF-Inversion's controller)
    solver_eta: float | None = None
    embedded_guidance: float | None = None
    negative: str | None = None
    plan: str | None = None
    clip_skip: int | None = None
    noise: str = "velodiff"
    #: set by check(): the model's folder or file; by load(): the model and its sampling defaults
    path: Path | None = None
    loaded: Any = None
    defaults: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def of(cls, options: dict[str, Any]) -> ImageRun:
        """The shared options out of a command's arguments (its ``locals()``): each command declares
        those it offers for typer, this reads them once (the others keep their defaults)."""
        names = [f for f in cls.__dataclass_fields__ if f not in ("path", "loaded", "defaults", "started")]
        return cls(**{k: options[k] for k in names if k in options})

    def check(self) -> None:
        """Refuse what is wrong without importing torch (one line each)."""
        from ..shipped import resolve_model
        from .names import (
            BATCH_NOISE,
            DTYPE_NAMES,
            NOISE_MODES,
            PREDICTION_TYPES,
            check_grid_name,
            check_name,
            check_solver_name,
        )

        if self.steps is not None and self.nfe is not None:
            raise VelodiffError("give --steps or --nfe, not both")
        for name, value in (("--guidance", self.guidance), ("--embedded-guidance", self.embedded_guidance)):
            if value is not None:
                check_guidance(value, name)
        if not 0 <= self.guidance_rescale <= 1:
            raise VelodiffError(f"--guidance-rescale must be in [0, 1], got {self.guidance_rescale}")
        for name, value in (("--width", self.width), ("--height", self.height)):
            if value is not None and not 0 < value <= MAX_SIDE:
                raise VelodiffError(f"{name} must be a number of pixels in [1, {MAX_SIDE}], got {value}")
        for name, value in (("--steps", self.steps), ("--nfe", self.nfe)):
            if value is not None and value > MAX_STEPS:
                raise VelodiffError(f"{name} {value} is more than {MAX_STEPS}; no sampler needs that many")
        if not SEED_MIN <= self.seed or not self.seed + self.n - 1 < SEED_END:
            last = self.seed + self.n - 1
            seeds = f"{self.seed}" if self.n == 1 else f"{self.seed} (with --n {self.n}: .. {last})"
            raise VelodiffError(f"--seed {seeds} is outside torch's seed range [-2**63, 2**64)")
        if self.lora_scale:
            if not self.lora:
                raise VelodiffError("--lora-scale needs a --lora")
            if len(self.lora_scale) not in (1, len(self.lora)):
                raise VelodiffError(f"{len(self.lora_scale)} --lora-scale values for {len(self.lora)} "
                                    "--lora: give one for all, or one per --lora")
            bad = [s for s in self.lora_scale if not math.isfinite(s)]
            if bad:
                raise VelodiffError(f"--lora-scale must be a finite number, got {bad[0]}")
        if self.solver_eta is not None and not math.isfinite(self.solver_eta):  # inf passes typer's min=0
            raise VelodiffError(f"--eta must be a finite number, got {self.solver_eta}")
        if self.clip_skip is not None and self.clip_skip < 0:
            raise VelodiffError(f"--clip-skip must be >= 0, got {self.clip_skip}")
        if self.solver is not None:
            check_solver_name(self.solver)
            if self.solver_eta is not None or ":" in self.solver:  # its options: before the model loads
                from ..solvers import get_solver

                get_solver(self.solver).check_options({"eta": self.solver_eta} if self.solver_eta is not None
                                                      else {})
        if self.grid is not None:
            check_grid_name(self.grid)
        check_name("noise mode", self.noise, NOISE_MODES)
        if self.noise in BATCH_NOISE and self.batch and self.batch < self.n:  # a generator per call
            raise VelodiffError(
                f"--noise {self.noise} draws the noise of one call from its first seed, as diffusers: "
                f"--batch {self.batch} below --n {self.n} would draw images {self.batch + 1}.. from other "
                "seeds; leave --batch out or use --noise velodiff"
            )
        if self.prediction_type is not None:
            check_name("prediction type", self.prediction_type, PREDICTION_TYPES)
        if self.dtype is not None:
            check_name("dtype", self.dtype, DTYPE_NAMES)
            if self.device == "cpu":
                check_cpu_dtype(self.dtype)
        if self.plan is not None:
            from ..plan import Plan

            Plan.parse(self.plan)  # refused in one line before the model loads
        self.path = resolve_model(self.model)
        if self.config is not None and not self.config.is_dir():
            raise VelodiffError(f"--config {str(self.config)!r} is not a folder; give a diffusers folder")
        factor = folder_latent_factor(self.path)
        for name, value in (("--width", self.width), ("--height", self.height)):
            if factor and value is not None and value % factor:
                raise VelodiffError(
                    f"{name} {value} is not a multiple of {factor}, the latent factor of this model; "
                    f"try {max(factor, round(value / factor) * factor)}"
                )

    def load(self) -> Any:
        """The model on its device and in its precision (defaults: the best device, float32 on the CPU,
        float16 on a GPU); --clip-skip set and --width / --height checked against its latent factor."""
        from ..models.base import default_dtype, resolve_device
        from .generate import load_model, quiet_libraries

        quiet_libraries()
        device = resolve_device(self.device)
        dtype = self.dtype or default_dtype(device)
        if device.type == "cpu":
            check_cpu_dtype(dtype)
        self.loaded, self.defaults = load_model(
            self.model, self.threads, str(device), dtype=dtype, config=self.config, lora=self.lora,
            lora_scale=self.lora_scale,
            family=self.family, prediction_type=self.prediction_type,
        )
        m = self.loaded
        if self.clip_skip:
            from ..models.loading import set_clip_skip

            set_clip_skip(m, self.clip_skip)
        if self.embedded_guidance is not None:
            set_embedded_guidance(m, self.embedded_guidance)
        f = m.size_factor
        for name, value in (("--width", self.width), ("--height", self.height)):
            if value is not None and value % f:
                raise VelodiffError(
                    f"{name} {value} is not a multiple of {f}, the latent factor of this {m.family} model; "
                    f"try {max(f, round(value / f) * f)}"
                )
        return m

    def sampling(self) -> dict[str, Any]:
        """The pipeline keywords (model defaults for what was not given)."""
        d = self.defaults
        return dict(
            negative=self.negative,
            steps=None if self.nfe is not None else self.steps if self.steps is not None else d.get("steps"),
            nfe=self.nfe,
            solver=self.solver or d.get("solver"),
            grid=self.grid,
            guidance=self.guidance if self.guidance is not None else d.get("guidance"),
            guidance_rescale=self.guidance_rescale,
            noise=self.noise,
            solver_options={"eta": self.solver_eta} if self.solver_eta is not None else None,
        )

    def run(self, pipeline: Callable[..., Any], *args: Any, plan: list[Any] | None = None, **kw: Any) -> Any:
        """``pipeline(model, *args, seeds=..., plan=..., **sampling, **kw)`` over --n images in batches
        of --batch; returns the first batch's result with every image in ``images``."""
        rules: list[Any] = [self.plan] if self.plan else []
        rules += plan or []
        seeds = [self.seed + i for i in range(self.n)]
        step = self.batch or self.n
        first, images = None, []
        for i in range(0, self.n, step):
            res = pipeline(self.loaded, *args, seeds=seeds[i : i + step], plan=rules, **self.sampling(), **kw)
            first = res if first is None else first
            images += list(res.images)
        assert first is not None
        first.images = images
        return first

    def infotext(self, prompt: str, res: Any, extra: dict[str, Any] | None = None) -> str:
        """How the images were made, written into the file (A1111's infotext, ``velodiff.infotext``):
        what the run used (its plan says the guidance rescale) and the options that changed it, then
        ``extra``."""
        from ..infotext import a1111_clip_skip, noise_fields, run_infotext

        asked = {
            "Eta": self.solver_eta,
            "Embedded guidance": self.embedded_guidance,
            "Clip skip": a1111_clip_skip(self.clip_skip),
            **noise_fields(self.noise),
            **(extra or {}),
        }
        assert self.path is not None
        loras = getattr(self.loaded, "loras", ())
        return run_infotext(prompt, self.negative, res, self.seed, self.path, loras, self.n, asked)

    def summary(self, out: Path, res: Any, size: tuple[int, int] | None = None) -> str:
        """`wrote out.png (1 image, 256x384, sd1 bfloat16 on cpu, dpmpp_2m, ...) in 3.1 s`."""
        m = self.loaded
        w, h = size or res.images[0].size
        calls = -(-self.n // (self.batch or self.n))
        batches = f" in {calls} batches" if calls > 1 else ""
        return (
            f"wrote {out} ({self.n} image{'s' if self.n > 1 else ''}{batches}, {w}x{h}, {m.family} "
            f"{str(m.dtype).removeprefix('torch.')} on {m.device}, {res.solver} on {res.grid}, "
            f"{res.steps} step{'s' if res.steps != 1 else ''}, {res.nfe} NFE, {res.evals:.4g} evals/image, "
            f"guidance {res.guidance:g}, {_embedded(m)}"
            f"plan {res.plan}) in {time.perf_counter() - self.started:.2f} s"
        )


def _embedded(model: Any) -> str:
    """'embedded guidance W, ' for a network that takes the scale as an input (Flux-dev, a guided
    student): the guidance that acts there, beside CFG's."""
    w = getattr(model, "embedded_guidance", None)
    takes = getattr(model, "takes_embedded_guidance", False)
    return f"embedded guidance {float(w):g}, " if w is not None and takes else ""


def folder_latent_factor(path: Path) -> int | None:
    """The latent factor of a diffusers folder from its VAE config, read before any model work (2 per
    down block past the first); None for single files and folders without one (checked after load)."""
    import json

    f = path / "vae" / "config.json"
    try:
        channels = json.loads(f.read_text()).get("block_out_channels") if f.is_file() else None
    except (OSError, ValueError):
        return None
    return 2 ** (len(channels) - 1) if channels else None


def set_embedded_guidance(model: Any, w: float) -> None:
    """--embedded-guidance: the scale input of a guidance-distilled network; refused for others."""
    if not model.takes_embedded_guidance:
        raise VelodiffError(
            f"--embedded-guidance: this {model.family} model has no guidance input (it is not guidance-"
            f"distilled); use --guidance for classifier-free guidance"
        )
    model.embedded_guidance = float(w)


def check_cpu_dtype(dtype: str) -> None:
    """float16 on the CPU: refused, since torch's CPU float16 kernels are slow or missing (a
    convolution runs many times slower than in float32) and diffusers users run float32 there."""
    if dtype in ("float16", "fp16"):
        raise VelodiffError(
            "--dtype float16 is slow or unsupported on the CPU; use float32 (the default there) or bfloat16"
        )


def read_image(path: Path, what: str = "image") -> Any:
    """An image file as a loaded 8-bit PIL image (one line if it is missing or not an image)."""
    from ..images import open_image

    if path.is_dir():
        raise VelodiffError(f"{what} {str(path)!r} is a folder; give an image file")
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "does not exist"
        raise VelodiffError(f"{what} {str(path)!r} {problem}")
    return open_image(path, what)


def read_rgb(path: Path, what: str = "image") -> Any:
    """An image file as an RGB PIL image: palette, grayscale and CMYK files converted, one with
    transparent pixels refused (as the Python API refuses it: what is behind them is not in the file)."""
    import numpy as np

    im = read_image(path, what)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        if int(np.asarray(im.convert("RGBA").getchannel("A")).min()) < 255:
            raise VelodiffError(
                f"{what} {str(path)!r} has transparent pixels; flatten it onto a background first"
            )
    return im.convert("RGB")


def fit_size(run: ImageRun, image: Any, what: str = "image") -> tuple[int, int]:
    """The output size (w, h): --width/--height if given (the image is resized to it), else the
    image's own, which must then be a multiple of the model's latent factor."""
    w, h = image.size
    f = run.loaded.size_factor
    tw, th = run.width or w, run.height or h
    if (run.width is None and w % f) or (run.height is None and h % f):
        raise VelodiffError(
            f"the {what} is {w}x{h}; its sides must be multiples of {f} for this {run.loaded.family} model: "
            f"pass --width {max(f, w // f * f)} --height {max(f, h // f * f)} to resize it"
        )
    return tw, th
