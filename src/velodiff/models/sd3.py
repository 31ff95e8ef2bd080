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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import VelodiffError
from .base import register_family
from .dit import (
    DiTModel,
    finish_dit,
    flow_schedule,
    has_component,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
)
from .loading import Source

SD3_PIPELINES = {
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
}


@dataclass
class SD3Model(DiTModel):
    """SD3 / SD3.5. ``components``: transformer, vae, text_encoder(_2) (CLIP with projection),
    text_encoder_3 (T5, or None), their tokenizers, scheduler_config."""

    uses_clip_skip: ClassVar[bool] = True
    strength_keeps_fraction: ClassVar[bool] = True  # diffusers' SD3 img2img / inpaint get_timesteps

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
