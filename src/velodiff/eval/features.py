"""The shapes-world feature encoder behind FD-shapes: a small CNN trained to read a shapes scene.

FID (Heusel et al. 2017) measures the Fréchet distance between Gaussians fitted to Inception-v3 pool
features of real and generated images. Inception was trained on ImageNet and knows nothing of the shapes
world, so on that world velodiff uses a feature extractor trained on the world itself, and the number it
gives is reported as **FD-shapes**, never as FID.

The encoder is a 4-level strided CNN (64x64 -> 4x4); its last map, flattened (where things are) and
max-pooled over space (what is anywhere), is projected to a 64-d embedding (``num_features``, the
features FD and KID use). It is trained, multi-task, to predict from the image what the generator drew
(``scene_targets``):

* which colour-shape pairs, colours and shapes are present (28 + 7 + 4, multi-label, held-out pair
  included),
* which object sizes are present (small, large),
* the number of objects (1-5, softmax),
* a 4x4 occupancy map (which cells an object covers).

Half of the training images are degraded (blur + pixel noise, ``shapes_eval.degrade``) so the features
stay meaningful on imperfect samples. A low-dimensional embedding keeps the covariance estimate usable at
the few hundred samples a CPU can generate. The features are standardised by the mean and standard
deviation of the embedding over 2000 clean real scenes (``calibrate``), so FD-shapes is in units of
real-data standard deviations and KID's polynomial kernel sees features of unit scale, as with Inception.

Train and ship (a few CPU minutes; the shipped file is ``assets/fd-shapes/encoder.safetensors``)::

    python -m velodiff.eval.features --out src/velodiff/assets/fd-shapes/encoder.safetensors
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.shapes import color_shape_pairs
from ..errors import VelodiffError

NUM_FEATURES = 64
MAX_OBJECTS = 5
GRID = 4
#: widths of the four stride-2 convolutions
WIDTHS = (32, 48, 64, 64)
ENCODER_VERSION = "fd-shapes-v2"


def default_encoder_path() -> Path:
    from ..shipped import asset_path

    return asset_path("fd-shapes") / "encoder.safetensors"



def head_sizes() -> dict[str, int]:
    from ..data.shapes import COLORS, SHAPES

    return {"pairs": len(color_shape_pairs()), "colors": len(COLORS), "shapes": len(SHAPES), "sizes": 2,
            "count": MAX_OBJECTS, "occupancy": GRID * GRID}


def conv_body() -> nn.Sequential:
    """Four stride-2 3x3 convolutions (``WIDTHS``) with GroupNorm and SiLU: 64x64 -> 4x4."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in WIDTHS:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
        c_in = c
    return nn.Sequential(*layers)


def prepare(images: Tensor) -> Tensor:
    """Images (float in [0, 1] or uint8) as float in [-1, 1] at 64x64."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[-2:] != (64, 64):
        x = nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0


def read_out(h: Tensor) -> Tensor:
    """The body's last map flattened (where things are) and max-pooled over space (what is anywhere)."""
    return torch.cat([h.flatten(1), h.amax(dim=(2, 3))], dim=1)


