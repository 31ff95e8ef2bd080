"""The teacher: an SD1-family diffusers folder (or a shipped name), checked up front in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import VelodiffError
from ..shipped import SAMPLING_FILE


def teacher_folder(teacher: str) -> Path:
    from ..shipped import resolve_model

    path = resolve_model(teacher)
    if not (path / "model_index.json").is_file() or not (path / "unet" / "config.json").is_file():
        raise VelodiffError(f"teacher {str(teacher)!r} is not a diffusers model folder with a unet")
    return path


def load_teacher(path: Path, role: str = "teacher") -> Any:
    """The teacher (or, ``role="--init"``, the model a student starts from) as a loaded model (its
    schedule, defaults and components: unet, text encoder, VAE, tokenizer), refused in one line if it is
    not a plain SD1-family v-prediction model."""
    from ..models import load

    try:
        model = load(path)
    except VelodiffError as e:
        raise VelodiffError(f"{role} {str(path)!r}: {e}") from None
    for name in ("unet", "text_encoder", "vae", "tokenizer"):
        if name not in model.components:
            raise VelodiffError(f"{role} {str(path)!r} has no {name} (expected an SD1-family model)")
    # the trainers read the UNet's output as a velocity (x0 = alpha x - sigma v) and feed it CLIP's
    # last hidden state: anything else would train without an error and give a wrong student
    if model.family != "sd1" or model.prediction_type != "v_prediction":
        raise VelodiffError(
            f"{role} {str(path)!r} is a {model.family} model predicting {model.prediction_type}; velodiff "
            "distill trains v-prediction SD1-family teachers (the shipped models, velodiff train's)"
        )
    # a guidance-distilled UNet takes w as an input the trainers do not give it (they would run it on a
    # conditioning it never saw, and its student would inherit the input)
    if getattr(model.components["unet"].config, "time_cond_proj_dim", None):
        raise VelodiffError(
            f"{role} {str(path)!r} is guidance-distilled (its UNet takes the guidance scale as an input); "
            "distill from a model without one (e.g. the one it was distilled from)"
        )
    return model


def training_data(
    teacher: Any, cache_size: int, data_seed: int, device: str, quiet: bool = True
) -> tuple[Any, Any, torch.Tensor, Any]:
    """What every distillation trains on: a ShapesWorld latent cache of ``cache_size`` scenes (held-out
    split), the teacher's frozen text encoder and UNet on ``device``, and the empty prompt's token ids.
    Returns (cache, text encoder, uncond ids, teacher UNet)."""
    from ..data.shapes import ShapesWorld
    from ..train.trainer import LatentCache, tokenize

    c = teacher.components
    vae, tok = c["vae"], c["tokenizer"]
    world = ShapesWorld(seed=data_seed, size=64, holdout=True)
    scaling = float(vae.config.scaling_factor)
    cache = LatentCache(world, vae.to(device), tok, cache_size, scaling, device, 1, quiet)
    text = c["text_encoder"].to(device).eval().requires_grad_(False)
    uncond = tokenize(tok, [""])[0].to(device)
    unet = c["unet"].to(device).eval().requires_grad_(False)
    return cache, text, uncond, unet


def save_student(
    teacher: Path,
    unet: Any | None,
    out: Path,
    sampling: dict[str, Any],
    card: str,
    lora: Any | None = None,
) -> Path:
    """A diffusers folder: the teacher's components with the student's UNet (float32 safetensors) and
    its own sampling defaults (``unet=None``: the teacher's UNet files as they are, e.g. under a LoRA;
    ``lora``: a peft-adapted UNet whose adapter goes to ``lora/``). Written whole to a sibling and
    swapped in; ``out`` must be new, empty or a model folder (``files.check_model_out``)."""
    from ..files import check_model_out, plain_modes

    out = check_model_out(Path(out), "the student's folder")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(teacher, tmp)
    shutil.rmtree(tmp / "lora", ignore_errors=True)  # a LoRA teacher's adapter: the student replaces it
    if unet is not None:
        shutil.rmtree(tmp / "unet")
        unet.to(torch.float32).save_pretrained(tmp / "unet", safe_serialization=True)
    (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=1))
    (tmp / "MODEL_CARD.md").write_text(card)
    if lora is not None:  # before the swap: a kill after it left the teacher's UNet under LCM defaults
        from ..models.lora import save_lora

        save_lora(lora, tmp / "lora")
    plain_modes(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ship_student(student: Path, asset: Path, base: Path) -> Path:
    """A student folder as a package asset (``velodiff/assets/<name>``, see ``velodiff.shipped``): only
    what differs from ``base`` (its UNet in float16, or its ``lora/``), ``sampling.json`` and the card."""
    from diffusers import UNet2DConditionModel

    from ..models.weights import from_pretrained

    tmp = asset.with_name(asset.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if (student / "unet").is_dir() and not _same_file_tree(student / "unet", base / "unet"):
        unet = from_pretrained(UNet2DConditionModel, student, "unet")
        unet.to(torch.float16).save_pretrained(tmp / "unet", safe_serialization=True)
    for name in ("lora", "scheduler"):
        if (student / name).is_dir() and not _same_file_tree(student / name, base / name):
            shutil.copytree(student / name, tmp / name)
    weights = tmp / "lora" / "adapter_model.safetensors"
    if weights.is_file():  # the adapter in float16, as the shipped UNets
        from safetensors.torch import save_file

        from ..models.weights import load_file

        state = {k: v.to(torch.float16) for k, v in load_file(str(weights)).items()}
        save_file(state, str(weights), metadata={"format": "pt", "velodiff": "lora"})
    for name in (SAMPLING_FILE, "MODEL_CARD.md"):
        if (student / name).is_file():
            shutil.copy2(student / name, tmp / name)
    shutil.rmtree(asset, ignore_errors=True)
    tmp.rename(asset)
    return asset


def _same_file_tree(a: Path, b: Path) -> bool:
    if not b.is_dir():
        return False
    files = sorted(q.relative_to(a) for q in a.rglob("*") if q.is_file())
    return files == sorted(q.relative_to(b) for q in b.rglob("*") if q.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )
