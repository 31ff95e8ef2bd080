"""`velodiff train`: velodiff's own trainer for the autoencoder and for text-to-image latent diffusion.

    velodiff train autoencoder --run runs/vae --steps 600
    velodiff train ldm --vae runs/vae --run runs/ldm --steps 3000 --out path/to/model
    velodiff train export --vae runs/vae --ldm runs/ldm --out path/to/model

A run folder holds safetensors checkpoints (never pickles) and loss.csv; rerunning the same command
resumes from the latest checkpoint and gives bit-identical weights to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import VelodiffError, unknown_name
from ..limits import MAX_BATCH
from .options import check_threads, example

train_app = typer.Typer(
    no_args_is_help=True,
    help="Train the autoencoder and the text-to-image model.",
    epilog=example("velodiff train autoencoder --run runs/vae"),
)


#: the architecture sizes of the shipped model's family (velodiff.default_model)
SIZES = ("default", "micro")


def _check(run: Path, size: str, lr: float, max_minutes: float | None) -> None:
    """What every training checks before any work, each in one line."""
    import math

    from ..errors import VelodiffError, unknown_name

    if size not in SIZES:
        raise unknown_name("size", size, SIZES)
    if run.exists() and not run.is_dir():
        raise VelodiffError(f"--run {str(run)!r} is a file; give a folder")
    for name, value in (("--lr", lr), ("--max-minutes", max_minutes)):
        if value is not None and not 0 < value < math.inf:  # NaN, inf: a NaN model, or no time limit
            raise VelodiffError(f"{name} must be a finite number > 0, got {value}")
    from .generate import quiet_libraries  # the libraries' import chatter off the CLI, as every command

    quiet_libraries()


def training_device(threads: int | None, device: str) -> str:
    """Set torch's CPU threads (None: 2, or the machine's CPUs if fewer) and resolve a training run's
    ``device``: auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N
    (``models.base.resolve_device``'s checks)."""
    import os

    import torch

    from ..errors import VelodiffError
    from ..models.base import resolve_device

    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise VelodiffError(f"--device {device!r}: training runs on cpu or cuda (or auto)")
    return str(dev)


@train_app.command(
    "autoencoder",
    epilog=example("velodiff train autoencoder --run runs/vae"),
    short_help="Train the autoencoder on shapes-world images.",
)
def autoencoder(
    run: Path = typer.Option(  # noqa: B008
        ..., help="run folder (checkpoints, loss.csv); resumes when it has a checkpoint"
    ),  # noqa: B008
    steps: int = typer.Option(600, min=1),
    batch: int = typer.Option(16, min=1, max=MAX_BATCH),
    lr: float = typer.Option(1e-3, min=0.0),
    warmup: int = typer.Option(50, min=0),
    kl_weight: float = typer.Option(1e-6, min=0.0),
    ema_decay: float = typer.Option(0.99, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    size: str = typer.Option("default", help="architecture size: default or micro"),
    init: Annotated[Path | None, typer.Option(help="start from this autoencoder run's weights")] = None,
    decoder_only: bool = typer.Option(False, help="freeze the encoder, fine-tune the decoder"),
    max_minutes: float = typer.Option(
        None, help="stop (with a checkpoint) after this much training time, counted over the run's resumes"
    ),
    checkpoint_every: int = typer.Option(100, min=1),
    threads: int | None = typer.Option(
        None, min=1, callback=check_threads, help="CPU threads (default: 2, or the CPUs if fewer)"
    ),
    quiet: bool = typer.Option(False),
) -> None:
    """Train the AutoencoderKL (64x64x3 <-> 16x16x4) on ShapesWorld images."""
    from ..train.autoencoder import build_vae, recon_sheet, train_autoencoder
    from ..train.loop import LoopConfig, load_run_weights

    _check(run, size, lr, max_minutes)
    training_device(threads, "cpu")
    cfg = LoopConfig(
        steps=steps,
        lr=lr,
        warmup=warmup,
        weight_decay=0.0,
        ema_decay=ema_decay,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_minutes=max_minutes,
    )
    s = train_autoencoder(
        run,
        cfg,
        batch=batch,
        size=size,
        kl_weight=kl_weight,
        init=init,
        decoder_only=decoder_only,
        quiet=quiet,
    )
    from ..data.shapes import ShapesWorld

    vae = build_vae(size)
    vae.load_state_dict(load_run_weights(run, "vae"))
    vae.eval()
    recon_sheet(vae, ShapesWorld(seed=0), run / "reconstructions.png")
    typer.echo(
        f"autoencoder: {s['steps']} steps, {s['wall_s'] / 60:.1f} min, loss {s['final_loss']:.4f}, "
        f"recon MSE {s['recon_mse']:.5f}, scaling_factor {s['scaling_factor']:.4f}"
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(train_app, name="train")


@train_app.command(
    "ldm",
    epilog=example("velodiff train ldm --vae runs/vae --run runs/ldm"),
    short_help="Train the UNet and the text encoder on the latents.",
)
def ldm(
    vae: Path = typer.Option(  # noqa: B008
        ..., help="the autoencoder run folder (from `velodiff train autoencoder`)"
    ),
    run: Path = typer.Option(  # noqa: B008
        ..., help="run folder (checkpoints, loss.csv); resumes when it has a checkpoint"
    ),  # noqa: B008
    steps: int = typer.Option(3000, min=1),
    batch: int = typer.Option(32, min=1, max=MAX_BATCH),
    lr: float = typer.Option(5e-4, min=0.0),
    warmup: int = typer.Option(200, min=0),
    prediction: str = typer.Option("v_prediction", help="epsilon or v_prediction"),
    min_snr_gamma: float = typer.Option(5.0, min=0.0, help="min-SNR weighting gamma (0: off)"),
    cond_dropout: float = typer.Option(0.1, min=0.0, max=1.0, help="CFG condition dropout probability"),
    ema_decay: float = typer.Option(0.999, min=0.0, max=1.0),
    grad_clip: float = typer.Option(1.0, min=0.0),
    cache_size: int = typer.Option(16384, min=1, help="number of distinct training scenes"),
    seed: int = typer.Option(0),
    size: str = typer.Option("default", help="architecture size: default or micro"),
    max_minutes: float = typer.Option(
        None, help="stop (with a checkpoint) after this much training time, counted over the run's resumes"
    ),
    checkpoint_every: int = typer.Option(100, min=1),
    out: Annotated[
        Path | None, typer.Option(help="export the EMA model as a diffusers folder here when done")
    ] = None,
    threads: int | None = typer.Option(
        None, min=1, callback=check_threads, help="CPU threads (default: 2, or the CPUs if fewer)"
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    workers: int = typer.Option(1, min=1, help="processes that render the training scenes (once, up front)"),
    init: Annotated[
        Path | None, typer.Option(help="fine-tune: start from this model folder's UNet and text encoder")
    ] = None,
    quiet: bool = typer.Option(False),
) -> None:
    """Train the UNet and the CLIP text encoder from scratch on the autoencoder's latents."""
    from ..files import check_model_out
    from ..train.loop import LoopConfig
    from ..train.trainer import LDMConfig, train_ldm

    if out is not None:
        o, r = out.expanduser().resolve(), run.expanduser().resolve()
        if o == r or o in r.parents or r in o.parents:  # (before check_model_out makes a parent folder)
            raise VelodiffError(f"--out {str(out)!r} and --run {str(run)!r} overlap; the export would "
                                "replace the run's checkpoints: give two separate folders")
        check_model_out(out)  # before the training, not after
    from ..train.objectives import PREDICTIONS

    if prediction not in PREDICTIONS:  # before the scenes are rendered, not at the first step
        raise unknown_name("--prediction", prediction, PREDICTIONS)
    _check(run, size, lr, max_minutes)
    device = training_device(threads, device)
    cfg = LoopConfig(
        steps=steps,
        lr=lr,
        warmup=warmup,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_minutes=max_minutes,
    )
    lcfg = LDMConfig(
        batch=batch,
        size=size,
        prediction_type=prediction,
        min_snr_gamma=min_snr_gamma or None,
        cond_dropout=cond_dropout,
        cache_size=cache_size,
        init=str(init) if init else None,
    )
    s = train_ldm(run, vae, cfg, lcfg, quiet=quiet, device=device, workers=workers)
    typer.echo(f"ldm: {s['steps']} steps, {s['wall_s'] / 60:.1f} min, loss {s['final_loss']:.4f}")
    again = ("rerun with a larger --max-minutes (it counts the training time over every resume)"
             if max_minutes else "rerun the same command")
    if out is not None and not s["completed"]:  # a half-trained model would replace the one at --out
        typer.echo(f"stopped before the last step: nothing exported to {out}; {again} to resume and export")
    elif out is not None:
        from ..train.export import export_model

        typer.echo(f"exported {export_model(vae, run, out)}")


@train_app.command(
    "export",
    epilog=example("velodiff train export --vae runs/vae --ldm runs/ldm --out my-model"),
    short_help="Write the latest checkpoint as a diffusers folder.",
)
def export(
    vae: Path = typer.Option(..., help="the autoencoder run folder"),  # noqa: B008
    ldm: Path = typer.Option(..., help="the ldm run folder"),  # noqa: B008
    out: Path = typer.Option(..., help="the diffusers folder to write"),  # noqa: B008
    raw: bool = typer.Option(False, help="export the raw weights instead of the EMA"),
    half: bool = typer.Option(
        True, help="store UNet and text encoder weights as float16 (loaded as float32)"
    ),
) -> None:
    """Write the latest checkpoint as a diffusers Stable Diffusion folder (safetensors)."""
    from ..files import check_model_out
    from ..train.export import export_model
    from .generate import quiet_libraries

    check_model_out(out)
    quiet_libraries()
    typer.echo(f"exported {export_model(vae, ldm, out, ema=not raw, half=half)}")
