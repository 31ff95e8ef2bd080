"""Layered region brushes: outside its mask a layer leaves the composite below exactly; an edit runs only the
last strength share of the steps; changing one layer re-renders it and the layers above only."""

import pytest
import torch
from PIL import Image

import velodiff
from velodiff import VelodiffError
from velodiff.edit.brushes import Canvas


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def latent_mask(mask):
    return torch.nn.functional.interpolate(mask[None, None], size=(16, 16), mode="area")[0, 0]


def test_layers_change_their_region_only_and_cost_a_fraction(model):
    from velodiff.pipelines import text2img

    c = Canvas(model, "a red circle above a blue square", seed=0, steps=10, guidance=2.5)
    base = c.render(output="latent")
    assert c.last_nfe == 10
    plain = text2img(
        model, "a red circle above a blue square", seeds=[0], steps=10, guidance=2.5, output="latent"
    )
    assert torch.equal(base.latents, plain.latents)  # the base is the ordinary generation
    low = torch.zeros(64, 64)
    low[32:] = 1
    left = torch.zeros(64, 64)
    left[:, :24] = 1
    c.add(low, "a green triangle", seed=1, strength=0.6)
    one = c.render(output="latent")
    assert c.last_nfe == 6  # only the last 60% of the steps
    lm = latent_mask(low)
    assert torch.equal(one.latents[..., lm == 0], base.latents[..., lm == 0])
    assert float((one.latents - base.latents)[..., lm == 1].abs().max()) > 0.1
    c.add(left, "a yellow cross", seed=2, strength=0.3)
    two = c.render(output="latent")
    assert c.last_nfe == 3  # layer 0 came from its cache
    lm2 = latent_mask(left)
    assert torch.equal(two.latents[..., lm2 == 0], one.latents[..., lm2 == 0])
    c.update(0, seed=5)
    five = c.render(output="latent")
    assert c.last_nfe == 6 + 3
    # the layer's own seed draws its noise: another seed, another object inside its mask only
    assert float((five.latents - two.latents)[..., lm == 1].abs().max()) > 0.1
    assert torch.equal(five.latents[..., (lm == 0) & (lm2 == 0)], two.latents[..., (lm == 0) & (lm2 == 0)])
    c.move(1, 0)
    c.render(output="latent")
    assert c.last_nfe == 3 + 6 and [layer.prompt for layer in c.layers] == [
        "a yellow cross",
        "a green triangle",
    ]


def test_bad_layers_are_one_line(model):
    c = Canvas(model, "a red circle", steps=4)
    for kw, match in [
        (dict(mask=torch.zeros(64, 64)), "covers nothing"),
        (dict(mask=torch.ones(30, 30)), "give it at the image's size"),
        (dict(mask=torch.ones(64, 64), strength=0), "strength must be in"),
        (dict(mask=torch.ones(64, 64), prompt=" "), "prompt is empty"),
        (dict(mask=torch.ones(64, 64), strength=0.2), "strength 0.2 of 4 steps runs no step"),  # as img2img
    ]:
        with pytest.raises(VelodiffError, match=match) as e:
            c.layers.clear()
            del c._cache[1:]
            c.add(**{"prompt": "a blue square", **kw})
            c.render(output="latent")
        assert "\n" not in str(e.value)
    with pytest.raises(VelodiffError, match="no layer 3"):
        c.remove(3)


def test_cli_brush(tmp_path, capsys):
    from test_invert import cli

    out = tmp_path / "b.png"
    layer = "box=0,0.5,1,1;a blue square above a green triangle;1;0.5"
    assert (
        cli("brush", "a red circle above a blue square", "--layer", layer, "-o", str(out), "--steps", "4")
        == 0
    )
    assert out.is_file() and "layers: 2 NFE" in capsys.readouterr().out
    negated = tmp_path / "n.png"  # the negative prompt reaches the base and every layer
    assert cli("brush", "a red circle above a blue square", "--layer", layer, "-o", str(negated),
               "--steps", "4", "--negative", "a red circle") == 0
    assert negated.read_bytes() != out.read_bytes()
    mask = tmp_path / "mask.png"  # an output that is an input mask (or the other output) is refused
    Image.new("L", (64, 64), 255).save(mask)
    before = mask.read_bytes()
    for extra, match in [(["-o", str(mask)], "--out and --layer 1's mask are the same file"),
                         (["-o", str(out), "--sheet", str(out)], "--out and --sheet are the same file")]:
        assert cli("brush", "a red circle", "--layer", f"{mask};a;1;0.5", *extra) == 2
        assert match in capsys.readouterr().err
    assert mask.read_bytes() == before
    for bad, match in [
        ("box=0,0.5,1.2,1;a;1;0.5", "must satisfy 0 <= x0 < x1 <= 1"),
        ("a;b", "4 fields"),
        ("box=0,0,1,1;a;x;0.5", "SEED must be an integer"),
    ]:
        assert cli("brush", "a red circle", "--layer", bad, "-o", str(out)) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err


