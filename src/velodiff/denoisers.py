"""The denoiser contract: ``denoise(x, t, cond) -> x0``, and the adapters that produce it.

A network predicts one of eps, v, x0 or a flow velocity; :class:`ModelDenoiser` turns any of them
into an x0-prediction using the schedule's alpha(t) and sigma(t). Guidance rules and accelerators
(``velodiff.guidance``, ``velodiff.accel``) sit on the plan (``velodiff.plan``) above a denoiser and
report what each evaluation cost (:class:`Cost`) after it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import VelodiffError, unknown_name
from .plan import Cost  # noqa: F401 - what an evaluation cost; re-exported
from .schedules import NoiseSchedule

#: Conditioning handed to the network: None, a tensor, or a mapping of tensors (batch first).
Cond = Any

#: A network: ``network(x, timestep, cond) -> prediction`` with the same shape as x.
Network = Callable[[Tensor, Tensor, Cond], Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@runtime_checkable
class Denoiser(Protocol):
    schedule: NoiseSchedule

    def __call__(self, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor: ...


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A time (scalar or per-sample) as a float64 tensor broadcastable against x."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def eps_from_x0(schedule: NoiseSchedule, x: Tensor, t: Tensor | float, x0: Tensor) -> Tensor:
    """eps = (x - alpha x0) / sigma."""
    tb = broadcast_time(t, x)
    a, s = schedule.alpha(tb).to(x.dtype), schedule.sigma(tb).to(x.dtype)
    return (x - a * x0) / s


def x0_from_alpha_sigma(
    prediction_type: str, x: Tensor, out: Tensor, alpha: Tensor | float, sigma: Tensor | float
) -> Tensor:
    """Convert a network output of the given type (diffusers' names) into x0, given alpha(t) and
    sigma(t): tensors broadcastable against x, or Python floats for a time shared by the batch (so no
    per-step tensor is made on the device). The one place sampling converts the prediction types; the
    distillers' losses use :func:`x0_from_v_vp`, which is this for v on a VP schedule."""
    a, s = alpha, sigma
    if prediction_type == "epsilon":
        return (x - s * out) / a
    if prediction_type == "v_prediction":
        # v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4)
        # => x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
        return (a * x - s * out) / (a * a + s * s)
    if prediction_type == "sample":
        return out
    if prediction_type == "flow":
        # velocity v = dx/dt = eps - x0 for alpha = 1 - t, sigma = t (Liu et al. 2022)  =>  x0 = x - t v
        return x - s * out
    raise unknown_name("prediction type", prediction_type, PREDICTION_TYPES)


def x0_from_v_vp(x: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """x0 = alpha x - sigma v: a v-prediction on a variance-preserving schedule (alpha^2 + sigma^2 = 1;
    Salimans & Ho 2022, Sec. 4), without :func:`x0_from_alpha_sigma`'s division by it, as the
    distillers' losses (``velodiff.distill``) have always computed it: their runs stay bit-identical."""
    return alpha * x - sigma * v


def prediction_from_x0(
    prediction_type: str, x: Tensor, x0: Tensor, alpha: Tensor | float, sigma: Tensor | float
) -> Tensor:
    """The network output of the given type that :func:`x0_from_alpha_sigma` turns into ``x0`` (its
    inverse; eps = (x - alpha x0) / sigma)."""
    a, s = alpha, sigma
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return (x - a * x0) / s
    if prediction_type == "v_prediction":
        return a * (x - a * x0) / s - s * x0  # v = alpha eps - sigma x0
    if prediction_type == "flow":
        return (x - x0) / s  # x0 = x - sigma v
    raise unknown_name("prediction type", prediction_type, PREDICTION_TYPES)


def x0_from_prediction(
    prediction_type: str, schedule: NoiseSchedule, x: Tensor, t: Tensor | float, out: Tensor
) -> Tensor:
    """Convert a network output of the given type into x0 (diffusers' names for the types)."""
    tb = broadcast_time(t, x)
    a, s = schedule.alpha(tb).to(x.dtype), schedule.sigma(tb).to(x.dtype)
    return x0_from_alpha_sigma(prediction_type, x, out, a, s)


@dataclass
class ModelDenoiser:
    """A network of any prediction type as an x0-denoiser over its noise schedule.

    ``timestep`` maps schedule time to the network's time input (default: the schedule's
    diffusers convention, e.g. the integer-valued timestep k for discrete schedules)."""

    network: Network
    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    timestep: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise unknown_name("prediction type", self.prediction_type, PREDICTION_TYPES)

    def __call__(self, x: Tensor, t: Tensor | float, cond: Cond = None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        to_timestep = self.timestep or self.schedule.timestep
        ts = to_timestep(t).to(x.dtype if x.is_floating_point() else torch.float32)
        if ts.ndim == 0:
            ts = ts.expand(x.shape[0])
        out = self.network(x, ts.to(x.device), cond)
        if out.shape != x.shape:
            raise VelodiffError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        # a shared time stays on the CPU (its coefficients are scalars); per-sample times go to x's device
        t = t if t.ndim == 0 else t.to(x.device)
        return x0_from_prediction(self.prediction_type, self.schedule, x, t, out)


def index_cond(cond: Cond, rows: Tensor) -> Cond:
    """The conditioning of the sample ``rows`` (tensors and mappings of tensors, batch first)."""
    if isinstance(cond, Tensor):
        return cond[rows.to(cond.device)]
    if isinstance(cond, Mapping):
        return {k: index_cond(v, rows) for k, v in cond.items()}
    return cond


def concat_cond(a: Cond, b: Cond) -> Cond:
    """Stack two conditionings along the batch axis (tensors, mappings of tensors, or None)."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            raise VelodiffError(f"conditionings have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: concat_cond(a[k], b[k]) for k in a}
    if a is b or a == b:  # plain constants shared by both halves
        return a
    raise VelodiffError(f"cannot batch conditionings of types {type(a).__name__} and {type(b).__name__}")
