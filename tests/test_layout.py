"""Layout guidance: regions from spatial words, boxes checked, the guided sample's cross-attention mass moves
into the regions (the energy it descends), and a prompt without a relation is left alone."""

import pytest
import torch

import velodiff
from velodiff import VelodiffError
from velodiff.accel.attention import AttentionMaps
from velodiff.edit.layout import LayoutGuidance, check_boxes, concepts, parse_layout, regions_from_prompt
from velodiff.pipelines import text2img


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def test_regions_from_spatial_words():
    assert regions_from_prompt("a red circle above a blue square") == {
        "red circle": (0.0, 0.0, 1.0, 0.5),
        "blue square": (0.0, 0.5, 1.0, 1.0),
    }
    left = regions_from_prompt("a white cross to the left of a blue triangle")
    assert left["white cross"] == (0.0, 0.0, 0.5, 1.0) and left["blue triangle"] == (0.5, 0.0, 1.0, 1.0)
    assert regions_from_prompt("two green crosses") == {}
    assert regions_from_prompt("a red circle, above a blue square.") == regions_from_prompt(
        "a red circle above a blue square"
    )  # a comma before the relation is not part of the object's words
    # one object named on both sides: a group with both halves, not only the last side's
    assert regions_from_prompt("a red circle above a red circle") == {
        "red circle": [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
    }
    with pytest.raises(VelodiffError, match="must satisfy"):
        check_boxes({"red circle": (0.1, 0.1, 1.2, 0.5)}, "a red circle")
    with pytest.raises(VelodiffError, match="'green' is not in the prompt"):
        check_boxes({"green circle": (0.1, 0.1, 0.5, 0.5)}, "a red circle")
    check_boxes({"blue square": (0.5, 0.5, 1, 1)}, "a red circle and a blue square.")  # punctuation
    with pytest.raises(VelodiffError, match="'blue circle' is not a phrase of the prompt"):
        check_boxes({"blue circle": (0.1, 0.1, 0.5, 0.5)}, "a red circle above a blue square")  # two objects'


def test_each_object_guides_its_own_words(model):
    """'a red circle and a red square': each box pulls on its own phrase's tokens, not on every 'red';
    an object the token limit cut off is one line."""
    from velodiff.pipelines import text2img

    rule = LayoutGuidance(boxes={"red circle": (0, 0, 0.5, 1), "red square": (0.5, 0, 1, 1)})
    text2img(model, "a red circle and a red square", seeds=[0], steps=2, plan=[rule], output="latent")
    assert [pos.tolist() for pos, _ in rule.objects[0]] == [[2, 3], [6, 7]]
    with pytest.raises(VelodiffError, match="past the prompt's token limit"):
        text2img(model, "circle " * 76 + "and a blue square", steps=2, output="latent",
                 plan=[LayoutGuidance(boxes={"blue square": (0.5, 0.5, 1, 1)})])


def inside_share(maps, model, prompt, regions):
    """Mean over the captured steps after the first of each object's attention share inside its box."""
    from velodiff.edit.layout import box_mask
    from velodiff.edit.p2p import word_positions
    from velodiff.plan import RunInfo

    run = RunInfo(None, None, None, 1, {}, model=model)
    shares = []
    for words, box in regions.items():
        pos = [q for w in words.split() for q in word_positions(run, prompt, w)]
        m = box_mask(box, 16 * 16)
        for i, a in maps.items():
            if i == 0:
                continue
            att = a[0][pos].mean(0).reshape(-1)
            shares.append(float((att * m).sum() / att.sum()))
    return sum(shares) / len(shares)


def test_guidance_moves_attention_into_the_regions(model):
    from velodiff.pipelines import text2img

    prompt = "a red circle above a blue square"
    regions = regions_from_prompt(prompt)
    plain, guided = AttentionMaps(), AttentionMaps()
    text2img(model, prompt, seeds=[0], steps=8, guidance=2.5, plan=[plain])
    text2img(
        model,
        prompt,
        seeds=[0],
        steps=8,
        guidance=2.5,
        plan=[guided, LayoutGuidance(scale=0.1, iters=3, steps=1.0)],
    )
    before = inside_share(plain.maps, model, prompt, regions)
    after = inside_share(guided.maps, model, prompt, regions)
    assert after > before + 0.02, (before, after)


class Recorded(LayoutGuidance):
    """The rule, recording its energy at the first iteration of each guided step (before that step's
    update): with ``scale=0`` it measures the plain run."""

    def begin(self, run):
        super().begin(run)
        self.first: list[float] = []
        self.fresh = False

    def after_step(self, info):
        self.fresh = True
        return super().after_step(info)

    def energy(self, maps):
        e = super().energy(maps)
        if self.fresh:
            self.first.append(float(e.detach()))
            self.fresh = False
        return e


def test_astar_concepts_and_segregation_separates_the_objects_maps(model):
    """A-STAR's objects of a prompt without a layout are its phrases; its segregation term (the overlap
    of their normalized cross-attention maps, its Eq. 2) goes down along the guided run against the
    same quantity measured on the plain run."""
    from velodiff.pipelines import text2img

    assert concepts("A red cross and a white triangle.") == ["red cross", "white triangle"]
    assert concepts("two green crosses") == ["green crosses"]
    three = ["red circle", "blue square", "green cross"]
    assert concepts("a red circle, a blue square and a green cross") == three
    prompt = "a red cross and a white triangle"
    runs = {}
    for scale in (0.0, 0.5):
        rule = Recorded(scale=scale, iters=3, steps=1.0, segregation=1)
        text2img(model, prompt, seeds=[0], steps=8, guidance=2.5, plan=[rule])
        runs[scale] = rule.first
    plain, guided = (sum(v[-3:]) / 3 for v in (runs[0.0], runs[0.5]))  # the last three guided steps
    assert runs[0.0][0] == runs[0.5][0] and guided < plain - 0.015, (runs[0.0], runs[0.5])
    # retention alone on one object: runs (its first guided step has no previous map to keep)
    out = text2img(model, "two green crosses", seeds=[0], steps=4, output="latent", plan="layout:retention=1")
    assert torch.isfinite(out.latents).all()
    # retention remembers each guided step's binarized maps for the next one: it changes the run
    kw = dict(seeds=[0], steps=4, guidance=2.5, output="latent")
    plans = (f"layout:scale=0.5,steps=1,retention={r},segregation=0" for r in (1, 0))
    kept, without = (text2img(model, prompt, plan=plan, **kw) for plan in plans)
    assert not torch.allclose(kept.latents, without.latents)


def test_astar_terms_are_its_equations():
    """Segregation (A-STAR Eq. 2): w_s sum(min(a_m, a_n)) / sum(a_m + a_n) over pairs of normalized maps;
    retention (Eq. 3): w_r (1 - IoU(a_m, B_m)) against the previous step's binarized maps B_m."""
    from velodiff import Plan

    rule = Plan.parse("layout:segregation=2,retention=3").rules[0]
    a, b = torch.tensor([1.0, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.5, 1.0, 0.0])
    assert float(rule.astar([a, b], None)) == pytest.approx(2 * 0.5 / 3.0)
    previous = [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])]
    # IoU(a, B_0) = 1.5 / 2, IoU(b, B_1) = 1 / 2.5
    assert float(rule.astar([a, b], previous)) == pytest.approx(2 * 0.5 / 3.0 + 3 * ((1 - 0.75) + (1 - 0.4)))


