"""Exponential moving average of parameters, with the warm-up of the decay of diffusers' ``EMAModel``
(``min(decay, (1 + n) / (10 + n))`` at the n-th update, counted from 0), but for the first update, where
diffusers copies the weights (decay 0) and velodiff averages at 1/10."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = d * shadow + (1 - d) * param`` with ``d = min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        floats, shadows, others = [], [], []
        for k, v in model.state_dict().items():
            (floats if v.is_floating_point() else others).append(v.detach())
            (shadows if v.is_floating_point() else others).append(self.shadow[k])
        if floats:
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, floats, alpha=1 - d)
        for v, s in zip(others[0::2], others[1::2], strict=True):
            s.copy_(v)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
        self.updates = updates

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)
