"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1; LCM-LoRA,
Luo et al. 2023b): a student f(x, t) that maps any point of the teacher's guided probability-flow ODE
to its origin, so a few steps of multistep consistency sampling (the ``lcm`` solver) give a sample.

Latent v-prediction UNet over a discrete VP schedule (``DiscreteVP``, integer timesteps k, t = (k+1)/N).
Per training step: scenes z0 from the latent cache; an index n on the skipping-step grid of the teacher's
timesteps k_n = (n + 1) c - 1 (c = N // origin_steps, diffusers' ``num_ddim_timesteps``), its
predecessor k' = max(k_n - c, 0); x = a_n z0 + s_n eps; one teacher DDIM step k_n -> k' with
classifier-free guidance at the fixed scale w (folded into the student, which samples at guidance 1);
the loss is the pseudo-Huber distance

    d(p, q) = mean(sqrt((p - q)^2 + c^2) - c)

between f_theta(x, k_n) and f_target(x', k') (no gradient). f is the boundary-conditioned consistency
function of diffusers' LCM: f(x, k) = c_skip(k) x + c_out(k) x0_theta(x, k) with
c_skip = sd^2 / ((10 k)^2 + sd^2), c_out = 10 k / sqrt((10 k)^2 + sd^2), sd = 0.5, so f(x, 0) = x.

The target network: an EMA of the student (decay ``ema``; for a LoRA student, of its adapter), a module
of the run, so a resumed run continues bit-exactly; ``ema = 0`` uses the online network under
stop-gradient instead (LCM-LoRA's choice)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..files import write_atomic
from ..solvers.lcm import boundary_scalings
from ..train.loop import LoopConfig, run_loop
from ..train.trainer import batch_indices
from .progressive import ddim_step
from .run import make_x0_fn
from .teacher import load_teacher, save_student, teacher_folder, training_data

#: the LoRA's target modules: diffusers' LCM-LoRA list (train_lcm_distill_lora_sd_wds.py) without its
#: feed-forward (ff.net.0.proj, ff.net.2) and resampler (downsamplers.0.conv, upsamplers.0.conv) layers,
#: which the shipped default-lcm was trained without (its card's command reproduces it bit for bit)
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
    "time_emb_proj",
)  # fmt: skip

@dataclass
class LCMConfig:
    #: the teacher's skipping-step grid (diffusers' num_ddim_timesteps / original_inference_steps)
    origin_steps: int = 50
    guidance: float = 2.5
    #: LoRA rank (peft ``r``); 0 = full fine-tune with an EMA target
    r: int = 8
    lora_alpha: float = 8.0
    ema: float = 0.95
    huber_c: float = 0.001
    batch: int = 8
    cache_size: int = 256
    data_seed: int = 0
    #: the student's default sampling steps
    sample_steps: int = 4


def origin_timesteps(n_train: int, origin_steps: int) -> Tensor:
    """The teacher's skipping-step timesteps k = c, 2c, ..., minus 1 (diffusers' lcm_origin_timesteps)."""
    if not 1 <= origin_steps <= n_train:
        raise VelodiffError(f"--origin-steps must be in [1, {n_train}], got {origin_steps}")
    c = n_train // origin_steps
    return torch.arange(1, origin_steps + 1, dtype=torch.float64) * c - 1


def add_lora(unet: Any, r: int, lora_alpha: float, seed: int = 0) -> Any:
    """peft LoRA adapters on ``unet``'s LCM-LoRA modules (lora_A drawn from ``seed``, lora_B zero)."""
    from peft import LoraConfig

    names = [n for n, _ in unet.named_modules()]
    targets = [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    unet.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):  # the initial adapter is a function of the seed
        torch.manual_seed(seed)
        unet.add_adapter(cfg)
    return unet


def consistency_fn(unet: Any, sched: Any, ctx: Tensor):
    """f(x, t) = c_skip(k) x + c_out(k) x0(x, t) (guidance 1), k the integer timestep of t."""
    x0_fn = make_x0_fn(unet, sched, ctx, None, 1.0)

    def f(x: Tensor, t: Tensor, k: Tensor) -> Tensor:
        c_skip, c_out = boundary_scalings(k.to(x.dtype).view(-1, 1, 1, 1))
        return c_skip * x + c_out * x0_fn(x, t)

    return f


def consistency_target(
    teacher_x0: Any, target_f: Any, x: Tensor, at: tuple[Tensor, Tensor, Tensor], to: tuple[Tensor, ...]
) -> Tensor:
    """LCM's regression target (Luo et al. 2023, Alg. 1, the skipping-step teacher): one DDIM step of the
    teacher's guided x0 from ``at`` = (t, alpha, sigma) to the earlier ``to`` = (t', k', alpha', sigma'),
    then the target network's consistency function at (x', t', k')."""
    t, a, s = at
    tp, kp, ap, sp = to
    xp = ddim_step(x, teacher_x0(x, t), a, s, ap, sp)
    return target_f(xp, tp, kp)


def pseudo_huber(p: Tensor, q: Tensor, c: float) -> Tensor:
    return ((p.float() - q.float()).pow(2) + c * c).sqrt().sub(c).mean(dim=(1, 2, 3))


def distill_lcm(
    teacher: str,
    out: Path,
    run: Path,
    cfg: LoopConfig,
    lcfg: LCMConfig,
    quiet: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    if lcfg.r < 0:
        raise VelodiffError(f"--lora-rank must be >= 0 (0: full fine-tune), got {lcfg.r}")
    if not 0.0 <= lcfg.ema < 1.0:
        raise VelodiffError(f"--ema must be in [0, 1), got {lcfg.ema}")
    tpath = teacher_folder(teacher)
    model = load_teacher(tpath)
    sched = model.schedule
    n_train = int(getattr(sched, "num_train_timesteps", 0) or 0)
    if not n_train:
        raise VelodiffError("consistency distillation needs a teacher with a discrete VP schedule")
    ks = origin_timesteps(n_train, lcfg.origin_steps)
    c = n_train // lcfg.origin_steps
    cache, text, uncond, teacher_unet = training_data(model, lcfg.cache_size, lcfg.data_seed, device)
    student = copy.deepcopy(teacher_unet)
    modules: dict[str, Any] = {"unet": student}
    if lcfg.r > 0:
        add_lora(student, lcfg.r, lcfg.lora_alpha, cfg.seed)
    else:
        student.requires_grad_(True)
    if lcfg.ema > 0:  # an EMA target, checkpointed with the run (LCM)
        target = copy.deepcopy(student).requires_grad_(False)
        modules["target"] = target
    else:  # the online network under stop-gradient (LCM-LoRA)
        target = student
    student.train()
    method = "lcm-lora" if lcfg.r > 0 else "lcm"
    rcfg = LoopConfig(**{**vars(cfg), "extra": {**cfg.extra, **vars(lcfg), "method": method}})

    def step_fn(step: int, gen: torch.Generator):
        if lcfg.ema > 0 and step > 0:  # target <- EMA of the online weights after the previous step
            with torch.no_grad():
                for pt, ps in zip(target.parameters(), student.parameters(), strict=True):
                    pt.mul_(lcfg.ema).add_(ps.detach(), alpha=1 - lcfg.ema)
        idx = batch_indices(step, lcfg.batch, lcfg.cache_size, cfg.seed)
        z0, ids = cache.get(idx)
        b = len(idx)
        j = torch.randint(0, lcfg.origin_steps, (b,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        k = ks[j]
        kp = (k - c).clamp_min(0)
        t, tp = sched.t_from_timestep(k), sched.t_from_timestep(kp)
        a = sched.alpha(t).float().view(-1, 1, 1, 1).to(device)
        s = sched.sigma(t).float().view(-1, 1, 1, 1).to(device)
        ap = sched.alpha(tp).float().view(-1, 1, 1, 1).to(device)
        sp = sched.sigma(tp).float().view(-1, 1, 1, 1).to(device)
        t, tp, k, kp = (v.float().to(device) for v in (t, tp, k, kp))
        x = a * z0 + s * eps
        with torch.no_grad():
            ctx = text(ids).last_hidden_state
            uctx = text(uncond[None].expand(b, -1)).last_hidden_state
            teacher_x0 = make_x0_fn(teacher_unet, sched, ctx, uctx, lcfg.guidance)
            target_f = consistency_fn(target, sched, ctx)
            tgt = consistency_target(teacher_x0, target_f, x, (t, a, s), (tp, kp, ap, sp))
        pred = consistency_fn(student, sched, ctx)(x, t, k)
        per = pseudo_huber(pred, tgt, lcfg.huber_c)
        return per.mean(), {"mse": (pred.detach() - tgt).pow(2).mean()}

    t0 = time.perf_counter()
    summary = run_loop(run, rcfg, modules, step_fn, desc=f"consistency distillation ({method})", quiet=quiet)
    summary.pop("emas")
    wall = time.perf_counter() - t0
    if not summary["completed"]:
        return {**summary, "wall_s": wall, "out": None}
    sampling = {
        "solver": "lcm",
        "steps": lcfg.sample_steps,
        "guidance": 1.0,
        "grid": "lcm",
        "grid_options": {"original_steps": lcfg.origin_steps},
        "trained_steps": lcfg.sample_steps,
    }
    card = (
        f"# latent consistency student ({method})\n\nTeacher: {tpath}\nTrained: {summary['steps']} steps x "
        f"batch {lcfg.batch}, {json.dumps(vars(lcfg))}, {summary['wall_s']:.0f} s of training on {device}\n"
        f"Sampling: {sampling}\n"
    )
    student.eval()
    if lcfg.r > 0:
        # the teacher's UNet files (a LoRA teacher's: its UNet with its adapter fused, which the new
        # adapter was trained on) and the adapter, applied by velodiff.load
        base = teacher_unet if (tpath / "lora").is_dir() else None
        save_student(tpath, base, out, sampling, card, lora=student)
    else:
        save_student(tpath, student, out, sampling, card)
    write_atomic(run / "summary.json", json.dumps({**summary, "wall_s": wall, "out": str(out)}, indent=1))
    return {**summary, "wall_s": wall, "out": str(out)}
