"""``velodiff distill reflow``: 2-rectified flow on teacher pairs, then a one-step distillation
(Liu, Gong & Liu 2023, "Flow straight and fast"; Liu et al. 2024, InstaFlow).

1. **Pairs.** The teacher (any plan; by default its own sampling defaults, DPM-Solver++ 2M, 20 steps,
   CFG 2.5) maps standard normal noise z_i to a sample x_i = ODE_teacher(z_i) for ShapesWorld caption
   i. The pairs (z, x, token ids) are cached in safetensors chunks (``PairCache``): a chunk is a pure
   function of (teacher, plan, seed, its indices), written atomically, so an interrupted generation
   resumes where it stopped and a rerun reproduces the same files.

2. **Reflow** (2-rectified flow, Liu et al. 2023, Eq. 1 with the coupling (X_0, X_1) = (z, x) given by
   the teacher's ODE, Sec. 2.3 "nonlinear" interpolations). We keep velodiff's VP parameterisation:
   the student is the teacher's v-prediction UNet (initialised from a student that already folds
   the guidance in) and is trained on the interpolation of the *coupled* pair,
       x_t = alpha_t x + sigma_t z,          loss  max(snr_t, 1) |x0_student(x_t, t) - x|^2,
   t ~ U(t_min, 1]. Its DDIM ODE is a straight line exactly when x0_student is constant along the
   path: in DDIM's coordinates xbar = x / alpha, sbar = sigma / alpha (Song et al. 2021, Eq. 14:
   d xbar = eps(xbar, sbar) d sbar) the path is xbar(sbar) = x0 + sbar eps. Training on a
   deterministic coupling makes the optimum x0_student(x_t, t) = E[x | x_t] = x (no crossing paths),
   i.e. straight DDIM paths, the VP counterpart of the rectified flow's v = x1 - x0. Keeping the VP
   parameterisation keeps the student a normal SD1 model: the ``ddim`` solver, the trailing grid and
   every plan apply unchanged, no scheduler change is needed.

3. **Few-step distillation** (InstaFlow, Eq. 6: min E |T(z) - ODE(z)|^2 with T the one-step model):
   the student's own K-step DDIM sampler on the trailing grid (K = ``student_steps``, 1 by default:
   one step from t = 1, input exactly z, as the sampler feeds it) regresses on the pair's x with a
   plain L2 loss (no LPIPS: no torchvision here), back-propagating through all K network passes; for
   K > 1 this is InstaFlow's objective with T the K-step sampler.

Straightness (``straightness``): Liu et al. 2023, Eq. 5, S(Z) = int_0^1 E |(Z_1 - Z_0) - v(Z_t, t)|^2 dt,
measured along the model's own DDIM ODE in DDIM's coordinates, where the velocity is eps and the
time is sbar / sbar_T; S = 0 exactly for a straight path. The report gives it for the teacher (at the
pairs' guidance), the student's start (``init``: its initial weights at the guidance 1 it samples with;
the teacher's own UNet without ``--init``, so that before and after differ only by the training) and
the student after each phase."""

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
from ..train.checkpoint import weights_digest
from ..train.loop import START, LoopConfig, run_loop, step_generator
from ..train.trainer import batch_indices, tokenize
from .progressive import ddim_step, student_grid
from .run import make_x0_fn
from .teacher import load_teacher, save_student, teacher_folder

CHUNK = 64


@dataclass
class PairConfig:
    pairs: int = 1024
    eval_pairs: int = 32
    seed: int = 0
    data_seed: int = 0
    plan: str | None = None
    solver: str | None = None
    steps: int | None = None
    guidance: float | None = None


def pairs_guidance(pcfg: PairConfig, model: Any) -> float:
    """The scale the pairs are sampled with, as ``text2img`` resolves it: the plan's own (``cfg:scale=4``,
    ``guidance=4``) over ``--guidance`` over the teacher's default. What measures or matches the teacher
    (reflow's straightness, DMD's real score) guides at the same scale."""
    from ..pipelines.setup import guided_scale
    from ..plan import Plan

    given = float(pcfg.guidance) if pcfg.guidance is not None else float(model.default_guidance)
    return guided_scale(Plan.parse(pcfg.plan), given)


