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
