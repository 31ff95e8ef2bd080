"""What every pipeline shares: prompts and seeds, initial noise, encoding the prompts, the run itself
(on the ``Setup`` that ``pipelines.setup`` resolves) and its result; images in and out are
``pipelines.images``.

Noise contract. Each image's initial latents come from ``velodiff.noise.randn`` on the CPU, seeded
by that image's own seed (``noise="velodiff"``): the same seed gives the same image on every device
and in every batch composition, and a stochastic solver's step noise is drawn per image the same way.
The other modes draw as other tools do, from torch-style generators (``velodiff.noise.GeneratorNoise``:
the starting noise, then one draw per step of a stochastic solver): ``noise="torch"`` one
``torch.Generator("cpu").manual_seed(seeds[0])`` for the whole batch (diffusers with a CPU generator;
ComfyUI's starting noise), ``noise="cuda"`` the same as an NVIDIA GPU's generator draws it (diffusers
with a CUDA generator, computed on any device by ``velodiff.philox``), ``noise="a1111-cpu"`` /
``"a1111-nv"`` one such generator per image, seeded with the image's seed (A1111's "RNG: CPU" / its
"NV" and, on an NVIDIA card, its default "GPU" source; diffusers with a list of generators, but for the
SDE solvers). The SDE solvers' noise in the A1111 modes comes from k-diffusion's per-image Brownian
trees over sigma, as A1111 seeds them (``SigmaBrownianNoise``); in torch and cuda, from the generator,
as diffusers' DPM-Solver++ SDE draws it, with DPM++ SDE's part-step increments from velodiff's trees
(diffusers' DPMSolverSDEScheduler seeds its tree apart from the generator). Given latents stand for the
starting noise: the generators draw none, as diffusers' do.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoisers import Cond
from ..errors import VelodiffError, check_text, unknown_name
from ..guidance import GuidedCond
from ..noise import BrownianNoise, GaussianNoise, GeneratorNoise, SigmaBrownianNoise, check_seed, randn
from ..plan import Accelerator
from ..sampling import StepInfo, sample
from .images import to_pil
from .setup import Sampling, Setup, guided_scale

NOISE_MODES = ("velodiff", "torch", "cuda", "a1111-cpu", "a1111-nv")
#: the modes that draw from other tools' generators: (source, one generator per image)
GENERATOR_MODES = {"torch": ("CPU", False), "cuda": ("NV", False), "a1111-cpu": ("CPU", True),
                   "a1111-nv": ("NV", True)}


@dataclass
class GenerationResult:
    """``images``: PIL images, a float tensor (B, 3, H, W) in [0, 1], or None for output="latent";
    ``latents``: the final latents (float32); ``nfe`` / ``evals``: batched network calls and
    network-sample evaluations per image; ``ts``: the grid that was run; ``plan``: the plan that ran."""

    images: Any
    latents: Tensor
    nfe: int
    evals: int
    steps: int
    seeds: list[int]
    ts: Tensor
    solver: str
    guidance: float
    #: velodiff's name of the grid the run sampled on
    grid: str = ""
    stopped: bool = False
    #: the canonical string of the plan that ran (implicit CFG included)
    plan: str = "none"
    info: dict[str, Any] = field(default_factory=dict)


def check_model(model: Any) -> None:
    """A pipeline's model must be loaded (``velodiff.load``): a name or a path is one line, not an
    AttributeError from deep inside."""
    from ..models.base import LoadedModel

    if not isinstance(model, LoadedModel):
        named = isinstance(model, (str, Path))
        hint = f"velodiff.load({str(model)!r})" if named else "velodiff.load(...)"
        raise VelodiffError(f"the model must be a loaded model, got {type(model).__name__}: pass {hint}")


def check_model_like(model: Any, needs: Sequence[str]) -> None:
    """What an editing API takes as a model: a loaded model, or any object with the attributes it uses
    (``needs``: a toy model in a test, a wrapper); a name or a path is one line, as :func:`check_model`."""
    from ..models.base import LoadedModel

    if isinstance(model, LoadedModel):
        return
    missing = [a for a in needs if not hasattr(model, a)]
    if isinstance(model, (str, Path)) or missing:
        check_model(model)


def normalize_prompts(prompts: str | Sequence[str]) -> list[str]:
    if not isinstance(prompts, (str, list, tuple)):
        raise VelodiffError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    ps = [prompts] if isinstance(prompts, str) else list(prompts)
    if not ps:
        raise VelodiffError("no prompt given; pass at least one prompt")
    for i, p in enumerate(ps):
        if not isinstance(p, str):
            raise VelodiffError(f"prompt {i} is a {type(p).__name__}, not text")
        if not p.strip():
            raise VelodiffError(f"prompt {i} is empty; describe the image in a few words")
    return ps


def batch_prompts_and_seeds(
    prompts: list[str], seeds: int | Sequence[int] | None
) -> tuple[list[str], list[int]]:
    """One image per (prompt, seed): a single prompt repeats over a seed list; an int seed s gives
    s, s+1, ... per prompt; None means 0, 1, ... ."""
    from ..limits import MAX_BATCH

    if seeds is None:
        seeds = 0
    if isinstance(seeds, numbers.Integral):  # (numpy's integers too)
        return prompts, [int(seeds) + i for i in range(len(prompts))]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise VelodiffError("seeds is an empty list")
    if max(len(seeds), len(prompts)) > MAX_BATCH:
        raise VelodiffError(f"{max(len(seeds), len(prompts))} images in one call; at most {MAX_BATCH}")
    if len(prompts) == 1:
        return prompts * len(seeds), seeds
    if len(seeds) != len(prompts):
        raise VelodiffError(
            f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt, or one prompt"
        )
    return prompts, seeds


def check_image_size(model: Any, h: int, w: int, what: str = "") -> None:
    """A run's size: each side in [1, MAX_SIDE] pixels (one line), and a word when its area is far
    beyond what the model was trained at (8192x8192 on the 64x64 model ran for minutes without one)."""
    from ..limits import MAX_SIDE, is_integer

    for side, v in (("height", h), ("width", w)):
        if not is_integer(v) or not 0 < v <= MAX_SIDE:
            raise VelodiffError(f"{what}{side} must be a number of pixels in [1, {MAX_SIDE}] (an integer), "
                                f"got {v!r}")
    dh, dw = model.default_size
    if h * w > 16 * dh * dw:
        warnings.warn(
            f"{w}x{h} is {h * w / (dh * dw):.0f}x the area this model was trained at ({dw}x{dh}): slow, and "
            "far from the images it knows",
            stacklevel=3,
        )


def initial_noise(shape: tuple[int, ...], seeds: list[int], mode: str = "velodiff") -> Tensor:
    """Standard normal starting noise (B, C, h, w) on the CPU, float32 (see the module's contract); a seed
    outside torch's range [-2**63, 2**64) is refused in one line."""
    for s in seeds:
        check_seed(s)
    if mode == "velodiff":
        return torch.cat([randn((1, *shape[1:]), s) for s in seeds])
    if mode in GENERATOR_MODES:
        return GeneratorNoise(shape, seeds, *GENERATOR_MODES[mode]).first()
    raise unknown_name("noise mode", mode, NOISE_MODES)


class PerImageNoise:
    """A stochastic solver's step noise, drawn per image from that image's seed, so an image does
    not depend on what else is in its batch."""

    def __init__(self, like: Tensor, seeds: list[int], kind: str, ts: Tensor) -> None:
        one = like[:1]
        self.parts = [
            BrownianNoise(one, s, ts) if kind == "brownian" else GaussianNoise(one, s) for s in seeds
        ]

    def __call__(self, i: int) -> Tensor:
        return torch.cat([p(i) for p in self.parts])

    def between(self, t_from: float, t_to: float) -> Tensor:
        """Brownian increments over part of a step (``dpmpp_sde``), per image."""
        return torch.cat([p.between(t_from, t_to) for p in self.parts])  # type: ignore[union-attr]


def run(
    model: Any,
    setup: Setup,
    opts: Sampling,
    x: Tensor,
    cond: Cond,
    seeds: list[int],
    prompts: list[str],
    size: tuple[int, int],
    *,
    ts: Tensor | None = None,
    callback: Callable[[StepInfo], Any] | None = None,
    encode: Callable[[list[str]], Cond] | None = None,
    rules: Sequence[Accelerator] = (),
) -> Any:
    """Sample from x at ts[0] (the setup's grid unless ``ts``) under the setup's plan, with the
    pipeline's own ``rules`` added (inpainting's masked re-noising; not part of the plan's label)."""
    if not setup.plan.needs("uncond"):  # diffusers drops them silently at scale <= 1
        given = [what for what, on in (("the negative prompt", opts.negative),
                                        ("guidance rescale", opts.guidance_rescale)) if on]
        if given:
            warnings.warn(
                f"{' and '.join(given)} {'acts' if len(given) == 1 else 'act'} on classifier-free guidance, "
                "which is off at scale 1 here (a student with guidance folded in runs at 1): no effect",
                stacklevel=3,
            )
    if setup.plan.find("compose") is None and any(" AND " in p for p in prompts):
        warnings.warn(
            "the prompt joins parts with AND, which the text encoder reads as 'and'; "
            "add the plan rule compose (--plan compose) to combine them as composable prompts",
            stacklevel=3,
        )
    ts = setup.ts if ts is None else ts
    noise: Any = None
    kind = setup.solver.noise
    if kind == "brownian" and opts.noise.startswith("a1111-"):  # A1111's k-diffusion trees per image
        noise = SigmaBrownianNoise(x, seeds, ts, model.schedule)
    elif kind != "none" and opts.noise in GENERATOR_MODES:
        # diffusers' SDE solvers draw Gaussians from the generator too; DPM++ SDE's part-step increments
        # come from velodiff's trees (diffusers' DPMSolverSDEScheduler seeds its tree apart from it)
        tree = PerImageNoise(x, seeds, kind, ts) if kind == "brownian" else None
        noise = GeneratorNoise(tuple(x.shape), seeds, *GENERATOR_MODES[opts.noise], x.device, x.dtype,
                               start=opts.latents is None, brownian=tree)
    elif kind != "none":
        noise = PerImageNoise(x, seeds, kind, ts)
    context = {**run_context(model, setup, prompts, size, encode), "seeds": tuple(seeds)}
    return sample(
        model.denoiser,
        x,
        ts,
        setup.solver,
        cond=cond,
        seed=seeds[0],
        noise=noise,
        callback=opts.callback if callback is None else callback,
        plan=setup.plan.without_settings().with_rules(rules),
        context=context,
        grad=opts.grad,
        **setup.options,
    )


def run_context(
    model: Any,
    setup: Setup,
    prompts: list[str],
    size: tuple[int, int],
    encode: Callable[[list[str]], Cond] | None = None,
) -> dict[str, Any]:
    """What the plan's rules may know of a pipeline run (``RunInfo``'s model, network, encode,
    prompts, guidance)."""
    h, w = size

    def encode_plain(texts: list[str]) -> Cond:
        return prepare_cond(model, texts, None, False, h, w)

    return {
        "model": model,
        "network": model.network,
        "encode": encode or encode_plain,
        "prompts": tuple(prompts),
        "guidance": setup.guidance,
    }


def check_setup(model: Any, setup: Setup, prompts: list[str], size: tuple[int, int]) -> None:
    """Refuse now what text2img with this setup would refuse before its first step (the grid on the
    model's schedule, the solver's steps and options, each plan rule's check on this model and batch),
    without encoding or sampling: a server checks a job with it when the job is submitted."""
    from ..sampling import check_run

    branches: dict[str, Any] = dict.fromkeys(("cond", "uncond") if setup.plan.needs("uncond") else ("cond",))
    check_run(
        model.denoiser,
        setup.ts,
        setup.solver,
        setup.plan.without_settings(),
        len(prompts),
        branches,
        run_context(model, setup, prompts, size),
        setup.options,
    )


def finish(model: Any, res: Any, setup: Setup, seeds: list[int], output: str, ts: Tensor, **info: Any) -> Any:
    images: Any = None
    if output != "latent":
        images = model.decode(res.x)
        if output == "pil":
            images = to_pil(images)
    return GenerationResult(
        images=images,
        latents=res.x,
        nfe=res.nfe,
        evals=res.evals,
        steps=res.steps,
        seeds=seeds,
        ts=ts,
        solver=setup.solver.name,
        guidance=guided_scale(setup.plan, setup.guidance),
        grid=setup.grid,
        stopped=res.stopped,
        plan=str(setup.plan),
        info=info,
    )


def prepare_cond(
    model: Any, prompts: list[str], negative: Any, guided: bool, height: int, width: int
) -> Cond:
    check_text(prompts, "prompt")
    check_text(negative, "negative prompt")
    with warnings.catch_warnings():  # every call's truncation warned, not only the first: after (appended
        warnings.simplefilter("always", append=True)  # to) the caller's filters, which still decide
        return model.encode_prompt(prompts, negative, guided=guided, height=height, width=width)


def repeat_cond(cond: Cond, n: int) -> Cond:
    """Cond for n images from a cond for one (used when one prompt serves a batch)."""
    if isinstance(cond, GuidedCond):
        return GuidedCond(repeat_cond(cond.cond, n), repeat_cond(cond.uncond, n))
    if isinstance(cond, dict):
        return {k: repeat_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, Tensor):
        return cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    return cond


def encode_batch_prompts(
    model: Any, prompts: list[str], negative: Any, guided: bool, height: int, width: int
) -> Cond:
    """Encode each distinct prompt once (a seed sweep of one prompt encodes it once); with the
    unconditional (or negative) conditioning too when ``guided``."""
    if len(set(prompts)) == 1 and len(prompts) > 1 and (negative is None or isinstance(negative, str)):
        return repeat_cond(prepare_cond(model, prompts[:1], negative, guided, height, width), len(prompts))
    return prepare_cond(model, prompts, negative, guided, height, width)
