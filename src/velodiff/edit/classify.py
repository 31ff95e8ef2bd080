"""The diffusion model as a zero-shot classifier (Li et al. 2023, "Your Diffusion Model is Secretly a
Zero-Shot Classifier", arXiv 2303.16203).

The image is encoded to latents ``x0``; for shared pairs (t_k, eps_k) every candidate prompt ``c`` is scored
by the denoising error the model makes on ``x_t = alpha_t x0 + sigma_t eps`` (their Eq. 5-6, a Monte Carlo
estimate of the ELBO's eps-prediction term, with the same pairs for every candidate so that the noise
cancels in the comparison)::

    score(c) = mean_k || eps_k - eps_theta(x_{t_k}, t_k, c) ||^2,  label = argmin_c score(c)

Any prediction type is turned into ``x0_theta`` by velodiff's denoiser, so the eps error is computed as
``(alpha_t / sigma_t)^2 ||x0 - x0_theta||^2`` (eps_theta = (x_t - alpha_t x0_theta) / sigma_t); ``weighting
="v"`` uses ``||v - v_theta||^2 = ||x0 - x0_theta||^2 / sigma_t^2`` (alpha^2 + sigma^2 = 1) and ``"x0"`` the
plain latent error. Times are a stratified (van der Corput) sequence over ``t_range`` of the schedule, so
the first few pairs already cover the range.

Adaptive pruning (the paper's Sec. 3.2, "Efficient classification"): in rounds, every remaining candidate is
brought to ``samples`` pairs in total, then only the ``keep`` best (lowest mean error) survive; the last
round's best is the label (``rounds`` zips the reference code's ``n_samples`` and ``to_keep`` lists). The
default, 28 -> 6 -> 2 candidates at 4 / 16 / 48 pairs, costs 248 network
evaluations instead of 28 x 48 = 1344.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError, check_text
from ..limits import MAX_STEPS, is_integer, is_number

#: (samples per candidate by the end of the round, candidates kept after it)
ROUNDS: tuple[tuple[int, int], ...] = ((4, 6), (16, 2), (48, 1))
WEIGHTINGS = ("eps", "v", "x0")


@dataclass
class Classification:
    """The label, every candidate's mean error over the pairs it got (lower is better) and the cost."""

    label: str
    index: int
    labels: list[str]
    errors: list[float]
    samples: list[int]  # pairs each candidate was scored on (pruned ones: fewer)
    evaluations: int  # network evaluations (one per candidate and pair)
    seconds: float
    rounds: list[list[str]] = field(default_factory=list)  # the candidates alive in each round

    def as_dict(self) -> dict[str, Any]:
        ranked = sorted(range(len(self.labels)), key=lambda i: (-self.samples[i], self.errors[i]))
        return {
            "label": self.label,
            "index": self.index,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 4),
            "ranking": [
                {"label": self.labels[i], "error": self.errors[i], "samples": self.samples[i]} for i in ranked
            ],
            "rounds": self.rounds,
        }


def _van_der_corput(n: int) -> list[float]:
    out = []
    for k in range(1, n + 1):
        x, denom = 0.0, 1.0
        while k:
            denom *= 2
            k, r = divmod(k, 2)
            x += r / denom
        out.append(x)
    return out


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(s).strip() for s in labels]
    check_text(labels, "candidate label")
    if not labels or not any(labels):
        raise VelodiffError(
            'no candidate labels; give at least two, e.g. --labels "a red circle,a blue square"'
        )
    if any(not s for s in labels):
        raise VelodiffError("a candidate label is empty; remove the empty entry (a doubled comma?)")
    # CLIP's tokenizer lowercases and splits on whitespace: labels differing only there are one prompt
    keys = [" ".join(s.lower().split()) for s in labels]
    dup = [s for s, k in zip(labels, keys, strict=True) if keys.count(k) > 1]
    if dup:
        raise VelodiffError(
            f"candidate labels repeat (ignoring case and spacing): {', '.join(repr(s) for s in dup)}"
        )
    if len(labels) < 2:
        raise VelodiffError("one candidate label only; give at least two to choose between")
    return labels


def check_rounds(rounds: Sequence[Sequence[int]] | str) -> list[tuple[int, int]]:
    """The pruning rounds as (samples, keep) pairs: a list of pairs, or the CLI's text "4:6,16:2,48:1"."""
    try:
        pairs = [r.split(":") for r in rounds.split(",")] if isinstance(rounds, str) else rounds
        out = [(int(n), int(k)) for n, k in pairs]
    except (TypeError, ValueError):
        raise VelodiffError(f"rounds {rounds!r}: give samples:keep pairs, e.g. 4:6,16:2,48:1") from None
    if not out or any(n < 1 or k < 1 for n, k in out):
        raise VelodiffError("each pruning round needs samples >= 1 and keep >= 1")
    if (most := max(n for n, _ in out)) > MAX_STEPS:  # the samples are network evaluations per label
        raise VelodiffError(f"a pruning round takes at most {MAX_STEPS} samples, got {most}")
    if any(b[0] <= a[0] or b[1] > a[1] for a, b in zip(out, out[1:], strict=False)):
        raise VelodiffError(
            "pruning rounds must have growing samples and non-growing keep, e.g. 4:6,16:2,48:1"
        )
    return out


