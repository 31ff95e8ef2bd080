"""Write a trained run as a diffusers Stable Diffusion folder (safetensors only) plus its model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..default_model import PIPELINE_CLASS, scheduler_config, write_tokenizer
from ..files import check_model_out, plain_modes
from .loop import load_run_weights, run_meta
from .trainer import build_models, load_vae


def _to_half(path: Path) -> None:
    from safetensors.torch import save_file

    from ..models.weights import load_file

    sd = load_file(path)
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
        str(path),
        metadata={"format": "pt"},
    )


def model_index() -> dict[str, Any]:
    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def export_model(
    vae_run: Path, ldm_run: Path, out: Path, *, ema: bool = True, card: str | None = None, half: bool = True
) -> Path:
    """Assemble the folder in a temporary sibling and swap it in (never a half-written model).

    ``half``: store the UNet and text encoder weights as float16 (half the size; diffusers and
    transformers load them into float32 models, and velodiff computes in float32); the small
    autoencoder stays float32."""
    from diffusers import DPMSolverMultistepScheduler

    run_meta(vae_run, "autoencoder", "--vae")
    meta = run_meta(ldm_run, "ldm", "--ldm")
    extra = meta["config"]["extra"]
    size, prediction = extra["size"], extra["prediction_type"]
    vae, _ = load_vae(vae_run, size)
    # the latent scale the diffusion model was trained with (the same encoder gives the same value)
    vae.register_to_config(scaling_factor=float(extra.get("scaling_factor", vae.config.scaling_factor)))
    unet, text = build_models(size)
    unet.load_state_dict(load_run_weights(ldm_run, "unet", ema))
    text.load_state_dict(load_run_weights(ldm_run, "text_encoder", ema))
    out = check_model_out(Path(out), "the model folder")
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    if half:
        for f in (tmp / "unet").glob("*.safetensors"), (tmp / "text_encoder").glob("*.safetensors"):
            for p in f:
                _to_half(p)
    write_tokenizer(tmp / "tokenizer")
    sc = scheduler_config(prediction)
    DPMSolverMultistepScheduler.from_config(
        {k: v for k, v in sc.items() if k != "_class_name"}
    ).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    if card is not None:
        (tmp / "MODEL_CARD.md").write_text(card)
    elif (out / "MODEL_CARD.md").exists():
        shutil.copy(out / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
    for p in tmp.rglob("*"):  # drop anything not safetensors/json/txt/md (no pickles ever)
        if p.is_file() and p.suffix not in (".safetensors", ".json", ".txt", ".md"):
            p.unlink()
    plain_modes(tmp)
    old = out.with_name(out.name + ".old-export")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    torch.set_grad_enabled(True)
    return out
