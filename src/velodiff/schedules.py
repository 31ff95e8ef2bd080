"""Noise schedules: x_t = alpha(t) * x_0 + sigma(t) * eps.

Every schedule shares one time convention so that solvers, grids and adapters compose:

* time runs from ``t = 0`` (clean data: alpha = 1, sigma = 0, log-SNR = +inf) up to ``t_max``;
* ``t_min`` is the smallest time at which the network was trained (a discrete schedule's first
  trained timestep); grids end at ``t_min`` or at 0 (a final jump to clean data);
* ``log_snr(t) = lambda(t) = log(alpha / sigma)`` is strictly decreasing, and
  ``t_from_log_snr`` is its exact inverse (DPM-Solver, Lu et al. 2022, Sec. 3.1);
* ``timestep(t)`` is what the network receives as its time input, in diffusers' convention.

All arithmetic is done in float64; callers cast results to the sample dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import VelodiffError, unknown_name

F64 = torch.float64

#: Stable Diffusion's DDPM schedule (1.x, 2.x, XL), as its diffusers scheduler configs give it; a config
#: built from it adds its own scheduler's keys
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _as_t(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=F64)


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x; xp increasing; linear extrapolation. ``fp``'s
    first dimension runs along xp (further dimensions are interpolated alike). On x's device (the
    tables live on the CPU; a GPU training loop asks with times on the GPU)."""
    xp, fp = xp.to(x.device), fp.to(x.device)
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1])).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).reshape(x.shape + (1,) * (fp.ndim - 1))
    return f0 + w * (f1 - f0)


