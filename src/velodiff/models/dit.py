"""The base of the transformer (DiT) families, SD3, Flux and PixArt: the network adapter over a
diffusers transformer, the component loaders, :class:`DiTModel` (T5 encoding, patch-size-aware latent
shapes, resolution-dependent flow shifts) and :func:`finish_dit`, which assembles a family's
:class:`~velodiff.models.base.LoadedModel` from its modules.

Flow schedules. A FlowMatchEulerDiscreteScheduler config becomes a RectifiedFlow
(:func:`flow_schedule`): its shift, and t_min = the smallest of its shifted training sigmas, so that
velodiff's "flow-shifted" grid is diffusers' default grid. A scheduler with ``use_dynamic_shifting``
(Flux, some SD3.5) shifts by exp(mu), mu linear in the image's token count (:func:`dynamic_shift`,
diffusers' ``calculate_shift``; Esser et al. 2024, Sec. 5.3.2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoisers import Cond
from ..errors import VelodiffError, shorten
from ..grids import flow_shift
from ..schedules import RectifiedFlow
from .base import NetworkDenoiser, as_guided
from .loading import Source
from .sd import SDModel, _negatives, place, vae_dtype_for
from .weights import from_pretrained


class TransformerNetwork:
    """``network(x, timestep, cond) -> prediction`` over a diffusers DiT: x (float32) is cast to the
    weights' dtype for the call, the cond dict's entries go in as keyword arguments, the output
    comes back in x's dtype (only its first ``out_channels`` channels: PixArt's learned variance
    is dropped)."""

    def __init__(self, transformer: torch.nn.Module, out_channels: int | None = None) -> None:
        self.transformer = transformer
        self.dtype = next(transformer.parameters()).dtype
        self.out_channels = out_channels

    def __call__(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        if not isinstance(cond, Mapping):
            raise VelodiffError(
                f"{type(self.transformer).__name__} needs a conditioning dict (from encode_prompt)"
            )
        h = x if x.dtype == self.dtype else x.to(self.dtype)
        out = self.transformer(h, timestep=timestep, return_dict=False, **cond)[0]
        if self.out_channels is not None and out.shape[1] != self.out_channels:
            out = out[:, : self.out_channels]
        return out if out.dtype == x.dtype else out.to(x.dtype)


def load_transformer(src: Source, cls_name: str, dtype: torch.dtype, device: torch.device) -> Any:
    import diffusers

    cls = getattr(diffusers, cls_name)
    return place(
        from_pretrained(cls, src.path, "transformer", torch_dtype=dtype), device
    )


def load_vae(src: Source, dtype: torch.dtype, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    vae = from_pretrained(AutoencoderKL, src.path, "vae")
    return place(vae, device, vae_dtype_for(src.config("vae"), dtype))


def has_component(src: Source, name: str) -> bool:
    entry = src.model_index.get(name)
    return bool(entry) and entry[0] is not None and (src.path / name).is_dir()


def load_text_encoder(src: Source, name: str, cls: Any, dtype: torch.dtype, device: torch.device) -> Any:
    return place(from_pretrained(cls, src.path, name, dtype=dtype), device)


def load_tokenizer(src: Source, name: str) -> Any:
    """A folder's tokenizer (CLIP or T5, as its own config says)."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, src.path, name, weights=False)