def test_the_guidance_passes_are_counted_in_the_cost(model):
    """Layout guidance's gradient passes run outside the solver's evaluations (after the step); the
    reported cost holds them: 8 steps, guidance after steps 0-2 (those ending before half the run), 2
    iterations each -> 6 more calls."""
    from velodiff.pipelines import text2img

    kw = dict(seeds=[0], steps=8, output="latent")
    plain = text2img(model, "a red circle above a blue square", **kw)
    guided = text2img(model, "a red circle above a blue square", plan="layout:iters=2", **kw)
    assert (plain.nfe, plain.evals) == (8, 16)  # CFG: one batched call, two evaluations per step
    assert (guided.nfe, guided.evals) == (8 + 3 * 2, 16 + 3 * 2)


def test_no_relation_no_change_and_refusals(model):
    from velodiff.pipelines import text2img

    a = text2img(model, "two green crosses", seeds=[0], steps=4, output="latent")
    b = text2img(model, "two green crosses", seeds=[0], steps=4, output="latent", plan="layout")
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(VelodiffError, match="is not in the prompt"):
        text2img(
            model, "a red circle", steps=2, plan=[LayoutGuidance(boxes={"blue square": (0, 0, 0.5, 0.5)})]
        )
    # boxes without their words: one line naming the form, not a ValueError from dict()
    from velodiff.edit.collage import collage
    from velodiff.edit.regional import RegionalPrompting

    form = r"maps the words of the prompt to boxes \(x0, y0, x1, y1\) in \[0, 1\]"
    for make in (lambda: LayoutGuidance(boxes=[(0, 0, 1, 1)]),
                 lambda: RegionalPrompting(regions={5: (0, 0, 1, 1)}),
                 lambda: collage(model, "a red circle", boxes=[(0, 0, 0.5, 0.5)], steps=2)):
        with pytest.raises(VelodiffError, match=form):
            make()
    with pytest.raises(VelodiffError, match="collage draws one prompt"):
        collage(model, 5)


