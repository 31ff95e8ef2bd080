"""Inpainting: repaint where the mask is white (1), keep the rest.

* A model trained for inpainting (UNet with 2 C + 1 input channels, e.g. SD 1.5 / 2 inpainting)
  gets the mask and the masked image's latents as extra input channels at every call
  (Rombach et al. 2022, Sec. 4.5), as diffusers' StableDiffusionInpaintPipeline does.
* Any other model inpaints by masked re-noising (RePaint without resampling, Lugmayr et al. 2022,
  Eq. 8; diffusers' legacy inpainting): after every step, x = m x + (1 - m) x_known(t_next), with
  x_known(t) = alpha(t) z0 + sigma(t) eps the original's latents noised with the starting noise to the
  next time (clean after the last step). It runs as the outermost plan rule (:class:`MaskedRenoising`),
  so the plan rule ``recur`` on top of it is RePaint with resampling.

The mask is binarized at 0.5 and downsampled (nearest) to the latent grid, as diffusers does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoisers import Cond
from ..errors import VelodiffError
from ..guidance import GuidedCond
from ..limits import check_strength
from ..plan import Accelerator
from ..sampling import SampleResult, StepInfo
from .common import (
    GenerationResult,
    batch_prompts_and_seeds,
    check_image_size,
    check_model,
    encode_batch_prompts,
    finish,
    initial_noise,
    normalize_prompts,
    prepare_cond,
    run,
)
from .images import given_latents, image_tensor, mask_tensor
from .img2img import check_runs_a_step, start_index
from .setup import Sampling, make_setup


def _with_concat(cond: Cond, extra: Tensor) -> Cond:
    if isinstance(cond, GuidedCond):
        return GuidedCond(_with_concat(cond.cond, extra), _with_concat(cond.uncond, extra))
    return {**cond, "concat": extra}


def inpaint(
    model: Any,
    prompts: str | Sequence[str],
    image: Any,
    mask: Any,
    strength: float = 1.0,
    *,
    image_latents: Tensor | None = None,
    masked_image_latents: Tensor | None = None,
    **options: Any,
) -> GenerationResult:
    """Repaint the white part of ``mask`` in ``image`` toward ``prompts``.

    ``image``: PIL / list / (B, 3, H, W) in [0, 1]; ``mask``: PIL L / tensor in [0, 1], same size.
    ``strength`` < 1 starts from the noised original instead of pure noise (as img2img).
    ``image_latents`` / ``masked_image_latents`` skip the VAE encoder (for exact comparisons).
    ``options`` as :func:`text2img` (:class:`velodiff.pipelines.setup.Sampling`)."""
    opts = Sampling.of("inpaint", options)
    check_model(model)
    s = check_strength(strength)
    ps, seeds_l = batch_prompts_and_seeds(normalize_prompts(prompts), opts.seeds)
    b = len(ps)
    img = image_tensor(image, "init image")
    h, w = int(img.shape[-2]), int(img.shape[-1])
    check_image_size(model, h, w, "the init image's ")
    shape = model.latent_shape(b, h, w)
    m = mask_tensor(mask)
    if tuple(m.shape[-2:]) != (h, w):
        raise VelodiffError(
            f"the mask is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}; "
            "give a mask of the image's size"
        )
    for name, n in (("init image", img.shape[0]), ("mask", m.shape[0])):
        if n not in (1, b):
            raise VelodiffError(f"{n} {name}s for {b} images; give one, or one per image")
    m = (m >= 0.5).float()
    if not bool(m.flatten(1).amax(1).all()):  # the run would return the picture unchanged
        raise VelodiffError("the mask covers nothing (no pixel >= 0.5): white marks what to repaint")
    m_lat = F.interpolate(m, size=shape[-2:]).to(model.device)  # nearest, as diffusers
    if not bool(m_lat.flatten(1).amax(1).all()):  # no latent cell to repaint: the picture, unchanged
        raise VelodiffError(
            f"the mask is thinner than the latent grid ({w // shape[-1]} pixels a cell) and repaints no cell "
            "of it; widen the mask"
        )
    m_lat = m_lat.expand(b, -1, -1, -1) if m_lat.shape[0] == 1 else m_lat

    if image_latents is None:
        z0 = model.encode(img)
        z0 = z0.expand(b, *z0.shape[1:]) if z0.shape[0] == 1 else z0
    else:
        z0, _, _ = given_latents(model, image_latents, "image_latents", b, h, w)
    setup = make_setup(model, opts, size=(h, w))
    check_runs_a_step(setup.steps, s, model)
    setup = setup.from_step(start_index(setup.steps, s, model))
    ts = setup.ts
    info = dict(prompts=ps, height=h, width=w, strength=s, grid_steps=setup.steps)  # (the whole grid's)
    if len(ts) < 2:
        res = SampleResult(z0.clone(), 0, 0, 0)
        return finish(model, res, setup, seeds_l, opts.output, ts, **info)
    eps = (initial_noise(shape, seeds_l, opts.noise) if opts.latents is None else opts.latents.float())
    eps = eps.to(model.device)
    if tuple(eps.shape) != shape:
        raise VelodiffError(f"latents have shape {tuple(eps.shape)}; expected {shape}")
    sched = model.schedule
    t0 = float(ts[0])
    x = (
        float(sched.alpha(t0)) * z0 + float(sched.sigma(t0)) * eps
        if s < 1.0
        else float((sched.alpha(t0) ** 2 + sched.sigma(t0) ** 2).sqrt()) * eps
    )
    cond = encode_batch_prompts(model, ps, opts.negative, setup.plan.needs("uncond"), h, w)
    rules: list[Accelerator] = []
    encode = None
    if model.is_inpainting:
        if masked_image_latents is None:
            # diffusers: masked image = image * (mask < 0.5) in [-1, 1], i.e. gray 0.5 where repainted
            masked = img * (1 - m) + 0.5 * m
            mz = model.encode(masked)
            mz = mz.expand(b, *mz.shape[1:]) if mz.shape[0] == 1 else mz
        else:
            mz, _, _ = given_latents(model, masked_image_latents, "masked_image_latents", b, h, w)
        extra = torch.cat([m_lat, mz], dim=1).to(model.dtype)
        cond = _with_concat(cond, extra)

        def encode(texts: list[str]) -> Cond:  # extra prompts of a plan rule get the same channels
            return _with_concat(prepare_cond(model, texts, None, False, h, w), extra)

    elif model.network_in_channels != model.latent_channels:
        raise VelodiffError(
            f"the network takes {model.network_in_channels} input channels; cannot inpaint with it"
        )
    else:
        rules.append(MaskedRenoising(sched, ts, z0, eps, m_lat))
    res = run(model, setup, opts, x, cond, seeds_l, ps, (h, w), ts=ts, encode=encode, rules=rules)
    return finish(model, res, setup, seeds_l, opts.output, ts, **info)


class MaskedRenoising(Accelerator):
    """Masked re-noising as the outermost plan rule of an inpainting run: after the step to time t,
    x = m x + (1 - m) x_known(t), with x_known(t) = alpha(t) z0 + sigma(t) eps (clean after the last
    step). As a rule's ``after_step`` it runs after every other rule's (steering moves x, then the known
    part is put back) and before a rule's ``redo``: self-recurrence (``recur``) re-noises the blended
    sample, which is RePaint's resampling (Lugmayr et al. 2022, Alg. 1, jump length 1); the callback
    sees the blended x. Not a plan rule a user names (the inpainting pipeline adds it)."""

    name = "masked-renoising"
    layer = 10_000  # outermost: its after_step is the last

    def __init__(self, schedule: Any, ts: Tensor, z0: Tensor, eps: Tensor, m_lat: Tensor) -> None:
        super().__init__()
        self.schedule, self.ts, self.z0, self.eps, self.m_lat = schedule, ts, z0, eps, m_lat

    def after_step(self, info: StepInfo) -> Tensor:
        known, t = self.z0, info.t  # clean after the last step
        if info.i < len(self.ts) - 2:
            known = float(self.schedule.alpha(t)) * self.z0 + float(self.schedule.sigma(t)) * self.eps
        return info.x * self.m_lat + (1 - self.m_lat) * known
