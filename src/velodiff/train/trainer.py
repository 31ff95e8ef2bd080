"""Stage 2: text-to-image latent diffusion. A UNet2DConditionModel and a CLIPTextModel trained jointly
from scratch on ShapesWorld captions, over the frozen stage-1 autoencoder's latents.

Latents of scenes ``0..cache_size-1`` are rendered and encoded once, up front (``LatentCache``), and
every step's batch, timesteps, noise and condition dropout come from the step's own generator, so a
resumed run is bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..default_model import scheduler_config, text_encoder_config, unet_config, vae_config, write_tokenizer
from ..errors import VelodiffError
from ..files import write_atomic
from .loop import LoopConfig, load_run_weights, run_loop, run_meta
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
    init: str | None = None


def build_models(size: str) -> tuple[Any, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(size))
    text = CLIPTextModel(CLIPTextConfig(**text_encoder_config(size)))
    return unet, text


def load_init_weights(unet: Any, text: Any, folder: Path) -> None:
    """Start from the UNet and text encoder of an SD1-family model (e.g. an exported one): fine-tuning."""
    from ..models import load

    try:
        model = load(folder)
    except VelodiffError as e:
        raise VelodiffError(f"--init: {e}") from None
    for module, name in ((unet, "unet"), (text, "text_encoder")):
        if name not in model.components:
            raise VelodiffError(f"--init {folder}: the model has no {name} (expected an SD1-family model)")
        try:
            module.load_state_dict(model.components[name].state_dict())
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise VelodiffError(f"--init {folder}: weights do not fit this architecture: {first}") from None


def fit_weights(module: Any, state: dict[str, Any], what: str, size: str) -> None:
    """Load ``state`` into ``module`` (built for ``size``), or one line: a run of another --size."""
    try:
        module.load_state_dict(state)
    except RuntimeError:
        raise VelodiffError(f"{what} is not of size {size!r}; give the --size it was trained with") from None


def load_vae(vae_run: Path, size: str) -> tuple[Any, float]:
    from diffusers import AutoencoderKL

    summary = vae_run / "summary.json"
    if not summary.exists():
        raise VelodiffError(
            f"{vae_run} has no finished autoencoder run (summary.json); run `velodiff train autoencoder`"
        )
    run_meta(vae_run, "autoencoder", "--vae")  # an LDM or distill run has a summary.json too
    try:
        done = json.loads(summary.read_text())
        scaling = float(done["scaling_factor"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VelodiffError(f"{summary} is damaged ({type(e).__name__}); rerun `velodiff train autoencoder` "
                            "with the same --run to write it again") from None
    if not done.get("completed", True):  # stopped by --max-minutes: a partly trained VAE
        raise VelodiffError(
            f"{vae_run}: the autoencoder run stopped at step {done.get('steps')}; rerun `velodiff train "
            "autoencoder` with the same --run to finish it"
        )
    vae = AutoencoderKL(**{**vae_config(size), "scaling_factor": scaling})
    fit_weights(vae, load_run_weights(vae_run, "vae"), f"{vae_run}: its autoencoder", size)
    vae.eval().requires_grad_(False)
    return vae, scaling


def _render_chunk(world: Any, start: int, stop: int) -> tuple[Any, list[str]]:
    """Images (uint8, n x H x W x 3) and captions of scenes start..stop-1 (runs in a worker process)."""
    import numpy as np

    scenes = [world.scene(i) for i in range(start, stop)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


class LatentCache:
    """Scaled latent means and token ids of scenes 0..n-1, all encoded up front on ``device``.

    Scenes are rendered by ``workers`` processes and encoded in fixed chunks, so the cache is a pure
    function of (world, autoencoder, n, device): a resumed run rebuilds it bit-identically instead of
    storing it in every checkpoint."""

    CHUNK = 256

    def __init__(
        self, world: Any, vae: Any, tokenizer: Any, n: int, scaling: float, device: str = "cpu",
        workers: int = 1, quiet: bool = True,
    ) -> None:
        starts = range(0, n, self.CHUNK)
        chunks = [(s, min(n, s + self.CHUNK)) for s in starts]
        latents, ids = [], []
        for images, captions in _map_chunks(world, chunks, workers, quiet):
            x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                latents.append(vae.encode(x).latent_dist.mean * scaling)
            ids.append(tokenize(tokenizer, captions).to(device))
        self.latents = torch.cat(latents)
        self.ids = torch.cat(ids)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.latents.device)
        return self.latents[idx], self.ids[idx]


def _map_chunks(world: Any, chunks: list[tuple[int, int]], workers: int, quiet: bool):
    """Rendered chunks in order, from a process pool when ``workers > 1``."""
    from tqdm import tqdm

    bar = tqdm(total=len(chunks), desc="render scenes", disable=quiet, mininterval=5.0)
    if workers <= 1:
        for a, b in chunks:
            yield _render_chunk(world, a, b)
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for out in pool.map(_render_chunk, [world] * len(chunks), *zip(*chunks, strict=True)):
                yield out
                bar.update(1)
    bar.close()


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
    out, pos, need = [], step * batch, batch
    while need > 0:  # a batch may run over the end of an epoch (or several, when batch > n)
        epoch, off = divmod(pos, n)
        take = min(need, n - off)
        out.append(_epoch_permutation(n, seed, epoch)[off : off + take])
        pos, need = pos + take, need - take
    return torch.cat(out)


@lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def train_ldm(
    run: Path, vae_run: Path, cfg: LoopConfig, lcfg: LDMConfig, quiet: bool = False, device: str = "cpu",
    workers: int = 1,
) -> dict[str, Any]:
    """Train on ``device``; ``workers`` processes render the training scenes once, up front."""
    from transformers import CLIPTokenizer

    from ..data.shapes import ShapesWorld
    from ..models.weights import from_pretrained

    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convolutions on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    world = ShapesWorld(seed=lcfg.data_seed, size=64, holdout=True)
    vae, scaling = load_vae(vae_run, lcfg.size)
    tok = from_pretrained(CLIPTokenizer, write_tokenizer(run / "tokenizer"), weights=False)
    unet, text = build_models(lcfg.size)
    if lcfg.init:
        load_init_weights(unet, text, Path(lcfg.init))
    unet, text = unet.to(device), text.to(device)
    sched = scheduler_config(lcfg.prediction_type)
    abar = alphas_cumprod(sched).to(device)
    cache = LatentCache(world, vae.to(device), tok, lcfg.cache_size, scaling, device, workers, quiet)
    del vae
    uncond = tokenize(tok, [""])[0].to(device)

    def step_fn(step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # every draw comes from the step's CPU generator: the same run on CPU and GPU sees the same data
        idx = batch_indices(step, lcfg.batch, lcfg.cache_size, cfg.seed)
        z0, ids = cache.get(idx)
        b = len(idx)
        drop = (torch.rand(b, generator=gen) < lcfg.cond_dropout).to(device)
        ids = torch.where(drop[:, None], uncond[None], ids)
        k = torch.randint(0, len(abar), (b,), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        x, target = noisy_and_target(z0, k, eps, abar, lcfg.prediction_type)
        ctx = text(ids).last_hidden_state
        pred = unet(x, k, ctx).sample
        per = (pred - target).pow(2).mean(dim=(1, 2, 3))
        w = loss_weights(k, abar, lcfg.prediction_type, lcfg.min_snr_gamma)
        loss = (w * per).mean()
        return loss, {"mse": per.detach().mean()}

    cfg.extra = {**cfg.extra, **vars(lcfg), "stage": "ldm", "scaling_factor": scaling}
    summary = run_loop(run, cfg, {"unet": unet, "text_encoder": text}, step_fn, desc="ldm", quiet=quiet)
    summary.pop("emas")
    write_atomic(run / "summary.json", json.dumps(summary, indent=1))
    return summary