def pair_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The standard normal noise of pair ``index``: a pure function of (seed, index)."""
    return torch.randn(shape, generator=step_generator(seed, index))


class PairCache:
    """(noise, teacher sample, token ids) pairs in ``folder/chunk-NNNNN.safetensors`` (``CHUNK`` pairs
    each, pair i a pure function of i) and ``folder/pairs.json`` (what made them). ``fill(gen)``
    writes the missing chunks with ``gen(start, stop) -> dict of tensors``; ``load()`` reads them."""

    def __init__(self, folder: Path, meta: dict[str, Any], total: int) -> None:
        self.folder, self.meta, self.total = Path(folder), meta, total
        mf = self.folder / "pairs.json"
        if mf.is_file():
            old = json.loads(mf.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise VelodiffError(
                    f"pair cache {self.folder} was made with other settings ({', '.join(diff)}); "
                    "use a new --run folder (the pairs live in its pairs/)"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(mf, json.dumps(meta, indent=1, sort_keys=True))

    def chunk_path(self, k: int) -> Path:
        return self.folder / f"chunk-{k:05d}.safetensors"

    def missing(self) -> list[int]:
        n = -(-self.total // CHUNK)
        return [k for k in range(n) if not self.chunk_path(k).is_file()]

    def fill(self, gen: Any, quiet: bool = True) -> int:
        from safetensors.torch import save
        from tqdm import tqdm

        from ..files import write_atomic

        todo = self.missing()
        for k in tqdm(todo, desc="teacher pairs", disable=quiet, unit="chunk"):
            a, b = k * CHUNK, (k + 1) * CHUNK  # always whole chunks: a cache extends by a prefix
            tensors = {name: v.detach().cpu().contiguous() for name, v in gen(a, b).items()}
            write_atomic(self.chunk_path(k), save(tensors))
        return len(todo)

    def load(self) -> dict[str, Tensor]:
        from ..models.weights import load_file

        if self.missing():
            raise VelodiffError(f"pair cache {self.folder} is incomplete; rerun to finish it")
        parts = [load_file(str(self.chunk_path(k))) for k in range(-(-self.total // CHUNK))]
        return {name: torch.cat([p[name] for p in parts])[: self.total] for name in parts[0]}


def straightness(x0_fn: Any, x: Tensor, grid: Tensor, sched: Any) -> dict[str, float]:
    """Run the deterministic DDIM ODE of ``x0_fn(x, t) -> x0`` from ``x`` along ``grid`` (decreasing,
    ending at 0) and measure how straight it is.

    In DDIM's coordinates xbar = x / alpha, sbar = sigma / alpha the ODE is d xbar / d sbar = eps
    (Song et al. 2021, Eq. 14). With u = sbar / sbar_T in [0, 1] the velocity is sbar_T eps and
    Liu et al.'s straightness (2023, Eq. 5) is
        S = int_0^1 |(xbar_T - xbar_0) - sbar_T eps(u)|^2 du / d,
    a left Riemann sum over the grid, per element (d = elements per sample), averaged over the batch.
    Also: ``x0_dev``, the mean over steps of |x0_i - x_out|^2 / d (0 for a straight path: its x0
    estimate never changes), and ``one_step_err`` = |x0_0 - x_out|^2 / d, the error of one step
    against the same ODE's output. Returns floats and the output under ``"out"`` (a tensor)."""

    def coef(t: Tensor) -> tuple[Tensor, Tensor]:
        if float(t) <= 0:
            return torch.ones(()), torch.zeros(())
        return sched.alpha(t).float(), sched.sigma(t).float()

    d = x[0].numel()
    ts = [grid[i].reshape(1).to(x.device) for i in range(len(grid))]
    x_T = x
    x0s, epss, sbars = [], [], []
    for i in range(len(ts) - 1):
        a, s = coef(ts[i])
        a2, s2 = coef(ts[i + 1])
        x0 = x0_fn(x, ts[i].expand(x.shape[0]).to(x.dtype))
        x0s.append(x0)
        epss.append((x - a * x0) / s)
        sbars.append(float(s / a))
        x = ddim_step(x, x0, a, s, a2, s2)
    out = x
    a_T, s_T = coef(ts[0])
    sbar_T = float(s_T / a_T)
    chord = x_T / a_T - out
    S = torch.zeros(x.shape[0], device=x.device)
    for i, eps in enumerate(epss):
        du = (sbars[i] - (sbars[i + 1] if i + 1 < len(sbars) else 0.0)) / sbar_T
        S += du * (chord - sbar_T * eps).pow(2).flatten(1).sum(1) / d
    dev = torch.stack([(x0 - out).pow(2).flatten(1).sum(1) / d for x0 in x0s]).mean(0)
    return {
        "S": float(S.mean()),
        "x0_dev": float(dev.mean()),
        "one_step_err": float(((x0s[0] - out).pow(2).flatten(1).sum(1) / d).mean()),
        "out": out,
    }


