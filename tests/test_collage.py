"""Layout by collage: the cut-out finds a rendered object's exact mask, chosen by attention among several;
the paste puts the object's pixels exactly in its box; on the shipped model every object of a two-object
prompt lands in its box (detector IoU), the evaluations of the whole pipeline are counted; bad input is
one line."""

import numpy as np
import pytest
import torch

import velodiff
from velodiff import VelodiffError
from velodiff.data.shapes import ShapesWorld
from velodiff.edit.collage import (
    boxes_from_prompt,
    collage,
    cut_out,
    grid_boxes,
    object_prompt,
    paste,
    singular,
)
from velodiff.plan import Accelerator


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def scene(caption: str, seed: int = 0):
    s = ShapesWorld(size=64).render(caption, seed=seed)
    return s, s.image.astype(np.float32) / 255.0


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_boxes_from_the_prompt_are_object_squares_in_their_halves():
    assert boxes_from_prompt("a red circle above a blue square") == {
        "red circle": pytest.approx((0.3, 0.05, 0.7, 0.45)),
        "blue square": pytest.approx((0.3, 0.55, 0.7, 0.95)),
    }
    right = boxes_from_prompt("a white cross to the right of a green triangle", side=0.3)
    assert right["white cross"] == pytest.approx((0.6, 0.35, 0.9, 0.65))
    assert boxes_from_prompt("a red circle") == {}
    listed = boxes_from_prompt("a red circle, a blue square and two green crosses")  # two rows of two
    assert listed["red circle"] == pytest.approx((0.1, 0.1, 0.4, 0.4))
    assert listed["blue square"] == pytest.approx((0.6, 0.1, 0.9, 0.4))
    crosses = [pytest.approx((0.1, 0.6, 0.4, 0.9)), pytest.approx((0.6, 0.6, 0.9, 0.9))]
    assert listed["green crosses"] == crosses
    assert boxes_from_prompt("two red circles") == {
        "red circles": [pytest.approx((0.1, 0.35, 0.4, 0.65)), pytest.approx((0.6, 0.35, 0.9, 0.65))]
    }
    above = boxes_from_prompt("three red circles above a blue square")  # three in the top half's row
    assert [(b[1] + b[3]) / 2 for b in above["red circles"]] == pytest.approx([0.25] * 3)
    assert [(b[0] + b[2]) / 2 for b in above["red circles"]] == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert above["blue square"] == pytest.approx((0.3, 0.55, 0.7, 0.95))
    twice = boxes_from_prompt("a red circle above a red circle")  # one box in each half, not one in all
    halves = [pytest.approx((0.3, 0.05, 0.7, 0.45)), pytest.approx((0.3, 0.55, 0.7, 0.95))]
    assert twice == {"red circle": halves}


def test_grid_boxes_fit_the_region_without_overlap():
    for region in [(0, 0, 1, 1), (0, 0, 1, 0.5), (0.5, 0, 1, 1)]:
        for n in range(1, 8):
            boxes = grid_boxes(region, n, side=0.3)
            assert len(boxes) == n
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                assert region[0] <= x0 < x1 <= region[2] and region[1] <= y0 < y1 <= region[3]
                assert x1 - x0 == pytest.approx(y1 - y0) and x1 - x0 <= 0.3 + 1e-9
                for a0, b0, a1, b1 in boxes[k + 1 :]:
                    assert min(x1, a1) <= max(x0, a0) or min(y1, b1) <= max(y0, b0), (region, n)
    (x0, _, x1, _), = grid_boxes((0, 0, 1, 1), 1, side=0.4)
    assert (x0, x1) == pytest.approx((0.3, 0.7))
    three = grid_boxes((0, 0, 1, 1), 3, side=0.3)  # two above, the third centred below
    assert (three[2][0] + three[2][2]) / 2 == pytest.approx(0.5)


def test_singular_names_one_object_of_a_counted_group():
    assert singular("three blue crosses") == "a blue cross"
    assert singular("two red circles") == "a red circle"
    assert singular("2 puppies") == "a puppy"
    assert singular("four wooden boxes") == "a wooden box"
    assert singular("a red circle") == "a red circle"


