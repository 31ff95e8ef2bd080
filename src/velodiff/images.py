"""Images: reading the pictures users give (``open_image``), PNG bytes of a PIL image (``png_bytes``), and
grids: many PIL images as one sheet, the one helper behind ``velodiff generate --n``'s grid, the sweep's
and ``velodiff eval shapes``' contact sheets and the autoencoder's reconstruction sheet.

Images sit in ``cols`` columns, row by row, ``gap`` pixels apart and ``margin`` pixels from the edge,
on white. Optionally each is upscaled (nearest neighbour, pixels stay crisp), marked by a coloured
bar under it (e.g. green for a correct sample, red for a wrong one) and captioned: its text wrapped
to the cell width, at most ``caption_lines`` lines, in ``caption_height`` pixels below the image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from .errors import VelodiffError, first_line

#: height of a mark bar under an image, in pixels
MARK_HEIGHT = 3


def png_bytes(image: Any) -> bytes:
    """A PIL image encoded as PNG, with the text entries of ``image.info`` as text chunks: how it was
    made (A1111's ``parameters``, ``velodiff.infotext``; a ComfyUI job's ``prompt`` graph)."""
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            text.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=text)
    return buf.getvalue()


def data_url_bytes(data: str, what: str = "image") -> bytes:
    """The file inside a data URL (``data:image/png;base64,...``) or plain base64; one line otherwise."""
    import base64
    import binascii

    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise VelodiffError(f"the {what} is not a data URL or base64 of an image file") from None


def open_image(source: str | bytes | Any, what: str = "image") -> Any:
    """An image file (a path or its bytes) as a loaded PIL image in an 8-bit mode, ready for
    ``convert("RGB")`` or ``convert("L")``; one line when it is not an image PIL can read.

    16-bit grayscale (PNG, TIFF: PIL's ``I;16`` modes, or ``I`` with values in [0, 65535]) is scaled
    to 8 bits: PIL's own conversion clips at 255, which turns a 16-bit picture or mask white.
    Floating-point and other 32-bit images are refused rather than guessed."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    what = what if isinstance(source, bytes) else f"{what} {str(source)!r}"
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        im.load()
        im = ImageOps.exif_transpose(im)  # as it is displayed (a phone's photo), as diffusers' load_image
    except Image.DecompressionBombError as e:
        raise VelodiffError(f"{what} is too large to open safely: {first_line(e)}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VelodiffError(f"{what} is not an image PIL can read ({type(e).__name__})") from None
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise VelodiffError(f"{what} is a 32-bit image; save it with 8 or 16 bits per channel")
        return Image.fromarray((a / 257.0).round().astype(np.uint8), "L")
    if im.mode == "F":
        raise VelodiffError(f"{what} is a floating-point image; save it with 8 or 16 bits per channel")
    return im


def wrap_caption(text: str, chars: int) -> list[str]:
    """``text``'s words in lines of at most ``chars`` characters (a longer word gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > chars:
            lines.append(line)
            line = word
        else:
            line = (line + " " + word).strip()
    lines.append(line)
    return lines


def image_grid(
    images: Sequence[Any],
    cols: int | None = None,
    *,
    gap: int = 2,
    margin: int = 0,
    scale: int = 1,
    captions: Sequence[str] | None = None,
    caption_lines: int = 2,
    caption_height: int = 30,
    marks: Sequence[tuple[int, int, int]] | None = None,
) -> Any:
    """PIL images (all of the first one's size) as one RGB grid; ``cols`` defaults to a near-square
    grid (ceil(sqrt(n)) columns). A single image without decoration comes back as it is."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images to put in a grid")
    decorated = scale != 1 or captions is not None or marks is not None or margin
    if len(images) == 1 and not decorated:
        return images[0]
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    below = caption_height if captions is not None or marks is not None else 0
    cell_h = h + below
    size = (cols * w + (cols - 1) * gap + 2 * margin, rows * cell_h + (rows - 1) * gap + 2 * margin)
    sheet = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet) if below else None
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = margin + c * (w + gap), margin + r * (cell_h + gap)
        sheet.paste(im.resize((w, h), Image.NEAREST) if scale != 1 else im, (x, y))
        if draw is None:
            continue
        if marks is not None:
            draw.rectangle([x, y + h, x + w - 1, y + h + MARK_HEIGHT - 1], fill=marks[i])
        if captions is not None:
            text = "\n".join(wrap_caption(captions[i], w // 6)[:caption_lines])
            top = y + h + (MARK_HEIGHT if marks is not None else 1)
            draw.multiline_text((x, top), text, fill=(0, 0, 0), spacing=0)
    return sheet
