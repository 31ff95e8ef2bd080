"""``velodiff distill dmd``: distribution matching distillation (Yin et al. 2024, "One-step Diffusion
with Distribution Matching Distillation", DMD), in velodiff's VP v-prediction parameterisation.

A regression to the teacher's samples alone (reflow's distillation phase, progressive distillation)
makes a few-step student *average* what it cannot resolve: blended colours, half-formed shapes. DMD adds
a loss that matches the student's output *distribution* to the teacher's, so an average of two modes,
which the teacher never makes, is pushed back to one of them.

The generator G is the student's own K-step DDIM sampler on the trailing grid (K = 1: one step from
pure noise; K > 1 back-propagates through all K passes). Per training step, on a batch of the teacher's
(noise z, sample x_teacher, caption) pairs (the reflow pair cache, ``reflow.PairCache``):

1. x = G(z, caption).
2. **Distribution matching** (DMD Eq. 7-8): diffuse x to a random time, x_t = alpha_t x + sigma_t eps,
   t ~ U[0.02, 0.98]; the real score is the teacher's guided x0 estimate mu_real(x_t) (CFG at the
   teacher's scale, or ``real_guidance``), the fake score that of a second network mu_fake(x_t)
   trained online on G's outputs. The gradient pushed into x is (mu_fake - mu_real) / mean|x - mu_real|
   (the normalisation of DMD Eq. 8), applied through the surrogate 0.5 |x - sg(x - grad)|^2.
3. **Regression** (DMD Eq. 9; the paper's LPIPS replaced by the latent L2, as no LPIPS network runs
   here): lambda_reg |x - x_teacher|^2 on the pair.
4. **The fake score** learns G's current distribution with the denoising loss on sg(x) (DMD Eq. 6),
   max(snr, 1) |mu_fake(x_t') - sg(x)|^2 at a fresh time; it is initialised from the teacher.

The three losses are summed into one AdamW step; gradients of 2 and 3 reach only G, of 4 only the fake
score (every x it sees is detached), so one optimizer trains both; each network's gradient norm is
clipped on its own. With ``fake_updates`` = N > 1 (DMD2, Yin et al. 2024b, "Improved Distribution
Matching Distillation for Fast Image Synthesis", Sec. 4.1, the two time-scale update rule; the paper
uses 5), only steps 0, N, 2N, ... update G; the others train the fake score alone on G's
current samples, so it tracks G's distribution more closely (G's parameters get no gradient there, and
AdamW leaves them as they are).

With ``gan_weight`` > 0, DMD2's GAN term (Sec. 4.2): a discriminator D, a small head on the fake score
network's bottleneck (its mid block's output, :class:`DiscriminatorHead`), reads diffused samples at
t ~ U[0.02, 0.98] with their captions. *Real* samples are the shapes world's own rendered scenes
(VAE-encoded, ``real_images`` of them, as the teacher was trained on), so G can learn from the data and
not only from the teacher. D (with the fake network) minimises the non-saturating loss
softplus(-D(real_t)) + softplus(D(G_t)) at weight ``disc_weight`` (DMD2: 1e-2); G, on its update
steps, softplus(-D(G_t)) at ``gan_weight`` (DMD2: 3e-3 to 5e-3), its gradient taken with respect to
G's sample only (the surrogate of :func:`dm_loss`), so the GAN's generator term never trains D."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..files import write_atomic
from ..train.loop import LoopConfig, run_loop
from ..train.trainer import batch_indices, tokenize
from .progressive import student_grid
from .reflow import PairConfig, make_pairs, pairs_guidance, sample_steps
from .run import make_x0_fn
from .teacher import load_teacher, save_student, teacher_folder

#: DMD's range of diffusion times for the distribution-matching gradient (the paper's 0.02 T to 0.98 T)
T_RANGE = (0.02, 0.98)


@dataclass
class DMDConfig:
    steps: int = 2000
    batch: int = 8
    student_steps: int = 1
    regression_weight: float = 0.25
    ema: float = 0.0
    real_guidance: float | None = None
    fake_updates: int = 1
    gan_weight: float = 0.0
    disc_weight: float = 1e-2
    real_images: int = 1024


class DiscriminatorHead(torch.nn.Module):
    """DMD2's classification branch on the fake network's bottleneck features (B, C, h, w) -> (B,)
    logits: conv 3x3, GroupNorm, SiLU, conv 1x1 to one channel, mean over positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1),
            torch.nn.GroupNorm(min(32, channels), channels),
            torch.nn.SiLU(),
            torch.nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).mean(dim=(1, 2, 3))


