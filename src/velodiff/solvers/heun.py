"""Heun's 2nd-order method with optional churn (Karras et al. 2022, "EDM", Alg. 2).

The probability-flow ODE is integrated in the noise level sigma = sigma(t) / alpha(t) on
x~ = x / alpha(t) (k-diffusion's and EDM's variables), where it reads (EDM Eq. 4 with s = 1)

    dx~/dsigma = (x~ - D(x~; sigma)) / sigma = eps.

One step from sigma_i to sigma_{i+1}:

    gamma   = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_i <= s_tmax else 0     (Alg. 2, l. 4)
    sigma^  = sigma_i (1 + gamma);  x~^ = x~_i + sqrt(sigma^^2 - sigma_i^2) s_noise z    (l. 5-6)
    d       = (x~^ - D(x~^; sigma^)) / sigma^                                             (l. 7)
    x~_{i+1} = x~^ + (sigma_{i+1} - sigma^) d                                              (l. 8)
    if sigma_{i+1} != 0:                                                                   (l. 9)
        d'       = (x~_{i+1} - D(x~_{i+1}; sigma_{i+1})) / sigma_{i+1}                     (l. 10)
        x~_{i+1} = x~^ + (sigma_{i+1} - sigma^) (d + d') / 2                               (l. 11)

so a step costs two evaluations, and the final jump to sigma = 0 one (an Euler step that returns the
denoiser's x0). The x0 a step reports (to callbacks) is its first evaluation, k-diffusion's
`denoised`. With the default s_churn = 0 the method is deterministic (EDM Alg. 1), which is
diffusers' HeunDiscreteScheduler and k-diffusion's sample_heun.

Two boundary cases the paper does not meet:

* sigma^ is capped at the schedule's largest noise level (t <= t_max), so churn never asks the
  network for a time it was not trained on (``churn.py``).
* where alpha(t_i) = 0 (rectified flow at t = 1) sigma_i is infinite and no trapezoid over
  [sigma_{i+1}, inf) exists; that step is the Euler (DDIM) step x_{i+1} = alpha_{i+1} x0 +
  sigma_{i+1} eps, which is finite, costs one evaluation, and keeps the global order 2 (one step's
  local error is O(h^2)). sample() counts the evaluations actually made.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import SolverSpec, StepContext
from .churn import CHURN_DEFAULTS, churn


def heun_step(ctx: StepContext, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
    if ctx.a(i) == 0.0:  # sigma_i = inf: Euler step in x (see the module docstring)
        x0 = ctx.denoise(x, ctx.t(i))
        return ctx.ddim(i, x, x0), x0, state
    t_next, a_next, s_next = ctx.t(i + 1), ctx.a(i + 1), ctx.s(i + 1)

    # Churn: raise the noise level to sigma^ by adding fresh noise (Alg. 2, lines 4-6).
    c = churn(ctx, i, x)
    x_ve, sig_hat = c.x_ve, c.sig
    # Euler predictor (line 7-8).
    x0 = ctx.denoise(c.a * x_ve, c.t)
    d = (x_ve - x0) / sig_hat
    if s_next == 0.0:  # final jump to clean data: no correction (line 9)
        return x0, x0, state
    sig_next = s_next / a_next
    x_ve_next = x_ve + (sig_next - sig_hat) * d
    # Trapezoidal corrector (lines 10-11).
    x0_next = ctx.denoise(a_next * x_ve_next, t_next)
    d_next = (x_ve_next - x0_next) / sig_next
    x_ve_next = x_ve + (sig_next - sig_hat) * 0.5 * (d + d_next)
    return a_next * x_ve_next, x0, state


HEUN = SolverSpec(
    name="heun",
    step=heun_step,
    order=2,
    nfe_per_step=2,
    noise="gaussian",
    stochastic=False,
    saves_final_eval=True,
    defaults=CHURN_DEFAULTS,
    description="Heun's 2nd-order method in sigma/alpha with optional churn (Karras et al. 2022, Alg. 2)",
)

__all__ = ["HEUN", "heun_step"]
