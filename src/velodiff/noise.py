"""Seeded noise: the initial sample and the per-step noise of stochastic solvers.

Contract: noise is drawn on the CPU in float32 from a generator seeded by (seed, purpose) and then
moved to the sample's device and dtype, so the same seed gives the same images on every device.
"""

from __future__ import annotations

import warnings
from typing import Any

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


#: the last entropy word of a (seed, key) with a 64-bit part (_generator)
_WIDE = 0xFFFFFFFF


def _generator(*key: int) -> torch.Generator:
    """The generator of (seed, *key). Each part wraps to 64 bits as torch's manual_seed does (-3 is not
    3's alias). numpy's SeedSequence reads an int as however many 32-bit words it needs and pads with
    zeros, so where every part fits 32 bits the parts are its words (trailing zeros add nothing: key
    (1, 0) is key (1,), which no draw uses); a part of 64 bits makes the words fixed, two per part, then
    the count and a marker, so seed s + 2**32 is not seed s with key (1,)."""
    words = [int(k) % SEED_END for k in key]
    if any(w >> 32 for w in words):
        words = [half for w in words for half in (w & 0xFFFFFFFF, w >> 32)] + [len(key), _WIDE]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)
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


class GeneratorNoise:
    """Noise as other tools draw it from torch-style generators. ``per_image`` (AUTOMATIC1111's
    ``modules/rng.py`` ``ImageRNG``, diffusers with a list of generators): image k's own generator, seeded
    with its seed, draws one image's shape; otherwise one generator seeded with the first seed draws the
    whole batch (diffusers with one generator; ComfyUI's starting noise). ``source`` "CPU" is a torch CPU
    generator, "NV" the Philox draws of an NVIDIA GPU computed here (``velodiff.philox``: A1111's "NV" and,
    on such a card, its "GPU" source and diffusers' CUDA generator). Draw 0 is the starting noise
    (``first``) and draw i + 1 step i's noise, as k-diffusion's samplers consume A1111's replayed
    ``torch.randn_like`` (one draw per step: the churn samplers on every step, the ancestral ones on every
    step but a last one to sigma 0) and diffusers' schedulers draw from the pipeline's generator per step.
    Draws are made in order and kept, so step i's noise is the same however often and in whatever order
    it is asked for. ``start=False``: a caller's latents stood for the starting noise, so the generators
    drew none (diffusers draws nothing for given ``latents``) and step i is draw i. ``brownian``: a
    Brownian source whose ``between`` gives a solver's increments over part of a step (DPM++ SDE)."""

    SOURCES = ("CPU", "NV")

    def __init__(self, shape: tuple[int, ...], seeds: list[int], source: str = "CPU", per_image: bool = True,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 start: bool = True, brownian: Any = None) -> None:
        from .philox import PhiloxGenerator

        if source not in self.SOURCES:
            raise VelodiffError(f"a generator's source is one of {', '.join(self.SOURCES)}, got {source!r}")
        self.shape, self.device, self.dtype = ((1, *shape[1:]) if per_image else tuple(shape)), device, dtype
        self.generators: list[Any] = [
            torch.Generator().manual_seed(int(s)) if source == "CPU" else PhiloxGenerator(s)
            for s in (seeds if per_image else seeds[:1])
        ]
        self.start = self._draw() if start else None  # the starting noise's draw comes first
        self.steps: list[Tensor] = []
        if brownian is not None:
            self.between = brownian.between

    def _draw(self) -> Tensor:
        return torch.cat([
            torch.randn(self.shape, generator=g, dtype=torch.float32) if isinstance(g, torch.Generator)
            else torch.from_numpy(g.randn(self.shape)) for g in self.generators
        ])

    def first(self) -> Tensor:
        """The starting noise (float32, on the CPU)."""
        assert self.start is not None, "made with start=False: the caller's latents are the starting noise"
        return self.start

    def __call__(self, i: int) -> Tensor:
        while len(self.steps) <= i:
            self.steps.append(self._draw())
        return self.steps[i].to(device=self.device, dtype=self.dtype)


class SigmaBrownianNoise:
    """A1111's Brownian noise for its SDE samplers (k-diffusion's ``BrownianTreeNoiseSampler`` with one
    tree per image, entropy = the image's seed), over k-diffusion's sigma = sigma_t / alpha_t between the
    grid's smallest positive sigma and its largest: increments (W(sigma_to) - W(sigma_from)) /
    sqrt(|sigma_to - sigma_from|) per image. A query beyond that range (a flow model's sigma = inf at
    t = 1, a last step to 0, which the SDE samplers never draw for) reads at the range's end."""

    def __init__(self, like: Tensor, seeds: list[int], ts: Tensor, schedule: NoiseSchedule) -> None:
        import torchsde

        self.schedule, self.ts, self.device, self.dtype = schedule, ts, like.device, like.dtype
        self.shape = (len(seeds), *like.shape[1:])
        sig = schedule.sigma_ve(ts.double())
        sig = sig[(sig > 0) & torch.isfinite(sig)]
        if sig.numel() == 0:
            raise VelodiffError("A1111's Brownian noise needs a grid with a finite sigma above 0")
        self.lo, self.hi = float(sig.min()), float(sig.max())
        w0 = torch.zeros(like.shape[1:], dtype=torch.float32)
        self.trees = [torchsde.BrownianTree(self.lo, w0, self.hi, entropy=int(s) % SEED_END) for s in seeds]

    def __call__(self, i: int) -> Tensor:
        return self.between(float(self.ts[i]), float(self.ts[i + 1]))

    def between(self, t_from: float, t_to: float) -> Tensor:
        """The normalized increment from t_from to t_to (times of the schedule), per image."""
        s_from, s_to = (min(max(float(self.schedule.sigma_ve(t)), self.lo), self.hi) for t in (t_from, t_to))
        if s_from == s_to:
            return torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        a, b, sign = (s_from, s_to, 1.0) if s_from < s_to else (s_to, s_from, -1.0)
        with warnings.catch_warnings():  # torchsde keeps its ends to 6 decimals and clamps the query to
            warnings.filterwarnings("ignore", message="Should have")  # them, saying so each time
            w = torch.stack([tree(a, b) for tree in self.trees]) * (sign / (b - a) ** 0.5)
        return w.to(device=self.device, dtype=self.dtype)
