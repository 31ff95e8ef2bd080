"""Text to image: encode the prompts, draw the noise, sample with velodiff's core, decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ..errors import VelodiffError
from ..noise import prior_sample
from ..sampling import StepInfo
from .common import (
    GenerationResult,
    batch_prompts_and_seeds,
    check_output,
    encode_batch_prompts,
    finish,
    initial_noise,
    make_plan,
    normalize_prompts,
    run,
)


def text2img(
    model: Any,
    prompts: str | Sequence[str],
    *,
    negative: str | Sequence[str] | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    solver: str | None = None,
    grid: str | Sequence[float] | None = None,
    guidance: float | None = None,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    seeds: int | Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    callback: Callable[[StepInfo], bool | None] | None = None,
    latents: Tensor | None = None,
    output: str = "pil",
    noise: str = "velodiff",
    solver_options: dict[str, Any] | None = None,
    grid_options: dict[str, Any] | None = None,
    final: str | None = None,
) -> GenerationResult:
    """Generate one image per (prompt, seed) with ``model`` (a :class:`velodiff.models.LoadedModel`).

    * ``steps`` or ``nfe`` (the most steps whose network calls fit), ``solver``, ``grid`` (a name
      or an explicit list of times) and ``guidance`` default to the model's.
    * ``seeds``: an int s (images get s, s+1, ...), a list (one prompt repeats over it), or None (0, 1, ...).
    * ``latents``: starting noise (B, C, h, w), standard normal, instead of drawing it from the seeds.
    * ``output``: "pil" (list of PIL images), "tensor" ((B, 3, H, W) in [0, 1]) or "latent" (no decode).
    * ``noise``: "velodiff" (per-image seed) or "torch" (one CPU generator for the batch: diffusers'
      CPU generator and ComfyUI draw the same noise from the same seed).
    """
    check_output(output)
    ps, seeds_l = batch_prompts_and_seeds(normalize_prompts(prompts), seeds)
    h = int(height or model.default_size[0])
    w = int(width or model.default_size[1])
    shape = model.latent_shape(len(ps), h, w)
    plan = make_plan(
        model,
        steps=steps,
        nfe=nfe,
        solver=solver,
        grid=grid,
        guidance=guidance,
        grid_options=grid_options,
        final=final,
        size=(h, w),
    )
    if latents is None:
        z = initial_noise(shape, seeds_l, noise)
    else:
        z = latents.float()
        if tuple(z.shape) != shape:
            raise VelodiffError(
                f"latents have shape {tuple(z.shape)}; expected {shape} for {len(ps)} images of {h}x{w}"
            )
    if model.is_inpainting:
        raise VelodiffError(f"{model.family} model at {model.path} is an inpainting model; use inpaint(...)")
    cond = encode_batch_prompts(model, ps, negative, plan.guidance, h, w)
    x = prior_sample(model.schedule, float(plan.ts[0]), z.to(model.device))
    res = run(
        model,
        plan,
        x,
        cond,
        seeds_l,
        callback=callback,
        guidance_rescale=guidance_rescale,
        guidance_interval=guidance_interval,
        solver_options=solver_options,
    )
    return finish(model, res, plan, seeds_l, output, plan.ts, prompts=ps, height=h, width=w)
