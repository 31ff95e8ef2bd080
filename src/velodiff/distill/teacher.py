"""The teacher: an SD1-family diffusers folder (or a shipped name), checked up front in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import VelodiffError

#: file a student folder carries with its own sampling defaults (solver, steps, guidance, grid)
SAMPLING_FILE = "sampling.json"


def teacher_folder(teacher: str) -> Path:
    from ..shipped import resolve_model

    path = resolve_model(teacher)
    if not (path / "model_index.json").is_file() or not (path / "unet" / "config.json").is_file():
        raise VelodiffError(f"teacher {str(teacher)!r} is not a diffusers model folder with a unet")
    return path


def load_teacher(path: Path) -> dict[str, Any]:
    from ..models import load

    try:
        model = load(path)
    except VelodiffError as e:
        raise VelodiffError(f"teacher {str(path)!r}: {e}") from None
    comps = model.components
    for name in ("unet", "text_encoder", "vae", "tokenizer"):
        if name not in comps:
            raise VelodiffError(f"teacher {str(path)!r} has no {name} (expected an SD1-family model)")
    return comps


def sampling_defaults(path: Path) -> dict[str, Any]:
    f = Path(path) / SAMPLING_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def save_student(teacher: Path, unet: Any, out: Path, sampling: dict[str, Any], card: str) -> Path:
    """A diffusers folder: the teacher's components with the student's UNet (float32 safetensors) and
    its own sampling defaults. Written to a sibling and swapped in."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(teacher, tmp)
    shutil.rmtree(tmp / "unet")
    unet.to(torch.float32).save_pretrained(tmp / "unet", safe_serialization=True)
    (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=1))
    (tmp / "MODEL_CARD.md").write_text(card)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