def test_generate_layout_option(tmp_path, capsys):
    from test_invert import cli
    from velodiff.edit.layout import parse_layout

    assert parse_layout("Red circle: 0,0.5,1,1; blue square: 0,0,1,0.5") == {
        "red circle": (0.0, 0.5, 1.0, 1.0),
        "blue square": (0.0, 0.0, 1.0, 0.5),
    }
    assert parse_layout("red circles: 0,0,0.4,0.4; Red circles: 0.5,0,0.9,0.4") == {  # a box per circle
        "red circles": [(0.0, 0.0, 0.4, 0.4), (0.5, 0.0, 0.9, 0.4)]
    }
    out = tmp_path / "l.png"
    prompt = "a red circle above a blue square"
    assert cli("generate", prompt, "-o", str(out), "--steps", "3", "--layout", "red circle: 0,0.5,1,1") == 0
    assert "plan layout+cfg" in capsys.readouterr().out
    for bad, match in [
        ("red circle 0,0,1,1", "write 'words: x0,y0,x1,y1'"),
        ("green circle: 0,0,1,1", "'green' is not in the prompt"),
        ("red circle: 0,0,1.5,1", "must satisfy"),
    ]:
        assert cli("generate", prompt, "-o", str(out), "--layout", bad) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err
    # --plan layout:... gives --layout's boxes their options (as --plan regional:... does --regions')
    assert cli("generate", prompt, "-o", str(out), "--steps", "3", "--layout", "red circle: 0,0,1,1",
               "--plan", "layout:iters=1,retention=0.5") == 0
    assert "plan layout:iters=1,retention=0.5+cfg" in capsys.readouterr().out
    assert cli("generate", prompt, "-o", str(out), "--layout", "red circle: 0,0,1,1", "--plan", "layout",
               "--layout-mode", "collage") == 2
    assert "collage places the objects itself; drop layout from --plan" in capsys.readouterr().err


def test_a_mask_region_is_the_box_it_draws_and_bad_masks_are_one_line(model, tmp_path):
    """A layout mask (an image, white = the region) is read from a path on the command line only, its
    cells on any attention grid are the box's it draws, and layout guidance on it is guidance on the box
    (the same images); a black mask or an unreadable file is one line."""
    import numpy as np
    from PIL import Image

    from velodiff.edit.layout import region_mask

    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    path = tmp_path / "Left Half.PNG"  # the path's case is kept, the words are lower-cased
    Image.fromarray(left).save(path)
    boxes = parse_layout(f"Red Circle: {path}", masks=True)
    mask = boxes["red circle"]
    assert mask.shape == (64, 64) and mask.max() == 1.0
    for h, w in [(8, 8), (16, 16), (4, 6)]:
        assert torch.equal(region_mask(mask, h, w), region_mask((0.0, 0.0, 0.5, 1.0), h, w))
    with pytest.raises(VelodiffError, match="four numbers in"):
        parse_layout(f"red circle: {path}")  # masks off (the server's): paths are not read
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(VelodiffError, match="covers nothing"):
        parse_layout(f"red circle: {tmp_path / 'black.png'}", masks=True)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(VelodiffError, match="is not an image PIL can read"):
        parse_layout(f"red circle: {tmp_path / 'bad.png'}", masks=True)
    with pytest.raises(VelodiffError, match=r"layout 'red circle': mask '.*nomask.png' does not exist"):
        parse_layout(f"red circle: {tmp_path / 'nomask.png'}", masks=True)  # the file named, not the syntax
    with pytest.raises(VelodiffError, match="four numbers in"):
        parse_layout("red circle: 0.1,0.2,x,0.5", masks=True)
    kw = dict(seeds=[0], steps=3, guidance=2.5, output="latent")
    box = LayoutGuidance(boxes={"red circle": (0, 0, 0.5, 1)})
    by_box = text2img(model, "a red circle", plan=[box], **kw)
    by_mask = text2img(model, "a red circle", plan=[LayoutGuidance(boxes={"red circle": mask})], **kw)
    assert torch.equal(by_box.latents, by_mask.latents)
    # white in pixels but on no cell of the 16x16 latent: it would steer nothing, so it is one line
    dot = np.zeros((64, 64), dtype=np.float32)
    dot[10:12, 10:12] = 1
    from velodiff.edit.regional import RegionalPrompting

    for plan, what in [(LayoutGuidance(boxes={"red circle": dot}), "layout mask 'red circle'"),
                       (LayoutGuidance(boxes={"red circle": (0.1, 0.1, 0.12, 0.12)}), "layout box"),
                       (RegionalPrompting(regions={"a red circle": dot}), "regional mask")]:
        with pytest.raises(VelodiffError, match=f"{what}.* covers no cell of the 16x16 latent"):
            text2img(model, "a red circle", plan=[plan], **{**kw, "steps": 4})  # (3: layout guides none)


