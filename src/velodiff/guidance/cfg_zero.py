"""CFG-Zero* (Fan et al. 2025, 'CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
Models', Sec. 3): for flow-matching models, in velocity space,

    s* = <v_c, v_u> / ||v_u||^2                       (per image; Eq. 8, the optimized scale)
    v  = s* v_u + w (v_c - s* v_u)                     (Eq. 9)

and 'zero-init': the first ``zero_init_steps`` steps output zero velocity (Sec. 3.2). With
x = (1 - t) x0 + t eps, v = eps - x0 = (x - x0) / t, so zero velocity is x0 = x; those steps cost no
network call here (diffusers evaluates and discards). Names and defaults as diffusers'
ClassifierFreeZeroStarGuidance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import VelodiffError
from ..plan import Cost, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .cfg import UncondCombiner

if TYPE_CHECKING:
    from torch import Tensor


def s_star(v_c: Tensor, v_u: Tensor) -> Tensor:
    """The optimized scale of Eq. 8 per image, <v_c, v_u> / ||v_u||^2, shaped to broadcast over v_u."""
    dims = list(range(1, v_c.ndim))
    return (v_c * v_u).sum(dim=dims, keepdim=True) / ((v_u * v_u).sum(dim=dims, keepdim=True) + 1e-8)


@register_rule
class CFGZeroStar(UncondCombiner):
    name = "cfg_zero"
    summary = "CFG-Zero* (Fan et al. 2025): optimized scale s* and zero-init, for flow models (SD3, Flux)"
    cost = "0 evals on the zero-init steps, then as cfg"
    options = {
        **UncondCombiner.options,
        "zero_init_steps": Option(
            1, "first steps with zero velocity (no network call)", kind=int, lo=0, hi=1000
        ),
    }

    def check(self, run: RunInfo) -> None:
        super().check(run)
        if run.prediction_type != "flow":
            raise VelodiffError(
                f"plan rule 'cfg_zero' is for flow-matching models (SD3, Flux); this model predicts "
                f"{run.prediction_type or 'an unknown type'}"
            )

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        if req.step < self.zero_init_steps:  # zero velocity, for every branch a rule above asked for
            return EvalResult(req.x, {b: req.x for b in req.branches}, Cost(0, 0))
        return super().evaluate(req, inner)

    def combine(self, req: EvalRequest, c: Tensor, u: Tensor, r: EvalResult) -> Tensor:
        t = self.run.schedule.sigma(req.t).reshape(-1, *([1] * (c.ndim - 1))).to(c.device, c.dtype)
        v_c, v_u = (req.x - c) / t, (req.x - u) / t
        s = s_star(v_c, v_u)
        v = s * v_u + self.w * (v_c - s * v_u)
        return req.x - t * v
