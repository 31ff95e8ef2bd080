"""Step grids: the decreasing times t_0 > t_1 > ... > t_N at which a solver steps.

A grid is independent of the solver. Each builder returns a float64 tensor of ``steps + 1`` times
that starts at the schedule's ``t_max`` (or ``t_start``) and ends at 0 (``final="zero"``: the last
step jumps to clean data, as diffusers' ``final_sigmas_type="zero"``) or at the smallest trained
time (``final="t_min"``). Grids defined in noise level (Karras, exponential, polyexponential) work
in sigma_ve = sigma / alpha, the k-diffusion convention.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import VelodiffError, unknown_name
from .limits import MAX_GRID_STEPS, is_integer
from .schedules import F64, DiscreteVP, NoiseSchedule, RectifiedFlow

FINALS = ("zero", "t_min")


def _finish(ts: Tensor, final: str) -> Tensor:
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
    return _finish(torch.linspace(hi, lo, steps if final == "zero" else steps + 1, dtype=F64), final)


def _n_points(steps: int, final: str, repeat_final: bool = False) -> int:
    """How many levels a grid defined by its two ends spaces: ``steps`` before a final 0, ``steps + 1``
    to t_min, and with ``repeat_final`` ``steps`` to t_min. That option is diffusers' grid for
    final_sigmas_type="sigma_min" with its Karras / exponential / Lu sigmas: its ``steps`` levels end at
    t_min and it appends t_min again, a last step of length zero that does not move the sample (its
    evaluation is spent and discarded); velodiff drops that step, so the grid is the ``steps`` levels,
    ``steps - 1`` steps with the same result."""
    if not repeat_final:
        return steps if final == "zero" else steps + 1
    if final != "t_min" or steps < 2:
        raise VelodiffError(f"repeat_final needs final='t_min' and steps >= 2, got final={final!r}, {steps}")
    return steps


def uniform_log_snr(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    repeat_final: bool = False,
) -> Tensor:
    """Equally spaced in lambda = log-SNR (DPM-Solver's 'logSNR'; Lu et al. 2022, Sec. 3.3; diffusers'
    use_lu_lambdas). ``repeat_final``: diffusers' final_sigmas_type="sigma_min" form (``_n_points``)."""
    hi, lo = _span(sched, t_start)
    lam_hi, lam_lo = sched.log_snr(hi), sched.log_snr(lo)
    if not torch.isfinite(lam_hi):  # alpha(t_max) = 0 (flow, zero-SNR): start from the next finite value
        lam_hi = sched.log_snr(hi - 1e-3 * (hi - lo))
    lams = torch.linspace(float(lam_hi), float(lam_lo), _n_points(steps, final, repeat_final), dtype=F64)
    ts = sched.t_from_log_snr(lams)
    ts[-1] = lo
    ts[0] = hi  # after ts[-1]: a one-point grid (steps=1, final="zero") starts at hi
    return _finish(ts, final)


