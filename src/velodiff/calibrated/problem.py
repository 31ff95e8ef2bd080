"""What a solver calibration runs on: a batch of starting samples, a way to solve them over any grid with
any solver, and the high-NFE reference trajectory every candidate is scored against.

A :class:`Problem` hides whether the denoiser is a loaded model under classifier-free guidance (prompts,
seeds, size and guidance scale fixed by :func:`model_problem`) or any bare denoiser, such as the exact
Gaussian-mixture oracle (:func:`denoiser_problem`). Every run starts from the same samples at t_max, so a
candidate's error is its distance to the reference from the same noise: the latent MSE that DPM-Solver-v3
(Zheng et al. 2023, Sec. 6) and DC-Solver (Zhao et al. 2024, Sec. 4) calibrate against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..grids import make_grid
from ..schedules import F64, NoiseSchedule
from ..solvers import SolverSpec, get_solver

#: (ts, solver, solver options, callback) -> the final samples of the problem's batch
Runner = Callable[[Tensor, SolverSpec, Mapping[str, Any], Any], Tensor]
#: (x, t) -> x0 for the problem's batch (guidance applied): what the model statistics are measured on
Denoise = Callable[[Tensor, float], Tensor]


@dataclass
class Trajectory:
    """The reference solution on a fine grid: ``xs[k]`` the sample at ``ts[k]``; ``x0s[k]`` the
    prediction made there (``x0s`` has one entry fewer: none is made at the final time)."""

    ts: Tensor
    xs: list[Tensor]
    x0s: list[Tensor]

    @property
    def final(self) -> Tensor:
        return self.xs[-1]


@dataclass
class Problem:
    """A batch to calibrate on. ``x`` are the starting samples at the schedule's t_max; ``runner`` solves
    them; ``denoise`` evaluates the (guided) model on any batch of the same size; ``evaluations``
    counts the network evaluations spent (one per denoiser call, the batch and CFG branches together)."""

    schedule: NoiseSchedule
    x: Tensor
    runner: Runner
    denoise: Denoise
    reference_solver: str = "dpmpp_3m"
    reference_steps: int = 200
    objective: str = "geomean"
    evaluations: int = 0
    _reference: Trajectory | None = field(default=None, repr=False)

    def run(
        self,
        ts: Tensor,
        solver: str | SolverSpec,
        options: Mapping[str, Any] | None = None,
        callback: Any = None,
    ) -> Tensor:
        """The batch solved over ``ts`` (which must start at t_max) with ``solver``."""
        spec = get_solver(solver)
        ts = torch.as_tensor(ts, dtype=F64)
        if abs(float(ts[0]) - self.schedule.t_max) > 1e-9 * self.schedule.t_max:
            t_max = self.schedule.t_max
            raise VelodiffError(f"a calibration grid starts at t_max={t_max:g}, not {float(ts[0]):g}")
        self.evaluations += spec.nfe(len(ts) - 1, ends_at_zero=float(ts[-1]) == 0.0)
        return self.runner(ts, spec, dict(options or {}), callback).double().cpu()

    def reference(self) -> Trajectory:
        """The reference trajectory, solved once: ``reference_steps`` steps of ``reference_solver`` on a
        grid uniform in log-SNR that ends with the jump from t_min to 0."""
        if self._reference is None:
            ts = make_grid("logsnr", self.schedule, self.reference_steps)
            self._reference = self.trajectory(ts, self.reference_solver)
        return self._reference

    def trajectory(self, ts: Tensor, solver: str | SolverSpec, progress: Any = None) -> Trajectory:
        """The batch solved over ``ts`` with every step's sample and prediction kept (float64, CPU);
        ``progress()`` is called after each step."""
        xs, x0s = [self.x.double().cpu()], []

        def record(info: Any) -> None:
            x0s.append(info.x0.detach().double().cpu())
            xs.append(info.x.detach().double().cpu())
            if progress is not None:
                progress()

        self.run(ts, solver, {}, record)
        return Trajectory(torch.as_tensor(ts, dtype=F64), xs, x0s)

    def mse(self, x: Tensor) -> float:
        """Latent MSE of ``x`` to the reference's final samples (the bars' measure)."""
        return float(((x.double().cpu() - self.reference().final) ** 2).mean())

    def error(self, x: Tensor) -> float:
        """What a calibration minimizes: ``objective="mse"``, the latent MSE; ``"geomean"`` (default), the
        geometric mean over the images of each one's MSE, which a few chaotic images (a shape that
        appears or not from a small change) cannot dominate, so what is fitted is what the typical
        image needs (the mean is dominated by them on a dozen calibration images and did not transfer
        to held-out prompts: bench/calibrate/README.md)."""
        if self.objective == "mse":
            return self.mse(x)
        per = ((x.double().cpu() - self.reference().final) ** 2).flatten(1).mean(1)
        return float(per.clamp_min(1e-30).log().mean().exp())

    def score(self, ts: Tensor, solver: str | SolverSpec, options: Mapping[str, Any] | None = None) -> float:
        """The error of one sampler configuration; inf when it diverges (NaN or an overflow)."""
        try:
            err = self.error(self.run(ts, solver, options))
        except VelodiffError:
            return float("inf")
        return err if err == err else float("inf")


def model_problem(
    model: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance: float,
    size: tuple[int, int] | None = None,
) -> Problem:
    """The calibration batch of a loaded model: one image per (prompt, seed) at ``size`` (default the
    model's), sampled with classifier-free guidance at ``guidance``."""
    from ..noise import prior_sample
    from ..pipelines import text2img
    from ..pipelines.common import encode_batch_prompts, initial_noise
    from ..pipelines.setup import resolve_plan
    from ..sampling import denoise_once

    if len(prompts) != len(seeds):
        raise VelodiffError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    h, w = size or model.default_size
    z = initial_noise(model.latent_shape(len(prompts), h, w), list(seeds))
    sched = model.schedule
    common = dict(seeds=list(seeds), guidance=guidance, height=h, width=w, output="latent")

    def runner(ts: Tensor, spec: SolverSpec, options: Mapping[str, Any], callback: Any) -> Tensor:
        res = text2img(
            model,
            list(prompts),
            grid=ts.tolist(),
            solver=spec,
            solver_options=dict(options),
            latents=z,
            callback=callback,
            **common,
        )
        return res.latents

    cond = encode_batch_prompts(model, list(prompts), None, guidance != 1.0, h, w)
    plan = resolve_plan(None, guidance)

    def denoise(x: Tensor, t: float) -> Tensor:
        with torch.inference_mode():
            res = denoise_once(
                model.denoiser,
                x.to(model.device, torch.float32),
                t,
                cond,
                plan,
                context={"guidance": guidance},
            )
        return res.x0.double().cpu()

    return Problem(sched, prior_sample(sched, sched.t_max, z).double(), runner, denoise)


def denoiser_problem(denoiser: Any, x: Tensor, cond: Any = None) -> Problem:
    """The calibration batch of any denoiser (``velodiff.sampling.sample``'s contract): the samples
    ``x`` at t_max, with ``cond`` (a GuidedCond applies CFG through the default plan)."""
    from ..sampling import check_denoiser, denoise_once, sample

    check_denoiser(denoiser)  # a plain function: one line naming velodiff.ModelDenoiser

    def runner(ts: Tensor, spec: SolverSpec, options: Mapping[str, Any], callback: Any) -> Tensor:
        return sample(denoiser, x, ts, spec, cond=cond, callback=callback, **options).x

    def denoise(xx: Tensor, t: float) -> Tensor:  # the statistics' batches are on the CPU, the model need not
        with torch.inference_mode():
            return denoise_once(denoiser, xx.to(x.device), t, cond).x0.double().cpu()

    return Problem(denoiser.schedule, x, runner, denoise)
