"""Invert an image to the noise a deterministic sampler maps back to it, and regenerate (or edit) from there.

    inv = invert(model, image, "a red circle", method="edict", steps=20)
    inv.metrics          # latent_max_error, latent_rms_error, psnr of invert-then-regenerate
    inv.regenerate()     # the image back (a GenerationResult)
    inv.regenerate("a blue circle")   # the same noise under another prompt: an edit

The methods (``ddim``, ``edict``, ``fixed-point``, ``rf``) and their math are in
``velodiff.edit.inversion``. The grid, guidance and plan are a pipeline run's (``steps``, ``guidance``,
``plan``, ... as :func:`text2img`); fixed-point inverts ``solver`` (default: the model's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..edit.inversion import OWN_SAMPLER, InversionResult, check_method, invert_latents, regenerate_latents
from ..errors import VelodiffError
from ..sampling import SampleResult
from .common import (
    GenerationResult,
    check_model,
    encode_batch_prompts,
    finish,
    normalize_prompts,
    prepare_cond,
)
from .images import image_tensor
from .img2img import init_image_latents
from .setup import Sampling, check_output, make_setup


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two images (or batches: the mean of each image's) in [0, 1]; inf when equal."""
    from ..eval.metrics import psnr as per_image

    return float(per_image(a, b).double().mean())


@dataclass
class Inversion:
    """An inverted image: ``result`` (the noise, ``result.latents``; EDICT's pair in ``result.pair``), the
    source latents ``z0``, the run's settings, and the round trip's ``metrics`` (after :meth:`measure`,
    which :func:`invert` calls unless ``measure=False``)."""

    model: Any
    result: InversionResult
    z0: Tensor
    prompts: list[str]
    size: tuple[int, int]
    opts: Sampling
    guidance: float
    plan: Any
    image: Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def latents(self) -> Tensor:
        return self.result.latents

    @property
    def method(self) -> str:
        return self.result.method

    def regenerate(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        latents: Tensor | None = None,
        plan: Any = None,
        output: str = "pil",
        eta: float = 0.0,
        stop: float = 0.25,
        callback: Any = None,
    ) -> GenerationResult:
        """Run the inverted sampler from the inverted noise (or ``latents``) under ``prompts`` (default:
        the inversion's; another prompt is an edit) and ``plan`` (default: the inversion's). ``eta`` /
        ``stop``: RF-Inversion's reverse controller toward the source image (method rf)."""
        m = self.model
        check_output(output)
        ps = self.prompts if prompts is None else normalize_prompts(prompts)
        if len(ps) == 1 and len(self.prompts) > 1:
            ps = ps * len(self.prompts)
        if len(ps) != len(self.prompts):
            raise VelodiffError(f"{len(ps)} prompts for {len(self.prompts)} inverted images")
        opts = replace(self.opts, plan=self.plan if plan is None else plan, guidance=self.guidance)
        setup = make_setup(m, opts, size=self.size)
        h, w = self.size
        cond = encode_batch_prompts(m, ps, opts.negative, setup.plan.needs("uncond"), h, w)
        stopped: list[int] = []  # the step a callback stopped after, reported as the run's

        def watched(info: Any) -> Any:
            reply = callback(info)
            if reply is True:
                stopped.append(info.i + 1)
            return reply

        z, nfe, evals = regenerate_latents(
            m.denoiser,
            self.result,
            cond=cond,
            plan=setup.plan.without_settings(),
            context=_context(m, ps, setup.guidance, h, w),
            latents=latents,
            eta=eta,
            stop=stop,
            callback=None if callback is None else watched,
            solver_options=setup.options,
        )
        steps = stopped[0] if stopped else len(self.result.ts) - 1
        res = SampleResult(z.float(), nfe, evals, steps, stopped=bool(stopped), plan=str(setup.plan))
        return finish(
            m,
            res,
            setup,
            list(range(len(ps))),
            output,
            self.result.ts,
            prompts=ps,
            height=h,
            width=w,
            inversion=self.method,
        )

    def measure(self, eta: float = 0.0, stop: float = 0.25) -> dict[str, Any]:
        """Invert-then-regenerate error: latent max / rms error against the source latents; PSNR of the
        decoded regeneration against the decoded source latents (the inversion's own error) and, when
        the source was an image, against that image (adds the autoencoder's error)."""
        back = self.regenerate(output="tensor", eta=eta, stop=stop)
        err = (back.latents.double() - self.z0.double()).abs()
        source = self.model.decode(self.z0)
        self.metrics = {
            "method": self.method,
            "solver": self.result.solver,
            "steps": len(self.result.ts) - 1,
            "guidance": self.guidance,
            "plan": back.plan,
            "latent_max_error": float(err.max()),
            "latent_rms_error": float(err.pow(2).mean().sqrt()),
            "psnr": psnr(back.images.cpu(), source.cpu()),
            "invert_nfe": self.result.nfe,
            "regenerate_nfe": back.nfe,
            **{k: v for k, v in self.result.info.items() if k != "iterations"},
        }
        if self.method == "rf":  # RF-Inversion's reverse controller decides the regeneration
            self.metrics.update(eta=eta, stop=stop)
        if self.image is not None:
            self.metrics["psnr_input"] = psnr(back.images.cpu(), self.image.cpu())
        return self.metrics


