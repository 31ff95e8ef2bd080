"""velodiff.images: reading users' pictures in 8 bits, and the one image-grid helper (generate's grid,
contact sheets)."""

import numpy as np
import pytest
from PIL import Image

from velodiff.errors import VelodiffError
from velodiff.images import image_grid, open_image, wrap_caption


def test_open_image_scales_16_bit_grayscale_and_refuses_float(tmp_path):
    """A 16-bit grayscale PNG (a picture or a mask) keeps its tones: PIL's own conversion clips at 255
    and turned it white (mean 254 for a ramp whose mean is 128 in 8 bits). Float images: one line."""
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65 520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I") and np.asarray(raw.convert("L")).mean() > 250  # the clipping
    for source in (tmp_path / "g16.png", (tmp_path / "g16.png").read_bytes()):
        rgb = np.asarray(open_image(source).convert("RGB"), dtype=np.float64)
        assert np.abs(rgb[..., 0] - ramp / 257.0).max() <= 0.5 and np.array_equal(rgb[..., 0], rgb[..., 2])
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(VelodiffError, match="floating-point image"):
        open_image(tmp_path / "f.tiff", "mask")
    Image.fromarray(np.full((8, 8), 70_000, np.int32)).save(tmp_path / "i32.tiff")
    with pytest.raises(VelodiffError, match="32-bit image"):
        open_image(tmp_path / "i32.tiff")
    with pytest.raises(VelodiffError, match=r"^a frame is not an image PIL can read"):
        open_image(b"not an image", "a frame")
    rgb8 = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb8.save(tmp_path / "rgb.png")
    assert open_image(tmp_path / "rgb.png").getpixel((0, 0)) == (10, 20, 30)  # 8-bit: as it is


def test_open_image_turns_a_photo_as_it_is_displayed_and_refuses_a_bomb_in_one_line(tmp_path, monkeypatch):
    """A phone's JPEG stored sideways with EXIF orientation 6 is read as displayed (diffusers' load_image
    does the same), so a mask drawn on the picture fits it; an image past PIL's pixel limit is one line."""
    stored = Image.new("RGB", (64, 32), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(tmp_path / "photo.jpg", exif=exif)
    assert open_image(tmp_path / "photo.jpg").size == (32, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(VelodiffError, match="too large to open safely"):
        open_image(tmp_path / "photo.jpg", "--image")


def _solid(color, size=(5, 3)):
    return Image.new("RGB", size, color)


def test_grid_layout_gaps_and_margins():
    ims = [_solid((i * 40, 0, 0)) for i in range(5)]
    g = image_grid(ims)  # near-square: 3 columns, 2 rows, 2 px white gaps
    assert g.size == (3 * 5 + 2 * 2, 2 * 3 + 2)
    assert g.getpixel((0, 0)) == (0, 0, 0) and g.getpixel((7, 0)) == (40, 0, 0)
    assert g.getpixel((5, 0)) == (255, 255, 255)  # a gap
    assert g.getpixel((7, 5)) == (160, 0, 0)  # image 4: row 1, column 1
    assert image_grid(ims[:1]) is ims[0]  # one plain image: itself
    m = image_grid(ims, cols=5, gap=4, margin=4, scale=2)
    assert m.size == (5 * 10 + 4 * 4 + 8, 6 + 8)
    assert m.getpixel((4, 4)) == (0, 0, 0) and m.getpixel((3, 3)) == (255, 255, 255)


def test_marks_and_captions_sit_under_each_image():
    ims = [_solid((0, 0, 255), (12, 12)) for _ in range(2)]
    g = image_grid(ims, 2, gap=4, margin=4, captions=["a b", "c"], caption_height=20,
                   marks=[(0, 200, 0), (200, 0, 0)])
    assert g.size == (4 + 12 + 4 + 12 + 4, 4 + 12 + 20 + 4)
    assert g.getpixel((4, 4 + 12)) == (0, 200, 0) and g.getpixel((20, 4 + 14)) == (200, 0, 0)
    assert wrap_caption("a red circle above a blue square", 12) == ["a red circle", "above a blue", "square"]
    assert wrap_caption("translucent cube", 8) == ["translucent", "cube"]  # no empty first line


# --- review28 ---------------------------------------------------------------------------------------------


def test_a_single_image_is_decorated_when_asked():
    """One image comes back as it is only without decoration: upscaled, framed or marked it is a sheet."""
    im = _solid((0, 0, 255), (4, 4))
    big = image_grid([im], scale=2)
    assert big is not im and big.size == (8, 8) and big.getpixel((7, 7)) == (0, 0, 255)
    framed = image_grid([im], margin=3)
    assert framed.size == (10, 10) and framed.getpixel((0, 0)) == (255, 255, 255)
    assert framed.getpixel((3, 3)) == (0, 0, 255)
    marked = image_grid([im], marks=[(0, 200, 0)], caption_height=6)
    assert marked.size == (4, 10) and marked.getpixel((0, 4)) == (0, 200, 0)


def test_captions_keep_at_most_caption_lines_lines():
    """A caption longer than ``caption_lines`` wrapped lines is cut to them: with caption_lines=1 the sheet
    is the one whose caption is its first line alone."""
    ims = [_solid((0, 0, 255), (36, 36)) for _ in range(2)]  # 36 px: 6 characters a line
    text = "red circle above blue square"
    assert wrap_caption(text, 6)[0] == "red"
    cut = image_grid(ims, 2, captions=[text, text], caption_lines=1, caption_height=40)
    first = image_grid(ims, 2, captions=["red", "red"], caption_lines=1, caption_height=40)
    assert np.array_equal(np.asarray(cut), np.asarray(first))
    full = image_grid(ims, 2, captions=[text, text], caption_lines=5, caption_height=40)
    assert not np.array_equal(np.asarray(full), np.asarray(first))
