"""Streaming image-to-image after StreamDiffusion (Kodaira et al. 2023, arXiv 2312.12491): frames in,
frames out, one network call per frame.

* **Stream batch** (Sec. 3.1): img2img runs the last ``k`` times tau_0 > ... > tau_{k-1} of a grid of
  ``steps`` steps (``k = int(steps * strength)``, diffusers' rule). Instead of k sequential calls per
  frame, the stream keeps k - 1 frames in flight, frame j at tau_j: each call denoises one batch
  [new frame at tau_0, in-flight frames at tau_1 .. tau_{k-1}], moves each one time down (DDIM, eta 0:
  x' = alpha' x0 + sigma' eps) and finishes the oldest. Output frame i is input frame i - (k - 1).
* **Residual CFG, self-negative** (Sec. 3.2, ``cfg="self"``): the unconditional prediction is not
  evaluated; the noise that entered with the frame (``stock`` noise) stands in for it,
  eps = stock + w (eps_cond - stock), so guidance costs no second pass. ``cfg="full"`` evaluates the
  unconditional branch (2k batch, as plain CFG); ``cfg="none"`` is eps_cond. StreamDiffusion also
  updates the stock noise from each step's residual; here it stays the frame's own noise (simpler, and
  the same at k = 1).
* **Stochastic similarity filter** (Sec. 3.4): with the cosine similarity c of the input frame to the last
  frame processed, the call is skipped with probability max(0, 1 - (1 - c) / (1 - threshold)) and the
  last output repeated (never more than ``max_skip`` times in a row).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..limits import SEED_END, SEED_MIN, is_integer, is_number

CFG_TYPES = ("self", "full", "none")


@dataclass
class StreamConfig:
    prompt: str
    steps: int = 10
    strength: float = 0.5
    guidance: float = 1.5
    cfg: str = "self"
    similarity: float | None = None
    max_skip: int = 10
    seed: int = 0

    @classmethod
    def of(cls, settings: Any) -> StreamConfig:
        """The settings a client sent (a JSON object), checked: unknown names and wrong types are one
        line, not an exception from deep inside the stream."""
        if not isinstance(settings, dict):
            raise VelodiffError('the first message is a JSON object of settings: {"prompt": "a red circle"}')
        fields = cls.__dataclass_fields__
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise VelodiffError(f"unknown setting {unknown[0]!r}; valid: model, {', '.join(fields)}")
        if not isinstance(settings.get("prompt"), str) or not settings["prompt"].strip():
            raise VelodiffError("the settings need a prompt (a non-empty string)")
        if not isinstance(settings.get("cfg", "self"), str):
            raise VelodiffError(f"cfg must be one of {', '.join(CFG_TYPES)}, got {settings['cfg']!r}")
        for name in ("steps", "max_skip", "seed", "strength", "guidance", "similarity"):
            v, integer = settings.get(name), name in ("steps", "max_skip", "seed")
            if name not in settings or (v is None and name == "similarity"):
                continue
            if not (is_integer(v) if integer else is_number(v)):
                raise VelodiffError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
        config = cls(**settings)
        config.check()
        return config

    def check(self) -> None:
        if self.cfg not in CFG_TYPES:
            raise VelodiffError(f"unknown cfg {self.cfg!r}; valid: {', '.join(CFG_TYPES)}")
        if not 1 <= self.steps <= 200:
            raise VelodiffError(f"steps must be between 1 and 200, got {self.steps}")
        if not 0 < self.strength <= 1:
            raise VelodiffError(f"strength must be in (0, 1], got {self.strength}")
        if int(self.steps * self.strength) < 1:
            raise VelodiffError(f"strength {self.strength} runs no step of {self.steps}; raise it")
        if self.similarity is not None and not 0 <= self.similarity < 1:
            raise VelodiffError(f"similarity threshold must be in [0, 1), got {self.similarity}")
        if not 0 <= self.guidance <= 100 or self.max_skip < 0 or not SEED_MIN <= self.seed < SEED_END:
            raise VelodiffError(  # the seeds of every other route: torch's, either sign
                f"guidance must be in [0, 100], max_skip >= 0 and seed in [-2**63, 2**64); got "
                f"{self.guidance}, {self.max_skip}, {self.seed}"
            )


class StreamImg2Img:
    """The stream over one model and prompt; call :meth:`__call__` once per frame (B=1 tensors)."""

    def __init__(self, model: Any, config: StreamConfig) -> None:
        from ..grids import make_grid
        from ..pipelines.img2img import start_index

        config.check()
        self.m, self.c = model, config
        ts = make_grid(model.default_grid, model.schedule, config.steps, **dict(model.default_grid_options))
        # the family's img2img rule (SD3 / Flux keep the fraction: never fewer steps than config.check's)
        start = start_index(config.steps, config.strength, model)
        self.ts = ts[start:-1].to(torch.float64)  # tau_0 .. tau_{k-1}
        self.k = len(self.ts)
        self.alpha = model.schedule.alpha(self.ts).float().to(model.device).view(-1, 1, 1, 1)
        self.sigma = model.schedule.sigma(self.ts).float().to(model.device).view(-1, 1, 1, 1)
        guided = config.cfg == "full"
        cond = model.encode_prompt([config.prompt], guided=guided)
        self.cond, self.uncond = (cond.cond, cond.uncond) if guided else (cond, None)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.x: Tensor | None = None  # (k - 1, C, h, w): frames in flight at tau_1 .. tau_{k-1}
        self.stock: Tensor | None = None  # (k, C, h, w): each in-flight frame's own noise
        self.prev: Tensor | None = None
        self.last: Tensor | None = None
        self.skipped = 0
        self.calls = 0

    @staticmethod
    def _repeat(cond: Any, n: int) -> Any:
        if isinstance(cond, Tensor):
            return cond.expand(n, *cond.shape[1:])
        if isinstance(cond, dict):
            return {k: StreamImg2Img._repeat(v, n) for k, v in cond.items()}
        return cond

    def _skip(self, frame: Tensor) -> bool:
        """The stochastic similarity filter's draw for this input frame."""
        if self.c.similarity is None or self.prev is None or self.last is None:
            return False
        cos = float(torch.nn.functional.cosine_similarity(frame.flatten(), self.prev.flatten(), dim=0))
        p = max(0.0, 1.0 - (1.0 - cos) / (1.0 - self.c.similarity))
        if self.skipped < self.c.max_skip and self.rng.random() < p:
            self.skipped += 1
            return True
        return False

    @torch.inference_mode()
    def __call__(self, frame: Any) -> tuple[Tensor, bool]:
        """One input frame (a PIL image, a numpy array or a (1, 3, H, W) tensor in [0, 1]) -> (an
        output frame (1, 3, H, W), skipped?)."""
        from ..pipelines.images import image_tensor

        if not isinstance(frame, Tensor) or frame.device.type == "cpu":
            frame = image_tensor(frame, "frame")
        if frame.shape[0] != 1:
            raise VelodiffError(f"a stream takes one frame at a time, got a batch of {frame.shape[0]}")
        if self._skip(frame):
            assert self.last is not None
            return self.last, True
        self.skipped = 0
        self.prev = frame
        z = self.m.encode(frame)
        if self.x is None:  # prime: the first frame fills the stream (k - 1 calls, once)
            self.x = z.new_zeros((0, *z.shape[1:]))
            self.stock = z.new_zeros((0, *z.shape[1:]))
            for _ in range(self.k - 1):
                self._step(z, emit=False)
        out = self._step(z, emit=True)
        assert out is not None
        self.last = self.m.decode(out).clamp(0, 1)
        self.calls += 1
        return self.last, False

    def _step(self, z: Tensor, emit: bool) -> Tensor | None:
        assert self.x is not None and self.stock is not None
        eps_in = torch.randn(z.shape, generator=self.gen).to(z.device, z.dtype)
        n = 1 + self.x.shape[0]  # frames in the batch: the new one and those in flight
        stock = torch.cat([eps_in, self.stock])
        x = torch.cat([self.alpha[0] * z + self.sigma[0] * eps_in, self.x])
        t, a, s = self.ts[:n], self.alpha[:n], self.sigma[:n]
        den = self.m.denoiser
        if self.c.cfg == "full":
            x0_both = den(
                torch.cat([x, x]),
                torch.cat([t, t]),
                _cat(self._repeat(self.cond, n), self._repeat(self.uncond, n)),
            )
            x0_c, x0_u = x0_both[:n], x0_both[n:]
            eps_c, eps_u = (x - a * x0_c) / s, (x - a * x0_u) / s
            eps = eps_u + self.c.guidance * (eps_c - eps_u)
        else:
            x0_c = den(x, t, self._repeat(self.cond, n))
            eps = (x - a * x0_c) / s
            if self.c.cfg == "self":
                eps = stock + self.c.guidance * (eps - stock)
        x0 = (x - s * eps) / a
        done = None
        if n == self.k:  # the oldest frame reached tau_{k-1}: finished
            done = x0[-1:]
            x0, eps, stock = x0[:-1], eps[:-1], stock[:-1]
        m = x0.shape[0]
        self.x = self.alpha[1 : m + 1] * x0 + self.sigma[1 : m + 1] * eps  # DDIM (eta 0) one time down
        self.stock = stock
        if self.k == 1:
            done, self.x = x0, x0[:0]
        return done if emit else None


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    return {k: _cat(a[k], b[k]) for k in a}
