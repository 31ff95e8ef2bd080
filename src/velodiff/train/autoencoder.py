"""Stage 1: the AutoencoderKL, trained on ShapesWorld images (L1 + MSE + a tiny KL term)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..default_model import vae_config
from ..errors import VelodiffError
from ..files import write_atomic
from .loop import LoopConfig, run_loop


def build_vae(size: str = "default") -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**vae_config(size))


def train_autoencoder(
    run: Path,
    cfg: LoopConfig,
    *,
    batch: int = 16,
    size: str = "default",
    kl_weight: float = 1e-6,
    data_seed: int = 0,
    init: Path | None = None,
    decoder_only: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train the autoencoder; ``init``: start from another autoencoder run's EMA weights;
    ``decoder_only``: freeze the encoder (its latent space stays fixed, so a latent-diffusion run on
    it can train at the same time) and fine-tune the decoder only."""
    from ..data.shapes import ShapesWorld
    from .loop import load_run_weights, run_meta
    from .trainer import fit_weights

    if decoder_only and init is None:
        raise VelodiffError(
            "--decoder-only fine-tunes the decoder of a trained autoencoder: give its run as --init"
        )
    # what train export checks its --vae run by (stage), and what a resume must share (the rest)
    cfg.extra = {**cfg.extra, "stage": "autoencoder", "batch": batch, "size": size, "kl_weight": kl_weight,
                 "data_seed": data_seed, "init": str(init) if init is not None else None,
                 "decoder_only": decoder_only}
    world = ShapesWorld(seed=data_seed, size=64, holdout=True)
    vae = build_vae(size)
    if init is not None:
        run_meta(init, "autoencoder", "--init")
        fit_weights(vae, load_run_weights(init, "vae"), f"--init {init}: its autoencoder", size)
    if decoder_only:
        for m in (vae.encoder, vae.quant_conv):
            if m is not None:
                m.requires_grad_(False)

    def step_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x, _ = world.batch(step * batch, batch)
        if decoder_only:
            with torch.no_grad():
                post = vae.encode(x).latent_dist
        else:
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + mse + kl_weight * kl
        return loss, {"l1": round(l1.item(), 5), "mse": round(mse.item(), 6), "kl": round(kl.item(), 3)}

    summary = run_loop(run, cfg, {"vae": vae}, step_fn, desc="autoencoder", quiet=quiet)
    summary["emas"]["vae"].copy_to(vae)
    vae.eval()
    summary["scaling_factor"] = measure_scaling_factor(vae, world)
    summary["recon_mse"] = recon_error(vae, world)
    kept = {k: v for k, v in summary.items() if k != "emas"}
    write_atomic(run / "summary.json", json.dumps(kept, indent=1))
    return summary


@torch.no_grad()
def measure_scaling_factor(vae: Any, world: Any, n: int = 256, start: int = 10_000_000) -> float:
    """1 / std of the latent posterior means over held-aside scenes (SD's scaling_factor)."""
    x, _ = world.batch(start, n)
    z = vae.encode(x).latent_dist.mean
    return float(1.0 / z.std())


@torch.no_grad()
def recon_error(vae: Any, world: Any, n: int = 64, start: int = 10_000_000) -> float:
    x, _ = world.batch(start, n)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((rec - x).pow(2).mean())


@torch.no_grad()
def recon_sheet(vae: Any, world: Any, path: Path, n: int = 8, start: int = 10_000_000) -> None:
    """Originals (top row) over reconstructions (bottom row), 3x upscaled."""
    from PIL import Image

    from ..files import save_image_atomic
    from ..images import image_grid

    x, _ = world.batch(start, n)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    tiles = [Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
             for im in torch.cat([x, rec])]
    save_image_atomic(image_grid(tiles, n, gap=0, scale=3), path)
