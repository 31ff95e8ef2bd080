"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): an MMDiT over rectified flow, three text encoders.

The prompt is encoded as diffusers' StableDiffusion3Pipeline does: the penultimate hidden states of
both CLIP encoders (77 tokens) concatenated along features and zero-padded to T5's width, then
T5's 256 token states appended along the sequence ("joint attention" context); the two CLIP
projected pooled outputs concatenated as ``pooled_projections``. Without T5 (a folder without
``text_encoder_3``, or ``load(..., family="sd3-no-t5")``) its part of the context is zeros, as
diffusers does with ``text_encoder_3=None``. The negative prompt defaults to "".

Time. The network was trained on sigma = t (x_t = (1 - t) x0 + t eps) and receives t * 1000; it
predicts the velocity eps - x0, so velodiff samples RectifiedFlow with prediction "flow". diffusers'
FlowMatchEulerDiscreteScheduler shifts its 1000 training sigmas, sigma_k = s u / (1 + (s - 1) u),
u = k / 1000, and its default grid is linspace(1, sigma_min, N) shifted once more; with the
schedule's t_min set to sigma_min = shift(1/1000), velodiff's "flow-shifted" grid is that grid.
Euler on this grid is diffusers' flow-matching Euler step x' = x + (t' - t) v.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoisers import Cond
from ..errors import VelodiffError
from ..grids import flow_shift
from ..schedules import RectifiedFlow
from .base import NetworkDenoiser, as_guided, register_family
from .loading import Source
from .sd import SDModel, _from_pretrained, _negatives, place, vae_dtype_for

SD3_PIPELINES = {
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
}


# --- shared by the transformer families (SD3, Flux, PixArt) ---------------------------------------


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
        _from_pretrained(cls, src.path, "transformer", torch_dtype=dtype, use_safetensors=True), device
    )


