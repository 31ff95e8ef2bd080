"""Metrics of an image set (``velodiff eval --manifest DIR``): FD and KID against real images (the
shapes world drawn for the set's prompts, another set, or a folder of image files), CLIP score, and
PSNR / SSIM against a reference set of the same prompts and seeds. Reads the finished images of a
complete or partial set (:func:`velodiff.sets.store.read_set`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..sets.store import HEADER, read_set

IMAGE_GLOBS = ("*.png", "*.jpg", "*.jpeg", "*.webp")


def _batches(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _open_rgb(paths: Sequence[Path]) -> list[Any]:
    from ..images import open_image

    return [open_image(p, "real image").convert("RGB") for p in paths]


def real_image_batches(real: str | os.PathLike[str], prompts: Sequence[str], seeds: Sequence[int],
                       batch: int) -> Iterable[list[Any]]:
    """Real images for FD/KID: 'shapes' (the shapes world drawn for the set's own prompts), another
    set's folder, or a folder of image files."""
    if str(real) == "shapes" and not Path(real).exists():
        from ..data.shapes import ShapesWorld

        world = ShapesWorld()
        for ps, ss in zip(_batches(prompts, batch), _batches(seeds, batch), strict=True):
            try:
                yield [world.render(p, seed=s).image for p, s in zip(ps, ss, strict=True)]
            except ValueError as e:
                raise VelodiffError(f"--real shapes: a prompt is not a shapes-world caption ({e})") from None
        return
    p = Path(real).expanduser()
    if (p / HEADER).is_file():
        paths = read_set(p).paths()
    elif p.is_dir():
        paths = sorted(f for g in IMAGE_GLOBS for f in p.glob(g))
    else:
        raise VelodiffError(f"--real {str(p)!r} is not a folder of images, a set, or 'shapes'")
    if not paths:
        raise VelodiffError(f"--real {str(p)!r} holds no images ({', '.join(IMAGE_GLOBS)})")
    for part in _batches(paths, batch):  # a real set of mixed sizes (COCO's): each size its own batch,
        by_size: dict[tuple[int, int], list[Any]] = {}  # the feature extractors resize every one
        for im in _open_rgb(part):
            by_size.setdefault(im.size, []).append(im)
        yield from by_size.values()


def evaluate_set(
    folder: str | os.PathLike[str],
    *,
    real: str | os.PathLike[str] | None = None,
    features: str = "fd-shapes",
    clip: str | os.PathLike[str] | None = None,
    reference: str | os.PathLike[str] | None = None,
    batch: int = 64,
) -> dict[str, Any]:
    """Metrics of the finished images of a set (complete or partial): FD and KID against ``real``
    (with ``features``), CLIP score with a local CLIP folder, PSNR / SSIM against a ``reference`` set
    of the same prompts and seeds. Metric weights are loaded before any image is read."""
    try:
        from . import metrics as M
    except ImportError as e:
        raise VelodiffError(f"velodiff's metrics are not available ({e})") from None
    s = read_set(folder)
    if not s.records:
        raise VelodiffError(f"{s.folder} has no finished images yet; run velodiff generate-set first")
    out: dict[str, Any] = {
        "set": str(s.folder),
        "images": len(s.records),
        "total": s.total,
        "complete": s.complete,
        "model": s.header["model"],
        "config": s.header["config"],
    }
    dist = M.DistributionMetrics(features, kid=True) if real is not None else None
    scorer = M.ClipScore(str(clip)) if clip is not None else None
    ref = None
    if reference is not None:
        ref = {r["index"]: r for r in read_set(reference).records}
        ref_folder = Path(reference).expanduser()
    prompts = [r["prompt"] for r in s.records]
    if dist is not None:
        for imgs in real_image_batches(real, prompts, [r["seed"] for r in s.records], batch):
            dist.add_real(imgs)
    psnrs: list[float] = []
    ssims: list[float] = []
    mismatched = 0
    for part in _batches(s.records, batch):
        imgs = _open_rgb([s.folder / r["file"] for r in part])
        if dist is not None:
            dist.add_fake(imgs)
        if scorer is not None:
            scorer.update(imgs, [r["prompt"] for r in part])
        if ref is not None:
            pairs = [(im, ref.get(r["index"])) for im, r in zip(imgs, part, strict=True)]
            ok = [(im, q) for (im, q), r in zip(pairs, part, strict=True)
                  if q is not None and q["prompt"] == r["prompt"] and q["seed"] == r["seed"]]
            mismatched += len(part) - len(ok)
            if ok:
                mine = [im for im, _ in ok]
                theirs = _open_rgb([ref_folder / q["file"] for _, q in ok])
                p = M.psnr(mine, theirs)
                psnrs += [float(v) for v in p[p.isfinite()]]
                ssims += [float(v) for v in M.ssim(mine, theirs)]
    if dist is not None:
        out["distribution"] = dist.compute()
        out["distribution"]["real"] = str(real)
    if scorer is not None:
        out["clip"] = scorer.compute()
    if ref is not None:
        if not ssims:
            raise VelodiffError(f"reference set {reference} has no image of this set's index, prompt, seed")
        out["reference"] = {
            "set": str(reference),
            "n": len(ssims),
            "unmatched": mismatched,
            # the mean over the images that differ; identical ones (PSNR inf) are counted on their own, and
            # with none differing there is no mean: null in the JSON (as `velodiff invert --json` writes it)
            "psnr": sum(psnrs) / len(psnrs) if psnrs else None,
            "identical": len(ssims) - len(psnrs),
            "ssim": sum(ssims) / len(ssims),
        }
    return out
