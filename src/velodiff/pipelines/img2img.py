"""Image to image (SDEdit, Meng et al. 2022): noise the encoded image to an intermediate time and
sample from there.

``strength`` in [0, 1] picks the start as diffusers does: of the grid for ``steps`` steps, the last
``int(steps * strength)`` steps are run, from the image latents noised to that grid time
(x = alpha(t) z0 + sigma(t) eps, diffusers' ``add_noise``). strength 1 starts at the top of the grid,
where the image still weighs alpha(t_max) (0.07 on SD's schedule: the result keeps a trace of it, as in
diffusers; ``inpaint`` at strength 1 starts from pure noise); strength 0 returns the image through the
VAE, with no network call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..errors import VelodiffError
from ..limits import check_strength
from ..sampling import SampleResult
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
from .images import given_latents, image_tensor
from .setup import Sampling, make_setup


def start_index(steps: int, strength: float, model: Any = None) -> int:
    """The grid step img2img starts from, by the rule of the model family's diffusers pipeline
    (``get_timesteps``): SD and SDXL run the last int(steps * strength) steps; SD3 and Flux
    (``model.strength_keeps_fraction``) start at int(steps - steps * strength), one step more whenever
    steps * strength is not whole."""
    if getattr(model, "strength_keeps_fraction", False):
        return int(max(steps - min(steps * strength, steps), 0))
    return steps - min(int(steps * strength), steps)


def check_runs_a_step(steps: int, strength: float, model: Any = None) -> None:
    """A strength above 0 that runs no step is refused, as diffusers refuses it (the image would come
    back unchanged); strength 0 asks for exactly that (the image back through the VAE)."""
    if strength > 0 and start_index(steps, strength, model) >= steps:
        raise VelodiffError(
            f"strength {strength:g} of {steps} step{'s' * (steps != 1)} runs no step (int(steps x strength) "
            f"= 0); raise the strength to {1 / steps:.3g}{' or more' * (steps != 1)}, or the steps"
        )


def init_image_latents(
    model: Any,
    image: Any,
    batch: int,
    height: int | None,
    width: int | None,
    image_latents: Tensor | None = None,
) -> tuple[Tensor, int, int]:
    """Encode the init image(s) and check their size; one image serves the whole batch."""
    if image_latents is not None:
        if image is not None:  # both: the latents are the image's, at its size (not silently the latents')
            img = image_tensor(image, "init image")
            height, width = height or int(img.shape[-2]), width or int(img.shape[-1])
        return given_latents(model, image_latents, "image_latents", batch, height, width)
    img = image_tensor(image, "init image")
    h, w = int(img.shape[-2]), int(img.shape[-1])
    if (height and height != h) or (width and width != w):
        raise VelodiffError(
            f"the init image is {w}x{h} (width x height) but {width or w}x{height or h} was asked for; "
            "resize the image or leave height/width out"
        )
    check_image_size(model, h, w, "the init image's ")
    model.latent_shape(1, h, w)  # the size check, with its error message
    z0 = model.encode(img)
    if z0.shape[0] not in (1, batch):
        raise VelodiffError(f"{z0.shape[0]} init images for {batch} images; give one, or one per image")
    return z0.expand(batch, *z0.shape[1:]) if z0.shape[0] == 1 else z0, h, w


def img2img(
    model: Any,
    prompts: str | Sequence[str],
    image: Any,
    strength: float = 0.8,
    *,
    height: int | None = None,
    width: int | None = None,
    image_latents: Tensor | None = None,
    **options: Any,
) -> GenerationResult:
    """Re-generate ``image`` (PIL, list, or (B, 3, H, W) in [0, 1]) toward ``prompts``.

    ``options`` as :func:`text2img` (:class:`velodiff.pipelines.setup.Sampling`); ``latents`` is the
    noise added to the image (standard normal, default from the seeds); ``image_latents`` skips the VAE
    encoder; ``nfe`` counts the whole grid, of which the last ``strength`` fraction runs."""
    opts = Sampling.of("img2img", options)
    check_model(model)
    s = check_strength(strength)
    ps, seeds_l = batch_prompts_and_seeds(normalize_prompts(prompts), opts.seeds)
    z0, h, w = init_image_latents(model, image, len(ps), height, width, image_latents)
    shape = model.latent_shape(len(ps), h, w)
    setup = make_setup(model, opts, size=(h, w))
    check_runs_a_step(setup.steps, s, model)
    setup = setup.from_step(start_index(setup.steps, s, model))
    ts = setup.ts
    info = dict(prompts=ps, height=h, width=w, strength=s, grid_steps=setup.steps)  # (the whole grid's)
    if len(ts) < 2:  # strength 0: the image back through the VAE
        res = SampleResult(z0.clone(), 0, 0, 0)
        return finish(model, res, setup, seeds_l, opts.output, ts, **info)
    eps = (initial_noise(shape, seeds_l, opts.noise) if opts.latents is None else opts.latents.float())
    eps = eps.to(model.device)
    if tuple(eps.shape) != shape:
        raise VelodiffError(f"latents have shape {tuple(eps.shape)}; expected {shape}")
    t0 = float(ts[0])
    x = float(model.schedule.alpha(t0)) * z0 + float(model.schedule.sigma(t0)) * eps
    if model.is_inpainting:
        raise VelodiffError(
            f"{model.family} model at {model.path} is an inpainting model; use inpaint() "
            "(CLI: velodiff inpaint)"
        )
    cond = encode_batch_prompts(model, ps, opts.negative, setup.plan.needs("uncond"), h, w)
    res = run(model, setup, opts, x, cond, seeds_l, ps, (h, w), ts=ts)
    return finish(model, res, setup, seeds_l, opts.output, ts, **info)
