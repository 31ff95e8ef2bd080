"""Classifier guidance with an off-the-shelf classifier on the denoised image (Ma et al. 2024,
'Elucidating The Design Space of Classifier-Guided Diffusion Generation', EluCD): a classifier that was
never trained on noisy images reads the decoded x0 prediction, and its gradient steers the sample.

Classifier guidance (Dhariwal & Nichol 2021, Eq. 14) adds s grad_x log p(y | x_t) to the score, that is
eps <- eps - s sigma_t grad_x; on velodiff's x0 predictions, x0 <- x0 + s (sigma_t^2 / alpha_t) grad_x.
With the classifier on the decoded estimate, g = grad_{x0} log p_T(y | decode(x0)) and grad_x = J^T g,
J = dx0 / dx_t:

* ``through=network`` (universal guidance's forward guidance, Bansal et al. 2023, Eq. 6): J exactly, by a
  backward pass through the conditional network evaluation (one extra forward + backward per step);
* ``through=x0`` (EluCD: the gradient on the detached x0, no network backward): J of the denoiser of
  unit-variance Gaussian data, alpha / (alpha^2 + sigma^2), so x0 <- x0 + s sigma^2 / (alpha^2 + sigma^2) g
  (the plain sigma^2 / alpha step with J = 1 explodes at high noise, where alpha -> 0);
* ``through=noisy`` (Dhariwal & Nichol's own classifier guidance): a noise-aware classifier reads x_t and
  its log-SNR itself, g = grad_{x_t} log p(y | x_t) directly (no decode, no network backward); the shipped
  one is the noise-aware pair counter (``head=pair_counts``, ``velodiff.guidance.noisy_counter``).

Both steps are weighted by EluCD's time factor w(t) below. The log-likelihood is EluCD's calibration of the
off-the-shelf classifier (Sec. 4.2, their code's 'joint' and 'margin' temperatures):

    log p_T(y | x) = T l_y(x) - logsumexp_j(T d l_j(x))     (softmax heads)
    log p_T(y | x) = sum_k log sigmoid(+-T l_k(x))          (multi-label heads: + named, - absent)

(T = ``temperature``, d = ``margin``: d < 1 keeps part of the joint log p(x, y) term) and EluCD's time
factor w(t) = 1 + gamma sin(pi t / t_max) (their guidance schedule: extra weight in the middle of the
trajectory).

The classifier (plan string): the shipped FD-shapes encoder's heads (``velodiff.eval.features``, trained
on clean and blurred renders, never on noisy images); the target comes from the prompt (the shapes
world's grammar): ``count`` the number of objects it names, ``colors`` / ``shapes`` / ``pairs`` the
colours, shapes and colour-shape pairs it names (the others absent), ``scene`` the four heads summed. A
prompt outside that grammar is sampled unguided. From Python, ``classifier`` (images in [0, 1] -> logits;
with ``through=noisy``, (x_t, log-SNR) -> logits) and ``targets`` (one class index per image) take any
softmax classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Cost, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .cfg import POST, START, STOP, GuidanceRule

if TYPE_CHECKING:
    from torch import Tensor

#: the FD-shapes encoder's heads a prompt gives a target for ("scene" sums all four), and the pair counter
HEADS = ("count", "colors", "shapes", "pairs", "scene", "pair_counts")


def prompt_target(prompt: str, head: str) -> Any:
    """What ``head`` should read off an image of ``prompt``: the class index of the number of objects
    (count), the indices of the colours / shapes / colour-shape pairs named (the others should be absent),
    or for "scene" a dict of all four; None for a prompt outside the shapes world's grammar."""
    from ..data.shapes import COLORS, SHAPES, ShapesSpecError, color_shape_pairs, parse_caption
    from ..eval.features import MAX_OBJECTS

    try:
        objects = parse_caption(prompt)["objects"]
    except ShapesSpecError:
        return None
    if head == "scene":
        parts = {h: prompt_target(prompt, h) for h in HEADS[:4]}
        return None if parts["count"] is None else parts
    if head == "pair_counts":
        from .pair_counter import pair_counts

        return pair_counts(objects).tolist()
    if head == "count":
        n = sum(o["count"] for o in objects)
        return n - 1 if 1 <= n <= MAX_OBJECTS else None
    key = {"colors": lambda o: o["color"], "shapes": lambda o: o["shape"],
           "pairs": lambda o: (o["color"], o["shape"])}[head]
    classes = {"colors": list(COLORS), "shapes": list(SHAPES), "pairs": color_shape_pairs()}[head]
    return sorted({classes.index(key(o)) for o in objects})


