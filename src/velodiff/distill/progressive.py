"""Progressive distillation (Salimans & Ho 2022): a student of N steps learns, in one DDIM step, what
the teacher does in two; each round halves the steps and the student becomes the next teacher.

Latent v-prediction UNet over a VP schedule in continuous time t in (0, 1] (``DiscreteVP``). The
teacher may be sampled with classifier-free guidance at scale ``w`` (two passes); the student gets the
guided target in one pass (so it samples with guidance 1).

Target (the paper's Eq. 8 in x0 form): with z_t, two teacher DDIM steps t -> t' -> t'' give z_t''; the
x0 that one DDIM step t -> t'' must predict to land there is
    x0* = (z_t'' - (s''/s) z_t) / (a'' - (s''/s) a),
and the loss is max(snr, 1) |x0_student - x0*|^2 (the truncated-SNR weighting)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..grids import make_grid
from ..schedules import DiscreteVP


def ddim_step(x: Tensor, x0: Tensor, a: Tensor, s: Tensor, a2: Tensor, s2: Tensor) -> Tensor:
    """Deterministic DDIM from (a, s) to (a2, s2) given the clean estimate x0."""
    eps = (x - a * x0) / s
    return a2 * x0 + s2 * eps


def student_target(x: Tensor, x2: Tensor, a: Tensor, s: Tensor, a2: Tensor, s2: Tensor) -> Tensor:
    """The x0 one DDIM step from (a, s) must predict to reach x2 at (a2, s2) from x."""
    r = s2 / s
    return (x2 - r * x) / (a2 - r * a)


def student_grid(sched: DiscreteVP, steps: int) -> Tensor:
    """The student's time grid (steps + 1 points, ending at clean data): diffusers' ``trailing``
    spacing, t = 1, 1 - 1/N, ..., 1/N, 0, which the ``ddim`` solver samples it with. The grids nest:
    the midpoints are the 2N-step grid's extra points, so the teacher runs its own 2N-step DDIM."""
    return make_grid("trailing", sched, steps, final="zero")


def teacher_two_steps(
    teacher_x0: Any, x: Tensor, t: Tensor, t_mid: Tensor, t2: Tensor, sched: DiscreteVP
) -> Tensor:
    """Two teacher DDIM steps t -> t_mid -> t2 (``teacher_x0(x, t) -> x0``); t2 = 0 means clean."""

    def coef(tt: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.where(tt > 0, sched.alpha(tt.clamp_min(sched.t_min)), torch.ones_like(tt))
        s = torch.where(tt > 0, sched.sigma(tt.clamp_min(sched.t_min)), torch.zeros_like(tt))
        return a.view(-1, 1, 1, 1).to(x.dtype), s.view(-1, 1, 1, 1).to(x.dtype)

    a, s = coef(t)
    am, sm = coef(t_mid)
    a2, s2 = coef(t2)
    xm = ddim_step(x, teacher_x0(x, t), a, s, am, sm)
    return ddim_step(xm, teacher_x0(xm, t_mid), am, sm, a2, s2)
