"""Guidance rules: denoisers that wrap a denoiser and declare what they cost per step.

Classifier-free guidance is linear in the prediction, so applying it to x0 equals applying it to
eps or v at the same (x, t); velodiff guides x0 and converts only where a rule needs another space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .denoisers import Cond, Cost, Denoiser, broadcast_time, concat_cond, eps_from_x0
from .errors import VelodiffError
from .schedules import NoiseSchedule


@dataclass(frozen=True)
class GuidedCond:
    """The two conditionings CFG needs: the prompt's and the unconditional (or negative) one."""

    cond: Cond
    uncond: Cond


@dataclass
class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): x0 = x0_u + w (x0_c - x0_u).

    * ``rescale`` (phi): guidance rescale of Lin et al. 2023 (Sec. 3.4, Eq. 15-16), computed on
      eps like diffusers' ``rescale_noise_cfg``: eps_r = eps_cfg * std(eps_c) / std(eps_cfg),
      eps = phi eps_r + (1 - phi) eps_cfg.
    * ``interval = (t_lo, t_hi)``: guidance only where t_lo <= t <= t_hi (Kynkaanniemi et al.
      2024, 'Applying Guidance in a Limited Interval'); elsewhere one conditional pass.
    * cond and uncond run as one batched network call: 1 NFE and 2 network-sample evaluations.
    """

    inner: Denoiser
    scale: float
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise VelodiffError(f"guidance scale must be >= 0, got {self.scale}")
        if not 0.0 <= self.rescale <= 1.0:
            raise VelodiffError(f"guidance rescale must be in [0, 1], got {self.rescale}")
        if self.interval is not None and not self.interval[0] <= self.interval[1]:
            raise VelodiffError(f"guidance interval must have t_lo <= t_hi, got {self.interval}")

    @property
    def schedule(self) -> NoiseSchedule:
        return self.inner.schedule

    def active(self, t: float) -> bool:
        if self.scale == 1.0:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def cost(self, t: float) -> Cost:
        inner = self.inner.cost(t)
        return Cost(inner.nfe, 2 * inner.evals) if self.active(t) else inner

    def __call__(self, x: Tensor, t: Tensor | float, cond: Cond = None) -> Tensor:
        if not isinstance(cond, GuidedCond):
            raise VelodiffError("classifier-free guidance needs a GuidedCond(cond, uncond)")
        t = torch.as_tensor(t, dtype=torch.float64)
        if not self.active(float(t.max())):
            return self.inner(x, t, cond.cond)
        both = self.inner(
            torch.cat([x, x]), t.repeat(2) if t.ndim else t, concat_cond(cond.cond, cond.uncond)
        )
        x0_c, x0_u = both.chunk(2)
        x0 = x0_u + self.scale * (x0_c - x0_u)
        if self.rescale > 0:
            x0 = self._rescaled(x, t, x0, x0_c)
        return x0

    def _rescaled(self, x: Tensor, t: Tensor, x0: Tensor, x0_c: Tensor) -> Tensor:
        sched = self.schedule
        eps_cfg, eps_c = eps_from_x0(sched, x, t, x0), eps_from_x0(sched, x, t, x0_c)
        dims = list(range(1, x.ndim))
        eps_r = eps_cfg * eps_c.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
        eps = self.rescale * eps_r + (1 - self.rescale) * eps_cfg
        tb = broadcast_time(t, x)
        a, s = sched.alpha(tb).to(x.dtype), sched.sigma(tb).to(x.dtype)
        return (x - s * eps) / a
