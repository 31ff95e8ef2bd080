"""Adaptive Projected Guidance (Sadat et al. 2024, 'Eliminating Oversaturation and Artifacts of High
Guidance Scales in Diffusion Models', Sec. 4 and Alg. 1), on the denoised prediction x0:

    D = x0_c - x0_u;   D <- D + beta D_prev (momentum, Sec. 4.3);   D <- D min(1, r / ||D||) (Sec. 4.2)
    D_par = (<D, x0_c> / <x0_c, x0_c>) x0_c,   D_orth = D - D_par                          (Sec. 4.1)
    x0 = x0_c + (w - 1) (D_orth + eta D_par)

eta = 0 drops the parallel component that causes oversaturation. Names as diffusers'
AdaptiveProjectedGuidance (``eta``; its ``adaptive_projected_guidance_rescale`` is the norm threshold r,
its ``..._momentum`` beta). ``apg:scale=w`` is that guider with ``use_original_formulation=True`` at
``guidance_scale = w - 1`` (the paper's Alg. 1; tests/test_guidance_parity.py), fed x0. With diffusers'
default formulation (w times the update added to x0_u) the two agree only at eta = 1 without momentum
and without a binding norm cap. Defaults are the paper's: eta 0 (diffusers: 1, which leaves only the
norm threshold), no norm threshold (diffusers: 15). diffusers' pipelines guide the network's output (eps,
v); this rule guides x0, the paper's choice (Sec. 4), so a threshold from a diffusers recipe does not
carry over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import EvalRequest, EvalResult, Option, RunInfo, register_rule
from .cfg import UncondCombiner

if TYPE_CHECKING:
    from torch import Tensor


@register_rule
class AdaptiveProjectedGuidance(UncondCombiner):
    name = "apg"

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        """The momentum carries the update from step to step."""
        return self.momentum != 0.0

    summary = "Adaptive Projected Guidance (Sadat et al. 2024): CFG without the oversaturating parallel part"
    cost = "as cfg: 2 evals per step"
    options = {
        **UncondCombiner.options,
        "eta": Option(0.0, "weight of the update's component parallel to x0_c", lo=0.0, hi=1.0),
        "norm_threshold": Option(
            0.0,
            "cap r on the update's norm (0 = none)",
            lo=0.0,
            aliases=("adaptive_projected_guidance_rescale",),
        ),
        "momentum": Option(
            0.0,
            "momentum beta on the update (the paper uses -0.5; 0 = none)",
            lo=-1.0,
            hi=1.0,
            aliases=("adaptive_projected_guidance_momentum",),
        ),
    }

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.running: Tensor | None = None

    def combine(self, req: EvalRequest, c: Tensor, u: Tensor, r: EvalResult) -> Tensor:
        import torch
        dims = list(range(1, c.ndim))
        d = c - u
        if self.momentum != 0.0:
            d = d if self.running is None else d + self.momentum * self.running
            self.running = d
        if self.norm_threshold > 0:
            d = d * torch.clamp(self.norm_threshold / d.norm(p=2, dim=dims, keepdim=True), max=1.0)
        d64, c64 = d.double(), c.double()
        unit = torch.nn.functional.normalize(c64.flatten(1), dim=1).reshape(c64.shape)
        par = (d64 * unit).sum(dim=dims, keepdim=True) * unit
        update = (d64 - par) + self.eta * par
        return c + (self.w - 1.0) * update.to(c.dtype)