def bottleneck_logits(
    unet: Any, head: DiscriminatorHead, x: Tensor, t: Tensor, ctx: Tensor, sched: Any
) -> Tensor:
    """D(x_t): the head on ``unet``'s mid-block output for (x_t, t, ctx); the up blocks are not run."""
    from .run import _velocity

    def stop(module: Any, inputs: Any, output: Tensor) -> None:
        raise _Bottleneck(output)

    hook = unet.mid_block.register_forward_hook(stop)
    try:
        _velocity(unet, x, t, ctx, sched)
    except _Bottleneck as b:
        return head(b.features)
    finally:
        hook.remove()
    raise VelodiffError("the discriminator's UNet never ran its mid block")  # pragma: no cover


class _Bottleneck(Exception):
    def __init__(self, features: Tensor) -> None:
        self.features = features


def dm_gradient(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """DMD's distribution-matching gradient for samples ``x`` (Yin et al. 2024, Eq. 7-8): the difference
    of the fake and real scores, in x0 form, normalised per sample by mean |x - real_x0| (so its scale
    does not depend on the time drawn). Descending it moves x toward the real distribution's denoised
    estimate and away from the generator's own."""
    w = (x - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-6)
    return torch.nan_to_num((fake_x0 - real_x0) / w)


def dm_loss(x: Tensor, grad: Tensor) -> Tensor:
    """The surrogate whose gradient in ``x`` is ``grad`` / x.numel() (mean reduction)."""
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def gan_losses(
    unet: Any, head: DiscriminatorHead, sched: Any, x: Tensor, ctx: Tensor, real_x: Tensor, real_ctx: Tensor,
    t: Tensor, eps: Tensor, update_g: bool,
) -> tuple[Tensor, Tensor]:
    """DMD2's GAN terms for B generated samples ``x`` and B real ones, diffused at the 2B times ``t``
    with ``eps`` (real first): the generator's term softplus(-D(G_t)), a surrogate whose gradient reaches
    ``x`` alone (zero when not ``update_g``), and the discriminator's softplus(-D(real_t)) + softplus(D(G_t))
    on detached samples (its gradient reaches ``unet`` and ``head``)."""
    b = len(x)
    a, s = sched.alpha(t).view(-1, 1, 1, 1).float(), sched.sigma(t).view(-1, 1, 1, 1).float()
    noisy = a * torch.cat([real_x, x.detach()]) + s * eps
    logits = bottleneck_logits(unet, head, noisy, t, torch.cat([real_ctx, ctx]), sched)
    softplus = torch.nn.functional.softplus
    d_loss = softplus(-logits[:b]).mean() + softplus(logits[b:]).mean()
    g_gan = torch.zeros((), device=x.device)
    if update_g:  # d softplus(-D(a x + s eps)) / dx = a grad, pushed into x alone
        xg = noisy[b:].detach().requires_grad_(True)
        with torch.enable_grad():
            g = softplus(-bottleneck_logits(unet, head, xg, t[b:], ctx, sched)).mean()
            (grad,) = torch.autograd.grad(g, xg)
        c = (a[b:] * grad).detach()
        g_gan = g.detach() + (x * c).sum() - (x.detach() * c).sum()
    return g_gan, d_loss


def distill_dmd(
    teacher: str,
    init: str | None,
    out: Path,
    run: Path,
    cfg: LoopConfig,
    pcfg: PairConfig,
    dcfg: DMDConfig,
    quiet: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    if pcfg.pairs < 1 or pcfg.eval_pairs < 0:
        raise VelodiffError(f"--pairs must be at least 1 and --eval-pairs at least 0, got {pcfg.pairs} and "
                            f"{pcfg.eval_pairs}")
    if dcfg.student_steps < 1:
        raise VelodiffError("--student-steps must be at least 1")
    if dcfg.regression_weight < 0:
        raise VelodiffError("--regression-weight must be >= 0")
    if dcfg.fake_updates < 1:
        raise VelodiffError("--fake-updates must be at least 1")
    if dcfg.gan_weight < 0 or dcfg.disc_weight < 0:
        raise VelodiffError("--gan-weight and --disc-weight must be >= 0")
    tpath = teacher_folder(teacher)
    ipath = teacher_folder(init) if init else None
    tmodel = load_teacher(tpath)
    init_model = load_teacher(ipath, "--init") if ipath else None  # refused before the pairs are made
    comps = dict(tmodel.components)
    sched = tmodel.schedule
    t0 = time.perf_counter()
    pairs = make_pairs(tpath, run / "pairs", pcfg, device, quiet)
    tok, text = comps["tokenizer"], comps["text_encoder"].to(device).eval().requires_grad_(False)
    uncond = tokenize(tok, [""])[0].to(device)
    w_pairs = pairs_guidance(pcfg, tmodel)
    w_real = float(dcfg.real_guidance) if dcfg.real_guidance is not None else w_pairs
    real = comps["unet"].to(device).eval().requires_grad_(False)
    fake = copy.deepcopy(real).train().requires_grad_(True)
    init_unet = init_model.components["unet"] if init_model is not None else real
    student = copy.deepcopy(init_unet).to(device).train().requires_grad_(True)
    gan = dcfg.gan_weight > 0
    if gan and getattr(fake, "mid_block", None) is None:
        raise VelodiffError("--gan-weight needs a teacher UNet with a mid block (the discriminator reads it)")
    modules: dict[str, torch.nn.Module] = {"unet": student, "fake": fake}
    if gan:
        from .teacher import training_data

        real_data = training_data(tmodel, dcfg.real_images, pcfg.data_seed, device)[0]
        with torch.random.fork_rng(devices=[]):  # the same head for every run of one seed
            torch.manual_seed(cfg.seed)
            head = DiscriminatorHead(fake.mid_block.resnets[-1].out_channels).to(device)
        modules["head"] = head
    n = pcfg.pairs
    z_all, x_all, ids_all = pairs["z"].to(device), pairs["x"].to(device), pairs["ids"].to(device)
    k_grid = student_grid(sched, dcfg.student_steps).to(torch.float32).to(device)
    t_min = float(sched.t_min)
    lo, hi = T_RANGE
    cfg = copy.deepcopy(cfg)
    cfg.steps, cfg.ema_decay, cfg.clip_per_module = dcfg.steps, dcfg.ema, True
    cfg.extra = {**cfg.extra, **asdict(pcfg), **asdict(dcfg), "method": "dmd", "real_guidance": w_real}

    def coef(t: Tensor) -> tuple[Tensor, Tensor]:
        return sched.alpha(t).view(-1, 1, 1, 1).float(), sched.sigma(t).view(-1, 1, 1, 1).float()

    def step_fn(step: int, gen: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        idx = batch_indices(step, dcfg.batch, n, cfg.seed)
        z, x_teacher, ids = z_all[idx], x_all[idx], ids_all[idx]
        b = len(idx)
        with torch.no_grad():
            ctx = text(ids).last_hidden_state
            uctx = text(uncond[None].expand(b, -1)).last_hidden_state
        update_g = step % dcfg.fake_updates == 0  # DMD2's two time-scale rule (module docstring)
        with torch.set_grad_enabled(update_g):
            x = sample_steps(make_x0_fn(student, sched, ctx, None, 1.0), z, k_grid, sched)
        # distribution matching at t ~ U[0.02, 0.98]
        t = (lo + (hi - lo) * torch.rand(b, generator=gen)).to(device)
        eps = torch.randn(x.shape, generator=gen).to(device)
        dm = reg = torch.zeros((), device=device)
        if update_g:
            a, s = coef(t)
            xt = a * x.detach() + s * eps
            with torch.no_grad():
                real_x0 = make_x0_fn(real, sched, ctx, uctx, w_real)(xt, t)
                fake_x0 = make_x0_fn(fake, sched, ctx, None, 1.0)(xt, t)
            dm = dm_loss(x, dm_gradient(x.detach(), real_x0, fake_x0))
            reg = (x - x_teacher).pow(2).mean()
        # the fake score's denoising loss on the generator's (detached) samples, at a fresh time
        t2 = (t_min + (1 - t_min) * (1 - torch.rand(b, generator=gen))).to(device)
        eps2 = torch.randn(x.shape, generator=gen).to(device)
        a2, s2 = coef(t2)
        pred = make_x0_fn(fake, sched, ctx, None, 1.0)(a2 * x.detach() + s2 * eps2, t2)
        snr = (a2 / s2).pow(2).view(-1).clamp_min(1.0)
        fake_loss = (snr * (pred - x.detach()).pow(2).mean(dim=(1, 2, 3))).mean()
        loss = dm + dcfg.regression_weight * reg + fake_loss
        logs = {"dm": dm.detach(), "reg": reg.detach(), "fake": fake_loss.detach()}
        if gan:
            real_x, real_ids = real_data.get(torch.randint(0, dcfg.real_images, (b,), generator=gen))
            with torch.no_grad():
                real_ctx = text(real_ids).last_hidden_state
            t3 = (lo + (hi - lo) * torch.rand(2 * b, generator=gen)).to(device)
            eps3 = torch.randn((2 * b, *x.shape[1:]), generator=gen).to(device)
            g_gan, d_loss = gan_losses(fake, head, sched, x, ctx, real_x, real_ctx, t3, eps3, update_g)
            loss = loss + dcfg.gan_weight * g_gan + dcfg.disc_weight * d_loss
            logs.update(gan=g_gan.detach(), disc=d_loss.detach())
        return loss, logs

    summary = run_loop(run / "dmd", cfg, modules, step_fn, desc="dmd", quiet=quiet)
    emas = summary.pop("emas")
    if not summary["completed"]:
        return {"summary": summary, "out": None}
    if dcfg.ema > 0:
        emas["unet"].copy_to(student)
    report = {"summary": summary, "held_out": held_out_error(student.eval(), sched, text, pairs, n, k_grid)}
    k = dcfg.student_steps
    sampling = {"solver": "ddim", "steps": k, "guidance": 1.0, "grid": "trailing", "trained_steps": k}
    card = (
        f"# DMD student ({k} steps)\n\nTeacher: {tpath}\nInitialised from: {init or tpath}\n"
        f"Pairs: {json.dumps(asdict(pcfg))}\nTraining: {json.dumps(asdict(dcfg))}\n"
        f"Real guidance: {w_real}\nSummary: {json.dumps(report)}\nSampling: {json.dumps(sampling)}\n"
    )
    save_student(tpath, student.eval(), out, sampling, card)
    res = {**report, "out": str(out), "wall_s": time.perf_counter() - t0}
    write_atomic(run / "summary.json", json.dumps(res, indent=1))
    return res


def held_out_error(
    unet: Any, sched: Any, text: Any, pairs: dict[str, Tensor], lo: int, grid: Tensor
) -> float:
    """Mean squared error per latent element of the student's K-step samples against the teacher's,
    on the held-out pairs (the noise the training never saw); nan when there are none."""
    z, x, ids = pairs["z"][lo:], pairs["x"][lo:], pairs["ids"][lo:]
    if len(z) == 0:
        return float("nan")
    with torch.no_grad():
        ctx = text(ids.to(grid.device)).last_hidden_state
        out = sample_steps(make_x0_fn(unet, sched, ctx, None, 1.0), z.to(grid.device), grid, sched)
    return float((out - x.to(grid.device)).pow(2).mean())
