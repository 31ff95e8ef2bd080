import numpy as np
import pytest

from velodiff.data.shapes import HOLDOUT_PAIRS, ShapesWorld, caption_from_spec, parse_caption
from velodiff.eval.shapes_eval import (
    CATEGORIES,
    PROMPT_SETS,
    Detection,
    _prompt_path,
    calibration,
    correct_by_category,
    detect,
    evaluate,
    load_prompts,
    paired_standard_error,
    prompt_set_json,
    score_prompt,
)

# ------------------------------------------------------------------------------------------ prompt sets


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_prompt_sets_are_fixed_balanced_and_well_formed(name):
    prompts = load_prompts(name)
    per = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert len(set(per.values())) == 1 and sum(per.values()) == len(prompts)
    assert per["single"] == (25 if name == "v1" else 9)
    for p in prompts:
        assert parse_caption(p.text) == p.spec  # the text says exactly what the spec checks
    # the stored JSON is what the deterministic builder makes (no silent edits)
    assert _prompt_path(name).read_text() == prompt_set_json(name)


def test_v1_avoids_and_holdout_uses_the_held_out_pair():
    held = HOLDOUT_PAIRS[0]

    def uses(p):
        return any((o["color"], o["shape"]) == held for o in p.spec["objects"])

    assert not any(uses(p) for p in load_prompts("v1"))
    assert all(uses(p) for p in load_prompts("v1-holdout"))
    assert len({p.text for p in load_prompts("v1")}) == 100


def test_unknown_prompt_set_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("v9")


# ------------------------------------------------------------------------------------------ calibration


@pytest.mark.parametrize("name,k", [("v1", 1), ("v1-holdout", 1)])
def test_calibration(name, k):
    r = calibration(name, images_per_prompt=k, seed=0)
    # the generator's own renders of the prompts
    assert r["own"]["overall"] >= 0.98
    assert min(r["own"]["by_category"].values()) >= 0.96
    assert r["own_strict"]["overall"] >= 0.98
    # blurred (sigma 0.8 px) and noised (sd 8/255) renders: what a decent generator makes
    assert r["own_blur_noise"]["overall"] >= 0.95
    # pure noise, pixel-wise and smooth colour fields
    assert r["noise"]["overall"] <= 0.02
    assert r["smooth_noise"]["overall"] <= 0.05
    # captions of other prompts, and captions with one attribute wrong (colour, shape, count, relation)
    assert r["mismatched"]["overall"] <= 0.05
    assert r["perturbed"]["overall"] <= 0.02


def test_world_stream_scores_perfectly_in_every_category():
    w = ShapesWorld(seed=11)
    scenes = list(w.stream(0, 100))
    r = evaluate([s.image for s in scenes], [s.spec for s in scenes], strict=True)
    assert r["overall"] == 1.0, [p for p in r["per_prompt"] if not p["correct"]][:3]
    assert {"single", "binding", "counting", "position"} <= set(r["by_category"])


# --------------------------------------------------------------------------------------------- detector


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_detections_match_ground_truth_objects():
    w = ShapesWorld(seed=5, holdout=False)
    for s in w.stream(0, 60):
        dets = detect(s.image)
        assert len(dets) == len(s.objects)
        for o in s.objects:
            best = max(dets, key=lambda d: _iou(d.box, o.box))
            assert _iou(best.box, o.box) >= 0.8
            assert (best.shape, best.color, best.size) == (o.shape, o.color, o.size)


def test_blank_and_background_images_have_no_objects():
    assert detect(np.full((64, 64, 3), 20, np.uint8)) == []
    assert detect(np.zeros((64, 64, 3), np.uint8)) == []
    assert detect(np.full((64, 64, 3), 128, np.uint8)) == []  # flat grey: no object stands on a background


def test_other_resolutions():
    w = ShapesWorld(seed=2, size=128)
    scenes = list(w.stream(0, 20))
    r = evaluate([s.image for s in scenes], [s.spec for s in scenes])
    assert r["overall"] == 1.0


# ----------------------------------------------------------------------------------------------- scoring


def _det(shape, color, box, size="small"):
    return Detection(shape=shape, color=color, size=size, box=box, area=100)


