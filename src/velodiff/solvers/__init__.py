"""Solvers: one file per family, registered here by name.

Each is a :class:`SolverSpec` whose ``step`` is a pure function (see ``base``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import VelodiffError
from .base import SolverSpec, StepContext
from .ddim import DDIM, DDPM
from .deis import DEIS, DEIS_3
from .dpm_2 import DPM_2, DPM_2_ANCESTRAL
from .dpm_fast import DPM_ADAPTIVE, DPM_FAST
from .dpm_solver import DPM_SOLVER_1, DPM_SOLVER_2, DPM_SOLVER_3, DPMPP_2S
from .dpm_solver_pp import DPMPP_2M, DPMPP_3M
from .dpm_solver_v3 import DPM_SOLVER_V3
from .dpmpp_2s_ancestral import DPMPP_2S_ANCESTRAL
from .dpmpp_sde import DPMPP_SDE
from .euler import EULER
from .euler_ancestral import EULER_ANCESTRAL
from .heun import HEUN
from .ipndm import IPNDM
from .lcm import LCM
from .lms import LMS
from .sde_dpm_solver_pp import SDE_DPMPP_2M, SDE_DPMPP_3M
from .unipc import UNIPC, UNIPC_3, UNIPC_BH1

SOLVERS: dict[str, SolverSpec] = {s.name: s for s in (DDIM, EULER, DDPM, DPMPP_2M, HEUN, EULER_ANCESTRAL)}
SOLVERS.update({s.name: s for s in (DPM_SOLVER_1, DPM_SOLVER_2, DPM_SOLVER_3, DPMPP_2S, DPMPP_3M)})
SOLVERS.update({s.name: s for s in (SDE_DPMPP_2M, SDE_DPMPP_3M, DPM_SOLVER_V3)})
SOLVERS.update({s.name: s for s in (UNIPC, UNIPC_BH1, UNIPC_3, DEIS, DEIS_3, IPNDM, LMS)})
# k-diffusion's samplers velodiff had no equivalent of (tests/test_kdiffusion_parity.py)
SOLVERS.update(
    {s.name: s for s in (DPM_2, DPM_2_ANCESTRAL, DPMPP_2S_ANCESTRAL, DPMPP_SDE, DPM_FAST, DPM_ADAPTIVE, LCM)}
)


def get_solver(name: str | SolverSpec, model_config: Mapping[str, Any] | None = None) -> SolverSpec:
    """A registered solver by name, or the solver another tool's name stands for (``velodiff.aliases``:
    "dpmpp_2m_sde", "DPM++ 2M Karras", "DPMSolverMultistepScheduler:solver_order=3", ...) with the
    alias's options as its defaults; a diffusers class on a model's scheduler ``model_config`` as
    ``Class.from_config`` makes it. An unknown name is refused with the nearest names."""
    if isinstance(name, SolverSpec):
        return name
    if not isinstance(name, str):
        raise VelodiffError(f"a solver is a name such as 'dpmpp_2m', got {type(name).__name__}")
    if name in SOLVERS:
        return SOLVERS[name]
    from ..aliases import resolve_solver

    r = resolve_solver(name, tuple(SOLVERS), model_config)
    if r.solver is None or r.solver not in SOLVERS:
        raise VelodiffError(f"solver {name!r} maps to {r.solver!r}, which this build does not provide")
    spec = SOLVERS[r.solver]
    if r.solver_options:
        spec.check_options(r.solver_options)  # (those a name gives, as unipc:order=2)
        spec = replace(spec, defaults={**spec.defaults, **r.solver_options})
    return spec


__all__ = ["SOLVERS", "SolverSpec", "StepContext", "get_solver"]
