"""Perturbed-Attention Guidance (Ahn et al. 2024, 'Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance', Eq. 10): a third branch runs the conditional input with the chosen
self-attention layers' maps replaced by the identity, and the prediction moves away from it,

    x0 = x0_guided + s (x0_c - x0_perturbed),

on top of whatever CFG-family rule made x0_guided (x0_c alone without one), as diffusers'
StableDiffusionPAGPipeline does. The perturbed rows ride in the same batched network call. Names and
defaults as diffusers: ``pag_scale`` 3.0, ``pag_applied_layers`` ['mid'], ``pag_adaptive_scale`` 0 (above
0: the scale falls as the sampler nears the image, s - a (1000 - k) at the network's timestep k, never
below 0, as diffusers' PAGMixin._get_pag_scale; a step where it reaches 0 runs no perturbed pass).
"""

from __future__ import annotations

from ..accel.attention import IdentitySelfAttention, ProcessorSwap, RowState, attention_modules
from ..errors import VelodiffError
from ..plan import EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .cfg import START, STOP, TERM, GuidanceRule


@register_rule
class PerturbedAttentionGuidance(GuidanceRule):
    name = "pag"
    layer = TERM
    claims = ("perturbed",)
    summary = "Perturbed-Attention Guidance (Ahn et al. 2024): away from an identity-self-attention pass"
    cost = "+1 eval per step (the perturbed branch, in the same batched call)"
    options = {
        "scale": Option(3.0, "PAG scale s", lo=0.0, aliases=("pag_scale",)),
        "adaptive_scale": Option(
            0.0, "a: the scale at the network's timestep k is max(0, s - a (1000 - k)) (0: s throughout)",
            lo=0.0, aliases=("pag_adaptive_scale",),
        ),
        "applied_layers": Option(
            ("mid",),
            "self-attention layers to perturb (regular expressions, '|'-separated)",
            kind=tuple,
            patterns=True,
            aliases=("pag_applied_layers",),
        ),
        "start": START,
        "stop": STOP,
    }

    def modules(self, run: RunInfo) -> list:
        return attention_modules(run.network, False, self.applied_layers)

    def check(self, run: RunInfo) -> None:
        if not self.modules(run):
            what = "plain self-attention layers" if run.network is not None else "a network to hook"
            blocks = list(dict.fromkeys(n.split(".")[0] for n, _ in attention_modules(run.network, False)))
            where = (
                f"this model's are in {', '.join(blocks)} (e.g. applied_layers="
                f"{blocks[-1].removesuffix('_blocks')})"
                if blocks else "this model has none (SD3.0 and Flux have joint attention only)"
            )
            raise VelodiffError(
                f"plan rule 'pag' needs {what} matching applied_layers={'|'.join(self.applied_layers)}; "
                f"{where}"
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.schedule = run.schedule
        self.state, self.swap = RowState(), ProcessorSwap()
        self.swap.install(self.modules(run), lambda name, mod, orig: IdentitySelfAttention(orig, self.state))

    def scale_at(self, t) -> float:
        """The PAG scale at time t: s, or with ``adaptive_scale`` a, s - a (1000 - k) at the network's
        timestep k of t, at least 0 (diffusers' pag_adaptive_scale)."""
        if self.adaptive_scale == 0:
            return self.scale
        k = float(self.schedule.timestep(t).reshape(-1)[0])
        return max(0.0, self.scale - self.adaptive_scale * (1000.0 - k))

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        scale = self.scale_at(req.t) if self.in_range(req.step) else 0.0
        if scale == 0:
            return inner(req)
        req = req.with_branch("perturbed", cond=req.conds["cond"])
        self.state.rows = req.rows("perturbed")
        try:
            r = inner(req)
        finally:
            self.state.rows = None
        if "perturbed" in r.parts:  # a rule below may have answered without the network
            r.x0 = r.x0 + scale * (r.parts["cond"] - r.parts["perturbed"])
        return r

    def end(self) -> None:
        self.swap.restore()
