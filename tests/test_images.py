"""velodiff.images: the one image-grid helper (generate's grid, contact sheets)."""

from PIL import Image

from velodiff.images import image_grid, wrap_caption


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
