"""CFG++ (Chung et al. 2024, 'CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
Models', Eq. 9 and Alg. 1): guide the denoised estimate with a scale lambda in [0, 1],
x0 = x0_u + lambda (x0_c - x0_u), but re-noise with the *unconditional* noise,

    x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps_u,   eps_u = (x_i - alpha_i x0_u) / sigma_i,

which keeps the sample near the data manifold at small lambda. The rule hands x0_u to the solver as
the evaluation's ``renoise_x0``; the solvers that honour it are DDIM / Euler / DDPM (the paper's
sampler), so other solvers are refused.
"""

from __future__ import annotations

from ..errors import VelodiffError
from ..plan import EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .cfg import UncondCombiner


@register_rule
class CFGPlusPlus(UncondCombiner):
    name = "cfgpp"
    summary = "CFG++ (Chung et al. 2024): guidance lambda in [0, 1], re-noising with the unconditional noise"
    cost = "as cfg: 2 evals per step"
    options = {
        **UncondCombiner.options,
        "scale": Option(
            0.6, "guidance lambda in [0, 1] (not CFG's w)", lo=0.0, hi=1.0, aliases=("guidance_scale",)
        ),
    }

    def check(self, run: RunInfo) -> None:
        super().check(run)
        if not run.solver.renoises:
            raise VelodiffError(
                f"plan rule 'cfgpp' re-noises inside the solver step; use solver ddim, euler or ddpm, "
                f"not {run.solver.name!r}"
            )
        if float({**run.solver.defaults, **run.options}.get("s_churn", 0) or 0) > 0:
            raise VelodiffError(  # euler's churned step re-noises from its own noise, not the uncond's
                "plan rule 'cfgpp' re-noises with the unconditional prediction, which euler's s_churn step "
                "does not take; use s_churn=0"
            )

    def active(self, req: EvalRequest) -> bool:
        return self.in_range(req.step)

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        r = super().evaluate(req, inner)
        r.renoise_x0 = r.parts.get("uncond")
        return r