def _sigma_span(
    sched: NoiseSchedule,
    t_start: float | None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[float, float, float, float]:
    """(t of the first point, t of the last, sigma_max, sigma_min) in sigma_ve = sigma / alpha: the
    schedule's own range unless ``sigma_min`` / ``sigma_max`` are given (k-diffusion's and ComfyUI's
    explicit bounds), which must lie inside it (a network is not evaluated where it was not trained)."""
    hi, lo = _span(sched, t_start)
    s_top = float(sched.sigma_ve(hi))
    if not math.isfinite(s_top):
        s_top = float(sched.sigma_ve(hi - 1e-3 * (hi - lo)))
    s_bottom = float(sched.sigma_ve(lo))
    s_max = s_top if sigma_max is None else float(sigma_max)
    s_min = s_bottom if sigma_min is None else float(sigma_min)
    tol = 1e-9
    if not s_bottom * (1 - tol) <= s_min < s_max <= s_top * (1 + tol):
        raise VelodiffError(
            f"sigma_min={s_min:g}, sigma_max={s_max:g}: need {s_bottom:.6g} <= sigma_min < sigma_max <= "
            f"{s_top:.6g}, the schedule's noise levels (sigma / alpha) from t_min to the start"
        )
    s_min, s_max = max(s_min, s_bottom), min(s_max, s_top)
    if sigma_max is not None:
        hi = min(float(sched.t_from_sigma_ve(s_max)), hi)
    if sigma_min is not None:
        lo = max(float(sched.t_from_sigma_ve(s_min)), lo)
    return hi, lo, s_max, s_min


def _from_sigmas(sched: NoiseSchedule, sigmas: Tensor, hi: float, lo: float, final: str) -> Tensor:
    ts = sched.t_from_sigma_ve(sigmas)
    ts[-1] = lo
    ts[0] = hi  # after ts[-1]: a one-point grid (steps=1, final="zero") starts at hi
    return _finish(ts, final)


def _spaced_bounds(
    sched: NoiseSchedule,
    steps: int,
    spacing: str | None,
    steps_offset: int,
    sigma_min: float | None,
    sigma_max: float | None,
) -> tuple[float | None, float | None]:
    """The sigma range of diffusers' Euler-type schedulers (Euler, Heun, LMS, KDPM2, DPMSolverSDE) with
    Karras or exponential sigmas: they convert the sigmas of their ``timestep_spacing``'s timesteps at
    this step count, so the range is those timesteps' (``leading`` at 6 steps: k = 1 ... 834, sigma_max
    5.9 on SD, not 14.6); explicit bounds win, as there. None: the schedule's range."""
    if spacing is None:
        return sigma_min, sigma_max
    if spacing not in ("linspace", "leading", "trailing"):
        raise unknown_name("timestep_spacing", spacing, ("linspace", "leading", "trailing"))
    ks = _discrete_timesteps(sched, spacing, steps, int(steps_offset))
    top, bottom = (float(sched.sigma_ve(sched.t_from_timestep(ks[j : j + 1]))) for j in (0, len(ks) - 1))
    return (bottom if sigma_min is None else sigma_min), (top if sigma_max is None else sigma_max)


def karras(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    repeat_final: bool = False,
    timestep_spacing: str | None = None,
    steps_offset: int = 0,
) -> Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    ``sigma_min`` / ``sigma_max`` (sigma / alpha) default to the schedule's range, or with
    ``timestep_spacing`` (and ``steps_offset``) to that of diffusers' spaced timesteps at this step
    count (Euler-type schedulers, ``_spaced_bounds``); ``repeat_final``: diffusers'
    final_sigmas_type="sigma_min" form (``_n_points``)."""
    if not (isinstance(rho, int | float) and 0 < rho < math.inf):
        raise ValueError(f"rho must be a number above 0, got {rho!r}")
    sigma_min, sigma_max = _spaced_bounds(sched, steps, timestep_spacing, steps_offset, sigma_min, sigma_max)
    hi, lo, s_max, s_min = _sigma_span(sched, t_start, sigma_min, sigma_max)
    n = _n_points(steps, final, repeat_final)
    ramp = torch.linspace(0, 1, n, dtype=F64)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _from_sigmas(sched, sigmas, hi, lo, final)


def exponential(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    repeat_final: bool = False,
    timestep_spacing: str | None = None,
    steps_offset: int = 0,
) -> Tensor:
    """Equally spaced in log sigma_ve (k-diffusion's get_sigmas_exponential); ``sigma_min`` /
    ``sigma_max`` (sigma / alpha) default to the schedule's range, or to that of ``timestep_spacing``
    as :func:`karras`; ``repeat_final``: diffusers' final_sigmas_type="sigma_min" form (``_n_points``)."""
    sigma_min, sigma_max = _spaced_bounds(sched, steps, timestep_spacing, steps_offset, sigma_min, sigma_max)
    hi, lo, s_max, s_min = _sigma_span(sched, t_start, sigma_min, sigma_max)
    n = _n_points(steps, final, repeat_final)
    sigmas = torch.exp(torch.linspace(math.log(s_max), math.log(s_min), n, dtype=F64))
    return _from_sigmas(sched, sigmas, hi, lo, final)


def polyexponential(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    rho: float = 1.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """k-diffusion's get_sigmas_polyexponential: log sigma interpolated with ramp**rho."""
    hi, lo, s_max, s_min = _sigma_span(sched, t_start, sigma_min, sigma_max)
    n = steps if final == "zero" else steps + 1
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
    sigmas = torch.exp(ramp * (math.log(s_max) - math.log(s_min)) + math.log(s_min))
    return _from_sigmas(sched, sigmas, hi, lo, final)


def _discrete_timesteps(
    sched: NoiseSchedule, spacing: str, steps: int, steps_offset: int = 0, drop_last: bool = False
) -> Tensor:
    """diffusers' timestep spacings (Lin et al. 2023, Table 2), as integer timesteps k. ``drop_last``:
    the multistep schedulers' form (DPMSolverMultistep, UniPC, DEIS), which spaces steps + 1 points
    and drops the last ('linspace' then ends above k = 0; 'leading' uses the ratio N // (steps + 1))."""
    if not isinstance(sched, DiscreteVP):
        raise VelodiffError(f"grid {spacing!r} needs a discrete schedule, not {sched.kind!r}")
    n = sched.num_train_timesteps
    if steps > n:
        raise VelodiffError(f"{steps} steps exceed the schedule's {n} trained timesteps")
    m = steps + 1 if drop_last and spacing != "trailing" else steps
    if spacing == "linspace":
        ks = torch.linspace(0, n - 1, m, dtype=F64).round().flip(0)
    elif spacing == "leading":
        ratio = n // m
        ks = (torch.arange(m, dtype=F64) * ratio).round().flip(0) + steps_offset
    else:  # trailing
        ratio = n / steps
        # = diffusers' np.arange(n, 0, -ratio).round() - 1, which for some steps (e.g. 121) rounds
        # into one extra timestep, -1; this always gives `steps` of them
        ks = (n - torch.arange(steps, dtype=F64) * ratio).round() - 1
    return ks[:steps]


def _spacing(spacing: str) -> Callable[..., Tensor]:
    def grid(
        sched: NoiseSchedule,
        steps: int,
        final: str = "zero",
        t_start: float | None = None,
        steps_offset: int = 0,
        drop_last: bool = False,
        fractional: bool = False,
    ) -> Tensor:
        if t_start is not None:
            raise VelodiffError(f"grid {spacing!r} always starts where diffusers starts it; use another grid")
        if fractional and spacing != "linspace":
            raise VelodiffError(f"grid {spacing!r}: fractional applies to 'linspace' only")
        if fractional and not isinstance(sched, DiscreteVP):
            raise VelodiffError(f"grid {spacing!r}: fractional interpolates a discrete schedule's table")
        if fractional:  # diffusers' Euler family: k unrounded, sigma interpolated linearly in k
            n = sched.num_train_timesteps
            ks = torch.linspace(0, n - 1, steps, dtype=F64).flip(0)
            table = sched.sigma_ve(sched.t_from_timestep(torch.arange(n, dtype=F64)))
            lo = ks.floor().clamp(max=n - 2).long()
            w = ks - lo
            sig = (1 - w) * table[lo] + w * table[lo + 1]
            ts = torch.where(w == 0, sched.t_from_timestep(ks), sched.t_from_sigma_ve(sig))
        else:
            ks = _discrete_timesteps(sched, spacing, steps, int(steps_offset), bool(drop_last))
            assert isinstance(sched, DiscreteVP)
            ts = sched.t_from_timestep(ks)
        if final == "t_min" and float(ts[-1]) != sched.t_min:
            ts = torch.cat([ts, torch.tensor([sched.t_min], dtype=F64)])
        return _finish(ts, final) if final == "zero" else ts

    grid.__doc__ = (
        f"diffusers' timestep_spacing='{spacing}' over the trained integer timesteps"
        " (steps_offset applies to 'leading', as in diffusers; drop_last=True is the multistep"
        " schedulers' variant; fractional=True the Euler family's unrounded 'linspace')."
    )
    return grid


def flow_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's time shift (Esser et al. 2024, Eq. 23): t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_unshift(t: float, shift: float) -> float:
    """The inverse of :func:`flow_shift`: t = t' / (s - (s - 1) t')."""
    return t / (shift - (shift - 1.0) * t)


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
    u_hi = flow_unshift(hi, s)  # = hi for t_start None (hi = 1) or s = 1
    # a shift below 1 moves t_min below itself: the ramp then ends at its inverse, the grid at t_min
    u_lo = lo if s >= 1.0 else flow_unshift(lo, s)
    ts = flow_shift(torch.linspace(u_hi, u_lo, n, dtype=F64), s)
    ts[0] = hi
    return _finish(ts, final)


def flux(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    shift: float | None = None,
) -> Tensor:
    """Flux's grid (the reference code's ``get_schedule``, diffusers' FluxPipeline sigmas
    linspace(1, 1/N, N) + [0]): ``steps`` times uniform from t_start (default 1) towards 0, then
    time-shifted; unlike "flow-shifted" the ramp runs to 0, so its last time is the shift of 1/N, not
    t_min. ``shift`` defaults to the schedule's own (Flux's grows with the image's size:
    ``model.grid_options(height, width)``); flows only."""
    if not isinstance(sched, RectifiedFlow):
        raise VelodiffError(f"grid 'flux' is a rectified flow's grid, not for a {sched.kind!r} schedule")
    hi, _ = _span(sched, t_start)
    s = sched.shift if shift is None else shift
    ts = flow_shift(torch.linspace(flow_unshift(hi, s), 0.0, steps + 1, dtype=F64)[:-1], s)
    ts[0] = hi
    if final == "t_min":
        return torch.cat([ts, torch.tensor([sched.t_min], dtype=F64)])
    return _finish(ts, final)


# --- grids as other tools' schedulers define them ------------------------------------------------
#
# ComfyUI's schedulers index the model's table of N trained noise levels (timesteps k = 0..N-1, sigma
# ascending with k). The grids below are written from those definitions (the scheduler's documented
# behaviour, not its code): a discrete schedule's trained times t = (k + 1) / N; a rectified flow's
# levels are ComfyUI's ModelSamplingDiscreteFlow ones, shift(k / N) for k = 1..N; any other schedule
# gets N = 1000 levels equally spaced in t. Each grid ends at sigma = 0 (final="zero", as ComfyUI) or,
# for final="t_min", at the smallest level.

LEVELS = 1000


def _n_levels(sched: NoiseSchedule) -> int:
    return sched.num_train_timesteps if isinstance(sched, DiscreteVP) else LEVELS


def _level(sched: NoiseSchedule, k: Tensor, shift: float | None = None) -> Tensor:
    """The time of (fractional) level k in [0, N - 1]. Between trained levels of a discrete schedule
    log sigma_ve is interpolated linearly in k (ComfyUI's ModelSamplingDiscrete.sigma); a flow's and the
    generic levels are linear in k before the shift (a flow's ``shift``, default its schedule's: Flux's
    grows with the image, ComfyUI's ModelSamplingFlux)."""
    n = _n_levels(sched)
    k = k.to(F64).clamp(0, n - 1)
    if isinstance(sched, DiscreteVP):
        lo, hi = k.floor(), k.ceil()
        log_s = torch.log(sched.sigma_ve(sched.t_from_timestep(torch.stack([lo, hi]))))
        w = k - lo
        ts = sched.t_from_sigma_ve(torch.exp((1 - w) * log_s[0] + w * log_s[1]))
        exact = w == 0  # trained levels exactly, not through the sigma round trip
        return torch.where(exact, sched.t_from_timestep(lo), ts)
    if isinstance(sched, RectifiedFlow):
        s = sched.shift if shift is None else shift
        return flow_shift((k + 1) / n, s).clamp(sched.t_min, sched.t_max)
    return sched.t_min + (sched.t_max - sched.t_min) * k / (n - 1)


def _end(sched: NoiseSchedule, ts: Tensor, final: str) -> Tensor:
    """ComfyUI's grids end with sigma = 0; final="t_min" ends at the smallest level instead."""
    if final == "t_min" and float(ts[-1]) > sched.t_min:
        ts = torch.cat([ts, torch.tensor([sched.t_min], dtype=F64)])
    return _finish(ts, final)


def _no_start(name: str, t_start: float | None, sched: NoiseSchedule, shift: float | None = None) -> None:
    """Refuse what a grid of ComfyUI's levels does not take: a start (it starts at the top level) and a
    shift on a schedule that is not a flow."""
    if t_start is not None:
        raise VelodiffError(f"grid {name!r} starts at the schedule's top, as defined; use another grid")
    if shift is not None and not isinstance(sched, RectifiedFlow):
        raise VelodiffError(f"grid {name!r}: shift is a rectified flow's option, not for {sched.kind}")


def _level_grid(name: str, levels: Callable[[int, int], Tensor]) -> Callable[..., Tensor]:
    """A ComfyUI scheduler that picks ``levels(N, steps)`` (fractional level indices, top first) of the
    model's N levels, then sigma = 0; its docstring is ``levels``'."""

    def grid(
        sched: NoiseSchedule,
        steps: int,
        final: str = "zero",
        t_start: float | None = None,
        shift: float | None = None,
    ) -> Tensor:
        _no_start(name, t_start, sched, shift)
        return _end(sched, _level(sched, levels(_n_levels(sched), steps), shift), final)

    grid.__name__, grid.__doc__ = name, levels.__doc__
    return grid


def _normal(n: int, steps: int) -> Tensor:
    """ComfyUI's "normal" scheduler: ``steps`` levels equally spaced in (fractional) timestep from the
    top level N - 1 down to 0, then sigma = 0."""
    return torch.linspace(n - 1, 0, steps, dtype=F64)


def _sgm_uniform(n: int, steps: int) -> Tensor:
    """ComfyUI's "sgm_uniform" (Stability's generative-models discretization): ``steps + 1`` levels
    equally spaced in timestep from N - 1 to 0, the last (level 0) replaced by sigma = 0."""
    return torch.linspace(n - 1, 0, steps + 1, dtype=F64)[:-1]


def _simple(n: int, steps: int) -> Tensor:
    """ComfyUI's "simple": every (N / steps)-th trained level from the top, level N - 1 - floor(i N /
    steps) for i = 0..steps-1, then sigma = 0."""
    return torch.tensor([n - 1 - math.floor(i * n / steps) for i in range(steps)], dtype=F64)


def _ddim_uniform(n: int, steps: int) -> Tensor:
    """ComfyUI's "ddim_uniform": levels 1, 1 + c, 1 + 2c, ... below N with c = max(N // steps, 1),
    from the top, then sigma = 0. As in ComfyUI the count can differ from ``steps`` where c does not
    divide N - 1 well (SD, 7 steps: 8)."""
    return torch.arange(1, n, max(n // steps, 1), dtype=F64).flip(0)


normal = _level_grid("normal", _normal)
sgm_uniform = _level_grid("sgm_uniform", _sgm_uniform)
simple = _level_grid("simple", _simple)
ddim_uniform = _level_grid("ddim_uniform", _ddim_uniform)


def beta(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    alpha: float = 0.6,
    beta: float = 0.6,
    shift: float | None = None,
) -> Tensor:
    """Beta sampling (Lee et al. 2024, "Beta Sampling is All You Need", Sec. 3; ComfyUI's "beta"):
    levels at the Beta(alpha, beta) quantiles, k_i = round(F^-1(1 - i / steps) (N - 1)) for
    i = 0..steps-1 (F the Beta CDF; alpha = beta = 0.6 spends more steps at both ends), repeated
    levels dropped, then sigma = 0."""
    from scipy.stats import beta as beta_dist

    _no_start("beta", t_start, sched, shift)
    if not (alpha > 0 and beta > 0):
        raise VelodiffError(f"grid 'beta' needs alpha > 0 and beta > 0, got {alpha:g}, {beta:g}")
    n = _n_levels(sched)
    qs = 1.0 - torch.arange(steps, dtype=F64) / steps
    ks = torch.from_numpy(beta_dist.ppf(qs.numpy(), alpha, beta)).to(F64).mul(n - 1).round()
    ks = torch.unique_consecutive(ks)
    return _end(sched, _level(sched, ks, shift), final)


def kl_optimal(sched: NoiseSchedule, steps: int, final: str = "zero", t_start: float | None = None) -> Tensor:
    """The KL-optimal schedule of Align Your Steps (Sabour et al. 2024, Eq. 6 / ComfyUI's "kl_optimal"):
    sigma_i = tan(atan(sigma_max) + i / (steps - 1) (atan(sigma_min) - atan(sigma_max))), then 0."""
    hi, lo, s_max, s_min = _sigma_span(sched, t_start)
    n = steps if final == "zero" else steps + 1
    ramp = torch.linspace(0, 1, n, dtype=F64)
    sigmas = torch.tan(math.atan(s_max) + ramp * (math.atan(s_min) - math.atan(s_max)))
    return _from_sigmas(sched, sigmas, hi, lo, final)


def linear_quadratic(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    threshold_noise: float = 0.025,
    linear_steps: int | None = None,
) -> Tensor:
    """The linear-quadratic t-schedule of Movie Gen (Polyak et al. 2024, Sec. 3.1.6; Mochi; ComfyUI's
    "linear_quadratic"), for rectified flows. With N = ``steps``, L = ``linear_steps`` (default N // 2)
    and theta = ``threshold_noise``, the fraction of noise removed before step i is

        u_i = theta i / L                          for i < L   (small, equal steps at high noise)
        u_i = a i^2 + b i + c                      for L <= i <= N,

    the quadratic that continues the line with the same value and slope at i = L and reaches u_N = 1
    (a = (L - theta N) / (L (N - L)^2), b = theta / L - 2 a L, c = a L^2); t_i = 1 - u_i."""
    _no_start("linear_quadratic", t_start, sched)
    if not isinstance(sched, RectifiedFlow):
        raise VelodiffError(f"grid 'linear_quadratic' is defined for rectified flows, not {sched.kind!r}")
    n = steps
    lin = n // 2 if linear_steps is None else int(linear_steps)
    if n == 1:
        u = torch.zeros(1, dtype=F64)
    else:
        if not 0 < lin < n or not 0 < threshold_noise < 1:
            raise VelodiffError(
                "grid 'linear_quadratic' needs 0 < linear_steps < steps and 0 < threshold_noise < 1"
            )
        i = torch.arange(n, dtype=F64)
        a = (lin - threshold_noise * n) / (lin * (n - lin) ** 2)
        b = threshold_noise / lin - 2 * a * lin
        u = torch.where(i < lin, threshold_noise * i / lin, a * i**2 + b * i + a * lin**2)
    ts = (1.0 - u).clamp(min=sched.t_min)
    ts[0] = min(float(ts[0]), sched.t_max)
    return _end(sched, ts, final)


#: Align Your Steps (Sabour et al. 2024): the 10-step schedules NVIDIA published and diffusers ships
#: (``diffusers.schedulers.scheduling_utils.AysSchedules``): trained timesteps for SD 1.5 and SDXL,
#: sigma / alpha for Stable Video Diffusion (an EDM model). Ten evaluation points each; the grid adds
#: the final point.
AYS_TIMESTEPS = {
    "sd": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13),
}
AYS_SIGMAS = {"svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034)}


def loglinear_interp(levels: Tensor, n: int) -> Tensor:
    """The AYS authors' rule for other step counts: log of the decreasing ``levels`` interpolated
    linearly over their index, resampled at ``n`` equally spaced points (ends kept)."""
    xs = torch.linspace(0, 1, len(levels), dtype=F64)
    new = torch.linspace(0, 1, n, dtype=F64)
    idx = torch.searchsorted(xs, new, right=True).clamp(1, len(xs) - 1)
    x0, x1 = xs[idx - 1], xs[idx]
    y = torch.log(levels.to(F64))
    w = (new - x0) / (x1 - x0)
    return torch.exp(y[idx - 1] + w * (y[idx] - y[idx - 1]))


def ays(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    model: str | None = None,
) -> Tensor:
    """Align Your Steps (Sabour et al. 2024) as published for ``model`` ("sd", "sdxl", "svd"; default
    "sd", "svd" for an EDM schedule). At 10 steps: the published points, then the final one. At other
    counts: the 11 levels (the 10 points and the schedule's smallest, as the authors' lists end) are
    interpolated log-linearly in sigma / alpha over their index to ``steps + 1`` (the authors' and
    ComfyUI's AlignYourStepsScheduler rule) and the last becomes the final point."""
    _no_start("ays", t_start, sched)
    variants = (*AYS_TIMESTEPS, *AYS_SIGMAS)
    model = model or ("svd" if sched.kind == "edm" else "sd")
    if model not in variants:
        raise unknown_name("ays model", model, variants)
    if model in AYS_TIMESTEPS:
        if not isinstance(sched, DiscreteVP) or sched.num_train_timesteps != 1000:
            raise VelodiffError(
                f"grid 'ays' model={model!r} lists trained timesteps of a 1000-step discrete schedule; "
                f"this schedule is {sched.kind!r} (model='svd' lists noise levels)"
            )
        points = sched.t_from_timestep(torch.tensor(AYS_TIMESTEPS[model], dtype=F64))
    else:
        sig = torch.tensor(AYS_SIGMAS[model], dtype=F64)
        top, bottom = float(sched.sigma_ve(sched.t_max)), float(sched.sigma_ve(sched.t_min))
        if not (bottom * (1 - 1e-9) <= float(sig.min()) and float(sig.max()) <= top * (1 + 1e-9)):
            raise VelodiffError(
                f"grid 'ays' model={model!r} spans noise levels {float(sig.min()):g}..{float(sig.max()):g}, "
                f"outside this schedule's {bottom:.4g}..{top:.4g}"
            )
        points = sched.t_from_sigma_ve(sig)
    levels = torch.cat([points, torch.tensor([sched.t_min], dtype=F64)])
    if steps != len(points):
        sig = loglinear_interp(sched.sigma_ve(levels), steps + 1)
        levels = sched.t_from_sigma_ve(sig)
        levels[0], levels[-1] = points[0], sched.t_min
    return _finish(levels[:-1] if final == "zero" else levels, final)


def lcm(
    sched: NoiseSchedule,
    steps: int,
    final: str = "zero",
    t_start: float | None = None,
    original_steps: int = 50,
) -> Tensor:
    """diffusers' LCMScheduler timesteps: ``steps`` of the skipping-step grid k = c - 1, 2c - 1, ...,
    N - 1 (c = N // original_steps) the consistency model was distilled on, at indices
    floor(linspace(0, original_steps, steps, endpoint=False)) from the top."""
    _no_start("lcm", t_start, sched)
    if not isinstance(sched, DiscreteVP):
        raise VelodiffError(f"grid 'lcm' needs a discrete schedule, not {sched.kind!r}")
    n, m = sched.num_train_timesteps, int(original_steps)
    if not 1 <= m <= n:
        raise VelodiffError(f"grid 'lcm': original_steps must be in [1, {n}], got {m}")
    if steps > m:
        raise VelodiffError(f"grid 'lcm': {steps} steps exceed its {m} original steps (the timesteps the "
                            f"consistency model was distilled on); give at most {m}")
    origin = (torch.arange(m, 0, -1, dtype=F64) * (n // m) - 1)
    idx = torch.floor(torch.arange(steps, dtype=F64) * (m / steps)).long()
    return _finish(sched.t_from_timestep(origin[idx]), final)


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
    "flux": flux,
}
#: the grids defined by another tool's table of levels (ComfyUI's schedulers, AYS): they start at the
#: schedule's top (no ``t_start``) and may end above t_min before the final point
TOOL_GRIDS = ("normal", "sgm_uniform", "simple", "ddim_uniform", "beta", "ays", "linear_quadratic", "lcm")
GRIDS.update(
    normal=normal,
    sgm_uniform=sgm_uniform,
    simple=simple,
    ddim_uniform=ddim_uniform,
    beta=beta,
    kl_optimal=kl_optimal,
    ays=ays,
    linear_quadratic=linear_quadratic,
    lcm=lcm,
)


def make_grid(
    name: str | Sequence[float],
    sched: NoiseSchedule,
    steps: int | None = None,
    final: str = "zero",
    **options: float,
) -> Tensor:
    """A grid by name (see ``GRIDS``; other tools' scheduler names, ComfyUI's "align_your_steps" or
    A1111's "SGM Uniform", resolve through ``velodiff.aliases``), or an explicit decreasing list of
    times, validated."""
    if not all(hasattr(sched, a) for a in ("alpha", "sigma", "t_min", "t_max")):
        raise VelodiffError(f"make_grid's schedule is a NoiseSchedule (velodiff.DiscreteVP.scaled_linear(), "
                            f"model.schedule), got {type(sched).__name__}")
    if isinstance(name, str):
        if name not in GRIDS:  # another tool's scheduler name (velodiff.aliases), or refused
            from .aliases import resolve_grid

            r = resolve_grid(name, (*GRIDS, "calibrated"))
            assert r.grid is not None
            name, options = r.grid, {**r.grid_options, **options}
        if name == "calibrated":  # ComfyUI's "gits" too
            raise VelodiffError(
                "the calibrated grid is fitted to a model (velodiff calibrate solver): pass "
                "grid='calibrated' to a pipeline or --grid calibrated, not to make_grid"
            )
        whole = is_integer(steps)
        if not whole or not 1 <= steps <= MAX_GRID_STEPS:
            raise VelodiffError(f"grid {name!r} needs steps in [1, {MAX_GRID_STEPS}], got {steps}")
        ts = _call_grid(name, sched, steps, final, options)
    else:
        try:
            ts = torch.as_tensor(list(name), dtype=F64)
        except (TypeError, ValueError, RuntimeError):
            what = type(name).__name__
            raise VelodiffError(f"a grid is a name or a list of times (numbers), got {what}") from None
    check_grid(sched, ts)
    return ts


def grid_parameters(name: str) -> tuple[str, ...]:
    """The options grid ``name`` takes (none for a name that is not one of ``GRIDS``)."""
    fn = GRIDS.get(name)
    if fn is None:
        return ()
    return tuple(p for p in inspect.signature(fn).parameters if p not in ("sched", "steps", "final"))


def _call_grid(name: str, sched: NoiseSchedule, steps: int, final: str, options: dict[str, Any]) -> Tensor:
    """``GRIDS[name]`` with ``options``; an option it does not have, or a value of the wrong type, is
    one line naming the grid's options."""
    fn = GRIDS[name]
    known = list(grid_parameters(name))
    known.append("discard_penultimate")  # any grid's (discard_penultimate below)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise VelodiffError(f"grid {name!r} has no option {unknown[0]!r}; its options: {', '.join(known)}")
    options = dict(options)
    discard = bool(options.pop("discard_penultimate", False))
    if discard and final != "zero":
        raise VelodiffError(f"grid {name!r}: discard_penultimate needs final='zero'")
    try:
        ts = fn(sched, steps + 1 if discard else steps, final=final, **options)
    except (TypeError, ValueError, ArithmeticError) as e:  # (a division by an option of 0)
        raise VelodiffError(f"grid {name!r} with options {options}: {e}") from None
    return discard_penultimate(ts) if discard else ts


def discard_penultimate(ts: Tensor) -> Tensor:
    """AUTOMATIC1111's ``discard_next_to_last_sigma`` (modules/sd_samplers_kdiffusion.py, set for its DPM2
    samplers): the grid is built with one step more and its last level before 0 is dropped, so the last
    step jumps from the level above it straight to 0 (grid option ``discard_penultimate``)."""
    return torch.cat([ts[:-2], ts[-1:]])


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
