"""Structured pruning of a teacher UNet with distillation repair.

Units are whole pieces of the UNet that a diffusers ``UNet2DConditionModel`` config can leave out, so a
pruned UNet is a plain diffusers model with its own config (loaded unchanged by every velodiff loader
and by diffusers) and the kept modules' weights copied from the teacher:

- ``mid``: the mid block (``mid_block_type=None``);
- ``downI.attn`` / ``upI.attn``: the transformer (self- and cross-attention) layers of block I
  (``CrossAttnDownBlock2D`` -> ``DownBlock2D``, ``CrossAttnUpBlock2D`` -> ``UpBlock2D``);
- ``blockI.resnet``: one resnet of down block I and one of its mirror up block (``layers_per_block[I]``
  one lower), where the config still builds.

Ranking (which units go first):

- ``ld``: LD-Pruner (Castells et al. 2024, "LD-Pruner: Efficient Pruning of Latent Diffusion Models
  using Task-Agnostic Insights", Sec. 3): remove one unit at a time, generate the output latents of a
  few calibration prompts from fixed noise (DDIM, the teacher's guidance), and score the unit by how
  far the latents move, ``||mean(L_orig) - mean(L_mod)||_2 + ||std(L_orig) - std(L_mod)||_2`` (mean and
  standard deviation over the calibration set, per latent element); the least important go first.
- ``magnitude``: the mean absolute weight of the unit's parameters (the L1 criterion of Li et al. 2017,
  "Pruning Filters for Efficient ConvNets", applied to whole units); the smallest go first.

Units are removed in ranking order until the pruned UNet's FLOPs per evaluation (one UNet pass on one
latent, ``torch.utils.flop_counter.FlopCounterMode``) are at most ``target_flops`` x the teacher's.

Repair (BK-SDM, Kim et al. 2023, Sec. 3.2, without the task loss): the pruned student learns the
teacher's output, ``|v_s - v_t|^2``, plus ``feature_weight`` x the mean squared error of each up block's
output (the feature-level distillation), on noised ShapesWorld latents at t ~ U(t_min, 1) for the
conditional and the unconditional prompt (so classifier-free guidance still works)."""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import VelodiffError
from ..files import write_atomic
from ..train.checkpoint import weights_digest
from ..train.loop import LoopConfig, run_loop
from ..train.trainer import LatentCache, batch_indices
from .progressive import ddim_step, student_grid
from .run import make_x0_fn
from .teacher import load_teacher, save_student, teacher_folder, training_data

METHODS = ("ld", "magnitude")


@dataclass
class PruneConfig:
    method: str = "ld"
    #: the pruned UNet's FLOPs per evaluation as a fraction of the teacher's (at most)
    target_flops: float = 0.7
    feature_weight: float = 1.0
    guidance: float = 2.5
    calib_prompts: int = 8
    calib_steps: int = 10
    batch: int = 8
    cache_size: int = 256
    data_seed: int = 0


# -- units: config edits ------------------------------------------------------------------------


def _edit(config: dict[str, Any], unit: str) -> dict[str, Any]:
    c = copy.deepcopy(dict(config))
    n = len(c["down_block_types"])
    if unit == "mid":
        c["mid_block_type"] = None
        return c
    head, _, kind = unit.partition(".")
    i = int(re.sub(r"\D", "", head))
    if kind == "attn" and head.startswith("down"):
        c["down_block_types"] = [*c["down_block_types"]]
        c["down_block_types"][i] = "DownBlock2D"
    elif kind == "attn":
        c["up_block_types"] = [*c["up_block_types"]]
        c["up_block_types"][i] = "UpBlock2D"
    else:
        lpb = c["layers_per_block"]
        lpb = [lpb] * n if isinstance(lpb, int) else [*lpb]
        lpb[i] -= 1
        c["layers_per_block"] = lpb
    return c


