"""Real checkpoints as velodiff denoisers: ``load(path) -> LoadedModel``.

    from velodiff.models import load
    model = load("path/to/stable-diffusion-v1-5", dtype="float16", device="cuda")

Families live one per module and register themselves (``register_family``); ``FAMILIES`` lists
them. Importing this package is cheap: diffusers is imported when a model is built.
"""

from __future__ import annotations

import importlib

from .base import FAMILIES, FamilySpec, LoadedModel, NetworkDenoiser, UNetNetwork, register_family
from .loading import Source, inspect_source, load

#: modules that register families when imported (one per family file)
FAMILY_MODULES = [
    "velodiff.models.sd",
    "velodiff.models.sdxl",
    "velodiff.models.sd3",
    "velodiff.models.flux",
    "velodiff.models.pixart",
]


def _register_builtin() -> None:
    for name in FAMILY_MODULES:
        importlib.import_module(name)


_register_builtin()

__all__ = [
    "FAMILIES",
    "FAMILY_MODULES",
    "FamilySpec",
    "LoadedModel",
    "NetworkDenoiser",
    "Source",
    "UNetNetwork",
    "inspect_source",
    "load",
    "register_family",
]
