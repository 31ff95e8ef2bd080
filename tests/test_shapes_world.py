import numpy as np
import pytest
from scipy import ndimage

from velodiff.data.shapes import (
    COLORS,
    HOLDOUT_PAIRS,
    PALETTE,
    SHAPES,
    SIZE_PX,
    SIZES,
    ShapesWorld,
    caption_from_spec,
    parse_caption,
    relation_components,
)


def test_vocabulary_meets_the_issue():
    assert len(SHAPES) >= 4 and {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(COLORS) >= 6 and len(SIZES) >= 2


def test_scene_is_a_pure_function_of_seed_and_index():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in (0, 7, 12345):
        sa, sb = a.scene(i), b.scene(i)
        assert np.array_equal(sa.image, sb.image) and sa.caption == sb.caption
    # order of access does not matter, and other seeds differ
    assert np.array_equal(a.scene(5).image, ShapesWorld(seed=3).scene(5).image)
    diff = sum(not np.array_equal(a.scene(i).image, ShapesWorld(seed=4).scene(i).image) for i in range(10))
    assert diff >= 9


def test_scene_ground_truth_is_consistent():
    w = ShapesWorld(seed=0)
    bg = np.array([20, 20, 20])
    for s in w.stream(0, 200):
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= 3
        union = np.zeros((64, 64), bool)
        for o in s.objects:
            assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES
            assert o.mask.shape == (64, 64) and o.mask.dtype == bool
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
            assert abs(side - SIZE_PX[o.size]) <= 1.5
            assert not (union & o.mask).any(), "objects overlap"
            union |= o.mask
            # the mask's interior pixels carry the object's colour exactly
            inner = ndimage.binary_erosion(o.mask, iterations=2)
            assert inner.sum() >= 10
            assert np.abs(s.image[inner].astype(int) - PALETTE[o.color]).max() <= 1
        # everything outside the (slightly dilated) masks is background
        far = ~ndimage.binary_dilation(union, structure=np.ones((3, 3)), iterations=2)
        assert (s.image[far] == bg).all()


def test_caption_agrees_with_ground_truth():
    w = ShapesWorld(seed=1)
    categories = set()
    for s in w.stream(0, 300):
        spec = parse_caption(s.caption)
        assert spec == s.spec
        categories.add(s.category)
        # every named group is drawn exactly count times, and nothing else is drawn
        drawn = sorted((o.color, o.shape) for o in s.objects)
        named = sorted((g["color"], g["shape"]) for g in spec["objects"] for _ in range(g["count"]))
        assert drawn == named
        for g in spec["objects"]:
            if "size" in g:
                same = [o for o in s.objects if (o.color, o.shape) == (g["color"], g["shape"])]
                assert all(o.size == g["size"] for o in same)
        rel = spec["relation"]
        if rel is not None:
            a, b = spec["objects"][rel["a"]], spec["objects"][rel["b"]]
            oa = next(o for o in s.objects if (o.color, o.shape) == (a["color"], a["shape"]))
            ob = next(o for o in s.objects if (o.color, o.shape) == (b["color"], b["shape"]))
            comp = relation_components(oa.box, ob.box)
            assert comp[rel["type"]] >= 0.65
            # unambiguous: no other relation holds under the evaluator's rule
            assert [r for r, v in comp.items() if v > 0.5] == [rel["type"]]
    assert {"single", "counting", "binding", "position"} <= categories


def test_captions_vary_and_cover_counts_and_relations():
    caps = [s.caption for s in ShapesWorld(seed=0).stream(0, 300)]
    assert len(set(caps)) > 200
    joined = "\n".join(caps)
    for word in ("two", "three", "to the left of", "to the right of", "above", "below", "small", "large"):
        assert word in joined


def test_holdout_pair_never_drawn_by_default_but_rendered_on_request():
    (color, shape), = HOLDOUT_PAIRS
    w = ShapesWorld(seed=0)
    assert w.holdout
    for s in w.stream(0, 300):
        assert all((o.color, o.shape) != (color, shape) for o in s.objects)
        assert f"{color} {shape}" not in s.caption
    open_world = ShapesWorld(seed=0, holdout=False)
    assert any((o.color, o.shape) == (color, shape) for s in open_world.stream(0, 300) for o in s.objects)
    s = w.render(f"a {color} {shape} to the left of a red circle", seed=0)
    assert [(o.color, o.shape) for o in s.objects] == [(color, shape), ("red", "circle")]


@pytest.mark.parametrize("text", [
    "a red circle", "two green triangles", "a small blue square above a large white cross",
    "a yellow cross to the right of a cyan circle", "three purple squares",
    "a red circle, a blue square and a green triangle", "two white crosses and a red circle",
])
def test_render_from_spec_matches_the_spec(text):
    w = ShapesWorld(seed=0)
    spec = parse_caption(text)
    assert caption_from_spec(spec) == text
    for seed in range(5):
        s = w.render(spec, seed=seed)
        assert s.caption == text and s.spec == spec
        assert len(s.objects) == sum(g["count"] for g in spec["objects"])
    assert not np.array_equal(w.render(spec, seed=0).image, w.render(spec, seed=1).image)
    assert np.array_equal(w.render(spec, seed=2).image, w.render(spec, seed=2).image)


def test_parse_rejects_words_outside_the_vocabulary():
    for bad in ("a red hexagon", "four red circles", "a crimson circle", "a red circle left of"):
        with pytest.raises(ValueError):
            parse_caption(bad)
    # a sentence's closing punctuation is not a word
    plain = "two red circles and a blue square"
    assert parse_caption("Two red circles and a blue square.") == parse_caption(plain)
    assert parse_caption("a red circle!") == parse_caption("a red circle")


def test_batch_tensor_layout():
    w = ShapesWorld(seed=2)
    x, caps = w.batch(10, 5)
    assert tuple(x.shape) == (5, 3, 64, 64) and str(x.dtype) == "torch.float32"
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and len(caps) == 5
    s = w.scene(12)
    back = ((x[2].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    assert np.array_equal(back, s.image) and caps[2] == s.caption


def test_other_resolutions_scale():
    s = ShapesWorld(seed=0, size=128).scene(0)
    assert s.image.shape == (128, 128, 3)
    assert all(o.mask.shape == (128, 128) for o in s.objects)


# --- review28 ---------------------------------------------------------------------------------------------


def test_relation_components_are_genevals_rule():
    """GenEval's rule on known boxes: the centre offset, each axis shrunk by 0.1 x the two boxes' extents
    on it, over the raw offset's length; a shrink past zero leaves 0 on that axis."""
    comp = relation_components((0, 0, 10, 10), (30, 0, 40, 10))  # a 30 px left of b, same row
    assert comp["left_of"] == pytest.approx((30 - 0.1 * 20) / 30, abs=1e-12)
    assert comp["right_of"] == pytest.approx(-(30 - 0.1 * 20) / 30, abs=1e-12)
    assert comp["above"] == 0.0 and comp["below"] == 0.0
    comp = relation_components((0, 0, 10, 10), (1, 20, 11, 36))  # a above b, 1 px to the left
    norm = (1**2 + 23**2) ** 0.5
    assert comp["above"] == pytest.approx((23 - 0.1 * 26) / norm, abs=1e-12)
    assert comp["left_of"] == 0.0 and comp["right_of"] == 0.0  # |1| - 0.1 x 20 < 0
    assert relation_components((0, 0, 10, 10), (0, 0, 10, 10)) == dict.fromkeys(comp, 0.0)


def test_specs_hold_at_most_three_objects_and_relate_two_single_groups():
    from velodiff.data.shapes import normalize_spec

    for bad in ("two red circles and two blue squares", "three red circles and a blue square"):
        with pytest.raises(ValueError, match="at most 3 objects"):
            parse_caption(bad)
    spec = {"objects": [{"shape": "circle", "color": "red", "count": 2},
                        {"shape": "square", "color": "blue"}], "relation": {"type": "above", "a": 0, "b": 1}}
    with pytest.raises(ValueError, match="two single objects"):
        normalize_spec(spec)
    spec["objects"] = spec["objects"][::-1]  # the counted group second
    spec["relation"] = {"type": "above", "a": 0, "b": 1}
    with pytest.raises(ValueError, match="two single objects"):
        normalize_spec(spec)
    spec["relation"] = {"type": "above", "a": 1, "b": 1}
    with pytest.raises(ValueError, match="do not name two object groups"):
        normalize_spec(spec)


def test_captions_with_a_relation_and_a_third_group_round_trip_and_are_multi():
    """A relation between two groups and a third group: the caption names all three and parses back, and
    its category is "multi" (position is two related objects alone)."""
    from velodiff.data.shapes import category_of

    text = "a red circle above a blue square and a green cross"
    spec = parse_caption(text)
    assert [o["shape"] for o in spec["objects"]] == ["circle", "square", "cross"]
    assert spec["relation"] == {"type": "above", "a": 0, "b": 1}
    assert caption_from_spec(spec) == text
    s = ShapesWorld(seed=0).render(spec, seed=0)
    assert s.caption == text and len(s.objects) == 3
    cases = {"a red circle": "single", "two red circles": "counting",
             "a red circle and a blue square": "binding", "a red circle above a blue square": "position",
             text: "multi", "a red circle, a blue square and a green cross": "multi",
             "two red circles and a blue square": "multi"}
    assert {t: category_of(parse_caption(t)) for t in cases} == cases


def test_geneval_style_prompts_parse():
    """GenEval's prompts read "a photo of ...": the prefix is not part of the spec, as the world's own
    prefixes ("an image of ", "a picture of ") are not."""
    want = parse_caption("a red circle to the left of a blue square")
    for prefix in ("a photo of ", "an image of ", "a picture of ", "A photo of "):
        assert parse_caption(prefix + "a red circle to the left of a blue square") == want


def test_masks_are_the_pixels_at_least_half_covered():
    """The ground-truth mask is the set of pixels at least half covered by the shape (module docstring):
    read back from the antialiased image (coverage = the pixel's step from the background towards the
    object's colour, in 1/16 steps of the 4x4 supersampling), pixels exactly half covered included."""
    bg = np.array([20.0, 20.0, 20.0])
    halves = 0
    for s in ShapesWorld(seed=0).stream(0, 60):
        for o in s.objects:
            col = np.array(PALETTE[o.color], dtype=float)
            c = int(np.argmax(np.abs(col - bg)))
            x0, y0, x1, y1 = o.box
            win = (slice(max(y0 - 2, 0), y1 + 2), slice(max(x0 - 2, 0), x1 + 2))
            cov = (s.image[..., c][win] - bg[c]) / (col[c] - bg[c])
            assert np.array_equal(o.mask[win], cov >= 0.5 - 1 / 32)
            assert o.mask[win].sum() == o.mask.sum()
            halves += int(np.isclose(cov, 0.5, atol=1 / 64).sum())
    assert halves > 0  # the rule's edge case occurs


@pytest.mark.parametrize("shape, fraction", [
    ("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5), ("cross", 2 * 0.36 - 0.36**2),
])
def test_each_shape_covers_its_geometric_area(shape, fraction):
    """A shape's mask covers its geometric area in its box: all of a square, pi / 4 of a circle, half of a
    triangle, and for a cross of two bars 0.36 of the side wide 2 x 0.36 - 0.36^2 (within edge pixels)."""
    w = ShapesWorld(seed=0, size=128)
    for size in SIZES:
        s = w.render({"objects": [{"shape": shape, "color": "red", "size": size}]}, seed=1)
        (o,) = s.objects
        side = SIZE_PX[size] * 2
        assert abs(o.area - fraction * side**2) <= 2 * side, (shape, size, o.area, fraction * side**2)
