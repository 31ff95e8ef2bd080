"""Seeded noise: the initial sample and the per-step noise of stochastic solvers.

Contract: noise is drawn on the CPU in float32 from a generator seeded by (seed, purpose) and then
moved to the sample's device and dtype, so the same seed gives the same images on every device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import VelodiffError
from .limits import SEED_END, SEED_MIN, is_integer
from .schedules import NoiseSchedule


def check_seed(seed: int) -> int:
    """``seed`` as an int, refused in one line when it is no integer (1.5 ran as 1) or outside torch's
    seed range [-2**63, 2**64) (2**64 ran as seed 0)."""
    if not is_integer(seed):
        raise VelodiffError(f"a seed is an integer, got {seed!r}")
    if not SEED_MIN <= int(seed) < SEED_END:
        raise VelodiffError(f"seed {seed} is outside torch's seed range [-2**63, 2**64)")
    return int(seed)


def _generator(*key: int) -> torch.Generator:
    # a negative key wraps to 64 bits as torch's manual_seed does (so -3 is not 3's alias)
    state = np.random.SeedSequence([int(k) % SEED_END for k in key]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def randn(shape: tuple[int, ...], seed: int, *key: int, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` determined by (seed, *key) only: always drawn in float32 on the
    CPU, then moved and cast, so ``randn(shape, s, dtype=d)`` is ``randn(shape, s).to(d)`` bit for bit
    (float16, bfloat16, float64: a float64 draw is the float32 one widened, not a fresh float64 draw)."""
    z = torch.randn(shape, generator=_generator(seed, *key), dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


def prior_sample(schedule: NoiseSchedule, t: float, noise: Tensor) -> Tensor:
    """x at time t from standard normal noise: noise * sqrt(alpha^2 + sigma^2), the marginal std of
    x_t for unit-variance data (1 for VP and for flow at t = 1; about sigma for EDM)."""
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    return noise * (a * a + s * s) ** 0.5


class GaussianNoise:
    """Fresh standard normal noise per step i, a pure function of (seed, i)."""

    def __init__(self, like: Tensor, seed: int) -> None:
        self.shape, self.device, self.dtype, self.seed = tuple(like.shape), like.device, like.dtype, seed

    def __call__(self, i: int) -> Tensor:
        return randn(self.shape, self.seed, 1, i, device=self.device, dtype=self.dtype)


class BrownianNoise:
    """Normalized Brownian increments (W(t_i) - W(t_{i+1})) / sqrt(t_i - t_{i+1}) from one Brownian
    tree over schedule time, so a path is consistent across step counts for the same seed
    (as k-diffusion's BrownianTreeNoiseSampler)."""

    def __init__(self, like: Tensor, seed: int, ts: Tensor) -> None:
        import torchsde

        self.ts, self.device, self.dtype = ts, like.device, like.dtype
        t_hi = float(ts.max())
        self.tree = torchsde.BrownianTree(
            # the seed is the entropy (k-diffusion's BrownianTreeNoiseSampler), wrapped to 64 bits as the
            # other noise is; torchsde takes any such int (seeds 2**31 apart were one path before)
            0.0, torch.zeros(like.shape, dtype=torch.float32), t_hi, entropy=int(seed) % SEED_END
        )

    def __call__(self, i: int) -> Tensor:
        return self.between(float(self.ts[i]), float(self.ts[i + 1]))

    def between(self, t_from: float, t_to: float) -> Tensor:
        """The normalized increment over [t_to, t_from] of the same path (a solver stage's noise)."""
        t0, t1 = min(t_from, t_to), max(t_from, t_to)
        w = self.tree(t0, t1) / (t1 - t0) ** 0.5
        return w.to(device=self.device, dtype=self.dtype)