def _log_sigma_from_log_alpha(log_alpha: Tensor) -> Tensor:
    # VP: sigma^2 = 1 - alpha^2; log1p(-exp(2 la)) is accurate for la near 0.
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _log_alpha_from_log_snr(lam: Tensor) -> Tensor:
    # VP: alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 * log(1 + exp(-2 lambda)).
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class NoiseSchedule(ABC):
    """alpha(t), sigma(t), lambda(t) = log(alpha/sigma) and its inverse, over t in [0, t_max]."""

    t_min: float
    t_max: float
    #: what a user writes to name this schedule family
    kind: str = ""

    @abstractmethod
    def alpha(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor | float) -> Tensor: ...

    def log_snr(self, t: Tensor | float) -> Tensor:
        t = _as_t(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    @abstractmethod
    def t_from_log_snr(self, lam: Tensor | float) -> Tensor: ...

    def timestep(self, t: Tensor | float) -> Tensor:
        """The network's time input at t (diffusers' convention for this family)."""
        return _as_t(t) * 1000.0

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        """sigma / alpha: the noise level of x / alpha (the 'sigma' of k-diffusion and EDM)."""
        return torch.exp(-self.log_snr(t))

    def t_from_sigma_ve(self, sigma: Tensor | float) -> Tensor:
        return self.t_from_log_snr(-torch.log(_as_t(sigma)))

    def _check_params(self, t_max_limit: float = math.inf, **positive: float) -> None:
        """Refuse parameters the formulas cannot use (NaN, t_min >= t_max, a negative rate)."""
        for name, v in positive.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise VelodiffError(f"{type(self).__name__}: {name} must be a finite number > 0, got {v!r}")
        if not self.t_min < self.t_max <= t_max_limit or not math.isfinite(self.t_max):
            raise VelodiffError(
                f"{type(self).__name__}: needs 0 < t_min < t_max "
                f"{f'<= {t_max_limit:g}' if math.isfinite(t_max_limit) else '(finite)'}, "
                f"got t_min={self.t_min!r}, t_max={self.t_max!r}"
            )

    def check_range(self, t: Tensor) -> None:
        lo, hi = float(t.min()), float(t.max())
        if lo < 0 or hi > self.t_max * (1 + 1e-9):
            raise VelodiffError(
                f"time {lo if lo < 0 else hi:g} is outside the schedule's range [0, {self.t_max:g}]"
            )


class VariancePreserving(NoiseSchedule):
    """A VP schedule, sigma^2 = 1 - alpha^2, given by log alpha(t): alpha, sigma and the log-SNR
    lambda = log alpha - log sigma follow from it (computed in log space, accurate near t = 0)."""

    @abstractmethod
    def log_alpha(self, t: Tensor | float) -> Tensor: ...

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.exp(_log_sigma_from_log_alpha(self.log_alpha(t)))

    def log_snr(self, t: Tensor | float) -> Tensor:
        la = self.log_alpha(t)
        return la - _log_sigma_from_log_alpha(la)


@dataclass(frozen=True, eq=False)
class DiscreteVP(VariancePreserving):
    """A DDPM schedule of N trained timesteps k = 0..N-1 (diffusers' betas).

    Times follow DPM-Solver's discrete convention: trained step k sits at t = (k + 1) / N, and
    log(alpha) is interpolated piecewise-linearly in t between the trained steps (Lu et al. 2022,
    App. D.1); an extra knot at t = 0 with alpha = 1 makes the clean endpoint exact.
    """

    betas: Tensor
    kind: str = "discrete"
    log_alphas: Tensor = field(init=False, repr=False)
    knots: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = self.betas.to(F64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):  # NaN too
            raise VelodiffError("betas must be a 1-D sequence of values in (0, 1]")
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        # alpha = 0 (zero terminal SNR) is stored as diffusers' 2^-24, or below half the smallest
        # positive value so log-SNR stays strictly decreasing; positive values are kept as they are.
        positive = alphas_cumprod[alphas_cumprod > 0]
        floor = min(2.0**-24, 0.5 * float(positive.min())) if len(positive) else 2.0**-24
        alphas_cumprod = alphas_cumprod.clamp_min(floor)
        n = len(betas)
        log_alphas = torch.cat([torch.zeros(1, dtype=F64), 0.5 * torch.log(alphas_cumprod)])
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "log_alphas", log_alphas)
        object.__setattr__(self, "knots", torch.arange(n + 1, dtype=F64) / n)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.exp(2.0 * self.log_alphas[1:])

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 1.0 / self.num_train_timesteps

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return 1.0

    def log_alpha(self, t: Tensor | float) -> Tensor:
        return interp(_as_t(t), self.knots, self.log_alphas)

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        la = _log_alpha_from_log_snr(_as_t(lam))
        # log_alphas decrease with t: interpolate on the flipped (increasing) arrays.
        return interp(la, self.log_alphas.flip(0), self.knots.flip(0))

    def timestep(self, t: Tensor | float) -> Tensor:
        """diffusers' integer timestep k for t = (k + 1) / N (fractional between)."""
        return _as_t(t) * self.num_train_timesteps - 1.0

    def t_from_timestep(self, k: Tensor | float) -> Tensor:
        return (_as_t(k) + 1.0) / self.num_train_timesteps

    # --- constructors named as diffusers names its `beta_schedule` values ---------------------

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        return cls(torch.linspace(beta_start, beta_end, n, dtype=F64))

    @classmethod
    def scaled_linear(
        cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> DiscreteVP:
        """Stable Diffusion's schedule: linear in sqrt(beta)."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=F64) ** 2)

    @classmethod
    def squaredcos_cap_v2(cls, n: int = 1000, max_beta: float = 0.999) -> DiscreteVP:
        """The cosine schedule of Nichol & Dhariwal 2021, Eq. 17 (s = 0.008), betas capped."""

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
        return cls(torch.tensor(betas, dtype=F64))

    @classmethod
    def from_diffusers_config(cls, config: dict) -> DiscreteVP:
        """Build from a diffusers scheduler config (beta_schedule, betas, rescale_betas_zero_snr)."""
        n = int(config.get("num_train_timesteps", 1000))
        name = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            sched = cls(torch.as_tensor(config["trained_betas"], dtype=F64))
        elif name == "linear":
            sched = cls.linear(n, config.get("beta_start", 1e-4), config.get("beta_end", 0.02))
        elif name == "scaled_linear":
            sched = cls.scaled_linear(
                n, config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
            )
        elif name == "squaredcos_cap_v2":
            sched = cls.squaredcos_cap_v2(n)
        else:
            raise unknown_name("beta_schedule", name, ["linear", "scaled_linear", "squaredcos_cap_v2"])
        if config.get("rescale_betas_zero_snr", False):
            sched = sched.rescale_zero_terminal_snr()
        return sched

    def rescale_zero_terminal_snr(self) -> DiscreteVP:
        """Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps are Flawed', Alg. 1:
        shift and scale sqrt(alpha_bar) so the last step has alpha = 0 (stored as 2^-24, as diffusers,
        or lower if needed; see __post_init__)."""
        sqrt_abar = torch.cumprod(1.0 - self.betas, 0).sqrt()
        first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
        sqrt_abar = (sqrt_abar - last) * first / (first - last)
        abar = sqrt_abar**2
        alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
        return DiscreteVP((1.0 - alphas).clamp(1e-12, 1.0))


@dataclass(frozen=True, eq=False)
class ContinuousVP(VariancePreserving):
    """ScoreSDE's continuous VP-SDE with linear beta(t) (Song et al. 2021, Eq. 33):
    log alpha(t) = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    kind: str = "vp"

    def __post_init__(self) -> None:
        self._check_params(t_min=self.t_min)
        if not 0 <= self.beta_0 < self.beta_1 < math.inf:  # t(lambda) divides by beta_1 - beta_0
            raise VelodiffError(
                f"ContinuousVP: needs 0 <= beta_0 < beta_1, got {self.beta_0!r} and {self.beta_1!r}"
            )

    def log_alpha(self, t: Tensor | float) -> Tensor:
        t = _as_t(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        # Solve the quadratic for t (Lu et al. 2022, App. D.1, the closed-form inverse).
        d = self.beta_1 - self.beta_0
        tmp = 2.0 * d * torch.logaddexp(-2.0 * _as_t(lam), torch.zeros((), dtype=F64))
        delta = self.beta_0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / d


@dataclass(frozen=True, eq=False)
class EDM(NoiseSchedule):
    """Variance-exploding / EDM schedule (Karras et al. 2022): alpha = 1, sigma = t."""

    t_min: float = 0.002
    t_max: float = 80.0
    kind: str = "edm"

    def __post_init__(self) -> None:
        self._check_params(t_min=self.t_min)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_as_t(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_t(t).clone()

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -torch.log(_as_t(t))

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        return torch.exp(-_as_t(lam))

    def timestep(self, t: Tensor | float) -> Tensor:
        """EDM's c_noise(sigma) = ln(sigma) / 4 (Karras et al. 2022, Table 1)."""
        return torch.log(_as_t(t)) / 4.0


@dataclass(frozen=True, eq=False)
class RectifiedFlow(NoiseSchedule):
    """Rectified flow / flow matching (Liu et al. 2022; SD3, Flux): alpha = 1 - t, sigma = t.

    ``shift`` is SD3's resolution-dependent time shift (Esser et al. 2024, Eq. 23),
    t' = shift * t / (1 + (shift - 1) * t); it shapes the default step grid, as in diffusers'
    FlowMatchEulerDiscreteScheduler, and leaves alpha and sigma untouched.
    """

    shift: float = 1.0
    t_min: float = 1e-3
    t_max: float = 1.0
    kind: str = "flow"

    def __post_init__(self) -> None:  # sigma = t: past t = 1, alpha = 1 - t turns negative
        self._check_params(1.0, t_min=self.t_min, shift=self.shift)

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - _as_t(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return _as_t(t).clone()

    def log_snr(self, t: Tensor | float) -> Tensor:
        t = _as_t(t)
        return torch.log1p(-t) - torch.log(t)

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        return torch.sigmoid(-_as_t(lam))


SCHEDULES = {
    "linear": DiscreteVP.linear,
    "scaled_linear": DiscreteVP.scaled_linear,
    "squaredcos_cap_v2": DiscreteVP.squaredcos_cap_v2,
    "cosine": DiscreteVP.squaredcos_cap_v2,
    "vp": ContinuousVP,
    "edm": EDM,
    "flow": RectifiedFlow,
}


def get_schedule(name: str, **kwargs: float) -> NoiseSchedule:
    """A schedule by name: linear, scaled_linear, squaredcos_cap_v2 (cosine), vp, edm, flow.

    ``zero_snr=True`` applies zero-terminal-SNR rescaling to a discrete schedule."""
    zero_snr = bool(kwargs.pop("zero_snr", False))
    if name not in SCHEDULES:
        raise unknown_name("schedule", name, SCHEDULES)
    try:
        sched = SCHEDULES[name](**kwargs)
    except TypeError as e:  # an option the schedule does not have
        raise VelodiffError(f"schedule {name!r}: {e}") from None
    if zero_snr:
        if not isinstance(sched, DiscreteVP):
            raise VelodiffError(f"zero_snr rescaling applies to discrete schedules, not {name!r}")
        sched = sched.rescale_zero_terminal_snr()
    return sched
