"""An exact oracle: the Gaussian-mixture denoiser in closed form, and a reference solution of its
probability-flow ODE by adaptive high-order integration.

For data x0 ~ sum_k w_k N(mu_k, diag(v_k)) and x_t = alpha x0 + sigma eps, each component gives
x_t | k ~ N(alpha mu_k, alpha^2 v_k + sigma^2), so the posterior mean is exact:

    E[x0 | x_t] = sum_k gamma_k(x_t) (mu_k + alpha v_k / (alpha^2 v_k + sigma^2) (x_t - alpha mu_k)),

with gamma_k the posterior component weights. Tensors of any shape are flattened per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .denoisers import broadcast_time
from .noise import randn
from .schedules import F64, NoiseSchedule


@dataclass
class GaussianMixture:
    """weights (K,), means (K, *shape), variances (K, *shape) (diagonal covariances)."""

    weights: Tensor
    means: Tensor
    variances: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    @classmethod
    def random(cls, shape: tuple[int, ...], components: int = 4, seed: int = 0, spread: float = 1.0,
               min_var: float = 0.05, max_var: float = 0.3) -> GaussianMixture:
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(components, generator=g, dtype=F64) + 0.5
        means = spread * torch.randn(components, *shape, generator=g, dtype=F64)
        var = min_var + (max_var - min_var) * torch.rand(components, *shape, generator=g, dtype=F64)
        return cls(w / w.sum(), means, var)

    def mean(self) -> Tensor:
        return torch.einsum("k,k...->...", self.weights, self.means)

    def covariance(self) -> Tensor:
        """Full covariance of the flattened data."""
        m = self.means.flatten(1)
        mu = self.weights @ m
        cov = torch.zeros(m.shape[1], m.shape[1], dtype=F64)
        for w, mk, vk in zip(self.weights, m, self.variances.flatten(1), strict=True):
            d = mk - mu
            cov += w * (torch.diag(vk) + torch.outer(d, d))
        return cov

    def sample(self, n: int, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, *self.shape, generator=g, dtype=F64)
        return self.means[k] + self.variances[k].sqrt() * z

    def x0(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """E[x0 | x_t = x] for per-sample (or scalar) alpha and sigma."""
        n = x.shape[0]
        xf = x.to(F64).reshape(n, 1, -1)
        a = torch.as_tensor(alpha, dtype=F64).reshape(-1, 1, 1)
        s = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1, 1)
        mu, v = self.means.flatten(1)[None], self.variances.flatten(1)[None]
        var = a * a * v + s * s
        diff = xf - a * mu
        logp = -0.5 * (diff * diff / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights)
        gamma = torch.softmax(logp, dim=1)
        post = mu + a * v / var * diff
        out = torch.einsum("nk,nkd->nd", gamma, post)
        return out.reshape(x.shape).to(x.dtype)


@dataclass
class MixtureDenoiser:
    """The exact x0-denoiser of a Gaussian mixture under a schedule (a velodiff Denoiser)."""

    mixture: GaussianMixture
    schedule: NoiseSchedule

    def __call__(self, x: Tensor, t: Tensor | float, cond: object = None) -> Tensor:
        tb = broadcast_time(t, x).flatten()
        return self.mixture.x0(x, self.schedule.alpha(tb), self.schedule.sigma(tb))


def reference_solution(
    denoiser: MixtureDenoiser, x: Tensor, t_start: float, t_end: float, rtol: float = 1e-11,
    atol: float = 1e-12, method: str = "DOP853",
) -> Tensor:
    """Solve the probability-flow ODE from t_start to t_end > 0 with scipy's adaptive integrator.

    The ODE is written for y = x / sigma in lambda = log-SNR, where it reads
    dy/dlambda = exp(lambda) x0(sigma y, t(lambda)) (Lu et al. 2022b, Eq. 4 / DPM-Solver++), smooth
    even where alpha(t_start) = 0 (flow matching, zero-terminal SNR): there the first stretch adds
    less than exp(lambda) and starts at lambda = -30."""
    sched = denoiser.schedule
    lam0 = max(float(sched.log_snr(t_start)), -30.0)
    lam1 = float(sched.log_snr(t_end))
    shape = x.shape
    y0 = (x.to(F64) / float(sched.sigma(t_start))).flatten().numpy()

    def rhs(lam: float, y: np.ndarray) -> np.ndarray:
        t = sched.t_from_log_snr(torch.tensor(lam, dtype=F64))
        s = float(sched.sigma(t))
        xt = torch.from_numpy(y).reshape(shape) * s
        return (math.exp(lam) * denoiser(xt, t)).flatten().numpy()

    sol = solve_ivp(rhs, (lam0, lam1), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    return (y1 * float(sched.sigma(t_end))).to(x.dtype)


def reference_sample(denoiser: MixtureDenoiser, x: Tensor, ts: Tensor, **kwargs: float) -> Tensor:
    """What an exact solver on grid ``ts`` returns: the ODE solution at the last positive time,
    followed, if the grid ends at t = 0, by the same final jump x0(x_{t_min}) every solver makes."""
    ts = torch.as_tensor(ts, dtype=F64)
    t_last = float(ts[-2]) if float(ts[-1]) == 0.0 else float(ts[-1])
    x_end = reference_solution(denoiser, x, float(ts[0]), t_last, **kwargs)
    return denoiser(x_end, t_last) if float(ts[-1]) == 0.0 else x_end


def starting_noise(shape: tuple[int, ...], n: int, seed: int = 0) -> Tensor:
    return randn((n, *shape), seed, 7).to(F64)
