"""Solvers: one file per family, registered here by name.

Each is a :class:`SolverSpec` whose ``step`` is a pure function (see ``base``)."""

from __future__ import annotations

from ..errors import unknown_name
from .base import SolverSpec, StepContext
from .ddim import DDIM, DDPM, EULER
from .dpm_solver_pp import DPMPP_2M

SOLVERS: dict[str, SolverSpec] = {s.name: s for s in (DDIM, EULER, DDPM, DPMPP_2M)}


def get_solver(name: str | SolverSpec) -> SolverSpec:
    if isinstance(name, SolverSpec):
        return name
    if name not in SOLVERS:
        raise unknown_name("solver", name, SOLVERS)
    return SOLVERS[name]


__all__ = ["SOLVERS", "SolverSpec", "StepContext", "get_solver"]