#: the options of one inversion method each (eta and stop: RF-Inversion's reverse controller, not a
#: solver's eta, which would make the sampler stochastic and not invertible)
METHOD_OPTIONS = {"edict": ("p",), "fixed-point": ("iters", "tol", "sweeps"), "rf": ("gamma", "eta", "stop")}


def _context(model: Any, prompts: list[str], guidance: float, h: int, w: int) -> dict[str, Any]:
    def encode(texts: list[str]) -> Any:
        return prepare_cond(model, texts, None, False, h, w)

    return {
        "model": model,
        "network": model.network,
        "encode": encode,
        "prompts": tuple(prompts),
        "guidance": guidance,
    }


def invert(
    model: Any,
    image: Any,
    prompts: str | Sequence[str],
    method: str = "edict",
    *,
    height: int | None = None,
    width: int | None = None,
    image_latents: Tensor | None = None,
    measure: bool = True,
    p: float = 0.93,
    iters: int = 8,
    tol: float = 1e-5,
    sweeps: int | None = None,
    gamma: float = 0.5,
    eta: float = 0.0,
    stop: float = 0.25,
    **options: Any,
) -> Inversion:
    """Invert ``image`` (PIL, list, or (B, 3, H, W) in [0, 1]; or ``image_latents``) under ``prompts``
    with ``method``: ``ddim``, ``edict`` (default), ``fixed-point`` (of ``solver``) or ``rf`` (flow
    models). ``options``: the pipelines' sampling keywords (steps, solver, grid, guidance, plan, ...);
    ``p``, ``iters``, ``tol``, ``sweeps``, ``gamma`` as :func:`velodiff.edit.inversion.invert_latents`;
    ``eta`` / ``stop``: RF-Inversion's reverse controller when measuring. Returns an :class:`Inversion`
    whose ``metrics`` hold the round trip's error (unless ``measure=False``)."""
    opts = Sampling.of("invert", options)
    check_model(model)
    values = {"p": p, "iters": iters, "tol": tol, "sweeps": sweeps, "gamma": gamma, "eta": eta, "stop": stop}
    for owner, names in METHOD_OPTIONS.items():  # another method's option would be ignored: say so
        given = [n for n in names if values[n] != invert.__kwdefaults__[n]]
        if given and method != owner:
            raise VelodiffError(f"invert(): {given[0]} is an option of method {owner!r}, not of {method!r}")
    if opts.latents is not None or opts.seeds is not None or opts.callback is not None:
        raise VelodiffError("invert() takes no latents, seeds or callback; the image gives the start")
    ps = normalize_prompts(prompts)
    solver = opts.solver
    check_method(method, model.schedule, solver)
    if method == "fixed-point" and solver is None:
        opts = replace(opts, solver=model.default_solver)
    elif method in OWN_SAMPLER and solver is None:  # the method inverts its own sampler
        opts = replace(opts, solver=OWN_SAMPLER[method])
    if image_latents is None:
        img = image_tensor(image, "image to invert")
        if img.shape[0] > 1 and len(ps) == 1:
            ps = ps * img.shape[0]
        if img.shape[0] not in (1, len(ps)):
            raise VelodiffError(
                f"{img.shape[0]} images for {len(ps)} prompts; give one prompt, or one per image"
            )
        image = img
    else:
        image = None
    z0, h, w = init_image_latents(model, image, len(ps), height, width, image_latents)
    setup = make_setup(model, opts, size=(h, w))
    if model.is_inpainting:
        raise VelodiffError(f"{model.family} model at {model.path} is an inpainting model")
    cond = encode_batch_prompts(model, ps, opts.negative, setup.plan.needs("uncond"), h, w)
    result = invert_latents(
        model.denoiser,
        z0.float(),
        setup.ts,
        method,
        cond=cond,
        plan=setup.plan.without_settings(),
        solver=setup.solver,
        context=_context(model, ps, setup.guidance, h, w),
        p=p,
        iters=iters,
        tol=tol,
        sweeps=sweeps,
        gamma=gamma,
        **setup.options,
    )
    inv = Inversion(
        model,
        result,
        z0.float(),
        ps,
        (h, w),
        opts,
        setup.guidance,
        opts.plan,
        None if image is None else image.expand(len(ps), *image.shape[1:]),
    )
    if measure:
        with torch.inference_mode():
            inv.measure(eta=eta, stop=stop)
    return inv
