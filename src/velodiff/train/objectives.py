"""Diffusion training objectives over a diffusers DDPM schedule: noising, eps/v targets, min-SNR weights."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..schedules import DiscreteVP

PREDICTIONS = ("epsilon", "v_prediction")


def alphas_cumprod(scheduler_config: dict) -> Tensor:
    """alpha_bar_k for k = 0..N-1, float32 (the schedule the network is trained and sampled on)."""
    return DiscreteVP.from_diffusers_config(scheduler_config).alphas_cumprod.float()


def noisy_and_target(
    z0: Tensor, k: Tensor, eps: Tensor, abar: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """x_k = sqrt(abar) z0 + sqrt(1 - abar) eps and the network's target (eps or v = a eps - s z0)."""
    a = abar[k].sqrt().view(-1, 1, 1, 1)
    s = (1 - abar[k]).sqrt().view(-1, 1, 1, 1)
    x = a * z0 + s * eps
    if prediction_type == "epsilon":
        return x, eps
    if prediction_type == "v_prediction":
        return x, a * eps - s * z0
    raise VelodiffError(f"unknown prediction type {prediction_type!r}; valid: {', '.join(PREDICTIONS)}")


def loss_weights(k: Tensor, abar: Tensor, prediction_type: str, min_snr_gamma: float | None) -> Tensor:
    """Per-sample weights: 1, or min-SNR-gamma (Hang et al. 2023, Eq. 10 and its v-form):
    eps: min(snr, g) / snr; v: min(snr, g) / (snr + 1)."""
    if not min_snr_gamma:
        return torch.ones(k.shape, dtype=abar.dtype, device=abar.device)
    snr = abar[k] / (1 - abar[k])
    clipped = snr.clamp(max=min_snr_gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
