"""PixArt-alpha and PixArt-sigma (Chen et al. 2023, 2024): a DiT with cross-attention to T5-XXL,
over a discrete DDPM (VP) schedule, predicting eps and a learned variance.

As diffusers' PixArtAlphaPipeline / PixArtSigmaPipeline: the prompt is preprocessed as diffusers
does (lower-cased and stripped; cleaned further when ``bs4`` and ``ftfy`` are installed), tokenized
to 120 (alpha) or 300 (sigma) T5 tokens, and encoded with the attention mask, which also masks the
cross-attention; the negative prompt defaults to "". The network outputs 2C channels (eps and the
learned variance interpolation); velodiff keeps the first C, eps. PixArt-alpha at 1024 px
(``use_additional_conditions``) also conditions on the image's resolution (height, width) and aspect
ratio height / width (its micro-conditioning); velodiff passes the size it generates, as diffusers
does with ``use_resolution_binning=False`` (velodiff does not snap sizes to the training buckets).

Time. Trained step k of the N-step schedule sits at t = (k + 1) / N (``DiscreteVP``); the network
receives k. The default plan is diffusers': DPM-Solver++(2M) on DPMSolverMultistepScheduler's linspace
timesteps (999 ... 50 at 20 steps: ``drop_last``), 20 steps, guidance 4.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from .base import register_family
from .dit import DiTModel, finish_dit, load_text_encoder, load_tokenizer, load_transformer, load_vae
from .loading import Source
from .sd import scheduler_setup

PIXART_PIPELINES = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def preprocess(texts: list[str]) -> list[str]:
    """diffusers' PixArt caption preprocessing (clean_caption=True, its default): lower-case and strip,
    and its caption cleaning when bs4 and ftfy are installed."""
    from diffusers import PixArtAlphaPipeline

    cleaner = PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)  # only its text methods are used
    return PixArtAlphaPipeline._text_preprocessing(cleaner, texts, clean_caption=True)


@dataclass
class PixArtModel(DiTModel):
    """PixArt-alpha / sigma. ``components``: transformer, vae, text_encoder (T5), tokenizer,
    scheduler_config."""

    pipeline_class: str = "PixArtSigmaPipeline"

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        width = int(self.components["text_encoder"].config.d_model)
        h, mask = self.t5_hidden(preprocess(texts), "tokenizer", "text_encoder", width, mask=True)
        return {"encoder_hidden_states": h, "encoder_attention_mask": mask}

    def encode_prompt(
        self,
        prompts: list[str],
        negative: list[str] | None = None,
        *,
        guided: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> Any:
        cond = super().encode_prompt(prompts, negative, guided=guided, height=height, width=width)
        h, w = height or self.default_size[0], width or self.default_size[1]
        added = self.added_cond(len(prompts), h, w)
        for part in (cond.cond, cond.uncond) if guided else (cond,):
            part["added_cond_kwargs"] = added
        return cond

    def added_cond(self, batch: int, height: int, width: int) -> dict[str, Tensor | None]:
        """PixArt-alpha 1024's micro-conditions: resolution (height, width) and aspect ratio."""
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        res = torch.tensor([[float(height), float(width)]], dtype=self.dtype, device=self.device)
        ar = torch.tensor([[float(height / width)]], dtype=self.dtype, device=self.device)
        return {"resolution": res.expand(batch, -1), "aspect_ratio": ar.expand(batch, -1)}

    def to_diffusers(self, scheduler: Any = None) -> Any:
        """The same modules as diffusers' PixArt pipeline (shared weights); default: DPM-Solver++."""
        import diffusers
        from diffusers import DPMSolverMultistepScheduler

        c = self.components
        sched = scheduler or DPMSolverMultistepScheduler.from_config(c["scheduler_config"])
        cls = getattr(diffusers, self.pipeline_class)
        return cls(
            transformer=c["transformer"],
            scheduler=sched,
            vae=c["vae"],
            text_encoder=c["text_encoder"],
            tokenizer=c["tokenizer"],
        )


def detect_pixart(src: Source) -> bool:
    return src.is_transformer_folder(PIXART_PIPELINES, "PixArtTransformer2DModel")


def build_pixart(
    src: Source,
    *,
    dtype: torch.dtype,
    device: torch.device,
    prediction_type: str | None = None,
    config: Path | None = None,
) -> PixArtModel:
    from transformers import T5EncoderModel

    if src.kind != "folder":
        raise VelodiffError(
            f"{src.path.name}: PixArt loads from a diffusers folder (model_index.json), not a single file"
        )
    pipeline = src.pipeline_class if src.pipeline_class in PIXART_PIPELINES else "PixArtSigmaPipeline"
    max_seq = PIXART_PIPELINES[pipeline]
    c: dict[str, Any] = {
        "transformer": load_transformer(src, "PixArtTransformer2DModel", dtype, device),
        "vae": load_vae(src, dtype, device),
        "text_encoder": load_text_encoder(src, "text_encoder", T5EncoderModel, dtype, device),
        "tokenizer": load_tokenizer(src, "tokenizer"),
        "scheduler_config": src.config("scheduler"),
    }
    schedule, ptype = scheduler_setup(c["scheduler_config"], prediction_type)
    return finish_dit(
        PixArtModel,
        "pixart",
        c,
        schedule,
        ptype,
        device=device,
        dtype=dtype,
        steps=20,
        guidance=4.5,
        solver="dpmpp_2m",
        grid="linspace",
        default_grid_options={"drop_last": True},  # DPMSolverMultistepScheduler's linspace: ends at k = 50
        max_sequence_length=max_seq,
        pipeline_class=pipeline,
    )


register_family(
    "pixart",
    detect_pixart,
    build_pixart,
    priority=30,
    description="PixArt-alpha / sigma (DiT, T5-XXL cross-attention, discrete VP, eps + learned variance)",
)
