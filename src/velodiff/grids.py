"""Step grids: the decreasing times t_0 > t_1 > ... > t_N at which a solver steps.

A grid is independent of the solver. Each builder returns a float64 tensor of ``steps + 1`` times
that starts at the schedule's ``t_max`` (or ``t_start``) and ends at 0 (``final="zero"``: the last
step jumps to clean data, as diffusers' ``final_sigmas_type="zero"``) or at the smallest trained
time (``final="t_min"``). Grids defined in noise level (Karras, exponential, polyexponential) work
in sigma_ve = sigma / alpha, the k-diffusion convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import VelodiffError, unknown_name
from .schedules import F64, DiscreteVP, NoiseSchedule, RectifiedFlow

FINALS = ("zero", "t_min")


def _finish(sched: NoiseSchedule, ts: Tensor, final: str) -> Tensor:
    """Append the clean endpoint t = 0 when final == 'zero'."""
    if final not in FINALS:
        raise unknown_name("final", final, FINALS)
    ts = ts.to(F64)
    if final == "zero":
        ts = torch.cat([ts, torch.zeros(1, dtype=F64)])
    return ts


def _span(sched: NoiseSchedule, t_start: float | None) -> tuple[float, float]:
    hi = sched.t_max if t_start is None else float(t_start)
    if not sched.t_min <= hi <= sched.t_max * (1 + 1e-12):
        raise VelodiffError(
            f"t_start={hi:g} is outside the schedule's range [{sched.t_min:g}, {sched.t_max:g}]"
        )
    return hi, sched.t_min


def uniform_t(sched: NoiseSchedule, steps: int, final: str = "zero", t_start: float | None = None) -> Tensor:
    """Equally spaced in t from t_start to t_min (DPM-Solver's 'time_uniform')."""
    hi, lo = _span(sched, t_start)
    return _finish(sched, torch.linspace(hi, lo, steps if final == "zero" else steps + 1, dtype=F64), final)


def uniform_log_snr(
    sched: NoiseSchedule, steps: int, final: str = "zero", t_start: float | None = None
) -> Tensor:
    """Equally spaced in lambda = log-SNR (DPM-Solver's 'logSNR'; Lu et al. 2022, Sec. 3.3)."""
    hi, lo = _span(sched, t_start)
    lam_hi, lam_lo = sched.log_snr(hi), sched.log_snr(lo)
    if not torch.isfinite(lam_hi):  # alpha(t_max) = 0 (flow, zero-SNR): start from the next finite value
        lam_hi = sched.log_snr(hi - 1e-3 * (hi - lo))
    lams = torch.linspace(float(lam_hi), float(lam_lo), steps if final == "zero" else steps + 1, dtype=F64)
    ts = sched.t_from_log_snr(lams)
    ts[-1] = lo
    ts[0] = hi  # after ts[-1]: a one-point grid (steps=1, final="zero") starts at hi
    return _finish(sched, ts, final)


def _sigma_span(sched: NoiseSchedule, t_start: float | None) -> tuple[float, float, float]:
    hi, lo = _span(sched, t_start)
    s_max = float(sched.sigma_ve(hi))
    if not math.isfinite(s_max):
        s_max = float(sched.sigma_ve(hi - 1e-3 * (hi - lo)))
    return hi, s_max, float(sched.sigma_ve(lo))


def _from_sigmas(sched: NoiseSchedule, sigmas: Tensor, hi: float, final: str) -> Tensor:
    ts = sched.t_from_sigma_ve(sigmas)
    ts[-1] = sched.t_min
    ts[0] = hi  # after ts[-1]: a one-point grid (steps=1, final="zero") starts at hi
    return _finish(sched, ts, final)


def karras(
    sched: NoiseSchedule, steps: int, final: str = "zero", t_start: float | None = None, rho: float = 7.0
) -> Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    hi, s_max, s_min = _sigma_span(sched, t_start)
    n = steps if final == "zero" else steps + 1
    ramp = torch.linspace(0, 1, n, dtype=F64)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _from_sigmas(sched, sigmas, hi, final)


def exponential(
    sched: NoiseSchedule, steps: int, final: str = "zero", t_start: float | None = None
) -> Tensor:
    """Equally spaced in log sigma_ve (k-diffusion's get_sigmas_exponential)."""
    hi, s_max, s_min = _sigma_span(sched, t_start)
    n = steps if final == "zero" else steps + 1
    sigmas = torch.exp(torch.linspace(math.log(s_max), math.log(s_min), n, dtype=F64))
    return _from_sigmas(sched, sigmas, hi, final)


def polyexponential(
    sched: NoiseSchedule, steps: int, final: str = "zero", t_start: float | None = None, rho: float = 1.0
) -> Tensor:
    """k-diffusion's get_sigmas_polyexponential: log sigma interpolated with ramp**rho."""
    hi, s_max, s_min = _sigma_span(sched, t_start)
    n = steps if final == "zero" else steps + 1
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
    sigmas = torch.exp(ramp * (math.log(s_max) - math.log(s_min)) + math.log(s_min))
    return _from_sigmas(sched, sigmas, hi, final)


def _discrete_timesteps(sched: NoiseSchedule, spacing: str, steps: int, steps_offset: int = 0) -> Tensor:
    """diffusers' timestep spacings (Lin et al. 2023, Table 2), as integer timesteps k."""
    if not isinstance(sched, DiscreteVP):
        raise VelodiffError(f"grid {spacing!r} needs a discrete schedule, not {sched.kind!r}")
    n = sched.num_train_timesteps
    if steps > n:
        raise VelodiffError(f"{steps} steps exceed the schedule's {n} trained timesteps")
    if spacing == "linspace":
        ks = torch.linspace(0, n - 1, steps, dtype=F64).round().flip(0)
    elif spacing == "leading":
        ratio = n // steps
        ks = (torch.arange(steps, dtype=F64) * ratio).round().flip(0) + steps_offset
    else:  # trailing
        ratio = n / steps
        # = diffusers' np.arange(n, 0, -ratio).round() - 1, which for some steps (e.g. 121) rounds
        # into one extra timestep, -1; this always gives `steps` of them
        ks = (n - torch.arange(steps, dtype=F64) * ratio).round() - 1
    return ks


def _spacing(spacing: str) -> Callable[..., Tensor]:
    def grid(
        sched: NoiseSchedule,
        steps: int,
        final: str = "zero",
        t_start: float | None = None,
        steps_offset: int = 0,
    ) -> Tensor:
        if t_start is not None:
            raise VelodiffError(f"grid {spacing!r} always starts where diffusers starts it; use another grid")
        ks = _discrete_timesteps(sched, spacing, steps, int(steps_offset))
        assert isinstance(sched, DiscreteVP)
        ts = sched.t_from_timestep(ks)
        if final == "t_min" and float(ts[-1]) != sched.t_min:
            ts = torch.cat([ts, torch.tensor([sched.t_min], dtype=F64)])
        return _finish(sched, ts, final) if final == "zero" else ts

    grid.__doc__ = (
        f"diffusers' timestep_spacing='{spacing}' over the trained integer timesteps"
        " (steps_offset applies to 'leading', as in diffusers)."
    )
    return grid


def flow_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's time shift (Esser et al. 2024, Eq. 23): t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_shifted(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    shift: float | None = None,
) -> Tensor:
    """Uniform t then SD3/Flux's shift (diffusers' FlowMatchEulerDiscreteScheduler grid).

    ``shift`` defaults to the schedule's own (``RectifiedFlow.shift``), else 1. The grid starts at
    ``t_start`` itself (the uniform ramp starts at the shift's inverse of it) and ends, as diffusers'
    does, at the shifted t_min."""
    hi, lo = _span(sched, t_start)
    s = shift if shift is not None else (sched.shift if isinstance(sched, RectifiedFlow) else 1.0)
    n = steps if final == "zero" else steps + 1
    u_hi = hi / (s - (s - 1.0) * hi)  # inverse of flow_shift; = hi for t_start None (hi = 1) or s = 1
    ts = flow_shift(torch.linspace(u_hi, lo, n, dtype=F64), s)
    ts[0] = hi
    return _finish(sched, ts, final)


GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_t,
    "logsnr": uniform_log_snr,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "linspace": _spacing("linspace"),
    "leading": _spacing("leading"),
    "trailing": _spacing("trailing"),
    "flow-shifted": flow_shifted,
}


def make_grid(
    name: str | Sequence[float],
    sched: NoiseSchedule,
    steps: int | None = None,
    final: str = "zero",
    **options: float,
) -> Tensor:
    """A grid by name (see ``GRIDS``), or an explicit decreasing list of times, validated."""
    if isinstance(name, str):
        if name not in GRIDS:
            raise unknown_name("grid", name, GRIDS)
        if steps is None or steps < 1:
            raise VelodiffError(f"grid {name!r} needs steps >= 1, got {steps}")
        ts = GRIDS[name](sched, steps, final=final, **options)
    else:
        ts = torch.as_tensor(list(name), dtype=F64)
    check_grid(sched, ts)
    return ts


def check_grid(sched: NoiseSchedule, ts: Tensor) -> None:
    if ts.ndim != 1 or len(ts) < 2:
        raise VelodiffError("a grid needs at least two times (one step)")
    if not bool(torch.isfinite(ts).all()):
        raise VelodiffError("grid times must be finite")
    sched.check_range(ts)
    if not bool((ts[1:] < ts[:-1]).all()):
        raise VelodiffError("grid times must be strictly decreasing")
    if 0.0 < float(ts[-1]) < sched.t_min * (1 - 1e-9) or float(ts[-2]) < sched.t_min * (1 - 1e-9):
        raise VelodiffError(
            f"grid times below the smallest trained time t_min={sched.t_min:g} (only the final time may be 0)"
        )