def load_vae(src: Source, dtype: torch.dtype, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    vae = _from_pretrained(AutoencoderKL, src.path, "vae", use_safetensors=True)
    return place(vae, device, vae_dtype_for(src.config("vae"), dtype))


def has_component(src: Source, name: str) -> bool:
    entry = src.model_index.get(name)
    return bool(entry) and entry[0] is not None and (src.path / name).is_dir()


def load_text_encoder(src: Source, name: str, cls: Any, dtype: torch.dtype, device: torch.device) -> Any:
    return place(_from_pretrained(cls, src.path, name, dtype=dtype, use_safetensors=True), device)


def load_tokenizer(src: Source, name: str) -> Any:
    """A folder's tokenizer (CLIP or T5, as its own config says)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, src.path, name)


@dataclass
class DiTModel(SDModel):
    """A transformer family: the VAE codecs and tokenization of :class:`SDModel`, a ``transformer``
    component instead of a UNet. ``components``: transformer, vae, text encoders and tokenizers,
    scheduler_config."""

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
        for i, row in enumerate(tok(texts, truncation=False).input_ids):
            if len(row) > n:
                warnings.warn(
                    f"prompt {i} has {len(row)} T5 tokens; the model reads {n} (max_sequence_length), "
                    f"so the end was dropped: {tok.decode(row[n - 1 : -1]).strip()!r}",
                    UserWarning,
                    stacklevel=4,
                )
        am = enc.attention_mask.to(self.device)
        h = te(enc.input_ids.to(self.device), attention_mask=am if mask else None)[0]
        return h.to(self.dtype), am

    #: T5's sequence length (diffusers' ``max_sequence_length``)
    max_sequence_length: int = 256
    #: latent pixels per token side (the transformer's patch size; Flux's 2x2 packing)
    patch_size: int = 1
    #: mu at max_image_seq_len when the scheduler config has none (diffusers: SD3 1.16, Flux 1.15)
    max_shift: float = 1.16

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor * self.patch_size
        if height <= 0 or width <= 0 or height % f or width % f:
            raise VelodiffError(
                f"height and width must be positive multiples of {f} for {self.family} "
                f"(latent factor {self.vae_scale_factor} x patch size {self.patch_size}), "
                f"got {height}x{width}"
            )
        return super().latent_shape(batch, height, width)

    def grid_options(self, height: int, width: int) -> dict[str, Any]:
        """The default grid's options for images of this size: a scheduler with
        ``use_dynamic_shifting`` (Flux, some SD3.5) shifts by exp(mu), mu linear in the token count."""
        cfg = self.components.get("scheduler_config") or {}
        if not cfg.get("use_dynamic_shifting"):
            return dict(self.default_grid_options)
        f = self.vae_scale_factor * self.patch_size
        return {
            **self.default_grid_options,
            "shift": dynamic_shift(cfg, (height // f) * (width // f), self.max_shift),
        }


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
    n = int(sched_cfg.get("num_train_timesteps", 1000))
    shift = float(sched_cfg.get("shift", 1.0))
    if sched_cfg.get("use_dynamic_shifting"):  # Flux: the shift depends on the image size (see flux.py)
        return RectifiedFlow(shift=1.0, t_min=1.0 / n)
    t_min = float(flow_shift(torch.tensor(1.0 / n, dtype=torch.float32), shift))
    return RectifiedFlow(shift=shift, t_min=t_min)


# --- SD3 -----------------------------------------------------------------------------------------


@dataclass
class SD3Model(DiTModel):
    """SD3 / SD3.5. ``components``: transformer, vae, text_encoder(_2) (CLIP with projection),
    text_encoder_3 (T5, or None), their tokenizers, scheduler_config."""

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        c = self.components
        hidden, pooled = [], []
        for tk, te in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            ids = self.tokenize(c[tk], texts)
            out = c[te](ids.to(self.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-(self.clip_skip + 2)])
        width = int(self.transformer.config.joint_attention_dim)
        t5, _ = self.t5_hidden(texts, "tokenizer_3", "text_encoder_3", width)
        clip = torch.cat(hidden, dim=-1).to(self.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1).to(self.dtype),
        }

    def to_diffusers(self, scheduler: Any = None) -> Any:
        """The same modules as a diffusers StableDiffusion3Pipeline (shared weights)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        c = self.components
        sched = scheduler or FlowMatchEulerDiscreteScheduler.from_config(c["scheduler_config"])
        return StableDiffusion3Pipeline(
            transformer=c["transformer"],
            scheduler=sched,
            vae=c["vae"],
            text_encoder=c["text_encoder"],
            tokenizer=c["tokenizer"],
            text_encoder_2=c["text_encoder_2"],
            tokenizer_2=c["tokenizer_2"],
            text_encoder_3=c.get("text_encoder_3"),
            tokenizer_3=c.get("tokenizer_3"),
        )


def detect_sd3(src: Source) -> bool:
    return src.is_transformer_folder(SD3_PIPELINES, "SD3Transformer2DModel")


def build_sd3(
    src: Source,
    *,
    dtype: torch.dtype,
    device: torch.device,
    prediction_type: str | None = None,
    config: Path | None = None,
    t5: bool = True,
) -> SD3Model:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if src.kind != "folder":
        raise VelodiffError(
            f"{src.path.name}: SD3 loads from a diffusers folder (model_index.json), not a single file"
        )
    c: dict[str, Any] = {
        "transformer": load_transformer(src, "SD3Transformer2DModel", dtype, device),
        "vae": load_vae(src, dtype, device),
    }
    for i in ("", "_2"):
        c[f"text_encoder{i}"] = load_text_encoder(
            src, f"text_encoder{i}", CLIPTextModelWithProjection, dtype, device
        )
        c[f"tokenizer{i}"] = load_tokenizer(src, f"tokenizer{i}")
    use_t5 = t5 and has_component(src, "text_encoder_3")
    c["text_encoder_3"] = (
        load_text_encoder(src, "text_encoder_3", T5EncoderModel, dtype, device) if use_t5 else None
    )
    c["tokenizer_3"] = load_tokenizer(src, "tokenizer_3") if use_t5 else None
    c["scheduler_config"] = src.config("scheduler")
    return finish_dit(
        SD3Model,
        "sd3",
        c,
        flow_schedule(c["scheduler_config"]),
        prediction_type or "flow",
        device=device,
        dtype=dtype,
        steps=28,
        guidance=7.0,
        solver="euler",
        grid="flow-shifted",
        max_sequence_length=256,
    )


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


register_family(
    "sd3",
    detect_sd3,
    build_sd3,
    priority=30,
    description="Stable Diffusion 3 / 3.5 (MMDiT, rectified flow; CLIP-L + CLIP-G + optional T5-XXL)",
)
register_family(
    "sd3-no-t5",
    lambda src: False,
    lambda src, **kw: build_sd3(src, t5=False, **kw),
    priority=0,
    description="Stable Diffusion 3 without T5 (zeros in its place, as diffusers' text_encoder_3=None)",
)
