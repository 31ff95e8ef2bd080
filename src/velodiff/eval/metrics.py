"""Quality and cost metrics, streaming over any number of images.

* **Fréchet distance and KID** (torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``
  with a pluggable feature extractor): :class:`DistributionMetrics`. The extractor is

  - ``"fd-shapes"``: velodiff's shapes-world encoder (``velodiff.eval.features``); the number is
    reported as **FD-shapes** (and KID-shapes), never as FID;
  - a path to the standard FID Inception network as a TorchScript file (``inception-2015-12-05.pt``,
    the file clean-fid and StyleGAN's metrics use): standard **FID** / KID on 2048-d pool features;
  - any ``torch.nn.Module`` mapping images (B, 3, H, W) in [0, 1] to (B, d) features.

  FID: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))  (Heusel et al. 2017, eq. 6).
  KID: unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018, sec. 3).

* **CLIP score** (Hessel et al. 2021): 100 * max(cos(image, text), 0) with a CLIP model the user has as
  a local folder (transformers format); :class:`ClipScore`.
* **Distance to a reference run** from the same noise and prompt (the DPM-Solver-v3 / DC-Solver
  protocol): :func:`latent_mse`, :func:`psnr`, :func:`ssim`, per sample.
* **Cost**: :func:`time_repeats` (median wall seconds of repeats) and :func:`peak_memory`.

Images anywhere here may be a float tensor (B, 3, H, W) in [0, 1], a uint8 tensor, a list of PIL images,
or uint8 arrays (H, W, 3) / (B, H, W, 3): :func:`as_images`.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import VelodiffError, first_line

FD_SHAPES = "fd-shapes"


# --- images --------------------------------------------------------------------------------------


def as_images(images: Any) -> Tensor:
    """Any accepted image batch -> float32 (B, 3, H, W) in [0, 1] on the CPU: what the pipelines read
    (:func:`velodiff.pipelines.images.image_tensor`), plus uint8 tensors."""
    from ..pipelines.images import image_tensor

    if isinstance(images, Tensor) and images.dtype == torch.uint8:
        images = images.float() / 255.0
    return image_tensor(images, "image")


# --- feature extractors ---------------------------------------------------------------------------


class InceptionTorchScript(nn.Module):
    """The standard FID Inception-v3 (TF 2015-12-05 weights) as a TorchScript file: pool3 features
    (2048-d) of images resized to 299x299, fed as 0-255 floats (the clean-fid / StyleGAN convention)."""

    num_features = 2048

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from ..models.weights import load_torchscript

        try:
            self.net = load_torchscript(path).eval()
        except VelodiffError:
            raise
        except Exception as e:  # noqa: BLE001 - any load failure is the user's file
            msg = first_line(e)
            raise VelodiffError(f"cannot load Inception weights {str(path)!r} (TorchScript): {msg}") from None

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        x = x * 255.0 if images.dtype != torch.uint8 else x
        if x.shape[-2:] != (299, 299):
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x, return_features=True).reshape(x.shape[0], -1)


def feature_extractor(spec: str | Path | nn.Module = FD_SHAPES) -> tuple[nn.Module, str]:
    """(extractor, metric name): "fd-shapes" -> (shapes encoder, "FD-shapes"); a file path -> (Inception
    TorchScript, "FID"); a module -> (module, "FD")."""
    if isinstance(spec, nn.Module):
        return spec.eval(), "FD"
    if str(spec) == FD_SHAPES:
        from .features import load_encoder

        return load_encoder(), "FD-shapes"
    p = Path(spec).expanduser()
    if not p.is_file():
        raise VelodiffError(
            f"FID needs the Inception weights as a local TorchScript file (inception-2015-12-05.pt); "
            f"{str(p)!r} does not exist. Use 'fd-shapes' on the shapes world, or pass the file's path"
        )
    return InceptionTorchScript(p), "FID"


class _Features(nn.Module):
    """Identity over precomputed features: lets torchmetrics' FID and KID share one extraction."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, f: Tensor) -> Tensor:
        return f