def test_object_prompt_is_the_phrase_that_names_the_words():
    prompt = "a red circle above two blue squares"
    assert object_prompt(prompt, "red circle") == "a red circle"
    assert object_prompt(prompt, "blue squares") == "two blue squares"
    listed = "a white cross and a green triangle, a red square"
    assert object_prompt(listed, "green triangle") == "a green triangle"
    assert object_prompt("a cat on a sofa", "cat") == "a cat on a sofa"
    assert object_prompt("a red circle", "circle red") == "a red circle"


def test_cut_out_finds_the_rendered_object_and_attention_picks_among_several():
    s, pixels = scene("a red circle")
    mask = cut_out(pixels)
    (obj,) = s.objects
    assert box_of(mask) == obj.box
    assert (mask & obj.mask).sum() >= 0.9 * obj.mask.sum()
    s, pixels = scene("a large red circle above a small blue square")
    big, small = s.objects
    assert box_of(cut_out(pixels)) == big.box  # no attention: the largest region
    attention = small.mask.astype(np.float32)  # all the attention on the small object
    assert box_of(cut_out(pixels, attention)) == small.box


def test_paste_puts_the_object_exactly_in_its_box():
    s, pixels = scene("a large red square")
    mask = cut_out(pixels)
    canvas = np.zeros_like(pixels)
    box = (0.25, 0.5, 0.75, 0.875)  # 32 x 24 pixels at 64 x 64: the square is stretched into it
    out = paste(canvas, pixels, mask, box)
    fg = np.linalg.norm(out, axis=-1) > 0.25
    assert box_of(fg) == (16, 32, 48, 56)
    assert np.allclose(out[~fg], 0.0)
    assert np.abs(out[40, 32] - pixels[s.objects[0].mask].mean(0)).max() < 0.05  # the object's colour


def test_paste_into_a_mask_stays_inside_it():
    """A layout mask: the object fills the region's bounding box and shows only inside the region."""
    _, pixels = scene("a large red square")
    region = np.zeros((32, 32), dtype=np.float32)  # any size: stretched over the canvas
    rr, cc = np.mgrid[:32, :32]
    region[(rr - 16) ** 2 + (cc - 16) ** 2 <= 8**2] = 1.0  # a disc of radius 16 px on the 64 px canvas
    out = paste(np.zeros_like(pixels), pixels, cut_out(pixels), region)
    fg = np.linalg.norm(out, axis=-1) > 0.25
    disc = np.kron(region, np.ones((2, 2))) > 0.5
    assert fg[disc].mean() > 0.95 and not fg[~disc].any()  # the square, cut to the disc


def test_collage_places_each_object_in_its_box(model):
    from velodiff.eval.shapes_eval import detect

    prompt = "a red circle to the left of a blue square"
    boxes = {"red circle": (0.05, 0.5, 0.45, 0.9), "blue square": (0.55, 0.05, 0.95, 0.45)}
    res = collage(model, prompt, boxes, strength=0.5, seeds=[0, 1], steps=10, guidance=2.5)
    assert len(res.images) == 2 and len(res.info["collages"]) == 2 and len(res.info["objects"]) == 2
    tensor = collage(model, prompt, boxes, strength=0.5, seeds=[0], steps=10, guidance=2.5, output="tensor")
    pil = torch.from_numpy(np.asarray(res.images[0])).float()
    assert torch.allclose(tensor.images[0].permute(1, 2, 0) * 255, pil, atol=0.51)  # the same image
    assert res.nfe == 10 + 10 + 5 and res.evals == 2 * res.nfe  # two objects + half the steps, CFG pairs
    for image in res.images:
        dets = detect(np.asarray(image))
        for words, box in boxes.items():
            mine = [d for d in dets if f"{d.color} {d.shape}" == words]
            assert mine, f"no {words} in the collage"
            x0, y0, x1, y1 = (v / 64 for v in max(mine, key=lambda d: d.area).box)
            inter = max(0, min(x1, box[2]) - max(x0, box[0])) * max(0, min(y1, box[3]) - max(y0, box[1]))
            union = (x1 - x0) * (y1 - y0) + (box[2] - box[0]) * (box[3] - box[1]) - inter
            assert inter / union >= 0.6, (words, inter / union)