def logits_where_it_lives(net: Any) -> Callable[..., Any]:
    """``net.logits`` for inputs on any device: the shipped readers are shared and cached, so they stay
    where they are (moving one would move it for every other user) and the inputs go to them; the
    gradient flows back across the move."""
    import torch

    here = next(net.parameters()).device
    return lambda *xs: net.logits(*(x.to(here) if torch.is_tensor(x) else x for x in xs))


def log_likelihood(
    logits: Tensor, target: Any, temperature: float, margin: float, multilabel: bool
) -> Tensor:
    """EluCD's calibrated log p(y | x) of one image (module docstring)."""
    import torch

    if multilabel:
        sign = -torch.ones_like(logits)
        sign[list(target)] = 1.0
        return torch.nn.functional.logsigmoid(sign * temperature * logits).sum()
    y = torch.as_tensor(target, device=logits.device)
    picked = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # one softmax head, or one per row (K, C)
    return (temperature * picked - torch.logsumexp(temperature * margin * logits, dim=-1)).sum()


@register_rule
class ClassifierGuidance(GuidanceRule):
    """Off-the-shelf classifier guidance (module docstring)."""

    name = "classifier"
    layer = POST + 5  # on the final x0, after every guidance rule and rescale
    summary = "classifier guidance through the decoded x0 with an off-the-shelf classifier (EluCD)"
    cost = "a VAE decode + classifier backward per step; through=network also a cond forward + backward"
    options = {
        "scale": Option(1.0, "classifier guidance scale s", lo=0.0, aliases=("classifier_scale",)),
        "head": Option("count", "what to steer toward, read off the prompt", kind=str, choices=HEADS),
        "temperature": Option(1.0, "EluCD's joint temperature T on the logits", lo=1e-3, hi=100,
                              aliases=("joint_temperature",)),
        "margin": Option(1.0, "EluCD's margin temperature discount d (softmax heads)", lo=0.0, hi=1.0,
                         aliases=("margin_temperature_discount",)),
        "gamma": Option(0.0, "EluCD's sine schedule factor: w(t) = 1 + gamma sin(pi t / t_max)", lo=0.0,
                        aliases=("gamma_factor",)),
        "through": Option("x0", "differentiate w.r.t. the denoised x0 (EluCD), through the network to x_t "
                          "(universal guidance), or a noise-aware classifier of x_t itself (noisy: D&N)",
                          kind=str, choices=("x0", "network", "noisy")),
        "start": START,
        "stop": STOP,
    }

    def __init__(
        self,
        classifier: Callable[[Tensor], Tensor] | None = None,
        targets: Sequence[int] | None = None,
        **values: Any,
    ) -> None:
        super().__init__(**values)
        if (classifier is None) != (targets is None):
            raise VelodiffError("plan rule 'classifier': pass both classifier and targets, or neither")
        self.classifier, self.targets = classifier, targets

    def check(self, run: RunInfo) -> None:
        if run.model is None:
            raise VelodiffError("plan rule 'classifier' needs a loaded model (it decodes x0 to an image)")
        if self.classifier is None and not run.prompts:
            raise VelodiffError(
                "plan rule 'classifier' needs the run's prompts (or a classifier= and its targets=)"
            )
        if self.through == "noisy" and self.classifier is None and self.head != "pair_counts":
            raise VelodiffError(
                f"plan rule 'classifier': through=noisy needs a noise-aware classifier; the shipped one is "
                f"head=pair_counts, not head={self.head} (or pass classifier=, reading x_t and its log-SNR)"
            )
        if self.targets is not None and len(self.targets) != run.batch:
            raise VelodiffError(
                f"plan rule 'classifier': {len(self.targets)} targets for a batch of {run.batch} images"
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        if self.classifier is not None:
            self.read, self.goals = self.classifier, list(self.targets or [])
            return
        from ..eval.features import load_encoder
        from .noisy_counter import load_noisy_counter
        from .pair_counter import load_counter

        if self.through == "noisy":
            net = load_noisy_counter(run.model)
        else:
            net = load_counter() if self.head == "pair_counts" else load_encoder()
        self.read = logits_where_it_lives(net)
        prompts = list(run.prompts) * (run.batch // max(1, len(run.prompts)))
        self.goals = [prompt_target(p, self.head) for p in prompts[: run.batch]]

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        r = inner(req)
        if self.scale == 0 or not self.in_range(req.step) or all(g is None for g in self.goals):
            return r
        import torch

        from ..denoisers import broadcast_time

        sched = self.run.schedule
        t = broadcast_time(req.t, r.x0)
        w = 1.0 + self.gamma * torch.sin(math.pi * t / float(sched.t_max))
        a, sig = sched.alpha(t), sched.sigma(t)
        # x0 <- x0 + s w sigma^2 / alpha grad_x (D&N Eq. 14 on x0); grad_x = J^T g with J = dx0/dx_t
        # (network), or J = alpha / (alpha^2 + sigma^2), the denoiser of unit-variance Gaussian data (x0), or
        # grad_x itself from a classifier of x_t (noisy)
        step = self.scale * w * sig**2 * (1 / (a**2 + sig**2) if self.through == "x0" else 1 / a)
        r.x0 = r.x0 + step.to(r.x0.dtype) * self.gradient(req, r.x0).to(r.x0.dtype)
        if self.through == "network":  # the conditional pass again, with its backward
            r.cost = r.cost + Cost(1, 1)
        return r

    def gradient(self, req: EvalRequest, x0: Tensor) -> Tensor:
        """g = grad sum_i log p_T(y_i | decode(x0_i)) w.r.t. x0 (EluCD) or, through the conditional
        pass, w.r.t. x_t; or grad sum_i log p_T(y_i | x_t) of a noise-aware classifier (zero for images
        without a target)."""
        import torch

        with torch.inference_mode(False), torch.enable_grad():
            wrt = (x0 if self.through == "x0" else req.x).detach().clone().requires_grad_(True)
            if self.through == "noisy":  # a classifier of x_t and its log-SNR
                t = torch.as_tensor(req.t, dtype=torch.float64)
                logits = self.read(wrt, self.run.schedule.log_snr(t))
            else:  # a classifier of the decoded x0, for "network" through the conditional pass
                network = self.through == "network"
                z = self.run.model.denoiser(wrt, req.t, req.conds["cond"]) if network else wrt
                logits = self.read(self.run.model.decode(z, grad=True))
            terms = [self.log_likelihood(logits, i, y) for i, y in enumerate(self.goals) if y is not None]
            (g,) = torch.autograd.grad(torch.stack(terms).sum(), wrt)
        return g.detach()

    def log_likelihood(self, logits: Tensor | dict[str, Tensor], i: int, target: Any) -> Tensor:
        """log p_T(target | image i): one head, or the sum over the heads of a "scene" target."""
        if not isinstance(logits, dict):  # a Python classifier: softmax logits
            return log_likelihood(logits[i], target, self.temperature, self.margin, False)
        heads = target if isinstance(target, dict) else {self.head: target}
        return sum(  # type: ignore[return-value]
            log_likelihood(logits[h][i], y, self.temperature, self.margin, h not in ("count", "pair_counts"))
            for h, y in heads.items()
        )