@dataclass
class DiTModel(SDModel):
    """A transformer family: the VAE codecs and tokenization of :class:`SDModel`, a ``transformer``
    component instead of a UNet. ``components``: transformer, vae, text encoders and tokenizers,
    scheduler_config."""

    uses_clip_skip: ClassVar[bool] = False  # SD3 reads it; PixArt (T5) and Flux do not

    @property
    def transformer(self) -> Any:
        return self.components["transformer"]

    @property
    def network_in_channels(self) -> int:
        return self.latent_channels

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """The conditioning tensors for ``texts`` (batch first), without guidance."""
        raise NotImplementedError

    def split_cond(self, both: dict[str, Tensor], n: int, guided: bool) -> Cond:
        cond = {k: v[:n] for k, v in both.items()}
        uncond = {k: v[n:] for k, v in both.items()} if guided else None
        return as_guided(cond, uncond)

    def encode_prompt(
        self,
        prompts: list[str],
        negative: list[str] | None = None,
        *,
        guided: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> Cond:
        """The prompts' conditioning, and the negatives' ("" by default) as a GuidedCond when
        ``guided``; prompts and negatives go through each text encoder as one batch."""
        prompts = list(prompts)
        negs = _negatives(prompts, negative) if guided else []
        with torch.inference_mode():
            both = self.encode_texts(prompts + negs)
        return self.split_cond(both, len(prompts), guided)

    def t5_hidden(
        self, texts: list[str], tokenizer_key: str, encoder_key: str, width: int, mask: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """T5's last hidden states (B, max_sequence_length, width), zeros without a T5, and the
        token mask; the text encoder sees the mask only when ``mask`` (PixArt), as in diffusers."""
        te, tok, n = (
            self.components.get(encoder_key),
            self.components.get(tokenizer_key),
            self.max_sequence_length,
        )
        if te is None:
            return torch.zeros(len(texts), n, width, device=self.device, dtype=self.dtype), None
        enc = tok(
            texts,
            padding="max_length",
            max_length=n,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        for text, row in zip(texts, tok(texts, truncation=False, verbose=False).input_ids, strict=True):
            if len(row) > n:
                dropped = shorten(tok.decode(row[n - 1 : -1]).strip())
                warnings.warn(
                    f"the text {shorten(text, 40)} has {len(row)} T5 tokens; the model reads {n} "
                    f"(max_sequence_length), so the end was dropped: {dropped}",
                    UserWarning,
                    stacklevel=4,
                )
        am = enc.attention_mask.to(self.device)
        h = te(enc.input_ids.to(self.device), attention_mask=am if mask else None)[0]
        return h.to(self.dtype), am

    #: T5's sequence length (diffusers' ``max_sequence_length``)
    max_sequence_length: int = 256
    #: mu at max_image_seq_len when the scheduler config has none (diffusers: SD3 1.16, Flux 1.15)
    max_shift: float = 1.16

    def sized_grid_options(self, height: int, width: int) -> dict[str, Any]:
        """A scheduler with ``use_dynamic_shifting`` (Flux, some SD3.5) shifts by exp(mu), mu linear in
        the image's token count (diffusers' ``calculate_shift``)."""
        cfg = self.components.get("scheduler_config") or {}
        if not cfg.get("use_dynamic_shifting"):
            return {}
        f = self.size_factor
        return {"shift": dynamic_shift(cfg, (height // f) * (width // f), self.max_shift)}


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu, linear in the token count between (base_seq_len, base_shift) and (max_seq_len, max_shift)
    (diffusers' calculate_shift; Esser et al. 2024, Sec. 5.3.2: larger images need more noise)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def dynamic_shift(sched_cfg: dict[str, Any], image_seq_len: int, max_shift: float = 1.15) -> float:
    """exp(mu): diffusers' exponential time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1) is the shift
    t' = s t / (1 + (s - 1) t) with s = e^mu."""
    mu = calculate_shift(
        image_seq_len,
        int(sched_cfg.get("base_image_seq_len", 256)),
        int(sched_cfg.get("max_image_seq_len", 4096)),
        float(sched_cfg.get("base_shift", 0.5)),
        float(sched_cfg.get("max_shift", max_shift)),
    )
    return math.exp(mu)


def flow_schedule(sched_cfg: dict[str, Any]) -> RectifiedFlow:
    """RectifiedFlow from a FlowMatchEulerDiscreteScheduler config: its shift, and t_min = the
    smallest of its shifted training sigmas (so the default grid reproduces diffusers')."""
    if sched_cfg and "FlowMatch" not in str(sched_cfg.get("_class_name", "FlowMatch")):
        raise VelodiffError(f"scheduler {sched_cfg.get('_class_name')} is not a flow-matching scheduler")
    unread = {"time_shift_type": "exponential", "shift_terminal": None, "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False}
    for key, default in unread.items():  # a grid velodiff does not build: refused, not run another way
        value = sched_cfg.get(key)
        if value is not None and value != default:
            raise VelodiffError(
                f"scheduler config {key}={value!r}: velodiff builds FlowMatchEulerDiscreteScheduler's "
                "default grid (exponential time shift) only; remove the key to sample on that grid"
            )
    n = int(sched_cfg.get("num_train_timesteps", 1000))
    shift = float(sched_cfg.get("shift", 1.0))
    if sched_cfg.get("use_dynamic_shifting"):  # Flux: the shift depends on the image size (see flux.py)
        return RectifiedFlow(shift=1.0, t_min=1.0 / n)
    t_min = float(flow_shift(torch.tensor(1.0 / n, dtype=torch.float32), shift))
    return RectifiedFlow(shift=shift, t_min=t_min)


def finish_dit(
    cls: type[DiTModel],
    family: str,
    c: dict[str, Any],
    schedule: Any,
    ptype: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    guidance: float,
    solver: str,
    grid: str,
    network: Any = None,
    timestep: Any = None,
    max_sequence_length: int = 256,
    latent_channels: int | None = None,
    **fields: Any,
) -> Any:
    """The LoadedModel of a transformer family from its modules."""
    vae, tr = c["vae"], c["transformer"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(getattr(tr.config, "sample_size", 128)) * factor  # Flux has none: diffusers' default 128
    ch = int(latent_channels or vae.config.latent_channels)
    fields.setdefault("patch_size", int(getattr(tr.config, "patch_size", 1)))
    net = network or TransformerNetwork(tr, out_channels=ch)
    return cls(
        family=family,
        schedule=schedule,
        prediction_type=ptype,
        denoiser=NetworkDenoiser(net, schedule, ptype, timestep=timestep),
        latent_channels=ch,
        vae_scale_factor=factor,
        default_size=(size, size),
        default_steps=steps,
        default_guidance=guidance,
        default_solver=solver,
        default_grid=grid,
        components=c,
        device=device,
        dtype=dtype,
        max_tokens=77,
        max_sequence_length=max_sequence_length,
        **fields,
    )
