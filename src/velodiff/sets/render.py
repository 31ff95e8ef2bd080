"""Rendering a set's images: one chunk of items as one batched ``text2img`` call, PNG bytes out; the
same function in process and on Ray workers. Determinism: ``threads`` CPU threads and torch's
deterministic algorithms, set before the model is loaded (:func:`load_model_checked`), so a chunk's
bytes do not depend on which process renders it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..errors import VelodiffError, first_line
from ..images import png_bytes
from .fingerprint import load_fingerprint
from .items import Item


def set_determinism(threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True, warn_only=True)


def render_chunk(model: Any, chunk: Sequence[Item], config: dict[str, Any]) -> list[tuple[int, bytes]]:
    """PNG bytes of one chunk's images, rendered as one batch."""
    from ..pipelines import text2img

    eta = config.get("eta")
    res = text2img(
        model,
        [it.prompt for it in chunk],
        seeds=[it.seed for it in chunk],
        negative=config.get("negative"),
        steps=config.get("steps"),
        nfe=config.get("nfe"),
        solver=config.get("solver"),
        grid=config.get("grid"),
        guidance=config.get("guidance"),
        guidance_rescale=float(config.get("guidance_rescale") or 0.0),
        solver_options={"eta": float(eta)} if eta is not None else None,
        plan=config.get("plan"),
        height=config.get("height"),
        width=config.get("width"),
        noise=config.get("noise", "velodiff"),
    )
    return [(it.index, png_bytes(im)) for it, im in zip(chunk, res.images, strict=True)]


def load_model_checked(model_path: str | os.PathLike[str], fingerprint: str, config: dict[str, Any]) -> Any:
    """The model, loaded with the set's load options (``store.LOAD_KEYS``), after checking it (and its
    config folder and LoRA files) is what the set was made with; threads and determinism set."""
    from ..models import load

    set_determinism(int(config["threads"]))
    if load_fingerprint(model_path, config.get("config"), config.get("lora")) != fingerprint:
        raise VelodiffError(f"model at {model_path} is not the one this set was made with")
    try:
        model = load(
            model_path,
            device=config.get("device") or "cpu",
            dtype=config.get("dtype") or "float32",
            config=config.get("config"),
            family=config.get("family"),
            prediction_type=config.get("prediction_type"),
            lora=config.get("lora"),
            lora_scale=config.get("lora_scale") or 1.0,
        )
    except VelodiffError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = first_line(e)
        raise VelodiffError(f"cannot load model {str(model_path)!r}: {msg}") from None
    from ..models.loading import set_clip_skip

    set_clip_skip(model, int(config.get("clip_skip") or 0))
    return model
