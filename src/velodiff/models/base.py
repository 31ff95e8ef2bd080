"""What a loaded model is to velodiff: a denoiser over a noise schedule, plus text and image codecs.

A family module (``sd``, ``sdxl``, ...) turns a diffusers folder or a single checkpoint file into a
:class:`LoadedModel` and registers itself with :func:`register_family`::

    register_family("sd1", detect=..., build=..., priority=10)

``detect(source) -> bool`` looks at a :class:`~velodiff.models.loading.Source` (the folder's
``model_index.json`` and component configs, or a single file's tensor names); ``build(source, *,
dtype, device, prediction_type, config)`` returns the model. Families are tried by descending
priority, so a more specific family (SDXL) is asked before a general one (SD1).

The network adapter (:class:`UNetNetwork`) calls the diffusers module with the conditioning dict
the family's ``encode_prompt`` made; :class:`NetworkDenoiser` turns its prediction into x0 with the
sample kept in float32 and the time input kept in float32 whatever the weights' dtype (bfloat16
would round timestep 999 to 1000).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..denoisers import Cond, ModelDenoiser, broadcast_time, x0_from_alpha_sigma
from ..errors import VelodiffError, unknown_name
from ..guidance import GuidedCond
from ..schedules import F64, NoiseSchedule

if TYPE_CHECKING:
    from .loading import Source

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise unknown_name("dtype", str(dtype), ["float32", "bfloat16", "float16"])
    return DTYPES[dtype]


def best_device() -> str:
    """The fastest device here: a CUDA GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (cpu, cuda, cuda:N, mps; None: :func:`best_device`) checked against this machine,
    so a missing GPU is one line here, not a CUDA error inside diffusers."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device or best_device())
        except (RuntimeError, ValueError):
            raise VelodiffError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VelodiffError(f"device {str(dev)!r} was asked for but no CUDA GPU is available; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VelodiffError(
                f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise VelodiffError("device 'mps' was asked for but Apple's MPS is not available; use cpu")
    elif dev.type != "cpu":
        raise VelodiffError(f"unsupported device {str(dev)!r}; use cpu, cuda, cuda:N or mps")
    return dev


def default_dtype(device: torch.device) -> str:
    """The weights' dtype a diffusers user expects on ``device``: float16 on a GPU (half the memory,
    tensor cores), float32 on the CPU (torch's float16 kernels there are slow or missing)."""
    return "float32" if device.type == "cpu" else "float16"


# --- the network adapter and the denoiser -----------------------------------------------------

#: conditioning keys that diffusers' UNet takes in ``added_cond_kwargs`` (SDXL's micro-conditioning)
ADDED_COND_KEYS = ("text_embeds", "time_ids")


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """(B,) guidance scales -> (B, dim) sinusoidal features for a UNet's ``timestep_cond`` input
    (``time_cond_proj_dim``): VDM's Fourier embedding of 1000 w (Kingma et al. 2021), as diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``. A guidance-distilled UNet gets the
    scale of ``x0_u + w (x0_c - x0_u)`` minus one here (LCM's convention, Luo et al. 2023: w - 1 is the
    scale of ``x0_c + (w - 1)(x0_c - x0_u)``)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    arg = (w.to(torch.float32) * 1000.0)[:, None] * freq.to(w.device)[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class UNetNetwork:
    """``network(x, timestep, cond) -> prediction`` over a diffusers ``UNet2DConditionModel``.

    ``cond`` is a dict: ``encoder_hidden_states``, optional ``text_embeds`` / ``time_ids`` (SDXL)
    and optional ``concat`` (extra input channels, e.g. an inpainting UNet's mask and masked-image
    latents). x arrives in float32 and is cast to the weights' dtype for the call only."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.dtype = next(unet.parameters()).dtype

    def __call__(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        if not isinstance(cond, Mapping):
            raise VelodiffError("a UNet needs a conditioning dict with 'encoder_hidden_states'")
        h = x if x.dtype == self.dtype else x.to(self.dtype)
        extra = cond.get("concat")
        if extra is not None:
            h = torch.cat([h, extra.to(self.dtype)], dim=1)
        added = {k: cond[k] for k in ADDED_COND_KEYS if k in cond}
        w = cond.get("timestep_cond")  # a guidance-distilled UNet's embedded scale
        out = self.unet(
            h,
            timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep_cond=None if w is None else w.to(self.dtype),
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]
        return out if out.dtype == x.dtype else out.to(x.dtype)


@dataclass
class NetworkDenoiser(ModelDenoiser):
    """:class:`~velodiff.denoisers.ModelDenoiser` for real networks: the time input stays float32,
    the schedule is evaluated on the CPU in float64 and enters as scalars (no host-device syncs,
    no per-step tensors on the device for a shared time)."""

    def __call__(self, x: Tensor, t: Tensor | float, cond: Cond = None) -> Tensor:
        t = torch.as_tensor(t, dtype=F64).cpu()
        to_timestep = self.timestep or self.schedule.timestep
        ts = to_timestep(t).to(torch.float32)
        ts = ts.expand(x.shape[0]) if ts.ndim == 0 else ts
        out = self.network(x, ts.to(x.device), cond)
        if out.shape != x.shape:
            raise VelodiffError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        if t.ndim == 0:
            a, s = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        else:
            tb = broadcast_time(t, x)
            a = self.schedule.alpha(tb).to(x.device, x.dtype)
            s = self.schedule.sigma(tb).to(x.device, x.dtype)
        return x0_from_alpha_sigma(self.prediction_type, x, out, a, s)


# --- the loaded model ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready for velodiff's sampling core. Families subclass it and fill the codecs.

    ``denoiser(x, t, cond) -> x0`` takes float32 latents; ``encode_prompt`` returns the cond it
    needs (a :class:`GuidedCond` when ``guided``); ``decode`` maps latents to images in [0, 1]
    (differentiably with ``grad``); ``encode`` maps images in [0, 1] to latents (image-to-image,
    inpainting)."""

    family: str
    schedule: NoiseSchedule
    prediction_type: str
    denoiser: NetworkDenoiser
    latent_channels: int
    vae_scale_factor: int
    default_size: tuple[int, int]
    default_steps: int
    default_guidance: float
    default_solver: str
    default_grid: str
    components: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    path: str = ""
    #: how it was loaded where that changes the network beyond its files: a single file's ``config``
    #: folder, a forced ``family`` or ``prediction_type`` (its identity: ``eval.reference.model_identity``)
    loaded_with: dict[str, str] = field(default_factory=dict)
    #: the LoRA files merged on top at load and their scales (resolved paths); calibrations stay the base
    #: model's, outputs do not (``eval.reference.network_identity``)
    loras: tuple[tuple[str, float], ...] = ()
    #: options for the default grid (e.g. diffusers' ``steps_offset`` for "leading")
    default_grid_options: dict[str, Any] = field(default_factory=dict)
    #: "zero": the last step jumps to clean data (diffusers' final_sigmas_type="zero")
    default_final: str = "zero"
    #: the most tokens a prompt may have (CLIP: 77)
    max_tokens: int = 77
    #: the guidance scale a guidance-distilled network takes as an input (Flux-dev, a UNet with
    #: ``time_cond_proj_dim``: ``velodiff distill guided``, LCM): one pass per step; None for others.
    #: ``guidance`` stays true classifier-free guidance (two passes), 1 by default for such models.
    embedded_guidance: float | None = None
    #: latent pixels per token side: a transformer's patch size (Flux's 2x2 packing), 1 for a UNet
    patch_size: int = 1
    #: options a named grid takes by default on this model, under the call's (SDXL: AYS's SDXL schedule)
    grid_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: img2img's steps as the family's diffusers pipeline counts them (``pipelines.img2img.start_index``):
    #: False runs int(steps x strength) (SD, SDXL), True keeps the fraction (SD3, Flux)
    strength_keeps_fraction: ClassVar[bool] = False
    #: the tokenizer whose tokens the network's text context starts with (its cross-attention keys; SD3's
    #: joint context begins with CLIP's 77, Flux's is T5's): what an attention map's positions mean
    context_tokenizer: ClassVar[str] = "tokenizer"

    @property
    def size_factor(self) -> int:
        """What image sides must be multiples of: the VAE's factor times the patch size."""
        return self.vae_scale_factor * self.patch_size

    def grid_options(self, height: int, width: int) -> dict[str, Any]:
        """Options of the default grid for images of this size: the model's defaults, with what depends
        on the size (:meth:`sized_grid_options`) over them."""
        return {**self.default_grid_options, **self.sized_grid_options(height, width)}

    def sized_grid_options(self, height: int, width: int) -> dict[str, Any]:
        """The grid options that depend on the image's size (Flux's dynamic shift): every grid that takes
        them gets them, named or the default; none here."""
        return {}

    # -- codecs (filled by the family) --

    def encode_prompt(
        self,
        prompts: list[str],
        negative: list[str] | None = None,
        *,
        guided: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> Cond:
        raise NotImplementedError

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        raise NotImplementedError

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def context_offset(self) -> int:
        """Where a prompt's first token sits in the text context: 1 after CLIP's start token, 0 in T5's
        (it has none)."""
        tok = self.components.get(self.context_tokenizer)
        bos = getattr(tok, "bos_token_id", None)
        return int(tok is not None and bos is not None and tok("")["input_ids"][:1] == [bos])

    def context_tokens(self, prompt: str) -> list[tuple[int, str]]:
        """(position in the text context, token) of the prompt's tokens as the network attends to them,
        the start, end and padding tokens left out (CLIP's start token is position 0; T5 has none)."""
        tok = self.components.get(self.context_tokenizer)
        if tok is None:
            return []
        ids = tok(prompt, truncation=True, max_length=int(min(tok.model_max_length, 10_000)))["input_ids"]
        special = set(tok.all_special_ids)
        return [(i, t) for i, (n, t) in enumerate(zip(ids, tok.convert_ids_to_tokens(ids), strict=True))
                if n not in special]

    # -- what pipelines ask --

    @property
    def network(self) -> Any:
        """The denoising network (a UNet or a transformer): what plan rules hook."""
        return self.components.get("unet", self.components.get("transformer"))

    @property
    def takes_embedded_guidance(self) -> bool:
        """Whether the network takes the guidance scale as an input (``embedded_guidance``)."""
        config = self.network.config
        return bool(config.get("guidance_embeds") or config.get("time_cond_proj_dim"))

    @property
    def network_in_channels(self) -> int:
        """Input channels of the network: latent_channels, or more for an inpainting UNet."""
        unet = self.components.get("unet")
        return int(unet.config.in_channels) if unet is not None else self.latent_channels

    @property
    def is_inpainting(self) -> bool:
        """True for a network trained for inpainting (mask and masked-image latents as extra input
        channels: 4 + 1 + 4 = 9 for Stable Diffusion)."""
        return self.network_in_channels == 2 * self.latent_channels + 1

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.size_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            why = "the latent factor" if self.patch_size == 1 else (
                f"latent factor {self.vae_scale_factor} x patch size {self.patch_size}"
            )
            raise VelodiffError(
                f"height and width must be positive multiples of {f} for {self.family} ({why}), "
                f"got {height}x{width}"
            )
        v = self.vae_scale_factor
        return (batch, self.latent_channels, height // v, width // v)

    def describe(self) -> str:
        h, w = self.default_size
        return (
            f"{self.family} ({self.prediction_type}, {self.latent_channels}-channel latents, "
            f"{h}x{w}, {str(self.dtype).removeprefix('torch.')} on {self.device})"
        )


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySpec:
    """A registered model family: ``detect(source) -> bool`` and ``build(source, **kw) -> LoadedModel``."""

    name: str
    detect: Callable[[Source], bool]
    build: Callable[..., LoadedModel]
    priority: int = 0
    description: str = ""
    #: for the no-family error: the tensor names (or name prefixes) a single file must have
    expected_keys: tuple[str, ...] = ()


FAMILIES: dict[str, FamilySpec] = {}


def register_family(
    name: str,
    detect: Callable[[Source], bool],
    build: Callable[..., LoadedModel],
    *,
    priority: int = 0,
    description: str = "",
    expected_keys: tuple[str, ...] = (),
) -> FamilySpec:
    spec = FamilySpec(name, detect, build, priority, description, tuple(expected_keys))
    FAMILIES[name] = spec
    return spec


def families_by_priority() -> list[FamilySpec]:
    return sorted(FAMILIES.values(), key=lambda f: -f.priority)


def as_guided(cond: Cond, uncond: Cond | None) -> Cond:
    return GuidedCond(cond, uncond) if uncond is not None else cond
