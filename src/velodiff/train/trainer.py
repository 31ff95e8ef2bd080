"""Stage 2: text-to-image latent diffusion. A UNet2DConditionModel and a CLIPTextModel trained jointly
from scratch on ShapesWorld captions, over the frozen stage-1 autoencoder's latents.

Latents of scenes ``0..cache_size-1`` are encoded on first use and kept (in the checkpoint), and every
step's batch, timesteps, noise and condition dropout come from the step's own generator, so a resumed
run is bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..default_model import scheduler_config, text_encoder_config, unet_config, vae_config, write_tokenizer
from ..errors import VelodiffError
from .loop import LoopConfig, load_run_weights, run_loop
from .objectives import alphas_cumprod, loss_weights, noisy_and_target


@dataclass
class LDMConfig:
    batch: int = 32
    size: str = "default"
    prediction_type: str = "v_prediction"
    min_snr_gamma: float | None = 5.0
    cond_dropout: float = 0.1
    cache_size: int = 16384
    data_seed: int = 0


def build_models(size: str) -> tuple[Any, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(size))
    text = CLIPTextModel(CLIPTextConfig(**text_encoder_config(size)))
    return unet, text


def load_vae(vae_run: Path, size: str) -> tuple[Any, float]:
    from diffusers import AutoencoderKL

    summary = vae_run / "summary.json"
    if not summary.exists():
        raise VelodiffError(
            f"{vae_run} has no finished autoencoder run (summary.json); run `velodiff train autoencoder`"
        )
    scaling = float(json.loads(summary.read_text())["scaling_factor"])
    vae = AutoencoderKL(**{**vae_config(size), "scaling_factor": scaling})
    vae.load_state_dict(load_run_weights(vae_run, "vae"))
    vae.eval().requires_grad_(False)
    return vae, scaling


class LatentCache:
    """Scaled latent means and token ids of scenes 0..n-1, encoded on first use."""

    def __init__(self, world: Any, vae: Any, tokenizer: Any, n: int, scaling: float) -> None:
        self.world, self.vae, self.tok, self.scaling = world, vae, tokenizer, scaling
        self.latents = torch.zeros(n, 4, 16, 16)
        self.ids = torch.zeros(n, tokenizer.model_max_length, dtype=torch.int64)
        self.filled = torch.zeros(n, dtype=torch.bool)

    @torch.no_grad()
    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        missing = idx[~self.filled[idx]].unique()
        if len(missing):
            scenes = [self.world.scene(int(i)) for i in missing]
            x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
            self.latents[missing] = self.vae.encode(x).latent_dist.mean * self.scaling
            self.ids[missing] = tokenize(self.tok, [s.caption for s in scenes])
            self.filled[missing] = True
        return self.latents[idx], self.ids[idx]

    def state(self) -> dict[str, torch.Tensor]:
        return {"latents": self.latents, "ids": self.ids, "filled": self.filled}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.latents.copy_(st["latents"])
        self.ids.copy_(st["ids"])
        self.filled.copy_(st["filled"])


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Positions step*batch .. of the epoch-wise shuffled sequence of scenes 0..n-1."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(batch - len(out), n - off)
        out.append(perm[off : off + take])
        pos += take
        if sum(len(o) for o in out) >= batch:
            break
    return torch.cat(out)[:batch]


def train_ldm(
    run: Path, vae_run: Path, cfg: LoopConfig, lcfg: LDMConfig, quiet: bool = False
) -> dict[str, Any]:
    from transformers import CLIPTokenizer

    from ..data.shapes import ShapesWorld

    world = ShapesWorld(seed=lcfg.data_seed, size=64, holdout=True)
    vae, scaling = load_vae(vae_run, lcfg.size)
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(run / "tokenizer")))
    unet, text = build_models(lcfg.size)
    sched = scheduler_config(lcfg.prediction_type)
    abar = alphas_cumprod(sched)
    cache = LatentCache(world, vae, tok, lcfg.cache_size, scaling)
    uncond = tokenize(tok, [""])[0]

    def step_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        idx = batch_indices(step, lcfg.batch, lcfg.cache_size, cfg.seed)
        z0, ids = cache.get(idx)
        b = len(idx)
        drop = torch.rand(b, generator=gen) < lcfg.cond_dropout
        ids = torch.where(drop[:, None], uncond[None], ids)
        k = torch.randint(0, len(abar), (b,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        x, target = noisy_and_target(z0, k, eps, abar, lcfg.prediction_type)
        ctx = text(ids).last_hidden_state
        pred = unet(x, k, ctx).sample
        per = (pred - target).pow(2).mean(dim=(1, 2, 3))
        w = loss_weights(k, abar, lcfg.prediction_type, lcfg.min_snr_gamma)
        loss = (w * per).mean()
        return loss, {"mse": round(per.mean().item(), 5)}

    cfg.extra = {**cfg.extra, **vars(lcfg), "stage": "ldm", "scaling_factor": scaling}
    summary = run_loop(
        run,
        cfg,
        {"unet": unet, "text_encoder": text},
        step_fn,
        extra_state=(cache.state, cache.load),
        desc="ldm",
        quiet=quiet,
    )
    summary.pop("emas")
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
