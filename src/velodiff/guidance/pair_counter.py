"""A small classifier trained on clean (and blurred) shapes-world renders for classifier guidance: how many
objects of each colour-shape pair an image shows (0, 1, 2, 3 or more; 28 softmax heads).

It is the 'small classifier you train on clean renders' of off-the-shelf classifier guidance: it never sees
a noisy image, and it reads what a shapes-world prompt states (every pair it names, with its count; the
others absent), so ``velodiff generate --plan classifier:head=pair_counts`` steers toward the prompt's
counts. Same body as the FD-shapes encoder (``velodiff.eval.features``: four stride-2 convolutions, the
last map flattened and max-pooled), its own weights. Train and ship (3 CPU minutes, one thread)::

    python -m velodiff.guidance.pair_counter --out src/velodiff/assets/pair-counter/counter.safetensors \
        --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.shapes import color_shape_pairs
from ..eval.features import (
    WIDTHS,
    conv_body,
    fit,
    load_versioned,
    prepare,
    read_out,
    save_encoder,
    weights_file,
)

#: counts 0, 1, 2 and 3-or-more
COUNTS = 4
VERSION = "pair-counter-v1"


def default_path() -> Path:
    from ..shipped import asset_path

    return asset_path("pair-counter") / "counter.safetensors"


class PairCounter(nn.Module):
    """``counter.logits(images) -> {"pair_counts": (B, 28, 4)}``; images float in [0, 1] or uint8,
    (B, 3, H, W), resized to 64x64."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_body()
        self.head = nn.Sequential(
            nn.Linear(WIDTHS[-1] * (4 * 4 + 1), 128),
            nn.SiLU(),
            nn.Linear(128, len(color_shape_pairs()) * COUNTS),
        )

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        out = self.head(read_out(self.body(prepare(images))))
        return {"pair_counts": out.view(-1, len(color_shape_pairs()), COUNTS)}


def pair_counts(objects: list[Any]) -> np.ndarray:
    """(28,) counts per colour-shape pair (capped at 3) of objects with .color/.shape or dicts."""
    index = {p: i for i, p in enumerate(color_shape_pairs())}
    out = np.zeros(len(index), np.int64)
    for o in objects:
        c, s = (o["color"], o["shape"]) if isinstance(o, dict) else (o.color, o.shape)
        out[index[(c, s)]] += o.get("count", 1) if isinstance(o, dict) else 1
    return np.minimum(out, COUNTS - 1)


def make_dataset(n: int, seed: int, degrade_fraction: float = 0.5) -> tuple[Tensor, Tensor]:
    """n shapes-world renders (half blurred and noised) and their (n, 28) pair counts."""
    from ..eval import features

    return features.make_dataset(n, seed, degrade_fraction, lambda s: pair_counts(s.objects), stream=0xC0)


@torch.no_grad()
def accuracy(model: PairCounter, x: Tensor, t: Tensor) -> dict[str, float]:
    """Share of images whose every pair count is right, and of the named pairs' counts that are right."""
    pred = torch.cat([model.logits(x[i : i + 256])["pair_counts"].argmax(-1) for i in range(0, len(x), 256)])
    named = t > 0
    return {"exact": float((pred == t).all(1).float().mean()),
            "named_pairs": float((pred == t)[named].float().mean())}


def train(
    out: str | Path | None, *, n_train: int = 24000, n_val: int = 500, epochs: int = 12, batch: int = 64,
    lr: float = 3e-3, seed: int = 0, progress: bool = True,
) -> tuple[PairCounter, dict[str, Any]]:
    """Train from scratch (deterministic for a seed and thread count) and save to ``out``."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x, t = make_dataset(n_train, seed=5000 + seed)
    xv, tv = make_dataset(n_val, seed=6000 + seed)
    model = PairCounter()

    def loss(m: PairCounter, xs: Tensor, j: Tensor) -> Tensor:
        logits = m.logits(xs[j])["pair_counts"]
        return nn.functional.cross_entropy(logits.reshape(-1, COUNTS), t[j].reshape(-1))

    fit(model, loss, x, epochs=epochs, batch=batch, lr=lr, seed=seed, desc="pair counter",
        progress=progress)
    model.eval()
    info = {"version": VERSION, "n_train": n_train, "epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
            "val": accuracy(model, xv, tv), "train_seconds": round(time.perf_counter() - t0, 1)}
    if out is not None:
        save_encoder(model, out, info)
    return model, info


@lru_cache(maxsize=2)
def _load(path: str) -> PairCounter:
    return load_versioned(path, PairCounter, VERSION)  # type: ignore[return-value]


def load_counter(path: str | Path | None = None) -> PairCounter:
    """The shipped pair counter (or one trained by ``train``), in eval mode."""
    return _load(weights_file(path, default_path(), "pair-counter", "velodiff.guidance.pair_counter"))


def training_cli(argv: list[str] | None, description: str, train_fn: Any, n_train: int, epochs: int) -> int:
    """``python -m`` entry of a small classifier: --out, --n-train, --epochs, --seed, --threads; prints the
    training info as JSON."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=n_train)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, info = train_fn(args.out, n_train=args.n_train, epochs=args.epochs, seed=args.seed)
    print(json.dumps(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    return training_cli(argv, "train the shapes-world pair counter", train, n_train=24000, epochs=12)


if __name__ == "__main__":
    raise SystemExit(main())
