"""Text to image: encode the prompts, draw the noise, sample with velodiff's core, decode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import VelodiffError
from ..noise import prior_sample
from .common import (
    GenerationResult,
    batch_prompts_and_seeds,
    check_image_size,
    check_model,
    encode_batch_prompts,
    finish,
    initial_noise,
    normalize_prompts,
    run,
)
from .setup import Sampling, make_setup


def text2img(
    model: Any,
    prompts: str | Sequence[str],
    *,
    height: int | None = None,
    width: int | None = None,
    **options: Any,
) -> GenerationResult:
    """Generate one image per (prompt, seed) with ``model`` (a :class:`velodiff.models.LoadedModel`),
    ``height`` x ``width`` pixels (default: the model's size). ``options`` are the keywords every
    pipeline shares (:class:`velodiff.pipelines.setup.Sampling`: steps, solver, grid, guidance, plan,
    seeds, negative, output, ...)."""
    opts = Sampling.of("text2img", options)
    check_model(model)
    ps, seeds_l = batch_prompts_and_seeds(normalize_prompts(prompts), opts.seeds)
    h = height if height is not None else model.default_size[0]  # 0 is refused, not the default
    w = width if width is not None else model.default_size[1]
    check_image_size(model, h, w)  # (integers: 64.9 ran at 64)
    h, w = int(h), int(w)
    shape = model.latent_shape(len(ps), h, w)
    setup = make_setup(model, opts, size=(h, w))
    if opts.latents is None:
        z = initial_noise(shape, seeds_l, opts.noise)
    else:
        z = opts.latents.float()
        if tuple(z.shape) != shape:
            raise VelodiffError(
                f"latents have shape {tuple(z.shape)}; expected {shape} for {len(ps)} images of {h}x{w}"
            )
    if model.is_inpainting:
        raise VelodiffError(
            f"{model.family} model at {model.path} is an inpainting model; use inpaint() "
            "(CLI: velodiff inpaint)"
        )
    cond = encode_batch_prompts(model, ps, opts.negative, setup.plan.needs("uncond"), h, w)
    x = prior_sample(model.schedule, float(setup.ts[0]), z.to(model.device))
    res = run(model, setup, opts, x, cond, seeds_l, ps, (h, w))
    return finish(model, res, setup, seeds_l, opts.output, setup.ts, prompts=ps, height=h, width=w)