def fit(model: nn.Module, loss_fn: Any, x: Tensor, *, epochs: int, batch: int, lr: float,
        seed: int, desc: str, progress: bool) -> None:
    """AdamW with a one-cycle learning rate over shuffled minibatches (deterministic for a seed and thread
    count); ``loss_fn(model, images, index)`` gives a minibatch's loss."""
    from tqdm import tqdm

    n = len(x)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            loss = loss_fn(model, x, perm[i : i + batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()


class ShapesEncoder(nn.Module):
    """``encoder(images) -> (B, 64)`` features. Images: float in [0, 1] or uint8 in [0, 255],
    (B, 3, H, W); resized to 64x64 when they are another size."""

    num_features = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_body()
        self.embed = nn.Linear(WIDTHS[-1] * (4 * 4 + 1), NUM_FEATURES)
        self.heads = nn.Linear(NUM_FEATURES, sum(head_sizes().values()))
        self.register_buffer("feat_mean", torch.zeros(NUM_FEATURES))
        self.register_buffer("feat_std", torch.ones(NUM_FEATURES))

    def embedding(self, images: Tensor) -> Tensor:
        return self.embed(read_out(self.body(prepare(images))))

    def features(self, images: Tensor) -> Tensor:
        """The FD / KID features: the embedding standardised by real-data statistics."""
        return (self.embedding(images) - self.feat_mean) / self.feat_std

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        out = self.heads(nn.functional.silu(self.embedding(images)))
        parts = torch.split(out, list(head_sizes().values()), dim=1)
        return dict(zip(head_sizes(), parts, strict=True))


# --- targets -------------------------------------------------------------------------------------


def scene_targets(scene: Any) -> dict[str, np.ndarray]:
    """What the encoder learns to read off a scene (from the generator's ground truth)."""
    from ..data.shapes import COLORS, SHAPES, SIZES

    idx = {p: i for i, p in enumerate(color_shape_pairs())}
    pairs = np.zeros(len(idx), np.float32)
    colors = np.zeros(len(COLORS), np.float32)
    shapes = np.zeros(len(SHAPES), np.float32)
    sizes = np.zeros(len(SIZES), np.float32)
    occ = np.zeros((GRID, GRID), np.float32)
    h = scene.image.shape[0]
    for o in scene.objects:
        pairs[idx[(o.color, o.shape)]] = 1.0
        colors[COLORS.index(o.color)] = 1.0
        shapes[SHAPES.index(o.shape)] = 1.0
        sizes[SIZES.index(o.size)] = 1.0
        cells = o.mask.reshape(GRID, h // GRID, GRID, h // GRID).any(axis=(1, 3))
        occ = np.maximum(occ, cells.astype(np.float32))
    count = min(len(scene.objects), MAX_OBJECTS) - 1
    return {"pairs": pairs, "colors": colors, "shapes": shapes, "sizes": sizes, "count": np.int64(count),
            "occupancy": occ.reshape(-1)}


def make_dataset(
    n: int, seed: int, degrade_fraction: float = 0.5, targets: Any = None, stream: int = 0xFD5
) -> tuple[Tensor, Any]:
    """n scenes of ``ShapesWorld(seed, holdout=False)`` as uint8 images (a ``degrade_fraction`` of them
    blurred and noised, drawn from the random stream ``[seed, stream]``) and their stacked targets:
    ``targets(scene)`` (default ``scene_targets``: a dict of arrays, stacked per key)."""
    from ..data.shapes import ShapesWorld
    from .shapes_eval import degrade

    world = ShapesWorld(seed=seed, holdout=False)
    rng = np.random.default_rng([seed, stream])
    imgs, tg = [], []
    for i in range(n):
        s = world.scene(i)
        img = s.image
        if rng.random() < degrade_fraction:
            img = degrade(img, rng, blur=float(rng.uniform(0.3, 1.5)), noise=float(rng.uniform(2.0, 16.0)))
        imgs.append(img)
        tg.append((targets or scene_targets)(s))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    if isinstance(tg[0], dict):
        return x, {k: torch.from_numpy(np.stack([t[k] for t in tg])) for k in tg[0]}
    return x, torch.from_numpy(np.stack(tg))


@torch.no_grad()
def calibrate(model: ShapesEncoder, n: int = 2000, seed: int = 3000) -> ShapesEncoder:
    """Set the feature standardisation from n clean scenes of ``ShapesWorld(seed, holdout=False)``."""
    x, _ = make_dataset(n, seed=seed, degrade_fraction=0.0)
    model.eval()
    e = torch.cat([model.embedding(x[i : i + 256]) for i in range(0, n, 256)]).double()
    model.feat_mean.copy_(e.mean(0).float())
    model.feat_std.copy_(e.std(0).clamp(min=1e-6).float())
    return model


def _loss(logits: dict[str, Tensor], t: dict[str, Tensor]) -> Tensor:
    bce = nn.functional.binary_cross_entropy_with_logits
    return (
        4.0 * bce(logits["pairs"], t["pairs"])
        + bce(logits["colors"], t["colors"])
        + bce(logits["shapes"], t["shapes"])
        + bce(logits["sizes"], t["sizes"])
        + nn.functional.cross_entropy(logits["count"], t["count"])
        + bce(logits["occupancy"], t["occupancy"])
    )


@torch.no_grad()
def accuracy(model: ShapesEncoder, x: Tensor, t: dict[str, Tensor], batch: int = 256) -> dict[str, float]:
    """Exact-set accuracy of the colour-shape pairs, colours and shapes; count accuracy; occupancy cell
    accuracy."""
    model.eval()
    outs = [model.logits(x[i : i + batch]) for i in range(0, len(x), batch)]
    lg = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    exact = {k: float(((lg[k] > 0).float() == t[k]).all(1).float().mean())
             for k in ("pairs", "colors", "shapes")}
    count = (lg["count"].argmax(1) == t["count"]).float().mean()
    occ = ((lg["occupancy"] > 0).float() == t["occupancy"]).float().mean()
    out = {f"{k}_exact": v for k, v in exact.items()}
    return {**out, "count": float(count), "occupancy_cells": float(occ)}


def train_encoder(
    out: str | Path | None = None,
    *,
    n_train: int = 4000,
    n_val: int = 500,
    epochs: int = 5,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    init: str | Path | None = None,
) -> tuple[ShapesEncoder, dict[str, Any]]:
    """Train the encoder from scratch (deterministic for a seed and thread count); save it to ``out``
    (safetensors, with the training settings and validation accuracy in its metadata)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x, t = make_dataset(n_train, seed=1000 + seed)
    xv, tv = make_dataset(n_val, seed=2000 + seed)
    model = ShapesEncoder()
    if init is not None:  # continue from saved weights (a further stage of training)
        from ..models.weights import load_file

        state = {k: v for k, v in load_file(init).items() if not k.startswith("feat_")}
        model.load_state_dict(state, strict=False)
    fit(model, lambda m, xs, j: _loss(m.logits(xs[j]), {k: v[j] for k, v in t.items()}), x,
        epochs=epochs, batch=batch, lr=lr, seed=seed, desc="fd-shapes encoder", progress=progress)
    calibrate(model)
    info = {
        "version": ENCODER_VERSION,
        "n_train": n_train,
        "epochs": epochs,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "init": encoder_info(init) if init is not None else None,
        "val": accuracy(model, xv, tv),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    if out is not None:
        save_encoder(model, out, info)
    return model, info


def save_encoder(model: nn.Module, path: str | Path, info: dict[str, Any]) -> Path:
    """A small network's weights as safetensors, ``info`` (settings, accuracy, ``version``) as metadata."""
    from safetensors.torch import save

    from ..files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, save(state, metadata={"velodiff": json.dumps(info)}))
    return path


def load_versioned(path: str, make: Any, version: str) -> nn.Module:
    """``make()`` with the weights of ``path`` (refused unless its metadata names ``version``), frozen,
    in eval mode; its tensors are normal ones, so classifier guidance can differentiate through it."""
    from ..models.weights import load_file, safe_open

    with safe_open(path) as f:
        meta = json.loads((f.metadata() or {}).get("velodiff", "{}"))
    if meta.get("version") != version:
        raise VelodiffError(f"{path} is not a {version} network (found {meta.get('version')!r})")
    with torch.inference_mode(False):
        model = make()
        model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=4)
def _load(path: str) -> ShapesEncoder:
    return load_versioned(path, ShapesEncoder, ENCODER_VERSION)  # type: ignore[return-value]


def weights_file(path: str | Path | None, default: Path, what: str, module: str) -> str:
    """The resolved weights file of one of the small shipped networks (``path``, or ``default`` when
    None); one line naming the command that trains it when there is none."""
    p = Path(path) if path is not None else default
    if not p.is_file():
        raise VelodiffError(
            f"{what} weights not found at {p}; train them with `python -m {module} --out <file>` "
            "or reinstall velodiff"
        )
    return str(p.resolve())


def load_encoder(path: str | Path | None = None) -> ShapesEncoder:
    """The shipped FD-shapes encoder (or one trained by ``train_encoder``), in eval mode."""
    return _load(weights_file(path, default_encoder_path(), "FD-shapes encoder", "velodiff.eval.features"))


def encoder_info(path: str | Path | None = None) -> dict[str, Any]:
    from ..models.weights import safe_open

    p = Path(path) if path is not None else default_encoder_path()
    with safe_open(p) as f:
        return json.loads((f.metadata() or {}).get("velodiff", "{}"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Train the FD-shapes feature encoder.")
    ap.add_argument("--out", default=str(default_encoder_path()))
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="continue from these weights")
    a = ap.parse_args(argv)
    _, info = train_encoder(a.out, n_train=a.n_train, epochs=a.epochs, seed=a.seed, threads=a.threads,
                            init=a.init)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
