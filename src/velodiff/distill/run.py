"""``velodiff distill progressive``: rounds of progressive distillation from a teacher folder, each a
resumable run (``train/loop.py``: safetensors checkpoints, loss.csv, bit-exact resume), the last
student written as a diffusers folder with its own sampling defaults (``sampling.json``)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..denoisers import x0_from_v_vp
from ..errors import VelodiffError
from ..files import write_atomic
from ..train.checkpoint import weights_digest
from ..train.loop import START, LoopConfig, run_loop
from ..train.trainer import batch_indices
from .progressive import student_grid, student_target, teacher_two_steps
from .teacher import load_teacher, save_student, teacher_folder, training_data


@dataclass
class ProgressiveConfig:
    teacher_steps: int = 20
    rounds: int = 2
    guidance: float = 2.5
    batch: int = 8
    cache_size: int = 256
    data_seed: int = 0


def _velocity(unet: Any, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, sched: Any) -> torch.Tensor:
    k = sched.timestep(t).to(x)
    return unet(x, k, ctx).sample


def make_x0_fn(unet: Any, sched: Any, ctx: torch.Tensor, uctx: torch.Tensor | None, w: float | torch.Tensor):
    """x0(x, t) of a v-prediction UNet, classifier-free guided at scale w (a number, or one per sample)
    when uctx is given: a x - s (v_u + w (v_c - v_u)) (Ho & Salimans 2022, Eq. 6, on v)."""
    per_sample = isinstance(w, torch.Tensor)

    def x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = sched.alpha(t).view(-1, 1, 1, 1).to(x)
        s = sched.sigma(t).view(-1, 1, 1, 1).to(x)
        if uctx is None or (not per_sample and w == 1.0):
            v = _velocity(unet, x, t, ctx, sched)
        else:
            both = _velocity(unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uctx, ctx]), sched)
            vu, vc = both.chunk(2)
            scale = w.view(-1, 1, 1, 1).to(x.device) if per_sample else w
            v = vu + scale * (vc - vu)
        return x0_from_v_vp(x, v, a, s)

    return x0


def distill_progressive(
    teacher: str,
    out: Path,
    run: Path,
    cfg: LoopConfig,
    pcfg: ProgressiveConfig,
    quiet: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    tpath = teacher_folder(teacher)
    model = load_teacher(tpath)
    steps = pcfg.teacher_steps
    if steps % (2**pcfg.rounds) != 0:
        k = 2**pcfg.rounds
        near = sorted({max(k, steps - steps % k), steps - steps % k + k})
        raise VelodiffError(
            f"--teacher-steps {steps} must be a multiple of {k} (2**rounds: each of the {pcfg.rounds} rounds "
            f"halves it); try {' or '.join(map(str, near))}"
        )
    sched = model.schedule
    cache, text, uncond, teacher_unet = training_data(model, pcfg.cache_size, pcfg.data_seed, device, quiet)
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for r in range(pcfg.rounds):
        n = steps // 2 ** (r + 1)
        w = pcfg.guidance if r == 0 else 1.0  # the first student folds the guidance in
        grid = student_grid(sched, n).to(torch.float32)
        student = copy.deepcopy(teacher_unet).train().requires_grad_(True)
        rcfg = copy.deepcopy(cfg)
        rcfg.extra = {**cfg.extra, **vars(pcfg), "round": r, "student_steps": n, "method": "progressive"}
        if r > 0:  # trained from the round before's student: resumed only from the same one
            rcfg.extra[START] = weights_digest(teacher_unet)

        def step_fn(
            step: int, gen: torch.Generator, student=student, teacher=teacher_unet, grid=grid, w=w, n=n
        ):
            idx = batch_indices(step, pcfg.batch, pcfg.cache_size, cfg.seed)
            z0, ids = cache.get(idx)
            b = len(idx)
            i = torch.randint(0, n, (b,), generator=gen)
            eps = torch.randn(z0.shape, generator=gen).to(device)
            t, t2 = grid[i].to(device), grid[i + 1].to(device)
            tm = 0.5 * (t + t2)
            a = sched.alpha(t).view(-1, 1, 1, 1).float().to(device)
            s = sched.sigma(t).view(-1, 1, 1, 1).float().to(device)
            x = a * z0 + s * eps
            with torch.no_grad():
                ctx = text(ids).last_hidden_state
                uctx = text(uncond[None].expand(b, -1)).last_hidden_state
                x2 = teacher_two_steps(make_x0_fn(teacher, sched, ctx, uctx, w), x, t, tm, t2, sched)
                pos = t2 > 0
                a2 = torch.where(pos, sched.alpha(t2.clamp_min(sched.t_min)).float(), torch.ones_like(t2))
                s2 = torch.where(pos, sched.sigma(t2.clamp_min(sched.t_min)).float(), torch.zeros_like(t2))
                target = student_target(x, x2, a, s, a2.view(-1, 1, 1, 1), s2.view(-1, 1, 1, 1))
            pred = make_x0_fn(student, sched, ctx, None, 1.0)(x, t)
            snr = (a / s).pow(2).view(-1).clamp_min(1.0)
            per = (pred - target).pow(2).mean(dim=(1, 2, 3))
            return (snr * per).mean(), {"mse": per.detach().mean()}

        summary = run_loop(
            run / f"round-{r}",
            rcfg,
            {"unet": student},
            step_fn,
            desc=f"progressive {2 * n}->{n}",
            quiet=quiet,
        )
        summary.pop("emas")
        log.append({"round": r, "student_steps": n, **summary})
        if not summary["completed"]:
            break
        teacher_unet = student.eval().requires_grad_(False)
        if r < pcfg.rounds - 1:  # every round's student is a model of its own: out-<n>steps
            mid = {"solver": "ddim", "steps": n, "guidance": 1.0, "grid": "trailing", "trained_steps": n}
            save_student(
                tpath,
                copy.deepcopy(student),
                out.with_name(f"{out.name}-{n}steps"),
                mid,
                f"# progressive-distilled student ({n} steps), round {r} of {pcfg.rounds}\n",
            )
    wall = time.perf_counter() - t0
    done = log[-1]
    if not done["completed"]:
        return {"rounds": log, "wall_s": wall, "out": None}
    n = done["student_steps"]
    sampling = {"solver": "ddim", "steps": n, "guidance": 1.0, "grid": "trailing", "trained_steps": n}
    card = (
        f"# progressive-distilled student ({n} steps)\n\nTeacher: {tpath}\nRounds: {json.dumps(log)}\n"
        f"Sampling: {json.dumps(sampling)} (guidance {pcfg.guidance} folded in by round 0)\n"
    )
    save_student(tpath, teacher_unet, out, sampling, card)
    write_atomic(run / "summary.json", json.dumps({"rounds": log, "wall_s": wall, "out": str(out)}, indent=1))
    return {"rounds": log, "wall_s": wall, "out": str(out)}
