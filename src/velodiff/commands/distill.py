"""`velodiff distill`: few-step students trained from a teacher model.

    velodiff distill progressive --teacher default --out students/pd5 --run runs/pd --steps 200

Rerunning the same command resumes each round from its latest checkpoint (bit-exact)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import VelodiffError
from ..limits import check_guidance
from .options import check_threads, example

distill_app = typer.Typer(
    no_args_is_help=True,
    help="Distil few-step students from a teacher model.",
    epilog=example("velodiff distill progressive --out students/pd5 --run runs/pd"),
)


def loop_config(
    steps: int, lr: float, warmup: int, seed: int, checkpoint_every: int, max_minutes: float | None,
    ema: float = 0.0, *, out: Path | None = None, run: Path | None = None, guidance: float | None = None,
    sources: tuple[str | None, ...] = (), beside: tuple[str, ...] = (),
) -> Any:
    """The training loop's settings every distillation shares: no weight decay, a loss row per step.
    The shared options are checked here, before any work: ``--out`` and the students written beside it
    (``beside``: suffixes, e.g. ``-2steps`` for ``OUT-2steps``) folders that are none of the models the
    student is made from (``sources``: the teacher, --init), the numbers finite. Also quiets the
    libraries' loading bars."""
    from ..shipped import resolve_model
    from ..train.loop import LoopConfig
    from .generate import quiet_libraries

    quiet_libraries()
    written = [out, *(out.with_name(out.name + suffix) for suffix in beside)] if out is not None else []
    if written:
        from ..files import check_model_out

        for folder in written:
            check_model_out(folder, "--out" if folder == out else f"{folder} (written beside --out)")
    if run is not None:
        if run.exists() and not run.is_dir():
            raise VelodiffError(f"--run {str(run)!r} is a file; give a folder (the run's checkpoints)")
        if out is not None and run.expanduser().resolve() == out.expanduser().resolve():
            raise VelodiffError(f"--run and --out are one folder ({str(run)!r}); writing the student would "
                                "replace the run's checkpoints: give two folders")
    made_from: dict[str, str | None] = {}  # recorded with the run: resuming it from other models is refused
    for name, source in zip(("teacher", "init"), sources, strict=False):
        try:
            path = resolve_model(source).resolve() if source else None
        except VelodiffError:
            path = None  # refused with its own line where it is loaded
        shipped = source is not None and not Path(source).expanduser().exists()  # a name, e.g. default
        made_from[name] = source if shipped else str(path) if path is not None else None
        for folder in written:
            if path is not None and path == folder.expanduser().resolve():
                what = "is" if folder == out else f"writes {str(folder)!r} beside it, which is"
                raise VelodiffError(f"--out {str(out)!r} {what} the folder of {source!r}, which the student "
                                    "is made from; the student would replace it: give another --out")
    for name, value in (("--lr", lr), ("--max-minutes", max_minutes)):
        if value is not None and not 0 < value < math.inf:
            raise VelodiffError(f"{name} must be a finite number > 0, got {value}")
    if guidance is not None:
        check_guidance(guidance, "--guidance")

    return LoopConfig(steps=steps, lr=lr, warmup=warmup, weight_decay=0.0, ema_decay=ema, seed=seed,
                      checkpoint_every=checkpoint_every, max_minutes=max_minutes, log_every=1,
                      extra=made_from)


