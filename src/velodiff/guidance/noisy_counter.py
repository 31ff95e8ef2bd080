"""A noise-aware pair counter: classifier guidance as Dhariwal & Nichol (2021, Sec. 4) train it, a
classifier of the noisy latent x_t and its noise level, trained on the forward process of clean data.

It reads the same thing as the pair counter (``velodiff.guidance.pair_counter``: for each of the 28
colour-shape pairs, 0, 1, 2 or 3-or-more objects), but from a latent of the default model's VAE noised to
log-SNR lambda = log(alpha / sigma), x_t = alpha z + sigma eps, never from a decoded image. Guidance then
needs no VAE decode and no network backward: ``classifier:head=pair_counts,through=noisy`` adds
s grad_{x_t} log p(y | x_t, lambda) to the score (D&N Eq. 14). Training data: ``ShapesWorld`` renders
encoded by the VAE (the model's training distribution, never a model sample), t uniform over the
schedule's range as D&N draw it. The file records the hash of the VAE whose latents it reads; another
model's latents are refused. Train and ship (about 18 minutes on 2 CPU threads)::

    python -m velodiff.guidance.noisy_counter --threads 2 \
        --out src/velodiff/assets/pair-counter/noisy-counter.safetensors

Measured (bench/edit/README.md): guiding with it leaves ShapesEval counting as it is or lowers it; it reads
the prompt's counts as right in the unguided samples ShapesEval counts wrong, so it has nothing to steer.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.shapes import color_shape_pairs
from ..errors import VelodiffError
from ..eval.features import encoder_info, fit, load_versioned, save_encoder, weights_file
from .pair_counter import COUNTS, make_dataset, training_cli

VERSION = "noisy-pair-counter-v1"
#: frequencies of the sinusoidal embedding of lambda (the default model's 20-step grid spans about -5..+5)
FREQS = torch.exp(torch.linspace(math.log(0.05), math.log(8.0), 16))
LAMBDA_MAX = 10.0


def default_path() -> Path:
    from ..shipped import asset_path

    return asset_path("pair-counter") / "noisy-counter.safetensors"


def vae_hash(model: Any) -> str:
    """The fingerprint of the model's VAE folder: the latent space the counter reads."""
    from ..eval.reference import model_hash

    return model_hash(Path(model.path) / "vae")


class Block(nn.Module):
    """A residual block whose features are shifted and scaled by the noise level (FiLM)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(t_dim, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(nn.functional.silu(h))


class NoisyPairCounter(nn.Module):
    """``counter.logits(x_t, log_snr) -> {"pair_counts": (B, 28, 4)}``; x_t (B, 4, 16, 16) latents of the
    default model (scaled as its sampler sees them), log_snr (B,) or a scalar."""

    def __init__(self, channels: int = 4, widths: tuple[int, ...] = (32, 64, 128), t_dim: int = 128) -> None:
        super().__init__()
        self.time = nn.Sequential(nn.Linear(2 * len(FREQS), t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip((widths[0], *widths[:-1]), widths, strict=True)):
            blocks.append(Block(a, b, t_dim))
            if i < len(widths) - 1:
                blocks.append(nn.Conv2d(b, b, 3, stride=2, padding=1))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Flatten(),
            nn.Linear(widths[-1] * 4 * 4, 256), nn.SiLU(), nn.Linear(256, len(color_shape_pairs()) * COUNTS),
        )

    def logits(self, x: Tensor, log_snr: Tensor | float) -> dict[str, Tensor]:
        lam = torch.as_tensor(log_snr, dtype=torch.float32, device=x.device).reshape(-1).expand(len(x))
        lam = lam.clamp(-LAMBDA_MAX, LAMBDA_MAX)  # t = 0 has lambda = +inf
        arg = lam[:, None] * FREQS.to(x.device)
        temb = self.time(torch.cat([arg.sin(), arg.cos()], dim=1))
        h = self.stem(x.float())
        for b in self.blocks:
            h = b(h, temb) if isinstance(b, Block) else b(h)
        h = nn.functional.adaptive_avg_pool2d(h, 4)  # 16x16 latents give 4x4; other sizes are pooled to it
        return {"pair_counts": self.head(h).view(-1, len(color_shape_pairs()), COUNTS)}


def encode_dataset(model: Any, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n clean ``ShapesWorld`` renders as the model's latents, and their (n, 28) pair counts."""
    images, counts = make_dataset(n, seed, degrade_fraction=0.0)
    z = torch.cat([model.encode(images[i : i + 256].float() / 255) for i in range(0, n, 256)])
    return z.cpu(), counts


