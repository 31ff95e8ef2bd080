"""Stable Diffusion XL (Podell et al. 2023): two CLIP text encoders and micro-conditioning.

The prompt is encoded as diffusers' StableDiffusionXLPipeline does: the penultimate hidden states of
both encoders concatenated (768 + 1280 = 2048 wide), the second encoder's projected pooled output as
``text_embeds``, and ``time_ids`` = (original size, crop top-left, target size) (Sec. 2.2; each
(height, width), by default the image size, (0, 0) and the image size, as in diffusers); with no
negative prompt and ``force_zeros_for_empty_prompt`` the unconditional embeddings are zeros. The
refiner (one encoder, ``requires_aesthetics_score``) conditions on an aesthetic score instead of
the target size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoisers import Cond
from ..errors import VelodiffError
from .base import NetworkDenoiser, UNetNetwork, as_guided, register_family
from .loading import Source
from .sd import (
    SDModel,
    _negatives,
    default_grid_for,
    diffusers_vae,
    read_folder_modules,
    read_single_file,
    scheduler_setup,
)

SDXL_PIPELINES = {
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
}
SDXL_UNET_KEY = "model.diffusion_model.label_emb.0.0.weight"
SDXL_TEXT2_KEY = "conditioner.embedders.1.model.transformer.resblocks."
SDXL_REFINER_TEXT_KEY = "conditioner.embedders.0.model.transformer.resblocks."


@dataclass
class SDXLModel(SDModel):
    """SDXL. ``components``: unet, vae, text_encoder (None for the refiner), text_encoder_2,
    tokenizer(_2), scheduler_config, and the pipeline flags below."""

    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    #: size conditioning, (height, width) each, as diffusers' pipeline arguments of the same names;
    #: None: the image size, (0, 0) and the image size
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None

    def _encoders(self) -> list[tuple[Any, Any]]:
        c = self.components
        pairs = [(c.get("tokenizer"), c.get("text_encoder")), (c.get("tokenizer_2"), c.get("text_encoder_2"))]
        return [(tok, te) for tok, te in pairs if te is not None]

    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], None
        for tok, te in self._encoders():
            ids = self.tokenize(tok, texts)
            out = te(ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-(self.clip_skip + 2)])
        if pooled is None:
            raise VelodiffError("SDXL needs a text encoder with a projection (text_encoder_2)")
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(self, batch: int, height: int, width: int, negative: bool = False) -> Tensor:
        original = list(self.original_size or (height, width))
        crops = list(self.crops_coords_top_left or (0, 0))
        if self.requires_aesthetics_score:
            score = self.negative_aesthetic_score if negative else self.aesthetic_score
            ids = [*original, *crops, score]
        else:
            ids = [*original, *crops, *(self.target_size or (height, width))]
        return torch.tensor([ids], dtype=self.dtype, device=self.device).expand(batch, -1)

    def encode_prompt(
        self,
        prompts: list[str],
        negative: list[str] | None = None,
        *,
        guided: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> Cond:
        prompts = list(prompts)
        h, w = height or self.default_size[0], width or self.default_size[1]
        zero_neg = guided and negative is None and self.force_zeros_for_empty_prompt
        negs = _negatives(prompts, negative) if guided and not zero_neg else []
        with torch.inference_mode():
            hidden, pooled = self._encode_texts(prompts + negs)
        hidden, pooled = hidden.to(self.dtype), pooled.to(self.dtype)
        b = len(prompts)
        cond = {
            "encoder_hidden_states": hidden[:b],
            "text_embeds": pooled[:b],
            "time_ids": self.time_ids(b, h, w),
            **self._embedded_guidance(b),
        }
        if not guided:
            return cond
        if zero_neg:
            uncond = {
                "encoder_hidden_states": torch.zeros_like(hidden),
                "text_embeds": torch.zeros_like(pooled),
            }
        else:
            uncond = {"encoder_hidden_states": hidden[b:], "text_embeds": pooled[b:]}
        uncond["time_ids"] = self.time_ids(b, h, w, negative=True)
        uncond.update(self._embedded_guidance(b))
        return as_guided(cond, uncond)

    def to_diffusers(self, scheduler: Any = None) -> Any:
        from diffusers import (
            DDIMScheduler,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
            StableDiffusionXLPipeline,
        )

        c = self.components
        sched = scheduler or DDIMScheduler.from_config(c["scheduler_config"])
        kw = dict(
            vae=diffusers_vae(c["vae"], c["unet"].dtype),
            text_encoder=c.get("text_encoder"),
            text_encoder_2=c["text_encoder_2"],
            tokenizer=c.get("tokenizer"),
            tokenizer_2=c["tokenizer_2"],
            unet=c["unet"],
            scheduler=sched,
        )
        if self.is_inpainting:
            return StableDiffusionXLInpaintPipeline(
                **kw,
                requires_aesthetics_score=self.requires_aesthetics_score,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            )
        if self.requires_aesthetics_score:
            return StableDiffusionXLImg2ImgPipeline(
                **kw,
                requires_aesthetics_score=True,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            )
        return StableDiffusionXLPipeline(**kw, force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)


def detect_sdxl(src: Source) -> bool:
    if src.kind == "folder":
        return src.pipeline_class in SDXL_PIPELINES or (
            src.unet_config.get("addition_embed_type") == "text_time" and "text_encoder_2" in src.model_index
        )
    return SDXL_UNET_KEY in src.keys and (src.has_key(SDXL_TEXT2_KEY) or src.has_key(SDXL_REFINER_TEXT_KEY))


def build_sdxl(
    src: Source,
    *,
    dtype: torch.dtype,
    device: torch.device,
    prediction_type: str | None = None,
    config: Path | None = None,
) -> SDXLModel:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if src.kind == "folder":
        c = read_folder_modules(
            src,
            dtype,
            device,
            text_encoders=[
                ("text_encoder", "tokenizer", CLIPTextModel),
                ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection),
            ],
        )
        flags = src.model_index
    else:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        from .configs import single_file_config

        cfg_dir = single_file_config("sdxl", src, config)
        refiner = not src.has_key(SDXL_TEXT2_KEY)
        cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
        c = read_single_file(src, cls, cfg_dir, dtype, device, given=config is not None)
        flags = {"requires_aesthetics_score": refiner, "force_zeros_for_empty_prompt": not refiner}
        import json

        idx = cfg_dir / "model_index.json"
        flags = {**flags, **{k: v for k, v in json.loads(idx.read_text()).items() if k in flags}}
    if c.get("text_encoder_2") is None:
        raise VelodiffError(f"{src.path} has no text_encoder_2/; an SDXL model needs it")
    schedule, ptype = scheduler_setup(c["scheduler_config"], prediction_type)
    unet, vae = c["unet"], c["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(unet.config.sample_size) * factor
    grid, grid_opts = default_grid_for(c["scheduler_config"])
    tok = c.get("tokenizer") or c["tokenizer_2"]
    return SDXLModel(
        family="sdxl",
        schedule=schedule,
        prediction_type=ptype,
        denoiser=NetworkDenoiser(UNetNetwork(unet), schedule, ptype),
        latent_channels=int(vae.config.latent_channels),
        vae_scale_factor=factor,
        default_size=(size, size),
        default_steps=25,
        default_guidance=5.0,
        default_solver="dpmpp_2m",
        default_grid=grid,
        default_grid_options=grid_opts,
        grid_defaults={"ays": {"model": "sdxl"}},  # AYS published SDXL's own schedule
        components=c,
        device=device,
        dtype=dtype,
        max_tokens=int(min(tok.model_max_length, 10_000)),
        force_zeros_for_empty_prompt=bool(flags.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=bool(flags.get("requires_aesthetics_score", False)),
    )


register_family(
    "sdxl",
    detect_sdxl,
    build_sdxl,
    priority=20,
    description="Stable Diffusion XL (two CLIP text encoders, size/crop micro-conditioning)",
    expected_keys=(SDXL_UNET_KEY, SDXL_TEXT2_KEY + "*"),
)
