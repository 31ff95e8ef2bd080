"""Reference runs: the same prompt from the same noise, solved accurately, cached on disk.

DPM-Solver-v3 (Zheng et al. 2023, sec. 6) and DC-Solver (Zhao et al. 2024) score a fast sampler by its
distance to a reference sample drawn from the *same* initial noise and prompt with a many-step solver:
MSE in latent space, PSNR / SSIM in pixel space (``velodiff.eval.metrics``). A reference costs hundreds of
network calls, so each one is stored under a key of (model hash, prompt, seed, reference config, size,
noise mode) and computed once.

The cache lives in ``$VELODIFF_CACHE/reference`` (default ``~/.cache/velodiff/reference``); each entry is
one safetensors file holding the final latents and the decoded image of one (prompt, seed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..files import cache_root, file_sha256, files_under
from ..shipped import SAMPLING_FILE


@dataclass(frozen=True)
class ReferenceConfig:
    """How a reference is solved. ``guidance`` must equal the guidance of the runs compared to it.
    The default, a third-order multistep solver at 100 steps on a log-SNR grid, ends the way the
    solvers under test end (the model's final step), so the comparison carries no end-point mismatch."""

    solver: str = "dpmpp_3m"
    steps: int = 100
    grid: str | None = "logsnr"
    guidance: float = 3.0

    def key(self) -> dict[str, Any]:
        return asdict(self)


def default_cache_dir() -> Path:

    return cache_root() / "reference"


#: the folder of a model where velodiff's artefacts made for it travel (``velodiff calibrate solver
#: --beside-model``); not part of the model's fingerprint, so writing one keeps the hash it is keyed by
ARTEFACTS = "velodiff"


#: the files of a model folder its hash reads (case-insensitive, as the loader reads ``UNET.SAFETENSORS``)
WEIGHT_AND_CONFIG_SUFFIXES = (".safetensors", ".json", ".txt", ".bin", ".ckpt")


@lru_cache(maxsize=16)
def _hash_folder(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for p in files_under(root):
        if p != root and (p.name.startswith(".") or p.suffix.lower() not in WEIGHT_AND_CONFIG_SUFFIXES):
            continue  # (a single file is its own content, whatever its name: model.SAFETENSORS loads)
        if p.name == SAMPLING_FILE and p.parent == root:  # sampling defaults, not the network
            continue
        if p != root and p.parent != root and p.relative_to(root).parts[0] == ARTEFACTS:  # made for it
            continue
        # a folder's files by their place in it; a single file by its content only (renaming a checkpoint
        # keeps its calibrations and cached references)
        h.update(f"{p.relative_to(root) if p != root else ''}:{file_sha256(p)}\n".encode())
    return h.hexdigest()[:16]


def model_hash(path: str | Path) -> str:
    """A fingerprint of a model folder or file: the names and whole contents (SHA-256) of every weight
    and config file but ``sampling.json`` and the ``velodiff/`` artefacts folder; any change to the
    weights changes it (an edit of a few layers, as ``velodiff erase`` makes, included)."""
    p = Path(path)
    if not p.exists():
        raise VelodiffError(f"cannot hash model {str(p)!r}: it does not exist")
    files = files_under(p)
    stamp = tuple((str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    return _hash_folder(str(p.resolve()), stamp)


def model_command_name(model: Any) -> str:
    """How a command names ``model``: ``--model`` and the load options its identity includes (for the
    lines that tell the user which command makes its calibration)."""
    from ..shipped import model_name

    how = getattr(model, "loaded_with", None) or {}
    opts = "".join(f" --{k.replace('_', '-')} {v}" for k, v in how.items())
    return model_name(model.path) + opts


def model_identity(model: Any) -> str:
    """The identity of a loaded model, which calibrations and cached references are keyed by: its files'
    hash (``model_hash``), and where it was loaded with them, the ``config`` folder's files and a forced
    family or prediction type (the same file under another config is another network)."""
    return identity_of(model.path, getattr(model, "loaded_with", None) or {})


def identity_of(path: str | Path, loaded_with: dict[str, str]) -> str:
    """:func:`model_identity` of the model files at ``path`` loaded with ``loaded_with`` (the options that
    make them another network: ``models.loading.loaded_with``), without loading them."""
    base = model_hash(path)
    how = dict(loaded_with)
    if not how:
        return base
    if "config" in how:
        how["config"] = model_hash(how["config"])
    return hashlib.sha256(json.dumps({"files": base, **how}, sort_keys=True).encode()).hexdigest()[:16]


def network_identity(model: Any) -> str:
    """What a model's outputs are keyed by (cached references, resumed sweeps): its identity
    (:func:`model_identity`) and the LoRA files merged on top at their scales, which its calibrations
    share with the base model but its images do not."""
    base = model_identity(model)
    loras = getattr(model, "loras", ())
    if not loras:
        return base
    blob = {"model": base, "loras": [[model_hash(p), float(s)] for p, s in loras]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def entry_key(
    model_id: str, prompt: str, seed: int, config: ReferenceConfig, size: Sequence[int], dtype: str
) -> str:
    """The cache key: (model's network identity, prompt, seed, reference config, image size, the dtype it
    ran in); the noise is velodiff's per-image noise, so a key does not depend on batching."""
    blob = json.dumps({"model": model_id, "prompt": prompt, "seed": int(seed), "config": config.key(),
                       "size": [int(s) for s in size], "noise": "velodiff", "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ReferenceCache:
    root: Path

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        from ..models.weights import load_file

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            d = load_file(p)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed
            return None
        return d["latents"], d["image"]

    def put(self, key: str, latents: Tensor, image: Tensor, meta: dict[str, Any]) -> Path:
        from safetensors.torch import save

        from ..files import write_atomic

        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"latents": latents.detach().float().cpu().contiguous(),
                   "image": image.detach().float().cpu().contiguous()}
        write_atomic(p, save(tensors, metadata={"velodiff": json.dumps(meta)}))
        return p


def reference_runs(
    model: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: ReferenceConfig,
    *,
    cache_dir: str | Path | None = None,
    model_id: str | None = None,
    batch: int = 16,
) -> tuple[Tensor, Tensor, dict[str, int]]:
    """Reference latents (B, C, h, w) and images (B, 3, H, W) in [0, 1] for each (prompt, seed) pair,
    from the cache where present; returns them with {"hits": ..., "computed": ...}."""
    from ..pipelines import text2img

    if len(prompts) != len(seeds):
        raise VelodiffError(f"{len(prompts)} prompts for {len(seeds)} seeds; give one seed per prompt")
    cache = ReferenceCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    mid = model_id or network_identity(model)
    size = tuple(model.default_size)
    dtype = str(getattr(model, "dtype", torch.float32)).removeprefix("torch.")
    keys = [entry_key(mid, p, s, config, size, dtype) for p, s in zip(prompts, seeds, strict=True)]
    found: dict[int, tuple[Tensor, Tensor]] = {}
    for i, k in enumerate(keys):
        hit = cache.get(k)
        if hit is not None:
            found[i] = hit
    hits = len(found)
    todo = [i for i in range(len(keys)) if i not in found]
    for j in range(0, len(todo), batch):
        idx = todo[j : j + batch]
        res = text2img(model, [prompts[i] for i in idx], seeds=[int(seeds[i]) for i in idx],
                       solver=config.solver, steps=config.steps, grid=config.grid, guidance=config.guidance,
                       output="tensor")
        for n, i in enumerate(idx):
            lat, img = res.latents[n : n + 1].cpu(), res.images[n : n + 1].cpu()
            cache.put(keys[i], lat, img, {"prompt": prompts[i], "seed": int(seeds[i]), "model": mid,
                                          "config": config.key(), "nfe": res.nfe})
            found[i] = (lat, img)
    lats = torch.cat([found[i][0] for i in range(len(keys))])
    imgs = torch.cat([found[i][1] for i in range(len(keys))])
    return lats, imgs, {"hits": hits, "computed": len(todo)}
