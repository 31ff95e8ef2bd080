"""Calibrated solvers and grids: fit the sampler to the model once, on a calibration batch, and use it on
any prompt (``velodiff calibrate solver``; ``--grid calibrated``, ``--solver dpm_solver_v3``).

``problem`` (what is calibrated on, and the reference), ``grids`` (GITS and the final-error descent),
``ems`` (DPM-Solver-v3's statistics), ``calibrate`` (the methods together), ``artefact`` (saved and found by
the model's hash and guidance scale)."""

from .artefact import find_entry, load_solver_calibration, load_statistics, save_solver_calibration
from .calibrate import METHODS, calibrate_solver, entry_options
from .ems import measure_statistics
from .grids import gits_grid, refine_grid
from .problem import Problem, denoiser_problem, model_problem

__all__ = [
    "METHODS",
    "Problem",
    "calibrate_solver",
    "denoiser_problem",
    "entry_options",
    "find_entry",
    "gits_grid",
    "load_solver_calibration",
    "load_statistics",
    "measure_statistics",
    "model_problem",
    "refine_grid",
    "save_solver_calibration",
]