# the options every method shares (defaults stay in each command's signature)
Teacher = Annotated[str, typer.Option(help="a shipped model name or a diffusers folder")]
Batch = Annotated[int, typer.Option(min=1)]
Warmup = Annotated[int, typer.Option(min=0)]
CacheSize = Annotated[int, typer.Option(min=1, help="ShapesWorld scenes encoded as training latents")]
Seed = Annotated[int, typer.Option()]
CheckpointEvery = Annotated[int, typer.Option(min=1)]
MaxMinutes = Annotated[float | None, typer.Option(help="stop (with a checkpoint) after this much time")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda")]
Threads = Annotated[int, typer.Option(min=1, callback=check_threads)]
Quiet = Annotated[bool, typer.Option()]
# the teacher pairs (``distill.reflow.PairCache``) that reflow and dmd train on
Init = Annotated[str, typer.Option(help="initialise the student from this model (default: the teacher)")]
PairPlan = Annotated[str, typer.Option(help="the teacher's plan for the pairs (default: none)")]
PairSolver = Annotated[str, typer.Option(help="the teacher's solver for the pairs (default: its own)")]
TeacherSteps = Annotated[int, typer.Option(min=1, help="the teacher's steps for pairs (default: its own)")]
PairGuidance = Annotated[float, typer.Option(help="the teacher's CFG scale (default: its own)")]
StudentSteps = Annotated[int, typer.Option(min=1, help="DDIM steps the distilled student samples with")]


def pair_config(pairs: int, eval_pairs: int, seed: int, plan: str | None, solver: str | None,
                teacher_steps: int | None, guidance: float | None) -> Any:
    from ..distill.reflow import PairConfig

    return PairConfig(pairs=pairs, eval_pairs=eval_pairs, seed=seed, plan=plan, solver=solver,
                      steps=teacher_steps, guidance=guidance)


def report(res: dict[str, Any], run: Path, max_minutes: float | None = None) -> None:
    if res["out"] is None and max_minutes:  # the budget counts the time trained over every resume
        typer.echo(f"stopped with a checkpoint in {run}: --max-minutes {max_minutes:g} counts the training "
                   "time over every resume; rerun with a larger --max-minutes (or none) to go on")
    elif res["out"] is None:
        typer.echo(f"stopped with a checkpoint in {run}; rerun the same command to resume")
    else:
        typer.echo(f"student: {res['out']} ({res['wall_s']:.0f} s)")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(distill_app, name="distill")


@distill_app.command(
    "progressive",
    epilog=example("velodiff distill progressive --out students/pd5 --run runs/pd"),
    short_help="Progressive distillation (Salimans & Ho 2022): halve the steps per round.",
)
def progressive(
    out: Path = typer.Option(..., help="the student's diffusers folder"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (checkpoints per round); resumes"),  # noqa: B008
    teacher: Teacher = "default",
    teacher_steps: int = typer.Option(20, min=2, help="the teacher's DDIM steps"),
    rounds: int = typer.Option(2, min=1, help="halvings (20 and 2 rounds: a 5-step student)"),
    guidance: float = typer.Option(2.5, help="the teacher's CFG scale, folded into the first student"),
    steps: int = typer.Option(200, min=1, help="training steps per round"),
    batch: Batch = 8,
    lr: float = typer.Option(2e-5, min=0.0),
    warmup: Warmup = 10,
    cache_size: CacheSize = 256,
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = 25,
    max_minutes: float = typer.Option(None, help="stop (with a checkpoint) after this much time per round"),
    device: Device = "auto",
    threads: Threads = 1,
    quiet: Quiet = False,
) -> None:
    """Each round's student learns two teacher DDIM steps in one, and teaches the next round."""
    from ..distill.run import ProgressiveConfig, distill_progressive
    from .train import training_device

    dev = training_device(threads, device)
    rounds_beside = tuple(f"-{teacher_steps // 2 ** (r + 1)}steps" for r in range(rounds - 1))  # OUT-<n>steps
    cfg = loop_config(steps, lr, warmup, seed, checkpoint_every, max_minutes, out=out, run=run,
                      guidance=guidance, sources=(teacher,), beside=rounds_beside)
    pcfg = ProgressiveConfig(
        teacher_steps=teacher_steps, rounds=rounds, guidance=guidance, batch=batch, cache_size=cache_size
    )
    res = distill_progressive(teacher, out, run, cfg, pcfg, quiet=quiet, device=dev)
    report(res, run, max_minutes)


@distill_app.command(
    "guided",
    epilog=example("velodiff distill guided --out students/guided --run runs/guided --steps 1000"),
    short_help="Guided distillation (Meng et al. 2023): the guidance scale as an input, one pass.",
)
def guided(
    out: Path = typer.Option(..., help="the student's diffusers folder"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (checkpoints); resumes"),  # noqa: B008
    teacher: Teacher = "default",
    w_min: float = typer.Option(1.0, min=0.0, help="smallest guidance scale trained"),
    w_max: float = typer.Option(4.0, min=0.0, help="largest guidance scale trained"),
    guidance: float = typer.Option(2.5, help="the scale the student samples at by default"),
    steps: int = typer.Option(1000, min=1, help="training steps"),
    batch: Batch = 8,
    lr: float = typer.Option(2e-5, min=0.0),
    warmup: Warmup = 10,
    cache_size: CacheSize = 256,
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = 50,
    max_minutes: MaxMinutes = None,
    device: Device = "auto",
    threads: Threads = 1,
    quiet: Quiet = False,
) -> None:
    """The student takes w as an input and matches the teacher's CFG output in one pass per step."""
    from ..distill.guided import GuidedConfig, distill_guided
    from .train import training_device

    dev = training_device(threads, device)
    cfg = loop_config(steps, lr, warmup, seed, checkpoint_every, max_minutes, out=out, run=run,
                      guidance=guidance, sources=(teacher,))
    gcfg = GuidedConfig(w_min=w_min, w_max=w_max, guidance=guidance, batch=batch, cache_size=cache_size)
    res = distill_guided(teacher, out, run, cfg, gcfg, quiet=quiet, device=dev)
    report(res, run, max_minutes)


@distill_app.command(
    "lcm",
    epilog=example("velodiff distill lcm --out students/lcm --run runs/lcm --lora-rank 16"),
    short_help="Latent consistency distillation (LCM / LCM-LoRA): 1-4 step sampling with the lcm solver.",
)
def lcm(
    out: Path = typer.Option(..., help="the student's diffusers folder (a LoRA student: lora/ in it)"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (checkpoints); resumes"),  # noqa: B008
    teacher: Teacher = "default",
    lora_rank: int = typer.Option(8, min=0, help="LoRA rank r (peft); 0 = full fine-tune with an EMA target"),
    lora_alpha: float = typer.Option(None, help="LoRA lora_alpha (default: the rank, scale 1)"),
    origin_steps: int = typer.Option(50, min=1, help="the teacher's skipping-step grid (num_ddim_timesteps)"),
    guidance: float = typer.Option(2.5, help="the teacher's CFG scale, folded into the student"),
    ema: float = typer.Option(0.95, help="EMA decay of the target (0: the online network, stop-gradient)"),
    huber_c: float = typer.Option(0.001, min=0.0, help="pseudo-Huber loss constant c"),
    sample_steps: int = typer.Option(4, min=1, help="the student's default sampling steps"),
    steps: int = typer.Option(2000, min=1, help="training steps"),
    batch: Batch = 8,
    lr: float = typer.Option(None, help="learning rate (default 1e-4 for a LoRA, 2e-5 full)"),
    warmup: Warmup = 10,
    cache_size: CacheSize = 256,
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = 50,
    max_minutes: MaxMinutes = None,
    device: Device = "auto",
    threads: Threads = 1,
    quiet: Quiet = False,
) -> None:
    """The student learns the consistency function of the teacher's guided ODE (skipping-step DDIM
    teacher, pseudo-Huber loss); sample it with the lcm solver in a few steps."""
    from ..distill.lcm import LCMConfig, distill_lcm
    from .train import training_device

    if sample_steps > origin_steps:  # the lcm grid picks the sampling steps among the teacher's grid
        raise VelodiffError(
            f"--sample-steps {sample_steps} exceeds --origin-steps {origin_steps}: the student samples on "
            "the teacher's skipping-step grid; lower --sample-steps or raise --origin-steps"
        )
    if lora_alpha is not None and not 0 < lora_alpha < math.inf:
        raise VelodiffError(f"--lora-alpha must be a finite number > 0, got {lora_alpha}")
    dev = training_device(threads, device)
    lr = lr if lr is not None else (1e-4 if lora_rank > 0 else 2e-5)
    cfg = loop_config(steps, lr, warmup, seed, checkpoint_every, max_minutes, out=out, run=run,
                      guidance=guidance, sources=(teacher,))
    lcfg = LCMConfig(
        origin_steps=origin_steps,
        guidance=guidance,
        r=lora_rank,
        lora_alpha=float(lora_alpha if lora_alpha is not None else max(lora_rank, 1)),
        ema=ema,
        huber_c=huber_c,
        batch=batch,
        cache_size=cache_size,
        sample_steps=sample_steps,
    )
    res = distill_lcm(teacher, out, run, cfg, lcfg, quiet=quiet, device=dev)
    report(res, run, max_minutes)


@distill_app.command(
    "reflow",
    epilog=example("velodiff distill reflow --out students/rf1 --run runs/rf --pairs 1024"),
    short_help="Reflow (2-rectified flow) on teacher pairs, then few-step distillation (InstaFlow).",
)
def reflow(
    out: Path = typer.Option(..., help="the distilled student's folder (the reflowed one: OUT-2steps)"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (pair cache, checkpoints per phase); resumes"),  # noqa: B008
    teacher: Teacher = "default",
    init: Init = None,
    pairs: int = typer.Option(1024, help="(noise, teacher sample) training pairs"),
    eval_pairs: int = typer.Option(32, help="held-out pairs for the straightness report"),
    plan: PairPlan = None,
    solver: PairSolver = None,
    teacher_steps: TeacherSteps = None,
    guidance: PairGuidance = None,
    reflow_steps: int = typer.Option(1500, min=0, help="training steps on the coupled interpolation"),
    distill_steps: int = typer.Option(1000, min=0, help="few-step distillation steps"),
    student_steps: StudentSteps = 1,
    batch: Batch = 8,
    lr: float = typer.Option(2e-5, min=0.0),
    warmup: Warmup = 10,
    ema: float = typer.Option(0.0, min=0.0, max=1.0, help="EMA decay of the student (0: none)"),
    ode_steps: int = typer.Option(20, help="DDIM steps of the ODE the straightness is measured on"),
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = 50,
    max_minutes: float = typer.Option(None, help="stop (with a checkpoint) after this much time per phase"),
    device: Device = "auto",
    threads: Threads = 1,
    quiet: Quiet = False,
) -> None:
    """Pairs z -> teacher ODE(z), cached; the student learns the straight coupling, then K steps."""
    from ..distill.reflow import ReflowConfig, distill_reflow
    from .train import training_device

    dev = training_device(threads, device)
    cfg = loop_config(1, lr, warmup, seed, checkpoint_every, max_minutes, ema=ema, out=out, run=run,
                      guidance=guidance, sources=(teacher, init), beside=("-2steps",) if reflow_steps else ())
    pcfg = pair_config(pairs, eval_pairs, seed, plan, solver, teacher_steps, guidance)
    rcfg = ReflowConfig(
        reflow_steps=reflow_steps, distill_steps=distill_steps, batch=batch, ema=ema, ode_steps=ode_steps,
        student_steps=student_steps,
    )
    res = distill_reflow(teacher, init, out, run, cfg, pcfg, rcfg, quiet=quiet, device=dev)
    for k, v in res["report"].items():
        if isinstance(v, dict):
            typer.echo(f"{k}: " + ", ".join(f"{m} {x:.4g}" for m, x in v.items()))
    report(res, run, max_minutes)


@distill_app.command(
    "dmd",
    epilog=example("velodiff distill dmd --init default-2step --out students/dmd2 --run runs/dmd"),
    short_help="Distribution matching distillation (DMD, Yin et al. 2024) on teacher pairs.",
)
def dmd(
    out: Path = typer.Option(..., help="the student's diffusers folder"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (pair cache, checkpoints); resumes"),  # noqa: B008
    teacher: Teacher = "default",
    init: Init = None,
    pairs: int = typer.Option(1024, help="(noise, teacher sample) pairs for the regression loss"),
    eval_pairs: int = typer.Option(32, min=0, help="held-out pairs for the student's error report"),
    plan: PairPlan = None,
    solver: PairSolver = None,
    teacher_steps: TeacherSteps = None,
    guidance: PairGuidance = None,
    steps: int = typer.Option(2000, min=0, help="training steps"),
    student_steps: StudentSteps = 1,
    regression_weight: float = typer.Option(0.25, min=0.0, help="weight of the regression on the pairs"),
    real_guidance: float = typer.Option(None, min=0.0, help="CFG of the real score (default: --guidance)"),
    fake_updates: int = typer.Option(1, min=1, help="fake-score updates per generator update (DMD2: 5)"),
    gan_weight: float = typer.Option(0.0, min=0.0, help="DMD2 GAN loss weight of the generator (0: off)"),
    disc_weight: float = typer.Option(1e-2, min=0.0, help="the discriminator's GAN loss weight (DMD2: 1e-2)"),
    real_images: int = typer.Option(1024, min=1, help="rendered shapes-world scenes the GAN takes as real"),
    batch: Batch = 8,
    lr: float = typer.Option(1e-5, min=0.0),
    warmup: Warmup = 10,
    ema: float = typer.Option(0.0, min=0.0, max=1.0, help="EMA decay of the student (0: none)"),
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = 50,
    max_minutes: float = typer.Option(None, help="stop (with a checkpoint) after this much time"),
    device: Device = "auto",
    threads: Threads = 1,
    quiet: Quiet = False,
) -> None:
    """A K-step student whose samples match the teacher's distribution (DMD) and its pairs."""
    from ..distill.dmd import DMDConfig, distill_dmd
    from .train import training_device

    dev = training_device(threads, device)
    cfg = loop_config(1, lr, warmup, seed, checkpoint_every, max_minutes, ema=ema, out=out, run=run,
                      guidance=guidance, sources=(teacher, init))
    pcfg = pair_config(pairs, eval_pairs, seed, plan, solver, teacher_steps, guidance)
    dcfg = DMDConfig(steps=steps, batch=batch, student_steps=student_steps,
                     regression_weight=regression_weight, ema=ema, real_guidance=real_guidance,
                     fake_updates=fake_updates, gan_weight=gan_weight, disc_weight=disc_weight,
                     real_images=real_images)
    res = distill_dmd(teacher, init, out, run, cfg, pcfg, dcfg, quiet=quiet, device=dev)
    if res["out"] is not None:
        typer.echo(f"held-out {student_steps}-step error vs the teacher's samples: {res['held_out']:.4g}")
    report(res, run, max_minutes)


@distill_app.command(
    "prune",
    epilog=example("velodiff distill prune --target-flops 0.7 --out pruned --run runs/prune"),
    short_help="Prune UNet blocks (LD-Pruner or magnitude ranking), then repair by distillation.",
)
def prune(
    out: Path = typer.Option(..., help="the pruned student's diffusers folder"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (ranking, checkpoints); resumes"),  # noqa: B008
    teacher: Teacher = "default",
    method: str = typer.Option("ld", help="ranking: ld (LD-Pruner, output-latent impact) or magnitude"),
    target_flops: float = typer.Option(0.7, help="FLOPs per evaluation kept, a fraction in (0, 1]"),
    feature_weight: float = typer.Option(1.0, min=0.0, help="weight of the up-block feature loss"),
    guidance: float = typer.Option(2.5, help="CFG scale of the calibration runs and the student's default"),
    calib_prompts: int = typer.Option(8, min=2, help="calibration prompts of the LD ranking"),
    calib_steps: int = typer.Option(10, min=1, help="DDIM steps of the LD calibration runs"),
    steps: int = typer.Option(1000, min=0, help="repair steps (0: prune only)"),
    batch: Batch = 8,
    lr: float = typer.Option(1e-4, min=0.0),
    warmup: Warmup = 10,
    cache_size: CacheSize = 256,
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = 50,
    max_minutes: MaxMinutes = None,
    device: Device = "auto",
    threads: Threads = 1,
    quiet: Quiet = False,
) -> None:
    """Remove the UNet units that change the output least until the FLOPs target is met; repair."""
    from ..distill.prune import PruneConfig, check_target
    from ..distill.prune import prune as run_prune
    from .train import training_device

    check_target(target_flops)
    dev = training_device(threads, device)
    cfg = loop_config(steps, lr, warmup, seed, checkpoint_every, max_minutes, out=out, run=run,
                      guidance=guidance, sources=(teacher,))
    pcfg = PruneConfig(
        method=method, target_flops=target_flops, feature_weight=feature_weight, guidance=guidance,
        calib_prompts=calib_prompts, calib_steps=calib_steps, batch=batch, cache_size=cache_size,
    )
    res = run_prune(teacher, out, run, cfg, pcfg, quiet=quiet, device=dev)
    kept = res["params"] / res["teacher_params"], res["flops"] / res["teacher_flops"]
    typer.echo(
        f"removed {', '.join(res['removed']) or 'nothing'}: {kept[0]:.2f} of the parameters, "
        f"{kept[1]:.2f} of the FLOPs per evaluation"
    )
    report(res, run, max_minutes)