@dataclass
class ReflowConfig:
    reflow_steps: int = 1500
    distill_steps: int = 1000
    batch: int = 8
    ema: float = 0.0
    ode_steps: int = 20
    student_steps: int = 1


def _pair_meta(tpath: Path, pcfg: PairConfig) -> dict[str, Any]:
    """What a chunk's content depends on (not the number of pairs: a longer cache extends a shorter)."""
    keep = {k: v for k, v in asdict(pcfg).items() if k not in ("pairs", "eval_pairs")}
    return {"teacher": str(tpath), **keep, "chunk": CHUNK}


def make_pairs(tpath: Path, folder: Path, pcfg: PairConfig, device: str, quiet: bool) -> dict[str, Tensor]:
    """Fill the pair cache (training pairs 0..pairs-1, then eval_pairs held-out ones) and load it."""
    from ..data.shapes import ShapesWorld
    from ..models import load
    from ..pipelines.text2img import text2img

    total = pcfg.pairs + pcfg.eval_pairs
    cache = PairCache(folder, _pair_meta(tpath, pcfg), total)
    if cache.missing():
        model = load(tpath, device=device)
        world = ShapesWorld(seed=pcfg.data_seed, size=64, holdout=True)
        tok = model.components["tokenizer"]
        shape = model.latent_shape(1, *model.default_size)[1:]
        given = {k: getattr(pcfg, k) for k in ("plan", "solver", "steps", "guidance")}
        opts = {k: v for k, v in given.items() if v is not None}  # (guidance 0 is a value, not "unset")

        def gen(a: int, b: int) -> dict[str, Tensor]:
            caps = [world.scene(i).caption for i in range(a, b)]
            z = torch.stack([pair_noise(pcfg.seed, i, shape) for i in range(a, b)])
            res = text2img(model, caps, latents=z, output="latent", **opts)
            return {"z": z, "x": res.latents.float(), "ids": tokenize(tok, caps), "index": torch.arange(a, b)}

        cache.fill(gen, quiet)
    return cache.load()


def _check_pair_config(pcfg: PairConfig, rcfg: ReflowConfig) -> None:
    if pcfg.pairs < 1 or pcfg.eval_pairs < 1:
        raise VelodiffError("--pairs and --eval-pairs must be at least 1")
    if rcfg.ode_steps < 2:
        raise VelodiffError("--ode-steps must be at least 2")
    if rcfg.student_steps < 1:
        raise VelodiffError("--student-steps must be at least 1")


def sample_steps(x0_fn: Any, z: Tensor, grid: Tensor, sched: Any) -> Tensor:
    """The student's deterministic DDIM sampler from noise ``z`` along ``grid`` (decreasing, ending at
    0), differentiable: the final step returns the clean estimate itself."""
    x = z
    for i in range(len(grid) - 1):
        t = grid[i].expand(len(z))
        x0 = x0_fn(x, t)
        if float(grid[i + 1]) <= 0:
            return x0
        a, s = sched.alpha(grid[i]).float(), sched.sigma(grid[i]).float()
        a2, s2 = sched.alpha(grid[i + 1]).float(), sched.sigma(grid[i + 1]).float()
        x = ddim_step(x, x0, a, s, a2, s2)
    return x


