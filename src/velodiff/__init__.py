"""velodiff: fast, controllable, measurable diffusion-model generation.

The public names below are imported on first use (module ``__getattr__``), so ``import velodiff``
and the CLI's ``--help`` and early errors do not import torch; ``from velodiff import sample`` and
``velodiff.DiscreteVP`` work as before."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "Cost": "denoisers", "ModelDenoiser": "denoisers",
    "VelodiffError": "errors",
    "GRIDS": "grids", "make_grid": "grids",
    "ClassifierFreeGuidance": "guidance", "GuidedCond": "guidance", "Plan": "plan",
    "SampleResult": "sampling", "StepInfo": "sampling", "sample": "sampling",
    "EDM": "schedules", "ContinuousVP": "schedules", "DiscreteVP": "schedules", "NoiseSchedule": "schedules",
    "RectifiedFlow": "schedules", "get_schedule": "schedules",
    "SOLVERS": "solvers", "get_solver": "solvers",
    "load": "models",  # without importing the model families up front
    "invert": "pipelines.invert",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .denoisers import Cost, ModelDenoiser
    from .errors import VelodiffError
    from .grids import GRIDS, make_grid
    from .guidance import ClassifierFreeGuidance, GuidedCond
    from .models import load
    from .pipelines.invert import invert
    from .plan import Plan
    from .sampling import SampleResult, StepInfo, sample
    from .schedules import EDM, ContinuousVP, DiscreteVP, NoiseSchedule, RectifiedFlow, get_schedule
    from .solvers import SOLVERS, get_solver


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name.startswith("__"):  # dunder probes (pickle, inspect, doctest) are not submodules
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # `import velodiff; velodiff.sampling.sample`: submodules load on first access, as before
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "EDM", "GRIDS", "SOLVERS", "ClassifierFreeGuidance", "ContinuousVP", "Cost", "DiscreteVP",
    "GuidedCond", "ModelDenoiser", "NoiseSchedule", "Plan", "RectifiedFlow", "SampleResult", "StepInfo",
    "VelodiffError", "get_schedule", "get_solver", "invert", "load", "make_grid", "sample",
]