def test_moved_and_removed_layers_render_the_new_stack(model):
    """After move() or remove() the render is what a fresh canvas with the resulting layer order gives:
    no composite cached for the old order (moving the bottom layer up), nor one that still holds a removed
    layer, is reused; what no layer changed stays cached (remove costs nothing to re-render)."""
    low, left = torch.zeros(64, 64), torch.zeros(64, 64)
    low[32:] = 1
    left[:, :24] = 1
    steps = 4
    triangle = (low, "a green triangle", 1, 0.5)  # runs 2 of the 4 steps
    cross = (left, "a yellow cross", 2, 0.75)  # runs 3

    def canvas(*layers):
        c = Canvas(model, "a red circle above a blue square", seed=0, steps=steps, guidance=2.5)
        for layer in layers:
            c.add(*layer)
        return c

    def latents(c):
        return c.render(output="latent").latents

    c = canvas(triangle, cross)
    latents(c)
    c.move(0, 1)  # the bottom layer to the top: both layers re-render
    assert [layer.prompt for layer in c.layers] == ["a yellow cross", "a green triangle"]
    moved, nfe = latents(c), c.last_nfe
    assert torch.equal(moved, latents(canvas(cross, triangle))) and nfe == 3 + 2
    c.remove(1)
    assert torch.equal(latents(c), latents(canvas(cross))) and c.last_nfe == 0
    c.remove(0)
    assert torch.equal(latents(c), latents(canvas())) and c.last_nfe == 0


def test_bad_canvases_are_one_line(model):
    """The base is one image of the canvas's own seed: per-run keywords (seeds, latents, callback, output)
    are refused in one line, not silently ignored; so is a stochastic solver, which brushes do not run
    (they need a deterministic one)."""
    for key, value in [("seeds", [5]), ("latents", torch.zeros(1, 4, 16, 16)), ("callback", print),
                       ("output", "latent")]:
        with pytest.raises(VelodiffError, match=f"Canvas takes no '{key}'; the base is one image of seed 0"):
            Canvas(model, "a red circle", **{key: value})
    for solver, options in (("euler_ancestral", {}), ("ddim", {"eta": 1.0})):  # stochastic by its options too
        c = Canvas(model, "a red circle", steps=4, solver=solver, solver_options=options)
        with pytest.raises(VelodiffError, match=f"need a deterministic solver; '{solver}' draws step noise"):
            c.render(output="latent")


def test_a_refused_change_leaves_the_canvas_as_it_was(model):
    """Layers are checked whole when added or changed, and moves check both places first: a bad mask, seed
    or field, or a move to no layer, is one line and the stack, its masks and its render stay (a refused
    move had dropped the layer; a refused mask had replaced the good one, every later render failing)."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    c = Canvas(model, "a red circle above a blue square", steps=4)
    c.add(mask, "a green triangle", seed=1)
    c.add(mask, "a yellow cross", seed=2)
    first = c.render(output="latent").latents
    layers = [dict(vars(layer)) for layer in c.layers]
    for call, message in [
        (lambda: c.move(0, 5), "no layer 5; the canvas has 2 layers"),
        (lambda: c.update(0, mask=None), "the mask must be a PIL image"),
        (lambda: c.update(0, mask=Image.new("L", (64, 64), 0)), "a layer's mask covers nothing"),
        (lambda: c.update(1, mask=mask.resize((32, 32))), "a layer's mask is 32x32"),
        (lambda: c.update(0, seed="x"), "a seed is an integer, got 'x'"),
        (lambda: c.update(0, colour="red"), "a layer has no 'colour'"),
        (lambda: c.add(Image.new("L", (64, 64), 0), "a red circle"), "a layer's mask covers nothing"),
    ]:
        with pytest.raises(VelodiffError, match=message):
            call()
        assert [dict(vars(layer)) for layer in c.layers] == layers
    again = c.render(output="latent")
    assert again.nfe == 0 and torch.equal(again.latents, first)
    for prompt, seed, message in (("", 0, "the canvas's prompt is a non-empty string"),
                                  ("a red circle", 1.5, "a seed is an integer")):
        with pytest.raises(VelodiffError, match=message):
            Canvas(model, prompt, seed=seed)
    with pytest.raises(VelodiffError, match="the model must be a loaded model, got str"):
        Canvas("default", "a red circle")


def test_cli_brush_is_the_canvas_of_the_api(model, tmp_path, capsys):
    """brush --seed 2 with a layer of seed 7: --out is the API's canvas after the layer (base seed 2, the
    layer at its own seed 7 and strength), --sheet the base and that composite side by side."""
    import numpy as np

    from test_invert import cli
    from velodiff.edit.layout import region_mask
    from velodiff.images import image_grid

    out, sheet = tmp_path / "b.png", tmp_path / "sheet.png"
    prompt, box = "a red circle above a blue square", (0.0, 0.5, 1.0, 1.0)
    assert cli("brush", prompt, "--layer", "box=0,0.5,1,1;a green triangle;7;0.5", "--seed", "2", "--steps",
               "4", "--threads", "1", "-o", str(out), "--sheet", str(sheet)) == 0
    canvas = Canvas(model, prompt, seed=2, steps=4)
    images = [canvas.render().images[0]]
    canvas.add(region_mask(box, 64, 64), "a green triangle", seed=7, strength=0.5)
    images.append(canvas.render().images[0])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(images[-1]))  # the picture
    assert np.array_equal(np.asarray(Image.open(sheet).convert("RGB")), np.asarray(image_grid(images)))