def test_score_prompt_rules():
    red_left = _det("circle", "red", (2, 20, 18, 36))
    blue_right = _det("square", "blue", (40, 22, 56, 38))

    def ok(dets, text, **kw):
        return score_prompt(dets, parse_caption(text), **kw)["correct"]

    pair = [red_left, blue_right]
    assert ok(pair, "a red circle to the left of a blue square")
    assert ok(pair, "a blue square to the right of a red circle")
    assert not ok(pair, "a red circle to the right of a blue square")
    assert not ok(pair, "a red circle above a blue square")
    # binding: colours must sit on the right shapes
    assert ok(pair, "a red circle and a blue square")
    assert not ok(pair, "a blue circle and a red square")
    # counting is exact; single presence is "at least one" unless strict
    two = [red_left, _det("circle", "red", (30, 30, 46, 46))]
    assert ok(two, "two red circles")
    assert not ok(two, "three red circles")
    assert not ok(two + [_det("circle", "red", (2, 48, 14, 60))], "two red circles")
    assert ok(two, "a red circle")
    assert not ok(two, "a red circle", strict=True)
    assert not ok(pair, "a red circle", strict=True)
    # a named size is checked
    assert not ok([red_left], "a large red circle")
    assert ok([red_left], "a small red circle")


def test_evaluate_accepts_tensors_and_several_images_per_prompt():
    w = ShapesWorld(seed=0)
    prompts = load_prompts("v1")[::25][:4]  # one per category
    k = 3
    scenes = [w.render(p.spec, seed=j) for p in prompts for j in range(k)]
    import torch

    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
    r = evaluate(x, prompts)
    assert r["overall"] == 1.0 and len(r["per_prompt"]) == k * len(prompts)
    assert [p["prompt_index"] for p in r["per_prompt"]] == [j // k for j in range(k * len(prompts))]
    assert set(r["by_category"]) == set(CATEGORIES) and all(v == k for v in r["counts"].values())
    # captions work as prompts too
    r2 = evaluate([s.image for s in scenes], [p.text for p in prompts])
    assert r2["overall"] == 1.0
    # batch() output goes straight in
    xb, caps = w.batch(0, 8)
    assert evaluate(xb, caps)["overall"] == 1.0
    with pytest.raises(ValueError, match="images"):
        evaluate([s.image for s in scenes[:5]], prompts)


def test_paired_standard_error_of_the_overall_score():
    """The standard error of overall(a) - overall(b) on the same images: per category the paired
    differences' variance over their count, summed, over the number of categories squared."""
    assert paired_standard_error({"x": "1100"}, {"x": "1000"}) == pytest.approx(0.25)  # var 1/4, n 4
    two = paired_standard_error({"x": "10", "y": "11"}, {"x": "00", "y": "01"})
    assert two == pytest.approx(np.sqrt(0.25 + 0.25) / 2)
    assert paired_standard_error({"x": "1010"}, {"x": "1010"}) == 0  # identical verdicts: no noise
    with pytest.raises(ValueError, match="not scored on the same images") as e:
        paired_standard_error({"x": "10"}, {"x": "101"})
    assert len(str(e.value).splitlines()) == 1
    w = ShapesWorld(seed=0)
    prompts = load_prompts("v1")[::25][:4]
    good = evaluate([w.render(p.spec, seed=0).image for p in prompts], prompts)
    blank = evaluate([np.zeros((64, 64, 3), np.uint8)] * 4, prompts)
    assert correct_by_category(good) == dict.fromkeys(CATEGORIES, "1")
    assert correct_by_category(blank) == dict.fromkeys(CATEGORIES, "0")


def test_canonical_prompt_text_roundtrip():
    for p in load_prompts("v1-holdout"):
        spec = parse_caption(p.text)
        assert parse_caption(caption_from_spec(spec)) == spec


def test_eval_shapes_command_scores_the_images_it_draws(tmp_path):
    """`velodiff eval shapes`: k images per prompt, prompt-major, image j with seed SEED + j; its verdicts are
    evaluate()'s on text2img's images of the same prompts and seeds (the command adds nothing of its own)."""
    import json

    import torch

    import velodiff
    from velodiff.cli import main
    from velodiff.pipelines import text2img
    from velodiff.pipelines.images import to_pil

    out = tmp_path / "r.json"
    try:
        main(["eval", "shapes", "--limit", "4", "--images-per-prompt", "2", "--steps", "6", "--seed", "5",
              "--threads", "1", "--json", str(out)])
    except SystemExit as e:
        assert not e.code
    r = json.loads(out.read_text())
    assert r["config"]["nfe"] == 6 and r["config"]["evals"] == 12.0 and len(r["per_prompt"]) == 8
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
    assert f"plan `{r['config']['plan']}`" in out.with_suffix(".md").read_text()  # two runs told apart
    texts = [p["text"] for p in r["per_prompt"]]
    assert len(set(r["by_category"])) > 1  # the limit spreads over the categories
    torch.set_num_threads(1)
    res = text2img(velodiff.load("default"), texts, seeds=[5 + j for j in range(8)], steps=6, guidance=2.5,
                   output="tensor")
    want = evaluate(res.images, texts[::2], value_range=(0, 1))  # a pipeline's tensors are in [0, 1]
    assert [p["correct"] for p in r["per_prompt"]] == [p["correct"] for p in want["per_prompt"]]
    assert r["overall"] == pytest.approx(want["overall"])
    assert evaluate([to_pil(res.images[j : j + 1])[0] for j in range(8)], texts[::2])["per_prompt"] == \
        want["per_prompt"]


def test_overall_is_the_mean_of_the_categories_not_of_the_images():
    """ShapesEval's overall weighs every category equally, whatever its number of images: three single
    objects (one drawn wrong) and one count right give (2/3 + 1) / 2, not 3/4."""
    w = ShapesWorld(seed=0)
    prompts = ["a red circle", "a blue square", "a green triangle", "two yellow crosses"]
    drawn = ["a red circle", "a blue square", "a white cross", "two yellow crosses"]
    r = evaluate([w.render(p, seed=i).image for i, p in enumerate(drawn)], prompts)
    assert r["counts"] == {"single": 3, "counting": 1}
    assert r["by_category"] == pytest.approx({"single": 2 / 3, "counting": 1.0})
    assert r["overall"] == pytest.approx((2 / 3 + 1.0) / 2)


# --- review24: the shape features' definitions, exact boxes, sizes at other resolutions, bad input ----

def _canvas(size=64):
    from velodiff.data.shapes import BACKGROUND

    img = np.zeros((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    return img


def test_shape_features_of_known_masks():
    """extent = area / box area, solidity = area / hull area of the pixel squares, corners = mean fill of
    the four quarter-side corner cells (rows: a quarter of the height, columns: of the width), ycent = the
    centroid's offset below the box centre in box heights, aspect = width / height."""
    from velodiff.eval.shapes_eval import shape_features

    rect = np.zeros((32, 32), bool)
    rect[5:15, 3:9] = True  # 6 wide, 10 tall
    assert shape_features(rect) == pytest.approx(
        {"corners": 1.0, "extent": 1.0, "solidity": 1.0, "ycent": 0.0, "aspect": 0.6})
    tri = np.zeros((32, 32), bool)
    for y in range(10):  # 20 wide, 10 tall; row y holds 2 (y + 1) pixels from the left: mean row 6
        tri[10 + y, 4 : 4 + 2 * (y + 1)] = True
    f = shape_features(tri)
    assert f["extent"] == pytest.approx(110 / 200) and f["aspect"] == pytest.approx(2.0)
    assert f["ycent"] == pytest.approx((6 + 0.5 - 5) / 10)
    notch = np.zeros((32, 32), bool)
    notch[4:20, 6:10] = True  # 4 wide, 16 tall: corner cells of 4 rows x 1 column
    notch[4:8, 6] = False  # the top-left cell empty, the box unchanged
    assert shape_features(notch)["corners"] == pytest.approx(0.75)


def test_a_drawn_square_is_detected_with_its_exact_box():
    """Detection boxes are (x0, y0, x1, y1), end-exclusive: a 16 x 16 red square at x 10-25, y 20-35 on the
    world's background is (10, 20, 26, 36), area 256."""
    from velodiff.data.shapes import PALETTE

    img = _canvas()
    img[20:36, 10:26] = PALETTE["red"]
    (d,) = detect(img)
    assert (d.shape, d.color, d.box, d.area) == ("square", "red", (10, 20, 26, 36), 256)
    bar = _canvas()
    bar[20:30, 10:34] = PALETTE["red"]  # 24 x 10: large by its longest side (the cut is 21 px)
    (d,) = detect(bar)
    assert d.box == (10, 20, 34, 30) and d.size == "large"
    w = ShapesWorld(seed=5, holdout=False)
    for s in w.stream(0, 10):  # the renders' own boxes, exactly
        assert sorted(d.box for d in detect(s.image)) == sorted(tuple(o.box) for o in s.objects)


def test_sizes_are_judged_at_every_resolution():
    """Object sizes scale with the image: at 128 px a small object is small and a large one large."""
    for size in (64, 128):
        w = ShapesWorld(seed=3, size=size, holdout=False)
        for k, text in enumerate(["a small red circle", "a large blue square", "a small green triangle",
                                  "a large yellow cross"]):
            (d,) = detect(w.render(text, seed=k).image)
            assert d.size == text.split()[1], (size, text)


def test_bad_images_and_value_ranges_are_refused():
    prompts = load_prompts("v1")[:2]
    with pytest.raises(ValueError, match="images"):
        evaluate([], prompts)
    with pytest.raises(ValueError, match="value_range"):
        evaluate(np.zeros((2, 3, 64, 64), np.float32), prompts, value_range=(1.0, 0.0))
    w = ShapesWorld(seed=0)
    imgs = [w.render(p.spec, seed=0).image for p in prompts]
    as_range = [im.astype(np.float32) / 255.0 * 4.0 + 2.0 for im in imgs]  # values in [2, 6]
    assert evaluate(as_range, prompts, value_range=(2.0, 6.0))["overall"] == 1.0


def test_the_detectors_pixel_and_area_rules():
    """Foreground: value at least 45% of the way from the background's to the colour's (a 47% blend of red
    into the background at the square's edge is part of it, a 40% one is not); intermediate saturation
    (0.25) is no colour; groups smaller than 30 px at 64x64 (120 px at 128x128) or covering half the image
    are no objects."""
    from velodiff.data.shapes import BACKGROUND, PALETTE

    red = np.array(PALETTE["red"], np.float32)
    bg = np.array(BACKGROUND, np.float32)
    for a, box in ((0.47, (10, 20, 27, 36)), (0.40, (10, 20, 26, 36))):
        img = _canvas()
        img[20:36, 10:26] = PALETTE["red"]
        img[20:36, 26] = np.rint(bg + a * (red - bg)).astype(np.uint8)
        (d,) = detect(img)
        assert (d.color, d.box) == ("red", box), a
    pale = _canvas()
    pale[20:36, 10:26] = (200, 150, 150)  # saturation 0.25: between white's 0.22 and a colour's 0.32
    assert detect(pale) == []
    for size, small, kept in ((64, 5, 6), (128, 10, 12)):
        for side, n in ((small, 0), (kept, 1)):
            img = _canvas(size)
            img[20 : 20 + side, 30 : 30 + side] = PALETTE["red"]
            assert len(detect(img)) == n, (size, side)
    big = _canvas()
    big[7:57, 7:57] = PALETTE["red"]  # 2500 px of 4096, on the background
    assert detect(big) == []


def test_a_relation_at_exactly_the_threshold_does_not_hold():
    """GenEval's rule is strict (> 0.5): centres 12 left and 16 up of each other, boxes 10 wide, give a
    left-of component of exactly (12 - 2) / 20 = 0.5, which is not "to the left"."""
    a, b = _det("circle", "red", (0, 0, 10, 10)), _det("square", "blue", (12, 16, 22, 26))
    spec = parse_caption("a red circle to the left of a blue square")
    res = score_prompt([a, b], spec)
    assert res["relation_ok"] is False and not res["correct"]
    b2 = _det("square", "blue", (13, 16, 23, 26))  # one pixel further right: (13 - 2) / sqrt(13^2 + 16^2)
    assert score_prompt([a, b2], spec)["correct"]


def test_a_blob_far_from_every_shape_prototype_is_unknown():
    """A 24 x 10 bar is none of the four shapes: beyond SHAPE_MAX_DIST from every prototype it is "unknown"
    (and so matches no named shape)."""
    from velodiff.data.shapes import PALETTE
    from velodiff.eval.shapes_eval import SHAPE_MAX_DIST

    bar = _canvas()
    bar[20:30, 10:34] = PALETTE["red"]
    (d,) = detect(bar)
    assert d.features["shape_distance"] > SHAPE_MAX_DIST and d.shape == "unknown"
    assert not score_prompt([d], parse_caption("a red square"))["correct"]


def test_eval_shapes_sweep_reports_the_best_scale_its_seed_and_each_prompts_first_image(tmp_path):
    """A guidance sweep's top-level result is its best scale's (the highest overall in ``sweep``), the
    config records the seed it ran, and the contact sheet shows the first image of every prompt (image
    j * k, prompt-major) with its verdict."""
    import json

    import torch
    from PIL import Image

    import velodiff
    from velodiff.cli import main
    from velodiff.commands.eval_shapes import contact_sheet
    from velodiff.pipelines import text2img

    out = tmp_path / "r.json"
    try:
        main(["eval", "shapes", "--limit", "4", "--images-per-prompt", "2", "--steps", "4", "--seed", "3",
              "--guidance", "0,2.5", "--threads", "1", "--json", str(out)])
    except SystemExit as e:
        assert not e.code
    r = json.loads(out.read_text())
    best = max(r["sweep"], key=lambda row: row["overall"])
    assert [row["guidance"] for row in r["sweep"]] == [0.0, 2.5] and best["overall"] > min(
        row["overall"] for row in r["sweep"])  # the scales score apart, so the best one is the pick
    assert r["overall"] == best["overall"] and r["config"]["guidance"] == best["guidance"]
    assert r["config"]["seed"] == 3
    texts = [p["text"] for p in r["per_prompt"]]
    torch.set_num_threads(1)
    res = text2img(velodiff.load("default"), texts, seeds=[3 + j for j in range(8)], steps=4,
                   guidance=best["guidance"])
    firsts = [0, 2, 4, 6]
    want = contact_sheet([res.images[i] for i in firsts], [r["per_prompt"][i] for i in firsts])
    assert np.array_equal(np.asarray(Image.open(out.with_suffix(".png")).convert("RGB")), np.asarray(want))
