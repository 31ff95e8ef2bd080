"""Reward steering in the vector field (Patel et al. 2024, 'Steering Rectified Flow Models in the Vector
Field for Controlled Image Generation', FlowChef, Alg. 1; in the spirit of RED-Diff, Mardani et al. 2023):
a differentiable reward R of the decoded clean-image estimate steers the *state* of the sampler, with the
network's Jacobian skipped (FlowChef's "gradient skipping": no backward through the denoiser):

    g = grad_{x0} R(decode(x0))                           (x0: the prediction the step made)
    x_{t'} <- x_{t'} + scale * sigma_{t'} * g / rms(g)    (after the step to t')

FlowChef moves x_t by -s grad L before its Euler step and steps with the velocity it already has, which
is the same as moving the step's result by the same vector; here the step is normalized (as layout
guidance's), so ``scale`` is a fraction of the noise level at t', the same for every model, VP or flow
(sigma from the run's schedule). Unlike the ``classifier`` rule (which changes the x0 prediction the
solver combines, Dhariwal & Nichol's score correction), the solver's own predictions stay exact and only
its state moves; the cost is a VAE decode and the reward's backward per steered step, no extra network
pass.

The reward: a Python callable (images (B, 3, H, W) in [0, 1] -> (B,) rewards to raise, e.g. a
CLIP score or an aesthetic model) or, from a plan string, ``target``: the log-probability that one of
the shipped FD-shapes encoder's heads reads the prompt's count / colours / shapes / colour-shape pairs
(``velodiff.guidance.classifier.prompt_target``; a prompt outside the shapes world is not steered).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Option, RunInfo, register_rule
from .cfg import POST, START, STOP, GuidanceRule
from .classifier import HEADS, log_likelihood, prompt_target

if TYPE_CHECKING:
    from torch import Tensor


@register_rule
class RewardSteering(GuidanceRule):
    """FlowChef-style reward steering of the sampler's state (module docstring)."""

    name = "reward"
    layer = POST + 6
    summary = "reward steering of the state through the decoded x0, the network's Jacobian skipped (FlowChef)"
    cost = "a VAE decode + the reward's backward per steered step (no network backward)"
    options = {
        "scale": Option(0.05, "step size, a fraction of sigma at the step's end", lo=0.0, hi=10.0),
        "target": Option("colors", "the FD-shapes head whose reading of the prompt is the reward", kind=str,
                         choices=HEADS[:5]),
        "temperature": Option(1.0, "temperature T on the head's logits", lo=1e-3, hi=100),
        "start": START,
        "stop": STOP,
    }

    def __init__(self, reward: Callable[[Tensor], Tensor] | None = None, **values: Any) -> None:
        super().__init__(**values)
        self.reward = reward

    def check(self, run: RunInfo) -> None:
        if run.model is None:
            raise VelodiffError("plan rule 'reward' needs a loaded model (it decodes x0 to an image)")
        if self.reward is None and not run.prompts:
            raise VelodiffError("plan rule 'reward' needs the run's prompts (or a reward= callable)")

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.goals: list[Any] = []
        if self.reward is None:
            from ..eval.features import load_encoder
            from .classifier import logits_where_it_lives

            self.read = logits_where_it_lives(load_encoder())
            prompts = list(run.prompts) * (run.batch // max(1, len(run.prompts)))
            self.goals = [prompt_target(p, self.target) for p in prompts[: run.batch]]

    def rewards(self, images: Tensor) -> Tensor:
        """(B,) rewards of the images (0 for an image whose prompt gives the head no target)."""
        import torch

        if self.reward is not None:
            r = self.reward(images)
            if r.shape != (images.shape[0],):
                raise VelodiffError(
                    f"plan rule 'reward': the reward gave shape {tuple(r.shape)} for {images.shape[0]} "
                    "images; return one number per image"
                )
            return r
        logits = self.read(images)

        def log_p(i: int, goal: Any) -> Tensor:
            heads = goal if self.target == "scene" else {self.target: goal}
            return sum(  # type: ignore[return-value]
                log_likelihood(logits[h][i], y, self.temperature, 1.0, h != "count") for h, y in heads.items()
            )

        none = images.sum() * 0.0  # an image without a target: no reward, no gradient
        # the scoring network may run on another device than the images (the shipped one on the CPU)
        return torch.stack([none if y is None else log_p(i, y).to(none.device)
                            for i, y in enumerate(self.goals)])

    def after_step(self, info: Any) -> Tensor | None:
        if self.scale == 0 or info.t <= 0 or not self.in_range(info.i):
            return None
        if self.reward is None and all(y is None for y in self.goals):
            return None
        import torch

        with torch.inference_mode(False), torch.enable_grad():
            z = info.x0.detach().clone().float().requires_grad_(True)
            (g,) = torch.autograd.grad(self.rewards(self.run.model.decode(z, grad=True)).sum(), z)
        rms = g.pow(2).mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt().clamp_min(1e-12)
        sigma = float(self.run.schedule.sigma(info.t))
        return (info.x + (self.scale * sigma * g / rms).to(info.x.dtype)).detach()
