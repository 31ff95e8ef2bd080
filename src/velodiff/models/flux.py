"""Flux.1 (Black Forest Labs): an MMDiT + single-stream DiT over rectified flow, CLIP-L and T5-XXL.

As diffusers' FluxPipeline: the prompt's T5 hidden states (512 tokens, no attention mask) are the
joint-attention context with zero text position ids; CLIP-L's pooled output is
``pooled_projections``. velodiff keeps latents spatial, (B, 16, H/8, W/8); the network adapter packs
each 2x2 patch into one token (B, HW/4, 64) with image position ids (0, row, col), calls the
transformer, and unpacks the velocity.

Time. The transformer receives t = sigma (it multiplies by 1000 itself). The schedule is
RectifiedFlow with shift = exp(mu), mu linear in the image's token count (diffusers'
``calculate_shift``): the shift grows with resolution (Esser et al. 2024, Sec. 5.3.2). The
default grid is Flux's own, "flux" (:func:`velodiff.grids.flux`): N + 1 times uniform from 1 to 0,
the last dropped, then shifted (the reference code's ``get_schedule``, diffusers' FluxPipeline);
"flow-shifted" (SD3's) takes the same size-dependent shift.

Guidance. Flux-dev is guidance-distilled: the guidance scale is an input of the network
(``embedded_guidance``, diffusers' ``guidance_scale``, default 3.5), not a second pass. velodiff's
``guidance`` is true classifier-free guidance (diffusers' ``true_cfg_scale``), 1.0 by default, against
the empty prompt when no negative is given (FluxPipeline applies it only with a ``negative_prompt``);
Flux-schnell (no guidance input) defaults to 4 steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoisers import Cond
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

FLUX_PIPELINES = {"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"}


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW/4, 4C): each 2x2 patch one token (diffusers' _pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack` for latents of height h and width w."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position ids (0, row, col) of the (h, w) token grid, (h*w, 3)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxNetwork:
    """``network(x, timestep, cond)`` over a FluxTransformer2DModel with spatial latents x (float32).
    The position ids depend only on the shapes and are built once per shape."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.dtype = next(transformer.parameters()).dtype
        self._ids: dict[tuple[Any, ...], Tensor] = {}

    def _cached(self, key: tuple[Any, ...], make: Any) -> Tensor:
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = make()
        return ids

    def __call__(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        if not isinstance(cond, Mapping):
            raise VelodiffError("Flux needs a conditioning dict (from encode_prompt)")
        _, _, h, w = x.shape
        txt = cond["encoder_hidden_states"]
        img_ids = self._cached(
            ("img", h, w, x.device), lambda: image_ids(h // 2, w // 2, x.device, self.dtype)
        )
        txt_ids = self._cached(
            ("txt", txt.shape[1], x.device),
            lambda: torch.zeros(txt.shape[1], 3, device=x.device, dtype=self.dtype),
        )
        out = self.transformer(
            hidden_states=pack(x).to(self.dtype),
            timestep=timestep,
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=txt,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(x.dtype)


def flux_timestep(t: Tensor) -> Tensor:
    """The transformer's time input, rounded as diffusers rounds it: float32(t * 1000) / 1000."""
    return (t * 1000.0).to(torch.float32) / 1000.0


@dataclass
class FluxModel(DiTModel):
    """Flux.1. ``components``: transformer, vae, text_encoder (CLIP-L), tokenizer, text_encoder_2 (T5),
    tokenizer_2, scheduler_config. ``embedded_guidance``: the guidance input of a guidance-distilled
    transformer (None when it has none), read by ``encode_prompt``."""

    embedded_guidance: float | None = 3.5
    strength_keeps_fraction: ClassVar[bool] = True  # diffusers' Flux img2img / inpaint get_timesteps
    context_tokenizer: ClassVar[str] = "tokenizer_2"  # the joint attention's text is T5's (CLIP: pooled)

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        c = self.components
        ids = self.tokenize(c["tokenizer"], texts)
        pooled = c["text_encoder"](ids.to(self.device), output_hidden_states=False).pooler_output
        width = int(self.transformer.config.joint_attention_dim)
        t5, _ = self.t5_hidden(texts, "tokenizer_2", "text_encoder_2", width)
        cond = {"encoder_hidden_states": t5, "pooled_projections": pooled.to(self.dtype)}
        if self.transformer.config.guidance_embeds:
            g = 3.5 if self.embedded_guidance is None else float(self.embedded_guidance)
            cond["guidance"] = torch.full((len(texts),), g, device=self.device, dtype=torch.float32)
        return cond

    def to_diffusers(self, scheduler: Any = None) -> Any:
        """The same modules as a diffusers FluxPipeline (shared weights)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        c = self.components
        sched = scheduler or FlowMatchEulerDiscreteScheduler.from_config(c["scheduler_config"])
        return FluxPipeline(
            transformer=c["transformer"],
            scheduler=sched,
            vae=c["vae"],
            text_encoder=c["text_encoder"],
            tokenizer=c["tokenizer"],
            text_encoder_2=c["text_encoder_2"],
            tokenizer_2=c["tokenizer_2"],
        )


def detect_flux(src: Source) -> bool:
    return src.is_transformer_folder(FLUX_PIPELINES, "FluxTransformer2DModel")


def build_flux(
    src: Source,
    *,
    dtype: torch.dtype,
    device: torch.device,
    prediction_type: str | None = None,
    config: Path | None = None,
) -> FluxModel:
    from transformers import CLIPTextModel, T5EncoderModel

    if src.kind != "folder":
        raise VelodiffError(
            f"{src.path.name}: Flux loads from a diffusers folder (model_index.json), not a single file"
        )
    if not has_component(src, "text_encoder_2"):
        raise VelodiffError(f"{src.path} has no text_encoder_2/ (T5); Flux needs it")
    c: dict[str, Any] = {
        "transformer": load_transformer(src, "FluxTransformer2DModel", dtype, device),
        "vae": load_vae(src, dtype, device),
        "text_encoder": load_text_encoder(src, "text_encoder", CLIPTextModel, dtype, device),
        "tokenizer": load_tokenizer(src, "tokenizer"),
        "text_encoder_2": load_text_encoder(src, "text_encoder_2", T5EncoderModel, dtype, device),
        "tokenizer_2": load_tokenizer(src, "tokenizer_2"),
        "scheduler_config": src.config("scheduler"),
    }
    distilled = bool(c["transformer"].config.guidance_embeds)
    model = finish_dit(
        FluxModel,
        "flux",
        c,
        flow_schedule(c["scheduler_config"]),
        prediction_type or "flow",
        device=device,
        dtype=dtype,
        steps=28 if distilled else 4,
        guidance=1.0,
        solver="euler",
        grid="flux",
        network=FluxNetwork(c["transformer"]),
        timestep=flux_timestep,
        max_sequence_length=512,
        latent_channels=int(c["transformer"].config.in_channels) // 4,
        embedded_guidance=3.5 if distilled else None,
        patch_size=2,
        max_shift=1.15,
    )
    model.default_grid_options = model.grid_options(*model.default_size)
    return model


register_family(
    "flux",
    detect_flux,
    build_flux,
    priority=30,
    description="Flux.1 dev / schnell (MMDiT + single-stream DiT, rectified flow; CLIP-L + T5-XXL)",
)
