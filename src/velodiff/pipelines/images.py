"""Images in and out of the pipelines: the pictures, masks and latents a caller passes (PIL images,
tensors, numpy arrays as diffusers takes them) read into float32 tensors with one line for what is
wrong, and decoded images back to PIL."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError


def to_pil(images: Tensor) -> list[Any]:
    from PIL import Image

    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in arr]


def _in_unit_range(x: Tensor) -> bool:
    """Every value finite and in [0, 1] (to float round-off); NaN fails, as no comparison would say."""
    return bool(x.isfinite().all()) and -1e-6 <= float(x.min()) and float(x.max()) <= 1 + 1e-6


def image_tensor(image: Any, what: str = "init image") -> Tensor:
    """A PIL image (RGB, RGBA without transparency, L), a list of them, a float tensor in [0, 1] of shape
    (3, H, W) / (B, 3, H, W), or a numpy array as diffusers takes one ((H, W, 3) / (B, H, W, 3), floats
    in [0, 1] or uint8) -> float32 (B, 3, H, W)."""
    import numpy as np

    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise VelodiffError(f"the {what} array must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
        x = torch.from_numpy(np.array(image, copy=True)).float()  # (a read-only array too)
        x = x / 255.0 if image.dtype == np.uint8 else x
        return image_tensor(x.movedim(-1, -3), what)
    if isinstance(image, (list, tuple)):
        if not image:
            raise VelodiffError(f"no {what} given (an empty list)")
        parts = [image_tensor(im, what) for im in image]
        if len({p.shape[-2:] for p in parts}) > 1:
            raise VelodiffError(f"the {what}s have different sizes")
        return torch.cat(parts)
    if isinstance(image, Tensor):
        if not image.is_floating_point():  # 0-255 by convention: read as [0, 1] it is another picture
            raise VelodiffError(f"the {what} tensor is {image.dtype}; give floats in [0, 1] (divide by 255)")
        x = image.detach().float()
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != 3:
            raise VelodiffError(
                f"the {what} tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}"
            )
        if x.numel() and not _in_unit_range(x):
            raise VelodiffError(f"the {what} tensor must hold values in [0, 1]")
        return x.cpu()
    mode = getattr(image, "mode", None)
    if mode is None:
        raise VelodiffError(
            f"the {what} must be a PIL image, a tensor or a numpy array, got {type(image).__name__}"
        )
    if mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise VelodiffError(
                f"the {what} has transparent pixels (mode RGBA); flatten it onto a background first"
            )
        image = image.convert("RGB")
    elif mode == "L":
        image = image.convert("RGB")
    elif mode != "RGB":
        raise VelodiffError(f"the {what} has mode {mode!r}; give an RGB (or grayscale L) image")
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]


def given_latents(
    model: Any, z: Any, name: str, batch: int, height: int | None, width: int | None
) -> tuple[Tensor, int, int]:
    """Latents a caller passes instead of encoding an image (``image_latents``,
    ``masked_image_latents``): one, or one per image, of the model's latent shape for ``height`` x
    ``width`` (default: the size they hold); float32 on the model's device, expanded to ``batch``,
    with the image size."""
    if not isinstance(z, Tensor) or z.ndim != 4:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise VelodiffError(f"{name} must be a tensor (B, C, h, w), got {got}")
    f = model.vae_scale_factor
    h, w = height or int(z.shape[-2]) * f, width or int(z.shape[-1]) * f
    want = model.latent_shape(1, h, w)[1:]  # the size check, with its error message
    if tuple(z.shape[1:]) != tuple(want) or z.shape[0] not in (1, batch):
        raise VelodiffError(
            f"{name} have shape {tuple(z.shape)}; expected (1 or {batch}, {', '.join(map(str, want))}) "
            f"for {w}x{h} images"
        )
    if not bool(torch.isfinite(z).all()):
        raise VelodiffError(f"{name} contain NaN or inf")
    z = z.to(model.device, torch.float32)
    return (z.expand(batch, *z.shape[1:]) if z.shape[0] == 1 else z), h, w


def mask_tensor(mask: Any) -> Tensor:
    """A mask (white / 1 = repaint): PIL L or 1 (or RGB, read as luminance), a tensor in [0, 1] of shape
    (H, W), (1, H, W) or (B, 1, H, W), or a numpy array of those shapes (floats in [0, 1], bool or
    uint8) -> float32 (B, 1, H, W)."""
    import numpy as np

    if isinstance(mask, np.ndarray):
        m = torch.from_numpy(np.array(mask, copy=True)).float()
        return mask_tensor(m / 255.0 if mask.dtype == np.uint8 else m)

    if isinstance(mask, (list, tuple)):
        return torch.cat([mask_tensor(m) for m in mask])
    if isinstance(mask, Tensor):
        m = mask.detach().float()
        m = m[None, None] if m.ndim == 2 else (m[None] if m.ndim == 3 else m)
        if m.ndim != 4 or m.shape[1] != 1:
            raise VelodiffError(
                f"the mask tensor must be (H, W), (1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}"
            )
        if m.numel() and not _in_unit_range(m):
            raise VelodiffError("the mask tensor must hold values in [0, 1] (1 = repaint)")
        return m.cpu()
    mode = getattr(mask, "mode", None)
    if mode is None:
        raise VelodiffError(
            f"the mask must be a PIL image, a tensor or a numpy array, got {type(mask).__name__}"
        )
    if mode not in ("L", "1", "RGB"):
        raise VelodiffError(f"the mask has mode {mode!r}; give a grayscale (L) image, white = repaint")
    arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None, None]