def image_latents(model: Any, image: Any) -> Tensor:
    """A PIL RGB image (or a float tensor (3, H, W) in [0, 1]) -> latents (1, C, h, w); one line for a
    wrong mode or size."""
    import numpy as np

    if isinstance(image, Tensor | np.ndarray):  # in [0, 1], as img2img's (0-255 read as another label)
        from ..pipelines.images import image_tensor

        x = image_tensor(image, "image")
        if x.shape[0] != 1:
            raise VelodiffError(f"classify takes one image; the tensor holds {x.shape[0]}")
        x = x[0]
    else:
        mode = getattr(image, "mode", None)
        if mode == "RGBA" and image.getextrema()[3][0] == 255:
            image = image.convert("RGB")
        elif mode == "L":
            image = image.convert("RGB")
        if mode is None or image.mode != "RGB":
            raise VelodiffError(
                f"the image's mode is {mode!r}; give an RGB image (or L, or RGBA without transparency)"
            )
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = x.shape[1:]
    f = model.vae_scale_factor
    if h % f or w % f or h < f or w < f:
        raise VelodiffError(f"the image is {w}x{h}; its sides must be multiples of {f} for this model")
    if (h, w) != tuple(model.default_size):
        dh, dw = model.default_size
        raise VelodiffError(f"the image is {w}x{h}; this model was trained at {dw}x{dh}: resize it to that")
    return model.encode(x[None])


def classify(
    model: Any,
    image: Any,
    labels: Sequence[str],
    *,
    rounds: Sequence[Sequence[int]] = ROUNDS,
    weighting: str = "eps",
    t_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 64,
) -> Classification:
    """Classify ``image`` among ``labels`` (prompts) by the model's denoising error (Li et al. 2023) with
    the paper's adaptive pruning (``rounds``: (samples, keep) per round). ``t_range``: the share of the
    schedule's time range the pairs are drawn from. Returns a :class:`Classification`. Takes turns with
    the runs of the model's network in other threads (their rules change it while they run)."""
    from ..pipelines.common import check_model_like
    from ..sampling import network_lock

    check_model_like(model, ("schedule", "denoiser", "encode", "encode_prompt"))
    with network_lock(getattr(model, "network", None)), torch.no_grad():
        return _classify(model, image, labels, rounds, weighting, t_range, seed, batch_size)


def _classify(
    model: Any,
    image: Any,
    labels: Sequence[str],
    rounds: Sequence[Sequence[int]],
    weighting: str,
    t_range: tuple[float, float],
    seed: int,
    batch_size: int,
) -> Classification:
    from ..noise import check_seed

    t0 = time.perf_counter()
    texts = isinstance(labels, Sequence) and not isinstance(labels, str)
    if not texts or any(not isinstance(s, str) for s in labels):
        raise VelodiffError(f"labels is a list of prompts, got {labels!r:.60}")
    labels = check_labels(labels)
    rounds = check_rounds(rounds)
    if not is_integer(batch_size) or batch_size < 1:
        raise VelodiffError(f"batch_size must be an integer >= 1, got {batch_size!r}")  # -1 ran nothing
    check_seed(seed)
    if weighting not in WEIGHTINGS:
        from ..errors import unknown_name

        raise unknown_name("weighting", weighting, WEIGHTINGS)
    if not (isinstance(t_range, Sequence) and len(t_range) == 2
            and all(is_number(v) for v in t_range)):
        raise VelodiffError(f"t_range is a pair (lo, hi) of shares of the time range, got {t_range!r}")
    lo, hi = (float(v) for v in t_range)
    if not 0.0 <= lo < hi <= 1.0:
        raise VelodiffError(f"t_range must satisfy 0 <= lo < hi <= 1; got {t_range}")
    x0 = image_latents(model, image).float()
    sched = model.schedule
    n = rounds[-1][0]
    t_min, t_max = float(sched.t_min), float(sched.t_max)
    u = torch.tensor(_van_der_corput(n), dtype=torch.float64)
    ts = t_min + (t_max - t_min) * (lo + (hi - lo) * u)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *x0.shape[1:]), generator=gen, dtype=torch.float32)
    alpha = sched.alpha(ts).to(torch.float32)
    sigma = sched.sigma(ts).to(torch.float32)
    weight = {"eps": (alpha / sigma) ** 2, "v": 1.0 / sigma**2, "x0": torch.ones_like(sigma)}[weighting]
    x0d = x0.to(model.device)
    # noise and schedule live on the CPU (the draw is the same on every device); the latents may not
    xt = (alpha.view(-1, 1, 1, 1) * x0.cpu() + sigma.view(-1, 1, 1, 1) * noise).to(model.device)
    emb = model.encode_prompt(labels, guided=False)["encoder_hidden_states"]

    sums = [0.0] * len(labels)
    done = [0] * len(labels)
    alive = list(range(len(labels)))
    history, evals = [], 0
    for samples, keep in rounds:
        history.append([labels[i] for i in alive])
        jobs = [(c, k) for c in alive for k in range(done[c], samples)]
        for b in range(0, len(jobs), batch_size):
            part = jobs[b : b + batch_size]
            ci = torch.tensor([c for c, _ in part])
            ki = torch.tensor([k for _, k in part])
            pred = model.denoiser(xt[ki], ts[ki], {"encoder_hidden_states": emb[ci.to(emb.device)]})
            err = ((pred.float() - x0d) ** 2).mean(dim=(1, 2, 3)).cpu() * weight[ki]
            if not bool(err.isfinite().all()):  # a ranking of NaNs would still name a label
                raise VelodiffError("the model returned NaN or inf while classifying; check its weights")
            for (c, _), e in zip(part, err.tolist(), strict=True):
                sums[c] += e
            evals += len(part)
        for c in alive:
            done[c] = max(done[c], samples)
        alive = sorted(alive, key=lambda c: sums[c] / done[c])[: min(keep, len(alive))]
        if len(alive) == 1:
            break
    best = alive[0]
    errors = [sums[i] / done[i] if done[i] else math.inf for i in range(len(labels))]
    return Classification(
        label=labels[best],
        index=best,
        labels=labels,
        errors=errors,
        samples=done,
        evaluations=evals,
        seconds=time.perf_counter() - t0,
        rounds=history,
    )
