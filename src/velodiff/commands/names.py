"""Names the CLI checks before any model work, without importing the registries (they import torch).

``tests/test_cli_startup.py`` keeps these equal to the registries."""

from __future__ import annotations

import sys

from ..errors import unknown_name

#: the names of ``velodiff.solvers.SOLVERS``, in its order
SOLVER_NAMES = (
    "ddim", "euler", "ddpm", "dpmpp_2m", "heun", "euler_ancestral", "dpm_solver_1", "dpm_solver_2",
    "dpm_solver_3", "dpmpp_2s", "dpmpp_3m", "sde_dpmpp_2m", "sde_dpmpp_3m", "dpm_solver_v3", "unipc",
    "unipc_bh1", "unipc_3", "deis", "deis_3", "ipndm", "lms", "dpm_2", "dpm_2_ancestral",
    "dpmpp_2s_ancestral", "dpmpp_sde", "dpm_fast", "dpm_adaptive", "lcm",
)


def check_solver_name(name: str) -> None:
    """Refuse an unknown solver name with the registry's own message (``unknown solver 'x'; valid:
    ...``). When the registry is already imported (velodiff used as a library), it decides."""
    if "velodiff.solvers" in sys.modules:
        from ..solvers import get_solver

        get_solver(name)
    elif name not in SOLVER_NAMES:
        from ..aliases import resolve_solver

        resolve_solver(name, SOLVER_NAMES)  # another tool's name ("DPM++ 2M Karras"), or refused


#: the names of ``velodiff.grids.GRIDS``, in its order, and the model-fitted ``calibrated``
GRID_NAMES = (
    "uniform", "logsnr", "karras", "exponential", "polyexponential", "linspace", "leading", "trailing",
    "flow-shifted", "flux", "normal", "sgm_uniform", "simple", "ddim_uniform", "beta", "kl_optimal", "ays",
    "linear_quadratic", "lcm",
)


def check_grid_name(name: str) -> None:
    """Refuse an unknown grid name (``--grid``, a plan's ``grid=``) as the pipelines would, before any
    model loads: velodiff's names, ``calibrated`` and other tools' scheduler names (ComfyUI's, A1111's)."""
    from ..aliases import resolve_grid

    resolve_grid(name, (*GRID_NAMES, "calibrated"))


#: ``velodiff.denoisers.PREDICTION_TYPES``
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
#: ``velodiff.pipelines.common.NOISE_MODES``
NOISE_MODES = ("velodiff", "torch", "cuda", "a1111-cpu", "a1111-nv")
#: the modes that draw a whole call's images from one generator (an image depends on its batch)
BATCH_NOISE = ("torch", "cuda")
#: the weight dtypes the CLI offers (``velodiff.models.base.DTYPES`` also takes fp32 / bf16 / fp16)
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def check_name(kind: str, name: str, valid: tuple[str, ...]) -> None:
    if name not in valid:
        raise unknown_name(kind, name, valid)
