"""Guided distillation, stage one (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
Sec. 4.1): a student that takes the guidance scale w as an input matches the teacher's classifier-free
guided prediction in one pass, so sampling at any w in [w_min, w_max] costs one network evaluation per
step instead of two.

The student is the teacher's UNet with a guidance input: diffusers' ``time_cond_proj_dim`` (a linear map
of a Fourier embedding of w added to the time embedding, as LCM's w-conditioning), initialised to zero,
so the student starts as the teacher's conditional model. Per step: scenes z0 from the latent cache,
t ~ U(t_min, 1), w ~ U(w_min, w_max), z_t = a z0 + s eps; the teacher's guided velocity
v_w = v_u + w (v_c - v_u) (two passes, no gradient); the loss is the truncated-SNR-weighted x0 error of
the student's v(z_t, t, c, w) against it (the paper's Eq. 6 in x0 form, the weighting of the
progressive rounds)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..denoisers import x0_from_v_vp
from ..errors import VelodiffError
from ..models.base import guidance_embedding
from ..train.loop import LoopConfig, run_loop
from ..train.trainer import batch_indices
from .run import make_x0_fn
from .teacher import load_teacher, save_student, teacher_folder, training_data

#: width of the student's guidance embedding (diffusers' LCM UNets use 256)
EMBEDDING_DIM = 256


@dataclass
class GuidedConfig:
    w_min: float = 1.0
    w_max: float = 4.0
    #: the scale the student samples at by default (its sampling.json)
    guidance: float = 2.5
    batch: int = 8
    cache_size: int = 256
    data_seed: int = 0


def guided_student(teacher_unet: Any) -> Any:
    """The teacher's UNet with a zero-initialised guidance input (``time_cond_proj_dim``)."""
    from diffusers import UNet2DConditionModel

    if teacher_unet.config.get("time_cond_proj_dim"):
        raise VelodiffError("the teacher's UNet already takes a guidance input (time_cond_proj_dim)")
    config = {**teacher_unet.config, "time_cond_proj_dim": EMBEDDING_DIM}
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher_unet.parameters()).device)


def student_cond(w: torch.Tensor) -> torch.Tensor:
    """``timestep_cond`` for scales ``w`` (LCM's convention: the embedding of w - 1)."""
    return guidance_embedding(w - 1.0, EMBEDDING_DIM)


def distill_guided(
    teacher: str,
    out: Path,
    run: Path,
    cfg: LoopConfig,
    gcfg: GuidedConfig,
    quiet: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:

    if not 0 <= gcfg.w_min <= gcfg.w_max:
        raise VelodiffError(f"need 0 <= --w-min <= --w-max, got {gcfg.w_min} and {gcfg.w_max}")
    if not gcfg.w_min <= gcfg.guidance <= gcfg.w_max:
        raise VelodiffError(
            f"--guidance {gcfg.guidance} is outside the trained range [{gcfg.w_min}, {gcfg.w_max}]"
        )
    tpath = teacher_folder(teacher)
    model = load_teacher(tpath)
    sched = model.schedule
    cache, text, uncond, teacher_unet = training_data(model, gcfg.cache_size, gcfg.data_seed, device)
    student = guided_student(teacher_unet).train().requires_grad_(True)
    rcfg = LoopConfig(**{**vars(cfg), "extra": {**cfg.extra, **vars(gcfg), "method": "guided"}})

    def step_fn(step: int, gen: torch.Generator):
        idx = batch_indices(step, gcfg.batch, gcfg.cache_size, cfg.seed)
        z0, ids = cache.get(idx)
        b = len(idx)
        t = sched.t_min + (1 - sched.t_min) * torch.rand(b, generator=gen, dtype=torch.float64)
        w = gcfg.w_min + (gcfg.w_max - gcfg.w_min) * torch.rand(b, generator=gen)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        a = sched.alpha(t).float().view(-1, 1, 1, 1).to(device)
        s = sched.sigma(t).float().view(-1, 1, 1, 1).to(device)
        k = sched.timestep(t).float().to(device)
        x = a * z0 + s * eps
        with torch.no_grad():
            ctx = text(ids).last_hidden_state
            uctx = text(uncond[None].expand(b, -1)).last_hidden_state
            target = make_x0_fn(teacher_unet, sched, ctx, uctx, w)(x, t)  # the teacher's guided x0
        v = student(x, k, ctx, timestep_cond=student_cond(w).to(device)).sample
        per = (x0_from_v_vp(x, v, a, s) - target).pow(2).mean(dim=(1, 2, 3))
        snr = (a / s).pow(2).view(-1).clamp_min(1.0)
        return (snr * per).mean(), {"mse": per.detach().mean()}

    t0 = time.perf_counter()
    summary = run_loop(run, rcfg, {"unet": student}, step_fn, desc="guided distillation", quiet=quiet)
    summary.pop("emas")
    wall = time.perf_counter() - t0
    if not summary["completed"]:
        return {**summary, "wall_s": wall, "out": None}
    sampling = {"solver": "dpmpp_2m", "steps": 20, "guidance": 1.0, "embedded_guidance": gcfg.guidance,
                "trained_guidance": [gcfg.w_min, gcfg.w_max]}
    card = (
        "# guidance-distilled student (one pass per step)\n\n"
        f"Teacher: {tpath}\nTrained: {summary['steps']} steps x batch {gcfg.batch}, w in "
        f"[{gcfg.w_min}, {gcfg.w_max}], {wall:.0f} s on {device}\nSampling: {sampling}\n"
    )
    save_student(tpath, student.eval(), out, sampling, card)
    return {**summary, "wall_s": wall, "out": str(out)}