def test_collage_of_a_counted_group_draws_exactly_the_count(model):
    """A counted group is drawn one object per box: the collage holds exactly the count, and the
    harmonised images show it (the model alone merges or drops objects of a group)."""
    from velodiff.eval.shapes_eval import detect

    res = collage(model, "three red circles", seeds=[0, 1], steps=10, guidance=2.5)
    assert len(res.info["objects"]) == 3 and res.nfe == 3 * 10 + 5
    drawn = [np.asarray(im).tobytes() for images in res.info["objects"] for im in images]
    assert len(set(drawn)) == 6  # consecutive image seeds never draw one object twice
    for image in [*res.info["collages"], *res.images]:
        assert sorted((d.color, d.shape) for d in detect(np.asarray(image))) == [("red", "circle")] * 3


def test_bad_input_is_one_line(model, tmp_path, capsys):
    from test_invert import cli

    flat = np.full((64, 64, 3), 0.1, dtype=np.float32)
    with pytest.raises(VelodiffError, match="stands out from its background"):
        cut_out(flat)
    box = {"red circle": (0.1, 0.1, 0.5, 0.5)}
    with pytest.raises(VelodiffError, match="strength must be in"):
        collage(model, "a red circle", box, strength=0, steps=2)
    with pytest.raises(VelodiffError, match="'red' is not in the prompt"):
        collage(model, "a blue circle", box, steps=2)
    for threshold in (float("nan"), 5, 0):
        with pytest.raises(VelodiffError, match=r"collage: threshold is an RGB distance in \(0, 1\)"):
            collage(model, "a red circle", box, threshold=threshold, steps=2)
    # a box outside the image is named as itself (it was reported as the square's missing box)
    with pytest.raises(VelodiffError, match=r"layout box 'red circle' \(0, 0, 2, 2\) must satisfy"):
        collage(model, "a red circle above a blue square", {"red circle": (0, 0, 2, 2)}, steps=2)
    out = str(tmp_path / "c.png")
    for args, message in [
        (("--layout-mode", "collage"), "needs layout boxes or a prompt naming several objects"),
        (("--layout-mode", "paste"), "use guidance or collage"),
        (("--strength", "0.3"), "applies to --layout-mode collage"),
        (("--layout", "red circle: 0,0,1,1", "--layout-mode", "collage", "--strength", "2"), "(0, 1]"),
    ]:
        assert cli("generate", "a red circle", "-o", out, *args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert cli("generate", "a red circle above a blue square", "-o", out, "--layout-mode", "collage",
               "--layout", "red circle: 0,0,0.5,0.5") == 2  # the square would be dropped without a word
    assert "no box for 'blue square', which the prompt names" in capsys.readouterr().err
    args = ("--layout", "red circle: 0.5,0.5,0.95,0.95", "--layout-mode", "collage", "--steps", "4")
    assert cli("generate", "a red circle", "-o", out, *args) == 0
    assert "4 steps, 6 NFE" in capsys.readouterr().out  # 4 steps for the object, 2 for the harmonising pass
    args = ("--layout-mode", "collage", "--steps", "4")  # boxes from the relation: two objects
    assert cli("generate", "a red circle above a blue square", "-o", out, *args) == 0
    assert "10 NFE" in capsys.readouterr().out
    from PIL import Image

    square = np.zeros((64, 64), dtype=np.uint8)
    square[8:40, 8:40] = 255
    Image.fromarray(square).save(tmp_path / "m.png")
    args = ("--layout", f"red circle: {tmp_path / 'm.png'}", "--layout-mode", "collage", "--steps", "4")
    assert cli("generate", "a red circle", "-o", out, *args) == 0  # a mask image as the region
    boxes = "red circles: 0.05,0.3,0.45,0.7; red circles: 0.55,0.3,0.95,0.7"  # a box per circle
    args = ("--layout", boxes, "--layout-mode", "collage", "--steps", "4")
    assert cli("generate", "two red circles", "-o", out, *args) == 0
    assert "10 NFE" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["sd3", "pixart-sigma"])