def candidate_units(config: dict[str, Any]) -> list[str]:
    """Every unit the config has (a unit whose removal does not build is dropped later)."""
    out = ["mid"] if config.get("mid_block_type") else []
    out += [f"down{i}.attn" for i, t in enumerate(config["down_block_types"]) if t.startswith("CrossAttn")]
    out += [f"up{i}.attn" for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")]
    lpb = config["layers_per_block"]
    lpb = [lpb] * len(config["down_block_types"]) if isinstance(lpb, int) else lpb
    out += [f"block{i}.resnet" for i, n in enumerate(lpb) if n >= 1]
    return out


def pruned_config(config: dict[str, Any], removed: list[str]) -> dict[str, Any]:
    c = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    for unit in removed:
        c = _edit(c, unit)
    return c


def pruned_unet(teacher: Any, removed: list[str]) -> Any:
    """A diffusers UNet with ``removed`` left out and every kept weight copied from ``teacher``
    (``removed=[]``: the teacher's architecture and weights exactly)."""
    from diffusers import UNet2DConditionModel

    config = pruned_config(teacher.config, removed)
    try:
        student = UNet2DConditionModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - diffusers asserts on configs it cannot build
        raise VelodiffError(
            f"removing {removed} does not give a buildable UNet ({type(e).__name__})"
        ) from None
    src = teacher.state_dict()
    dst = student.state_dict()
    bad = [k for k, v in dst.items() if k not in src or src[k].shape != v.shape]
    if bad:
        raise VelodiffError(f"removing {removed} leaves modules without a teacher weight ({bad[0]}, ...)")
    student.load_state_dict({k: src[k] for k in dst})
    return student.to(next(teacher.parameters()).device)


def removed_params(teacher: Any, removed: list[str]) -> list[str]:
    """Names of the teacher's parameters that the pruned UNet no longer has."""
    student = pruned_unet(teacher, removed)
    kept = {k for k, _ in student.named_parameters()}
    return [k for k, _ in teacher.named_parameters() if k not in kept]


def latent_size(config: Any) -> tuple[int, int]:
    """(h, w) of a UNet config's ``sample_size`` (diffusers allows an int or a pair)."""
    size = config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def flops_per_eval(unet: Any) -> int:
    """FLOPs of one UNet evaluation on one latent (``torch.utils.flop_counter.FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = unet.config
    p = next(unet.parameters())
    x = torch.zeros(1, c.in_channels, *latent_size(c), device=p.device, dtype=p.dtype)
    ctx = torch.zeros(1, 77, c.cross_attention_dim, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as m:
        unet(x, torch.tensor([500.0], device=p.device), ctx)
    return int(m.get_total_flops())


def n_params(unet: Any) -> int:
    return sum(p.numel() for p in unet.parameters())


def usable_units(teacher: Any) -> list[str]:
    out = []
    for unit in candidate_units(teacher.config):
        try:
            flops_per_eval(pruned_unet(teacher, [unit]))
        except Exception:  # noqa: BLE001 - a removal diffusers cannot build or run is no unit
            continue
        out.append(unit)
    return out


# -- ranking -------------------------------------------------------------------------------------


def magnitude_scores(teacher: Any, units: list[str]) -> dict[str, float]:
    """Mean |w| of each unit's parameters (Li et al. 2017's L1 criterion, per unit)."""
    params = dict(teacher.named_parameters())
    out = {}
    for unit in units:
        names = removed_params(teacher, [unit])
        total = sum(float(params[k].detach().abs().double().sum()) for k in names)
        out[unit] = total / sum(params[k].numel() for k in names)
    return out


@torch.no_grad()
def output_latents(unet: Any, sched: Any, ctx: torch.Tensor, uctx: torch.Tensor, noise: torch.Tensor,
                   guidance: float, steps: int) -> torch.Tensor:
    """Final latents of deterministic DDIM (trailing grid) from ``noise`` at the given guidance."""
    x0_fn = make_x0_fn(unet, sched, ctx, uctx, guidance)
    grid = student_grid(sched, steps).to(torch.float32)
    x = noise
    for i in range(steps):
        t = grid[i].expand(len(x))
        t2 = grid[i + 1]
        a, s = (f(t).float().view(-1, 1, 1, 1).to(x.device) for f in (sched.alpha, sched.sigma))
        if float(t2) > 0:
            a2, s2 = float(sched.alpha(t2)), float(sched.sigma(t2))
        else:
            a2, s2 = 1.0, 0.0
        x = ddim_step(x, x0_fn(x, t), a, s, torch.tensor(a2), torch.tensor(s2))
    return x


def ld_score(orig: torch.Tensor, mod: torch.Tensor) -> float:
    """LD-Pruner's distance between two sets of output latents (Castells et al. 2024, Sec. 3): the L2
    distance of their element-wise means plus that of their element-wise standard deviations."""
    return float(torch.linalg.vector_norm(orig.mean(0) - mod.mean(0))) + float(
        torch.linalg.vector_norm(orig.std(0) - mod.std(0))
    )


def ld_scores(teacher: Any, units: list[str], sched: Any, ctx: torch.Tensor, uctx: torch.Tensor,
              noise: torch.Tensor, guidance: float, steps: int) -> dict[str, float]:
    ref = output_latents(teacher, sched, ctx, uctx, noise, guidance, steps)
    return {
        u: ld_score(ref, output_latents(pruned_unet(teacher, [u]).eval(), sched, ctx, uctx, noise, guidance,
                                        steps))
        for u in units
    }


def select(teacher: Any, scores: dict[str, float], target: float) -> tuple[list[str], int, int]:
    """The set of units of least total score whose removal leaves FLOPs <= target x the teacher's
    (every subset tried, up to 12 units; beyond, units in ascending score order until the target is
    met). LD-Pruner removes its lowest-scored operators; taking the cheapest set rather than a prefix
    keeps a high-scored unit that one last removal would otherwise overshoot into."""
    full = flops_per_eval(teacher)
    units = sorted(scores, key=lambda u: (scores[u], u))
    if len(units) > 12:
        removed: list[str] = []
        flops = full
        for unit in units:
            if flops <= target * full:
                break
            removed.append(unit)
            flops = flops_per_eval(pruned_unet(teacher, removed))
    else:
        best: tuple[float, int, list[str]] | None = None
        for mask in range(1 << len(units)):
            subset = [u for i, u in enumerate(units) if mask >> i & 1]
            cost = sum(scores[u] for u in subset)
            if best is not None and cost >= best[0]:
                continue
            f = flops_per_eval(pruned_unet(teacher, subset)) if subset else full
            if f <= target * full:
                best = (cost, f, subset)
        removed, flops = (best[2], best[1]) if best else (units, flops_per_eval(pruned_unet(teacher, units)))
    if flops > target * full:
        raise VelodiffError(
            f"--target-flops {target}: removing every unit leaves {flops / full:.2f} of the teacher's FLOPs"
        )
    return removed, flops, full


# -- the command ---------------------------------------------------------------------------------


def check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise VelodiffError(f"--target-flops {target} must be in (0, 1] (a fraction of the teacher's FLOPs)")


def prune(
    teacher: str,
    out: Path,
    run: Path,
    cfg: LoopConfig,
    pcfg: PruneConfig,
    quiet: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Rank, prune and repair; the ranking and the removed units are kept in ``run/plan.json`` so a
    rerun resumes the same student."""

    check_target(pcfg.target_flops)
    if pcfg.method not in METHODS:
        raise VelodiffError(f"unknown pruning method {pcfg.method!r}; valid: {', '.join(METHODS)}")
    tpath = teacher_folder(teacher)
    model = load_teacher(tpath)
    sched = model.schedule
    cache, text, uncond, teacher_unet = training_data(model, pcfg.cache_size, pcfg.data_seed, device)

    t0 = time.perf_counter()
    plan_file = run / "plan.json"
    keys = ("method", "target_flops", "guidance", "calib_prompts", "calib_steps", "data_seed")
    made_from = weights_digest(teacher_unet)  # the ranking is the teacher's: kept only for the same one
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        if any(plan["config"][k] != getattr(pcfg, k) for k in keys):
            raise VelodiffError(f"run {run} was started with {plan['config']}; use a new --run folder")
        if plan["config"].get("teacher", made_from) != made_from:
            raise VelodiffError(f"run {run} ranked the units of another teacher; use a new --run folder")
    else:
        units = usable_units(teacher_unet)
        if pcfg.method == "magnitude":
            scores = magnitude_scores(teacher_unet, units)
        else:
            n = min(pcfg.calib_prompts, pcfg.cache_size)
            _, ids = cache.get(torch.arange(n))
            ctx = text(ids).last_hidden_state
            uctx = text(uncond[None].expand(n, -1)).last_hidden_state
            c = teacher_unet.config
            gen = torch.Generator().manual_seed(pcfg.data_seed)
            noise = torch.randn(n, c.in_channels, *latent_size(c), generator=gen).to(device)
            scores = ld_scores(teacher_unet, units, sched, ctx, uctx, noise, pcfg.guidance, pcfg.calib_steps)
        removed, flops, full = select(teacher_unet, scores, pcfg.target_flops)
        plan = {
            "config": {**{k: getattr(pcfg, k) for k in keys}, "teacher": made_from},
            "scores": scores,
            "removed": removed,
            "flops": flops,
            "teacher_flops": full,
            "rank_s": time.perf_counter() - t0,
        }
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(plan_file, json.dumps(plan, indent=1))
    student = pruned_unet(teacher_unet, plan["removed"]).train().requires_grad_(True)
    info = {
        "removed": plan["removed"],
        "params": n_params(student),
        "teacher_params": n_params(teacher_unet),
        "flops": plan["flops"],
        "teacher_flops": plan["teacher_flops"],
    }
    summary: dict[str, Any] = {"steps": 0, "completed": True}
    if cfg.steps > 0:
        summary = repair(student, teacher_unet, text, uncond, cache, sched, run, cfg, pcfg, quiet, device)
        summary.pop("emas", None)
    wall = time.perf_counter() - t0
    if not summary["completed"]:
        return {**info, **summary, "wall_s": wall, "out": None}
    sampling = {"solver": "dpmpp_2m", "steps": 20, "guidance": pcfg.guidance}
    card = (
        f"# pruned student ({pcfg.method} ranking, {plan['flops'] / plan['teacher_flops']:.2f} of the "
        f"teacher's FLOPs)\n\nTeacher: {tpath}\nRemoved: {', '.join(plan['removed'])}\n"
        f"Scores: {json.dumps(plan['scores'])}\nRepair: {summary['steps']} steps x batch {pcfg.batch}, "
        f"feature weight {pcfg.feature_weight}, {summary.get('wall_s', 0.0):.0f} s of training on {device}\n"
        f"Sampling: {sampling}\n"
    )
    save_student(tpath, student.eval(), out, sampling, card)
    return {**info, **summary, "wall_s": wall, "out": str(out)}