def noised(z: Tensor, schedule: Any, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """x_t = alpha z + sigma eps at t uniform over the schedule's range (D&N), and its log-SNR."""
    t = torch.rand(len(z), generator=g) * float(schedule.t_max)
    a, s = schedule.alpha(t).float(), schedule.sigma(t).float()
    eps = torch.randn(z.shape, generator=g)
    return a[:, None, None, None] * z + s[:, None, None, None] * eps, schedule.log_snr(t).float()


@torch.no_grad()
def accuracy(counter: NoisyPairCounter, z: Tensor, counts: Tensor, schedule: Any, t_fraction: float,
             seed: int = 0) -> dict[str, float]:
    """At t = t_fraction t_max: the share of latents whose every pair count is right, and of the named
    pairs' counts."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((len(z),), t_fraction * float(schedule.t_max))
    x = schedule.alpha(t).float()[:, None, None, None] * z + schedule.sigma(t).float()[:, None, None, None] \
        * torch.randn(z.shape, generator=g)
    pred = torch.cat([counter.logits(x[i : i + 256], schedule.log_snr(t[i : i + 256]).float())["pair_counts"]
                      .argmax(-1) for i in range(0, len(z), 256)])
    named = counts > 0
    return {"exact": float((pred == counts).all(1).float().mean()),
            "named_pairs": float((pred == counts)[named].float().mean())}


def train(
    out: str | Path | None, *, model: Any = None, n_train: int = 96000, n_val: int = 1000, epochs: int = 15,
    batch: int = 128, lr: float = 2e-3, seed: int = 0, progress: bool = True,
) -> tuple[NoisyPairCounter, dict[str, Any]]:
    """Train from scratch on the default model's latents (or ``model``'s) and save to ``out``; a fresh
    noise draw per image per epoch (deterministic for a seed and thread count)."""
    from ..models.loading import load

    if model is None:
        from ..default_model import default_model_path

        model = load(default_model_path())
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    z, counts = encode_dataset(model, n_train, seed=5000 + seed)
    zv, cv = encode_dataset(model, n_val, seed=6000 + seed)
    schedule, g = model.schedule, torch.Generator().manual_seed(seed)
    counter = NoisyPairCounter(channels=z.shape[1])

    def loss(m: NoisyPairCounter, zs: Tensor, j: Tensor) -> Tensor:
        x, lam = noised(zs[j], schedule, g)
        logits = m.logits(x, lam)["pair_counts"]
        return nn.functional.cross_entropy(logits.reshape(-1, COUNTS), counts[j].reshape(-1))

    fit(counter, loss, z, epochs=epochs, batch=batch, lr=lr, seed=seed, desc="noisy pair counter",
        progress=progress)
    counter.eval()
    val = {f"t={f:g}": accuracy(counter, zv, cv, schedule, f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)}
    info = {"version": VERSION, "vae_hash": vae_hash(model), "n_train": n_train, "epochs": epochs,
            "batch": batch, "lr": lr, "seed": seed, "val": val,
            "train_seconds": round(time.perf_counter() - t0, 1)}
    if out is not None:
        save_encoder(counter, out, info)
    return counter, info


@lru_cache(maxsize=2)
def _load(path: str) -> tuple[NoisyPairCounter, str]:
    trained_on = str(encoder_info(path).get("vae_hash", ""))
    return load_versioned(path, NoisyPairCounter, VERSION), trained_on  # type: ignore[return-value]


def load_noisy_counter(model: Any, path: str | Path | None = None) -> NoisyPairCounter:
    """The shipped noise-aware counter (or one ``train`` wrote), in eval mode; refused for a model whose
    VAE is not the one it was trained on (its latents mean something else)."""
    file = weights_file(path, default_path(), "noise-aware pair-counter", "velodiff.guidance.noisy_counter")
    counter, trained_on = _load(file)
    if getattr(model, "path", "") and trained_on != vae_hash(model):
        raise VelodiffError(
            f"the noise-aware pair counter reads the latents of VAE {trained_on}, not this model's "
            f"({vae_hash(model)}); use through=x0 or through=network, or train one for this model"
        )
    return counter


def main(argv: list[str] | None = None) -> int:
    return training_cli(argv, "train the noise-aware pair counter", train, n_train=96000, epochs=15)


if __name__ == "__main__":
    raise SystemExit(main())