def _num_features(extractor: nn.Module) -> int:
    d = getattr(extractor, "num_features", None)
    if isinstance(d, int):
        return d
    with torch.no_grad():
        return int(extractor(torch.zeros(1, 3, 64, 64)).shape[-1])


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Any, batch: int = 256) -> Tensor:
    x = as_images(images)
    parts = [extractor(x[i : i + batch]).reshape(min(batch, len(x) - i), -1) for i in range(0, len(x), batch)]
    return torch.cat(parts).double()


@dataclass
class DistributionMetrics:
    """Streaming FD and KID between a real and a generated image set.

        m = DistributionMetrics("fd-shapes")
        m.add_real(real_batch); m.add_fake(fake_batch)   # any number of batches of any size
        m.compute()  # {"name": "FD-shapes", "fd", "kid", "kid_std", "n_real", "n_fake"}

    FD keeps running sums (constant memory); KID keeps the features (d floats per image)."""

    extractor: Any = FD_SHAPES
    kid: bool = True
    kid_subsets: int = 50
    kid_subset_size: int = 1000
    seed: int = 0
    name: str = field(init=False)

    def __post_init__(self) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self._net, self.name = feature_extractor(self.extractor)
        d = _num_features(self._net)
        self._fid = FrechetInceptionDistance(feature=_Features(d), reset_real_features=False)
        with warnings.catch_warnings():  # "KID keeps all features": 64 floats an image here, by design
            warnings.simplefilter("ignore", UserWarning)
            self._kid = KernelInceptionDistance(feature=_Features(d), subsets=self.kid_subsets,
                                                reset_real_features=False)
        self.n_real = self.n_fake = 0

    def _add(self, images: Any, real: bool) -> None:
        f = extract_features(self._net, images).float()
        self._fid.update(f, real=real)
        if self.kid:
            self._kid.update(f, real=real)
        if real:
            self.n_real += len(f)
        else:
            self.n_fake += len(f)

    def add_real(self, images: Any) -> None:
        self._add(images, True)

    def add_fake(self, images: Any) -> None:
        self._add(images, False)

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real statistics (one real set, many configurations)."""
        self._fid.reset()
        self._kid.reset()
        self.n_fake = 0

    def compute(self) -> dict[str, Any]:
        if self.n_real < 2 or self.n_fake < 2:
            raise VelodiffError(f"{self.name} needs at least 2 real and 2 generated images "
                                f"(got {self.n_real} and {self.n_fake})")
        out: dict[str, Any] = {"name": self.name, "fd": max(float(self._fid.compute()), 0.0),
                               "n_real": self.n_real, "n_fake": self.n_fake}
        if self.kid:
            self._kid.subset_size = min(self.kid_subset_size, self.n_real, self.n_fake)
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                mean, std = self._kid.compute()
            out["kid"], out["kid_std"] = float(mean), float(std)
        return out


# --- CLIP score -----------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScore:
    """CLIP score (Hessel et al. 2021, eq. 1 with w = 100, as torchmetrics): mean over images of
    100 * max(cos(E_image, E_text), 0), from a local CLIP folder (transformers ``CLIPModel`` +
    tokenizer). Images are resized (bicubic, shorter side) and centre-cropped to the model's size."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        p = Path(path).expanduser() if path else None
        if p is None or not (p / "config.json").is_file():
            raise VelodiffError(
                f"CLIP score needs CLIP weights as a local folder (transformers format, e.g. a saved "
                f"openai/clip-vit-large-patch14); {str(path)!r} is not one. Pass --clip PATH or leave it out"
            )
        from transformers import AutoTokenizer, CLIPModel

        from ..models.weights import from_pretrained

        try:
            self.model = from_pretrained(CLIPModel, p).eval().to(device)
            self.tokenizer = from_pretrained(AutoTokenizer, p, weights=False)
        except VelodiffError as e:
            raise VelodiffError(f"cannot load CLIP from {str(p)!r}: {e}") from None
        self.size = int(self.model.config.vision_config.image_size)
        self.device = device
        self.scores: list[float] = []

    def _pixels(self, images: Any) -> Tensor:
        x = as_images(images)
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        x = nn.functional.interpolate(x, size=(max(self.size, round(h * s)), max(self.size, round(w * s))),
                                      mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size].clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @torch.no_grad()
    def update(self, images: Any, prompts: Sequence[str]) -> list[float]:
        px = self._pixels(images)
        if len(prompts) != len(px):
            raise VelodiffError(f"CLIP score: {len(px)} images for {len(prompts)} prompts")
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len,
                             return_tensors="pt")
        img = self.model.get_image_features(pixel_values=px)
        txt = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        s = (100.0 * cos.clamp(min=0)).tolist()
        self.scores += s
        return s

    def compute(self) -> dict[str, float]:
        if not self.scores:
            raise VelodiffError("CLIP score: no images were scored")
        a = np.asarray(self.scores)
        return {"clip_score": float(a.mean()), "clip_score_std": float(a.std()), "n": len(a)}


