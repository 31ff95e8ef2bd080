"""Self-recurrence (Bansal et al. 2023, 'Universal Guidance for Diffusion Models', Alg. 1, the loop over
k): after a guided step from x_t to x_s (s < t), re-noise the result back to t with fresh noise and take
the step again, k times in all, so the guidance of each step is applied k times while the network
re-projects the sample onto the data manifold in between (their remedy for a guidance step that is too
strong to take at once; the same move is FreeDoM's 'time-travel' and Restart sampling's inner loop).

The re-noising is the forward process from s to t (q(x_t | x_s), any schedule x_t = alpha_t x0 +
sigma_t eps, Eq. 10 of the paper written for VP):

    x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z,   z ~ N(0, I)

With an exact denoiser the recurrence leaves the sample's distribution unchanged (a deterministic step
maps the marginal at t to the one at s, the forward process maps it back); with guidance it compounds the
guided change of each step. The whole step repeats, with every rule's ``after_step`` (steering moves the
state each time); ``start`` / ``stop`` choose the steps. The noise of image j, step i, repetition r is
drawn from that image's seed by the velodiff noise contract (``velodiff.noise``), so an image does not
depend on its batch. Costs k times the network evaluations of each recurrent step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Option, RunInfo, register_rule
from .cfg import START, STOP, GuidanceRule

if TYPE_CHECKING:
    from torch import Tensor

#: the key under which the recurrence's noise is drawn (velodiff.noise: 1 is the solvers' step noise)
NOISE_KEY = 2


@register_rule
class SelfRecurrence(GuidanceRule):
    """Universal guidance's self-recurrence (module docstring)."""

    name = "recur"
    layer = 100  # evaluates nothing: its place in the stack does not matter
    summary = "universal guidance's self-recurrence: re-noise each step's result and take the step again"
    cost = "k x the network evaluations of every recurrent step"
    options = {
        "k": Option(2, "times each step is taken (1: no recurrence)", kind=int, lo=1, hi=16,
                    aliases=("recurrent_steps",)),
        "start": START,
        "stop": STOP,
    }
    #: the repeated steps draw noise: an inversion could not undo them
    stateful = True

    def check(self, run: RunInfo) -> None:
        if run.solver.draws_noise(run.options):
            raise VelodiffError(
                f"plan rule 'recur' retakes the steps of a deterministic solver; {run.solver.name!r} draws "
                "step noise here, which a retaken step would reuse: use ddim, dpmpp_2m, unipc, ... (eta 0)"
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.taken: dict[int, int] = {}

    def redo(self, info: Any) -> Tensor | None:
        taken = self.taken.get(info.i, 1)
        if taken >= self.k or not self.in_range(info.i):
            return None
        self.taken[info.i] = taken + 1
        sched, x = self.run.schedule, info.x
        ratio = float(sched.alpha(info.t_from)) / float(sched.alpha(info.t))
        var = float(sched.sigma(info.t_from)) ** 2 - ratio**2 * float(sched.sigma(info.t)) ** 2
        return ratio * x + max(var, 0.0) ** 0.5 * self.noise(x, info.i, taken)

    def noise(self, like: Tensor, step: int, repeat: int) -> Tensor:
        """Standard normal noise for repetition ``repeat`` of ``step``: per image from the run's seeds
        (one per image), or for the whole batch from its one seed."""
        import torch

        from ..noise import randn  # here, not at the top: plan strings parse without torch (CLI start-up)

        seeds = self.run.seeds or (0,)
        key = (NOISE_KEY, step, repeat)
        if len(seeds) == like.shape[0]:
            return torch.cat([randn((1, *like.shape[1:]), s, *key, device=like.device, dtype=like.dtype)
                              for s in seeds])
        return randn(tuple(like.shape), seeds[0], *key, device=like.device, dtype=like.dtype)
