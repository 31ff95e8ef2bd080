"""`velodiff distill`: few-step students trained from a teacher model.

    velodiff distill progressive --teacher default --out students/pd5 --run runs/pd --steps 200

Rerunning the same command resumes each round from its latest checkpoint (bit-exact)."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import example

distill_app = typer.Typer(
    no_args_is_help=True,
    help="Distil few-step students from a teacher model.",
    epilog=example("velodiff distill progressive --out students/pd5 --run runs/pd"),
)


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
    teacher: str = typer.Option("default", help="a shipped model name or a diffusers folder"),
    teacher_steps: int = typer.Option(20, min=2, help="the teacher's DDIM steps"),
    rounds: int = typer.Option(2, min=1, help="halvings (20 and 2 rounds: a 5-step student)"),
    guidance: float = typer.Option(2.5, help="the teacher's CFG scale, folded into the first student"),
    steps: int = typer.Option(200, min=1, help="training steps per round"),
    batch: int = typer.Option(8, min=1),
    lr: float = typer.Option(2e-5, min=0.0),
    warmup: int = typer.Option(10, min=0),
    cache_size: int = typer.Option(256, min=1, help="ShapesWorld scenes encoded as training latents"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(25, min=1),
    max_minutes: float = typer.Option(None, help="stop (with a checkpoint) after this much time per round"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    threads: int = typer.Option(1, min=1),
    quiet: bool = typer.Option(False),
) -> None:
    """Each round's student learns two teacher DDIM steps in one, and teaches the next round."""
    from ..distill.run import ProgressiveConfig, distill_progressive
    from ..train.loop import LoopConfig
    from .train import _threads

    dev = _threads(threads, device)
    cfg = LoopConfig(
        steps=steps,
        lr=lr,
        warmup=warmup,
        weight_decay=0.0,
        ema_decay=0.0,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_minutes=max_minutes,
        log_every=1,
    )
    pcfg = ProgressiveConfig(
        teacher_steps=teacher_steps, rounds=rounds, guidance=guidance, batch=batch, cache_size=cache_size
    )
    res = distill_progressive(teacher, out, run, cfg, pcfg, quiet=quiet, device=dev)
    if res["out"] is None:
        typer.echo(f"stopped with a checkpoint in {run}; rerun the same command to resume")
    else:
        typer.echo(f"student: {res['out']} ({res['wall_s']:.0f} s)")


@distill_app.command(
    "guided",
    epilog=example("velodiff distill guided --out students/guided --run runs/guided --steps 1000"),
    short_help="Guided distillation (Meng et al. 2023): the guidance scale as an input, one pass.",
)
def guided(
    out: Path = typer.Option(..., help="the student's diffusers folder"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (checkpoints); resumes"),  # noqa: B008
    teacher: str = typer.Option("default", help="a shipped model name or a diffusers folder"),
    w_min: float = typer.Option(1.0, min=0.0, help="smallest guidance scale trained"),
    w_max: float = typer.Option(4.0, min=0.0, help="largest guidance scale trained"),
    guidance: float = typer.Option(2.5, help="the scale the student samples at by default"),
    steps: int = typer.Option(1000, min=1, help="training steps"),
    batch: int = typer.Option(8, min=1),
    lr: float = typer.Option(2e-5, min=0.0),
    warmup: int = typer.Option(10, min=0),
    cache_size: int = typer.Option(256, min=1, help="ShapesWorld scenes encoded as training latents"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(50, min=1),
    max_minutes: float = typer.Option(None, help="stop (with a checkpoint) after this much time"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    threads: int = typer.Option(1, min=1),
    quiet: bool = typer.Option(False),
) -> None:
    """The student takes w as an input and matches the teacher's CFG output in one pass per step."""
    from ..distill.guided import GuidedConfig, distill_guided
    from ..train.loop import LoopConfig
    from .train import _threads

    dev = _threads(threads, device)
    cfg = LoopConfig(
        steps=steps,
        lr=lr,
        warmup=warmup,
        weight_decay=0.0,
        ema_decay=0.0,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_minutes=max_minutes,
        log_every=1,
    )
    gcfg = GuidedConfig(w_min=w_min, w_max=w_max, guidance=guidance, batch=batch, cache_size=cache_size)
    res = distill_guided(teacher, out, run, cfg, gcfg, quiet=quiet, device=dev)
    if res["out"] is None:
        typer.echo(f"stopped with a checkpoint in {run}; rerun the same command to resume")
    else:
        typer.echo(f"student: {res['out']} ({res['wall_s']:.0f} s)")


@distill_app.command(
    "prune",
    epilog=example("velodiff distill prune --target-flops 0.7 --out students/pruned --run runs/prune"),
    short_help="Prune UNet blocks (LD-Pruner or magnitude ranking), then repair by distillation.",
)
def prune(
    out: Path = typer.Option(..., help="the pruned student's diffusers folder"),  # noqa: B008
    run: Path = typer.Option(..., help="run folder (ranking, checkpoints); resumes"),  # noqa: B008
    teacher: str = typer.Option("default", help="a shipped model name or a diffusers folder"),
    method: str = typer.Option("ld", help="ranking: ld (LD-Pruner, output-latent impact) or magnitude"),
    target_flops: float = typer.Option(0.7, help="FLOPs per evaluation kept, a fraction in (0, 1]"),
    feature_weight: float = typer.Option(1.0, min=0.0, help="weight of the up-block feature loss"),
    guidance: float = typer.Option(2.5, help="CFG scale of the calibration runs and the student's default"),
    calib_prompts: int = typer.Option(8, min=2, help="calibration prompts of the LD ranking"),
    calib_steps: int = typer.Option(10, min=1, help="DDIM steps of the LD calibration runs"),
    steps: int = typer.Option(1000, min=0, help="repair steps (0: prune only)"),
    batch: int = typer.Option(8, min=1),
    lr: float = typer.Option(1e-4, min=0.0),
    warmup: int = typer.Option(10, min=0),
    cache_size: int = typer.Option(256, min=1, help="ShapesWorld scenes encoded as training latents"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(50, min=1),
    max_minutes: float = typer.Option(None, help="stop (with a checkpoint) after this much time"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    threads: int = typer.Option(1, min=1),
    quiet: bool = typer.Option(False),
) -> None:
    """Remove the UNet units that change the output least until the FLOPs target is met; repair."""
    from ..distill.prune import PruneConfig, check_target
    from ..distill.prune import prune as run_prune
    from ..train.loop import LoopConfig
    from .generate import quiet_libraries
    from .train import _threads

    check_target(target_flops)
    quiet_libraries()
    dev = _threads(threads, device)
    cfg = LoopConfig(
        steps=steps,
        lr=lr,
        warmup=warmup,
        weight_decay=0.0,
        ema_decay=0.0,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_minutes=max_minutes,
        log_every=1,
    )
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
    if res["out"] is None:
        typer.echo(f"stopped with a checkpoint in {run}; rerun the same command to resume")
    else:
        typer.echo(f"student: {res['out']} ({res['wall_s']:.0f} s)")