def test_layout_guidance_runs_on_images_of_any_aspect(model):
    """The attention maps of a wide latent are wide: a box's mask is laid on that grid (8 x 16 tokens for
    16 x 32 latents: the left half is the first 8 of each row), and layout guidance runs at 128 x 64."""
    from velodiff.edit.layout import box_mask
    from velodiff.pipelines import text2img

    left = box_mask((0.0, 0.0, 0.5, 1.0), 8 * 16, (16, 32))
    assert left.reshape(8, 16).tolist() == [[1.0] * 8 + [0.0] * 8] * 8
    plain = text2img(model, "a red circle to the left of a blue square", seeds=[0], steps=4, height=64,
                     width=128, output="latent")
    guided = text2img(model, "a red circle to the left of a blue square", seeds=[0], steps=4, height=64,
                      width=128, output="latent", plan="layout:steps=1")
    assert guided.latents.shape == (1, 4, 16, 32) and not torch.equal(guided.latents, plain.latents)


class Stepped(LayoutGuidance):
    """The rule, recording each guided step's move of every image, in units of that step's sigma_t."""

    def begin(self, run):
        super().begin(run)
        self.moves: list[list[float]] = []

    def after_step(self, info):
        out = super().after_step(info)
        if out is not None:
            sigma = float(self.run.schedule.sigma(info.t))
            rms = (out - info.x).pow(2).mean(dim=tuple(range(1, out.ndim))).sqrt() / sigma
            self.moves.append(rms.tolist())
        return out


def test_each_guided_step_moves_each_image_by_scale_sigma(model):
    """Eq. 4 with the normalized step: one iteration moves the sample by scale * sigma_t in RMS, at every
    guided step (its noise level, not a fixed size) and for every image of a batch on its own (its
    gradient's RMS, not the batch's)."""
    rule = Stepped(scale=0.05, iters=1, steps=1.0)
    text2img(model, "a red circle above a blue square", seeds=[0, 1], steps=4, guidance=2.5,
             output="latent", plan=[rule])
    assert len(rule.moves) == 3  # after steps 0, 1 and 2 of 4 (the last one ends at t = 0)
    for moves in rule.moves:
        assert moves == pytest.approx([0.05, 0.05], rel=1e-3), rule.moves


class Retained(LayoutGuidance):
    """The rule, recording what A-STAR's terms get at every (layer, image): the normalized maps and B_m."""

    def begin(self, run):
        super().begin(run)
        self.calls: list[tuple[list[torch.Tensor], list[torch.Tensor] | None]] = []

    def astar(self, maps, previous):
        self.calls.append(([m.detach().clone() for m in maps], previous))
        return super().astar(maps, previous)


def test_retention_keeps_the_previous_maps_binarized_at_half_their_maximum(model):
    """A-STAR's B_m (Eq. 3) at a guided step is object m's map of the previous guided step (same layer
    and image) binarized at half its maximum: 1 where a_m >= 0.5, else 0."""
    rule = Retained(scale=0.5, iters=1, steps=1.0, retention=1)
    text2img(model, "a red cross and a white triangle", seeds=[0], steps=3, guidance=2.5, output="latent",
             plan=[rule])
    guided = 2  # after steps 0 and 1 of 3; one energy per guided step (iters=1), one image
    assert len(rule.calls) % guided == 0
    layers = len(rule.calls) // guided
    assert all(previous is None for _, previous in rule.calls[:layers])  # nothing to keep yet
    for (maps, _), (_, kept) in zip(rule.calls[:layers], rule.calls[layers:], strict=True):
        assert len(kept) == len(maps) == 2
        for a, b in zip(maps, kept, strict=True):
            assert torch.equal(b, (a >= 0.5).to(a)) and 0 < float(b.sum()) < b.numel()
