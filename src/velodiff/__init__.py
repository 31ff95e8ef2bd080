"""velodiff: fast, controllable, measurable diffusion-model generation."""

from .denoisers import Cost, ModelDenoiser
from .errors import VelodiffError
from .grids import GRIDS, make_grid
from .guidance import ClassifierFreeGuidance, GuidedCond
from .plan import Plan
from .sampling import SampleResult, StepInfo, sample
from .schedules import EDM, ContinuousVP, DiscreteVP, NoiseSchedule, RectifiedFlow, get_schedule
from .solvers import SOLVERS, get_solver

__version__ = "0.1.0"


def __getattr__(name: str):  # velodiff.load without importing the model families up front
    if name == "load":
        from .models import load

        return load
    raise AttributeError(f"module 'velodiff' has no attribute {name!r}")


__all__ = [
    "EDM", "GRIDS", "SOLVERS", "ClassifierFreeGuidance", "ContinuousVP", "Cost", "DiscreteVP",
    "GuidedCond", "ModelDenoiser", "NoiseSchedule", "Plan", "RectifiedFlow", "SampleResult", "StepInfo",
    "VelodiffError", "get_schedule", "get_solver", "load", "make_grid", "sample",
]
