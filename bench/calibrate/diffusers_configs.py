"""Every diffusers scheduler configuration issue 11's bars compare a calibration with, and a runner that
samples any calibration problem (``velodiff.calibrated.Problem``: the shipped model under CFG, or the
exact Gaussian-mixture oracle) with one of them within an NFE budget.

A configuration is a scheduler class with Stable Diffusion 1.x's config and one of the flags a diffusers
user sets: the timestep spacing (leading, trailing, linspace), Karras / exponential / Lu (log-SNR) sigmas,
solver order 3, or the Align-Your-Steps timesteps (diffusers' published SD schedule, its sigmas
interpolated log-linearly to other step counts as the AYS authors describe). A flag the class does not
take is skipped, as is a class that cannot fit the NFE.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import torch

from velodiff.eval.solver_bench import SD_SCHEDULER_CONFIG

CLASSES = {
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "UniPCMultistep": "UniPCMultistepScheduler",
    "DEISMultistep": "DEISMultistepScheduler",
    "DPMSolverSinglestep": "DPMSolverSinglestepScheduler",
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
}
#: (label suffix, config overrides); "_ays" asks for the AYS timesteps
FLAGS = [
    ("", {}),
    ("trailing", {"timestep_spacing": "trailing"}),
    ("linspace", {"timestep_spacing": "linspace"}),
    ("karras", {"use_karras_sigmas": True}),
    ("exponential", {"use_exponential_sigmas": True}),
    ("lu", {"use_lu_lambdas": True}),
    ("order 3", {"solver_order": 3}),
    ("order 3 trailing", {"solver_order": 3, "timestep_spacing": "trailing"}),
    ("AYS", {"_ays": True}),
]


def configurations() -> list[tuple[str, str, dict]]:
    """(label, diffusers class name, overrides) for every class x flag the class accepts."""
    import diffusers

    out = []
    for short, cls_name in CLASSES.items():
        ok = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        for suffix, over in FLAGS:
            if all(k.startswith("_") or k in ok for k in over):
                out.append((f"{short} {suffix}".strip(), cls_name, over))
    return out


def ays_timesteps(steps: int, sigma_table: np.ndarray) -> list[int]:
    """diffusers' AYS SD timesteps, or their sigmas interpolated log-linearly to ``steps``."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    if steps == 10:
        return list(AysSchedules["StableDiffusionTimesteps"])
    sig = np.log(np.array(AysSchedules["StableDiffusionSigmas"][:-1]))
    new = np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(sig)), sig))
    ks = np.interp(np.log(new), np.log(sigma_table), np.arange(len(sigma_table)))
    out = sorted({int(round(k)) for k in ks}, reverse=True)
    return out if len(out) == steps else []


def _set_steps(sched, n: int, ays: bool, table: np.ndarray) -> bool:
    try:
        if ays:
            ts = ays_timesteps(n, table)
            if not ts:
                return False
            sched.set_timesteps(timesteps=ts)
        else:
            sched.set_timesteps(n)
    except (ValueError, TypeError):  # a class that takes no custom timesteps, or cannot make n steps
        return False
    return True


def run_diffusers(problem, cls_name: str, overrides: dict, nfe: int) -> tuple[torch.Tensor, bool] | None:
    """``problem``'s batch sampled by the configuration with the most steps whose model calls fit in
    ``nfe``: (the final samples, whether they end at sigma 0; DDIM's end at t = 0's noise level), or
    None when none fits."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    ok = inspect.signature(cls.__init__).parameters
    over = {k: v for k, v in overrides.items() if not k.startswith("_")}
    sched = cls(**{k: v for k, v in {**SD_SCHEDULER_CONFIG, **over}.items() if k in ok})
    abar = sched.alphas_cumprod.double()
    table = ((1 - abar) / abar).sqrt().numpy()
    if not any(_set_steps(sched, n, bool(overrides.get("_ays")), table) and len(sched.timesteps) <= nfe
               for n in range(nfe, 0, -1)):
        return None
    vp = problem.schedule
    x = problem.x.clone() * float(sched.init_noise_sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            s = float(np.interp(float(t), np.arange(len(table)), table))
            a = 1.0 / math.sqrt(1.0 + s * s)
            tv = min(float(vp.t_from_sigma_ve(torch.tensor(s, dtype=torch.float64))), vp.t_max)  # round-off
            x0 = problem.denoise(xin, tv)
            problem.evaluations += 1
            eps = (xin - a * x0) / (s * a)
            x = sched.step(eps, t, x).prev_sample
    if getattr(sched, "sigmas", None) is not None:
        zero = float(sched.sigmas[-1]) == 0.0
    else:
        zero = float(getattr(sched, "final_alpha_cumprod", 1.0)) == 1.0
    return x, zero