def test_collage_runs_on_transformer_families(tmp_path, kind):
    """SD3's joint attention has no plain cross-attention map to read (the largest region is cut out);
    PixArt's has. Random weights: the images are noise, but a region stands out and the pipeline runs."""
    from velodiff.models import load
    from velodiff.models.tiny import save_tiny

    model = load(save_tiny(kind, tmp_path / kind))
    model.max_sequence_length = 32
    res = collage(model, "a photo of a red cat", {"red cat": (0.1, 0.1, 0.6, 0.6)}, steps=2)
    assert res.nfe == 3 and res.images[0].size == res.info["collages"][0].size


def test_eval_collage_leaves_one_object_prompts_alone(model):
    """`velodiff eval shapes --layout-mode collage`: a prompt naming several objects is collaged, one
    without is generated exactly as without the mode (same seed, same image)."""
    from velodiff.commands.eval_shapes import generate_for_prompts

    texts = ["a red circle", "a red circle above a blue square", "two red circles"]
    kw = dict(seed=5, batch=4, steps=6, guidance=2.5, solver="dpmpp_2m")
    plain, _, _ = generate_for_prompts(model, texts, 1, **kw)
    mixed, _, info = generate_for_prompts(model, texts, 1, collage=0.5, **kw)
    assert np.array_equal(np.asarray(plain[0]), np.asarray(mixed[0]))
    assert not np.array_equal(np.asarray(plain[1]), np.asarray(mixed[1]))
    assert not np.array_equal(np.asarray(plain[2]), np.asarray(mixed[2]))
    # CFG pairs of 6 steps: the plain one; two objects + half the steps (twice)
    assert info["evals"] == (12 + 2 * (12 + 12 + 6)) / 3
    assert info["steps"] == 6  # the plain generation's, not the harmonising pass's


def test_the_cut_out_reads_the_phrase_and_end_tokens_attention_not_the_start_tokens(model):
    """The attention that picks an object's region is its phrase's tokens' and the end token's: the start
    token (index 0 of the maps), which attends everywhere and would favour the largest region, is not read."""
    from velodiff.edit.collage import _phrase_token_indices

    tok = model.components["tokenizer"]
    ids = tok("a red circle").input_ids  # start, a, red, circle, end
    read = _phrase_token_indices(model, "a red circle")
    assert [tok.convert_ids_to_tokens(ids[i]) for i in read] == ["a</w>", "red</w>", "circle</w>",
                                                                "<|endoftext|>"]
    assert ids[0] == tok.bos_token_id and 0 not in read


class Seen(Accelerator):
    """A plan rule recording the prompts of every run it takes part in."""

    name = "seen"

    def __init__(self):
        super().__init__()
        self.prompts: list[list[str]] = []

    def begin(self, run):
        super().begin(run)
        self.prompts.append(list(run.prompts))


def test_the_plan_runs_in_the_objects_and_the_harmonising_pass_and_latents_are_refused(model):
    """The user's plan applies to every generation of the collage: each object's (under its phrase) and
    the harmonising img2img pass (under the whole prompt); caller latents, which would make every object
    the same draw, are refused in one line."""
    prompt = "a red circle above a blue square"
    boxes = {"red circle": (0.3, 0.05, 0.7, 0.45), "blue square": (0.3, 0.55, 0.7, 0.95)}
    rule = Seen()
    collage(model, prompt, boxes, seeds=[0], steps=4, guidance=2.5, plan=[rule])
    assert rule.prompts == [["a red circle"], ["a blue square"], [prompt]]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VelodiffError, match="collage: latents apply to one generation; give seeds") as e:
        collage(model, prompt, boxes, steps=4, latents=noise)
    assert "\n" not in str(e.value)


def test_generate_layout_mode_collage_takes_its_strength(model, tmp_path, capsys):
    """generate --layout-mode collage --strength 0.25: the harmonising pass re-runs that share of the steps
    (4 + 4 object steps and 1 of 4 harmonising: 9 NFE) and the image is the API's collage at that
    strength, with the boxes from the prompt."""
    from PIL import Image

    from test_invert import cli

    prompt = "a red circle above a blue square"
    out = tmp_path / "c.png"
    capsys.readouterr()
    assert cli("generate", prompt, "--layout-mode", "collage", "--strength", "0.25", "--steps", "4",
               "--threads", "1", "--out", str(out)) == 0
    assert ", 9 NFE," in capsys.readouterr().out
    want = collage(model, prompt, None, strength=0.25, seeds=[0], steps=4).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