# --- distance to a reference run -------------------------------------------------------------------


def latent_mse(x: Tensor, ref: Tensor) -> Tensor:
    """Per-sample mean squared error in latent space (DPM-Solver-v3, Zheng et al. 2023, sec. 6)."""
    d = (x.detach().float().cpu() - ref.detach().float().cpu()) ** 2
    return d.flatten(1).mean(1)


def psnr(images: Any, ref: Any) -> Tensor:
    """Per-sample PSNR in dB: 10 log10(1 / MSE) over pixels in [0, 1] (the data range 1; inf for identical
    images)."""
    a, b = as_images(images).clamp(0, 1), as_images(ref).clamp(0, 1)
    if a.shape != b.shape:
        raise VelodiffError(f"PSNR: image shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = ((a - b) ** 2).flatten(1).mean(1).double()
    return (10.0 * torch.log10(1.0 / mse)).float()


def ssim(images: Any, ref: Any) -> Tensor:
    """Per-sample SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5) via torchmetrics."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = as_images(images).clamp(0, 1), as_images(ref).clamp(0, 1)
    if a.shape != b.shape:
        raise VelodiffError(f"SSIM: image shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none").float().reshape(-1)


def reference_distances(
    latents: Tensor, images: Any, ref_latents: Tensor, ref_images: Any
) -> dict[str, float]:
    """Means over samples of latent MSE, PSNR (finite values) and SSIM against a reference run."""
    p = psnr(images, ref_images)
    fin = p[torch.isfinite(p)]
    return {
        "latent_mse": float(latent_mse(latents, ref_latents).mean()),
        "psnr": float(fin.mean()) if len(fin) else math.inf,
        "ssim": float(ssim(images, ref_images).mean()),
    }


# --- cost -----------------------------------------------------------------------------------------


def time_repeats(fn: Callable[[], Any], repeat: int = 1, warmup: int = 0) -> tuple[Any, list[float]]:
    """Run ``fn`` warmup + repeat times; return its first timed result and the timed wall seconds."""
    for _ in range(warmup):
        fn()
    first, times = None, []
    for i in range(max(1, repeat)):
        t0 = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = r
    return first, times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _rss_peak_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


@contextmanager
def peak_memory(device: str | torch.device = "cpu"):
    """Yields a dict filled on exit with ``peak_memory_mb`` and ``memory_kind``: on CUDA the peak of
    allocated tensor memory inside the block; on the CPU the process's resident-set high-water mark
    (it never goes down, so it bounds the block's peak from above)."""
    out: dict[str, Any] = {}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        yield out
    finally:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            out["memory_kind"] = "cuda allocated"
        else:
            out["peak_memory_mb"] = _rss_peak_mb()
            out["memory_kind"] = "process RSS high-water mark"
