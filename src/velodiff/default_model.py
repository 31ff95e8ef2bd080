"""The tiny Stable-Diffusion-architecture default model: its configs, its tokenizer, and where it lives.

The architecture is Stable Diffusion's (AutoencoderKL + UNet2DConditionModel with cross-attention +
CLIPTextModel over the real CLIP BPE vocabulary, 77 tokens) at a scale that trains on 2 CPU cores.
The shipped weights are a diffusers folder inside the package (``assets/default-model``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the CLIP context length (tokens, incl. start and end)
MAX_TOKENS = 77
IMAGE_SIZE = 64
#: diffusers' SD1.x/2.x pipeline component names in model_index.json
PIPELINE_CLASS = "StableDiffusionPipeline"

def default_model_path() -> Path:
    """The shipped default model (a diffusers folder inside the package; ``shipped_path("default")``)."""
    from .shipped import shipped_path

    return shipped_path("default")


# --- architecture configs ----------------------------------------------------------------------


def vae_config(size: str = "default") -> dict[str, Any]:
    """A small AutoencoderKL: 2 downsamplings (64x64x3 -> 16x16x4)."""
    ch = {"default": (16, 32, 64), "micro": (8, 16, 16)}[size]
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(ch),
        up_block_types=["UpDecoderBlock2D"] * len(ch),
        block_out_channels=list(ch),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8 if size == "default" else 4,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # measured and written after the autoencoder is trained
        mid_block_add_attention=False,
    )


def text_encoder_config(size: str = "default") -> dict[str, Any]:
    """A CLIPTextModel over CLIP's 49408-token vocabulary, 77 positions."""
    hidden, layers, heads = {"default": (64, 4, 2), "micro": (16, 1, 2)}[size]
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=hidden,
    )


def unet_config(size: str = "default") -> dict[str, Any]:
    """A UNet2DConditionModel on 16x16x4 latents: a convolutional 16x16 level, then cross-attention
    (and self-attention) blocks at 8x8 and 4x4 and in the middle block, 32 channels per head.

    diffusers' ``attention_head_dim`` is, for UNet2DConditionModel, the number of heads per block (its
    documented naming quirk, kept for SD1.x configs), so it is set from the channel counts here."""
    ch, cross, head_channels = {"default": ((48, 96, 192), 64, 32), "micro": ((8, 16), 16, 8)}[size]
    n = len(ch)
    return dict(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        block_out_channels=list(ch),
        layers_per_block=1,
        cross_attention_dim=cross,
        attention_head_dim=[c // head_channels for c in ch],
        norm_num_groups=8 if size == "default" else 4,
    )


def scheduler_config(prediction_type: str = "v_prediction") -> dict[str, Any]:
    """SD's scaled-linear 1000-step schedule, DPM-Solver++ 2M as the diffusers default."""
    from .schedules import SD_SCHEDULER  # torch: only when a model is written

    return {
        "_class_name": "DPMSolverMultistepScheduler",
        **SD_SCHEDULER,
        "prediction_type": prediction_type,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "set_alpha_to_one": False,
        "clip_sample": False,
    }


# --- tokenizer ---------------------------------------------------------------------------------


def write_tokenizer(folder: str | Path) -> Path:
    """Write a transformers CLIPTokenizer (vocab.json + merges.txt, 77 tokens, pad = <|endoftext|>) from
    the CLIP vocabulary bundled with velodiff (``models.configs.clip_vocab``)."""
    from .models.configs import clip_vocab  # imports velodiff.models (torch): only when needed

    vocab, pairs = clip_vocab()
    merges = [" ".join(m) for m in pairs]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_TOKENS,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
                "errors": "replace",
                "add_prefix_space": False,
            },
            indent=2,
        )
    )
    return folder


@lru_cache(maxsize=4)
def load_tokenizer(folder: str) -> Any:
    from transformers import CLIPTokenizer

    from .models.weights import from_pretrained

    return from_pretrained(CLIPTokenizer, folder, weights=False)