def repair(student: Any, teacher: Any, text: Any, uncond: torch.Tensor, cache: LatentCache, sched: Any,
           run: Path, cfg: LoopConfig, pcfg: PruneConfig, quiet: bool, device: str) -> dict[str, Any]:
    """Output and feature distillation from the teacher (BK-SDM, Kim et al. 2023, Sec. 3.2)."""
    feats: dict[str, list[torch.Tensor]] = {"s": [], "t": []}

    def hook(which: str):
        return lambda _m, _i, o: feats[which].append(o)

    handles = [b.register_forward_hook(hook("s")) for b in student.up_blocks]
    handles += [b.register_forward_hook(hook("t")) for b in teacher.up_blocks]
    rcfg = LoopConfig(**{**vars(cfg), "extra": {**cfg.extra, **vars(pcfg)}})

    def step_fn(step: int, gen: torch.Generator):
        idx = batch_indices(step, pcfg.batch, pcfg.cache_size, cfg.seed)
        z0, ids = cache.get(idx)
        b = len(idx)
        t = sched.t_min + (1 - sched.t_min) * torch.rand(b, generator=gen, dtype=torch.float64)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        a = sched.alpha(t).float().view(-1, 1, 1, 1).to(device)
        s = sched.sigma(t).float().view(-1, 1, 1, 1).to(device)
        k = sched.timestep(t).float().to(device)
        x = torch.cat([a * z0 + s * eps] * 2)
        kk = torch.cat([k, k])
        feats["s"].clear()
        feats["t"].clear()
        with torch.no_grad():
            ctx = torch.cat([text(uncond[None].expand(b, -1)).last_hidden_state, text(ids).last_hidden_state])
            vt = teacher(x, kk, ctx).sample
        vs = student(x, kk, ctx).sample
        out_loss = (vs - vt).pow(2).mean()
        feat_loss = sum((fs - ft).pow(2).mean() for fs, ft in zip(feats["s"], feats["t"], strict=True))
        feat_loss = feat_loss / len(feats["s"])
        loss = out_loss + pcfg.feature_weight * feat_loss
        return loss, {"out": out_loss.detach(), "feat": feat_loss.detach()}

    try:
        desc = f"prune repair ({pcfg.method})"
        return run_loop(run, rcfg, {"unet": student}, step_fn, desc=desc, quiet=quiet)
    finally:
        for h in handles:
            h.remove()
