"""Configs for single-file checkpoints: diffusers needs a folder of component configs (and the
tokenizer files) to build modules from an original-layout checkpoint. Without the network they
come from ``config=`` (a local diffusers folder of the same architecture, e.g. a downloaded
pipeline folder without weights)."""

from __future__ import annotations

from pathlib import Path

from ..errors import VelodiffError
from .loading import Source


def single_file_config(family: str, src: Source, config: Path | None) -> Path:
    if config is not None:
        if not (config / "model_index.json").is_file():
            raise VelodiffError(f"config {str(config)!r} is not a diffusers folder (no model_index.json)")
        return config
    raise VelodiffError(
        f"{src.path.name} is a single-file {family} checkpoint; pass config= (CLI: --config) "
        f"a local diffusers "
        f"folder of the same architecture (its JSON configs and tokenizer; weights not needed)"
    )
