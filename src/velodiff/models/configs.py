"""Configs for single-file checkpoints.

diffusers builds modules from an original-layout checkpoint (CompVis / Stability layout) with a
folder of component configs and the tokenizer files. Without the network those come from
``config=`` (a local diffusers folder of the same architecture; weights are not needed), or else
from velodiff's own copies of the published architectures below, written once to
``~/.cache/velodiff/single_file/<name>`` (``VELODIFF_CACHE`` moves it). The CLIP tokenizer is rebuilt
from the BPE merges that OpenAI's CLIP ships (``assets/clip``, MIT licence), exactly as
CLIP's own tokenizer builds its vocabulary.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..schedules import SD_SCHEDULER
from ..shipped import asset_path
from .loading import Source

#: CLIP's BPE merges, bundled in the package (velodiff/assets/clip, MIT licence)
BPE_FILE = asset_path("clip") / "bpe_simple_vocab_16e6.txt.gz"
CONFIG_VERSION = 1

_SD_SCHEDULER = {
    **SD_SCHEDULER,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
    "prediction_type": "epsilon",
}
_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
#: CLIP ViT-L/14's text tower (SD1's encoder, SDXL's first)
_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
}
#: OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second encoder)
_CLIP_G = {
    **_CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

#: name -> pipeline class, components {subfolder: config}, tokenizers {subfolder: pad token}
PUBLISHED: dict[str, dict[str, Any]] = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "configs": {
            "unet": _SD15_UNET,
            "vae": _VAE,
            "text_encoder": _CLIP_L,
            "scheduler": {"_class_name": "PNDMScheduler", **_SD_SCHEDULER},
        },
        "tokenizers": {"tokenizer": "<|endoftext|>"},
    },
    "sd15-inpainting": {
        "pipeline": "StableDiffusionInpaintPipeline",
        "configs": {
            "unet": {**_SD15_UNET, "in_channels": 9},
            "vae": _VAE,
            "text_encoder": _CLIP_L,
            "scheduler": {"_class_name": "PNDMScheduler", **_SD_SCHEDULER},
        },
        "tokenizers": {"tokenizer": "<|endoftext|>"},
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "configs": {
            "unet": _SDXL_UNET,
            "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
            "text_encoder": _CLIP_L,
            "text_encoder_2": _CLIP_G,
            "scheduler": {
                "_class_name": "EulerDiscreteScheduler",
                **_SD_SCHEDULER,
                "interpolation_type": "linear",
                "use_karras_sigmas": False,
            },
        },
        "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "extra": {"force_zeros_for_empty_prompt": True},
    },
}
_LIBRARY = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@cache
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49408-token vocabulary and its BPE merges, built as CLIP's SimpleTokenizer builds them."""
    if not BPE_FILE.is_file():
        raise VelodiffError(f"velodiff's CLIP vocabulary is missing ({BPE_FILE}); reinstall velodiff")
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = (
        chars
        + [c + "</w>" for c in chars]
        + ["".join(m) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    if len(vocab) != 49408:
        raise VelodiffError(f"CLIP vocabulary of {len(vocab)} tokens from {BPE_FILE}; reinstall velodiff")
    return {t: i for i, t in enumerate(vocab)}, merges  # type: ignore[return-value]


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


def published_folder(name: str) -> Path:
    """A diffusers config folder (no weights) for a published architecture, written once."""
    spec = PUBLISHED[name]
    from ..files import cache_root

    dest = cache_root() / "single_file" / f"{name}-v{CONFIG_VERSION}"
    if (dest / "model_index.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        index: dict[str, Any] = {"_class_name": spec["pipeline"], **spec.get("extra", {})}
        for sub, cfg in spec["configs"].items():
            (tmp / sub).mkdir()
            fname = "scheduler_config.json" if sub == "scheduler" else "config.json"
            (tmp / sub / fname).write_text(json.dumps(cfg, indent=2))
            index[sub] = ["diffusers", cfg["_class_name"]] if sub == "scheduler" else list(_LIBRARY[sub])
        for sub, pad in spec["tokenizers"].items():
            clip_tokenizer(pad).save_pretrained(str(tmp / sub))
            index[sub] = list(_LIBRARY[sub])
        if spec["pipeline"].startswith("StableDiffusion") and "XL" not in spec["pipeline"]:
            index.update(
                safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False
            )
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        try:
            tmp.rename(dest)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def published_name(family: str, src: Source) -> str | None:
    """Which bundled architecture a single file is, if velodiff has one for it."""
    if family == "sd1":
        shape = src.tensor_shape("model.diffusion_model.input_blocks.0.0.weight")
        return "sd15-inpainting" if shape is not None and shape[1] == 9 else "sd15"
    if family == "sdxl" and src.has_key("conditioner.embedders.1.model."):
        return "sdxl"
    return None


def single_file_config(family: str, src: Source, config: Path | None) -> Path:
    if config is not None:
        if not (config / "model_index.json").is_file():
            raise VelodiffError(f"config {str(config)!r} is not a diffusers folder (no model_index.json)")
        return config
    name = published_name(family, src)
    if name is None:
        raise VelodiffError(
            f"{src.path.name}: velodiff has no bundled {family} config for this single file; "
            "pass config= (CLI: --config) a local diffusers folder of the same architecture "
            "(its JSON configs and tokenizer; weights not needed)"
        )
    return published_folder(name)