def measure(unet: Any, sched: Any, text: Any, uncond: Tensor, pairs: dict[str, Tensor], lo: int,
            w: float, ode_steps: int) -> dict[str, float]:
    """Straightness of ``unet``'s DDIM ODE (guidance ``w``) from the held-out pairs' noise, and its
    one-step error against the teacher's samples of those pairs."""
    dev = uncond.device  # the text encoder's and the UNet's (the pair cache loads on the CPU)
    z, x, ids = (pairs[k][lo:].to(dev) for k in ("z", "x", "ids"))
    with torch.no_grad():
        ctx = text(ids).last_hidden_state
        uctx = text(uncond[None].expand(len(ids), -1)).last_hidden_state if w != 1.0 else None
        fn = make_x0_fn(unet, sched, ctx, uctx, w)
        grid = student_grid(sched, ode_steps).to(torch.float32)
        r = straightness(fn, z, grid, sched)
        one = fn(z, grid[0].expand(len(z)))
    d = x[0].numel()
    r["one_step_err_vs_teacher"] = float(((one - x).pow(2).flatten(1).sum(1) / d).mean())
    r["ode_err_vs_teacher"] = float(((r.pop("out") - x).pow(2).flatten(1).sum(1) / d).mean())
    return r


def distill_reflow(
    teacher: str,
    init: str | None,
    out: Path,
    run: Path,
    cfg: LoopConfig,
    pcfg: PairConfig,
    rcfg: ReflowConfig,
    quiet: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:

    _check_pair_config(pcfg, rcfg)
    tpath = teacher_folder(teacher)
    ipath = teacher_folder(init) if init else tpath
    tmodel = load_teacher(tpath)
    init_model = load_teacher(ipath, "--init") if init else None  # refused before the pairs are made
    comps = dict(tmodel.components)
    sched = tmodel.schedule
    t0 = time.perf_counter()
    pairs = make_pairs(tpath, run / "pairs", pcfg, device, quiet)
    gen_s = time.perf_counter() - t0
    tok, text = comps["tokenizer"], comps["text_encoder"].to(device).eval().requires_grad_(False)
    uncond = tokenize(tok, [""])[0].to(device)
    n = pcfg.pairs
    w_teacher = pairs_guidance(pcfg, tmodel)
    report: dict[str, Any] = {"pairs_s": gen_s}
    rep_file = run / "straightness.json"
    if rep_file.is_file():  # measurements kept from a killed run (written whole or not at all)
        report = json.loads(rep_file.read_text())
    if "teacher" not in report:
        report["teacher"] = measure(comps["unet"].to(device).eval(), sched, text, uncond, pairs, n,
                                    w_teacher, rcfg.ode_steps)
    init_unet = init_model.components["unet"] if init_model is not None else comps["unet"]
    if "init" not in report:  # the student's start at its guidance 1: what 'after' compares to
        report["init"] = measure(init_unet.to(device).eval(), sched, text, uncond, pairs, n, 1.0,
                                 rcfg.ode_steps)
    rep_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(rep_file, json.dumps(report, indent=1))
    del comps["unet"]
    student = copy.deepcopy(init_unet).to(device).train().requires_grad_(True)
    z_all, x_all, ids_all = pairs["z"].to(device), pairs["x"].to(device), pairs["ids"].to(device)
    t_min = float(sched.t_min)
    k_grid = student_grid(sched, rcfg.student_steps).to(torch.float32).to(device)
    log: list[dict[str, Any]] = []
    for phase, steps in (("reflow", rcfg.reflow_steps), ("distill", rcfg.distill_steps)):
        if steps == 0:
            continue
        pc = copy.deepcopy(cfg)
        pc.steps, pc.ema_decay = steps, rcfg.ema
        pc.extra = {**cfg.extra, **asdict(pcfg), **asdict(rcfg), "phase": phase, "method": "reflow"}
        if phase == "distill" and rcfg.reflow_steps:  # from the reflow phase's student: resumed only from it
            pc.extra[START] = weights_digest(student)

        def step_fn(step: int, gen: torch.Generator, phase=phase) -> tuple[Tensor, dict[str, Any]]:
            idx = batch_indices(step, rcfg.batch, n, cfg.seed)
            z, x, ids = z_all[idx], x_all[idx], ids_all[idx]
            b = len(idx)
            with torch.no_grad():
                ctx = text(ids).last_hidden_state
            fn = make_x0_fn(student, sched, ctx, None, 1.0)
            if phase == "reflow":  # t ~ U(t_min, 1] on the coupled interpolation
                t = (t_min + (1 - t_min) * (1 - torch.rand(b, generator=gen))).to(device)
                a = sched.alpha(t).view(-1, 1, 1, 1).float()
                s = sched.sigma(t).view(-1, 1, 1, 1).float()
                pred, weight = fn(a * x + s * z, t), (a / s).pow(2).view(-1).clamp_min(1.0)
            else:  # the student's K DDIM steps from t = 1, fed exactly the sampler's input z
                pred, weight = sample_steps(fn, z, k_grid, sched), torch.ones(b, device=device)
            per = (pred - x).pow(2).mean(dim=(1, 2, 3))
            return (weight * per).mean(), {"mse": per.detach().mean()}

        summary = run_loop(run / phase, pc, {"unet": student}, step_fn, desc=f"reflow: {phase}", quiet=quiet)
        emas = summary.pop("emas")
        log.append({"phase": phase, **summary})
        if not summary["completed"]:
            return {"phases": log, "out": None, "report": report}
        if rcfg.ema > 0:
            emas["unet"].copy_to(student)
        key = f"after_{phase}"
        if report.get(key, {}).get("trained_steps") != steps:  # measured again when a run was extended
            report[key] = {**measure(student.eval(), sched, text, uncond, pairs, n, 1.0, rcfg.ode_steps),
                           "trained_steps": steps}
            write_atomic(rep_file, json.dumps(report, indent=1))
        student.train()
        if phase == "reflow":
            # trained on every t (not on a step count): more steps only follow its straighter ODE closer
            sampling = {"solver": "ddim", "steps": 2, "guidance": 1.0, "grid": "trailing"}
            save_student(tpath, copy.deepcopy(student), out.with_name(f"{out.name}-2steps"), sampling,
                         _card("2-rectified flow (reflow) student, 2 steps", tpath, ipath, pcfg, rcfg, log,
                               report, sampling))
    distilled = rcfg.distill_steps > 0  # without the distillation phase the student is the reflow one
    k = rcfg.student_steps if distilled else 2
    sampling = {"solver": "ddim", "steps": k, "guidance": 1.0, "grid": "trailing",
                **({"trained_steps": k} if distilled else {})}
    title = f"reflow + {k}-step distilled student" if distilled else "2-rectified flow (reflow) student"
    card = _card(title, tpath, ipath, pcfg, rcfg, log, report, sampling)
    save_student(tpath, student.eval(), out, sampling, card)
    res = {"phases": log, "out": str(out), "report": report, "wall_s": time.perf_counter() - t0}
    write_atomic(run / "summary.json", json.dumps(res, indent=1))
    return res


def _card(title: str, tpath: Path, ipath: Path, pcfg: PairConfig, rcfg: ReflowConfig, log: list,
          report: dict, sampling: dict) -> str:
    return (
        f"# {title}\n\nTeacher: {tpath}\nInitialised from: {ipath}\nPairs: {json.dumps(asdict(pcfg))}\n"
        f"Training: {json.dumps(asdict(rcfg))}\nPhases: {json.dumps(log)}\n"
        f"Straightness: {json.dumps(report)}\nSampling: {json.dumps(sampling)}\n"
    )
