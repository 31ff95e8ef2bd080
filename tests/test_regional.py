"""Regional prompting: a region covering the image with no base share samples its own prompt exactly
(both fusions), images without a relation are left alone, the region prompts move the objects into
their halves, and bad regions are refused in one line."""

import pytest
import torch

import velodiff
from velodiff import VelodiffError
from velodiff.edit.layout import spatial_parts
from velodiff.edit.regional import RegionalPrompting, finest_layers, parse_regions, region_mask
from velodiff.pipelines import text2img


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def test_regions_parse_and_masks():
    assert spatial_parts("A red circle to the right of a blue square.") == [
        ("a red circle", (0.5, 0.0, 1.0, 1.0)),
        ("a blue square", (0.0, 0.0, 0.5, 1.0)),
    ]
    assert spatial_parts("two green crosses") == []
    assert parse_regions("a red circle: 0,0,0.5,1; a blue square: 0.5,0,1,1") == {
        "a red circle": (0.0, 0.0, 0.5, 1.0),
        "a blue square": (0.5, 0.0, 1.0, 1.0),
    }
    m = region_mask((0.0, 0.0, 0.5, 1.0), 4, 6)
    assert m.shape == (4, 6) and m[:, :3].eq(1).all() and m[:, 3:].eq(0).all()
    for bad, match in [
        ("a red circle 0,0,1,1", "write 'prompt: x0,y0,x1,y1'"),
        ("a red circle: 0,0,1.5,1", "must satisfy"),
        (": 0,0,1,1", "write 'prompt"),
        (" ; ", "no region given"),
        ("a red circle: 0,0,0.5,1; a red circle: 0.5,0,1,1", "given twice"),
    ]:
        with pytest.raises(VelodiffError, match=match):
            parse_regions(bad)
    with pytest.raises(VelodiffError, match="must satisfy"):
        RegionalPrompting(regions={"a red circle": (0.5, 0, 0.2, 1)})


def test_finest_layers(model):
    names = finest_layers(model.network)
    assert names and all(n.startswith(("down_blocks.1.", "up_blocks.1.")) for n in names)


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_whole_image_region_samples_its_prompt(model, mode):
    """With one region over the whole image and no base share, every fused quantity is the region
    prompt's: the run equals a plain run of that prompt (attention: in every cross-attention layer)."""
    kw = dict(seeds=[3], steps=6, guidance=2.5, output="latent")
    want = text2img(model, "a blue square", **kw).latents
    rule = RegionalPrompting(
        regions={"a blue square": (0, 0, 1, 1)}, mode=mode, base_ratio=0.0, layers=("attn2",)
    )
    got = text2img(model, "a red circle", plan=[rule], **kw).latents
    other = text2img(model, "a red circle", **kw).latents
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (other - want).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_no_relation_left_alone(model, mode):
    prompts = ["a red circle above a blue square", "two green crosses"]
    kw = dict(seeds=[0, 1], steps=4, guidance=2.5, output="latent")
    plain = text2img(model, prompts, **kw).latents
    ruled = text2img(model, prompts, plan=f"regional:mode={mode}", **kw).latents
    # (latent mode batches the region branch with the image's other rows: the same up to round-off)
    assert torch.allclose(ruled[1], plain[1], atol=1e-5)
    assert mode == "latent" or torch.equal(ruled[1], plain[1])
    assert (ruled[0] - plain[0]).abs().max() > 0.05
    one = dict(seeds=[0], steps=4, output="latent")
    single = text2img(model, "two green crosses", plan="regional", **one).latents
    assert torch.equal(single, text2img(model, "two green crosses", **one).latents)


def test_regions_move_the_objects(model):
    """The objects land in their halves where the plain run misplaces them (prompts and seeds of the
    position category, ShapesEval's detector)."""
    from velodiff.eval.shapes_eval import evaluate, load_prompts

    prompts = [p for p in load_prompts("v1") if p.category == "position"][:8]
    texts = [p.text for p in prompts]
    scores = {}
    for plan in ("none", "regional"):
        images = text2img(model, texts, seeds=1000, steps=20, guidance=2.5, plan=plan).images
        scores[plan] = evaluate(list(images), prompts, keep_detections=False)["by_category"]["position"]
    assert scores["regional"] >= scores["none"] + 0.25, scores


def test_the_attention_map_instrument_observes_regional_without_changing_it(model):
    """attention_maps wraps regional's cross-attention processors: the sample is regional's own and the
    maps are captured (the instrument used to compute the layers itself and switch regional off)."""
    from velodiff.accel.attention import AttentionMaps
    from velodiff.plan import Plan

    kw = dict(steps=4, seeds=[0], output="latent")
    prompt = "a red circle above a blue square"
    plain, regional = (text2img(model, prompt, plan=p, **kw).latents for p in (None, "regional"))
    maps = AttentionMaps()
    observed = text2img(model, prompt, plan=[maps, "regional"], **kw).latents
    assert (observed - regional).abs().max() < 1e-4 < (regional - plain).abs().max()
    assert len(maps.maps) == 4
    for other in ("p2p", "layout"):  # each computes its cross-attention itself: one line, not a silent loss
        with pytest.raises(VelodiffError, match="both cross-attention processors"):
            Plan.parse(f"{other}+regional")
    Plan.parse("p2p+regional:mode=latent")  # the latent fusion uses no attention processor


def test_refusals(model):
    from velodiff.sampling import sample

    with pytest.raises(VelodiffError, match="needs a pipeline run"):
        sample(model.denoiser, torch.randn(1, 4, 16, 16), torch.linspace(1, 0, 3).double(), "ddim",
               cond=None, plan="regional")
    with pytest.raises(VelodiffError, match="no matching cross-attention layers"):
        text2img(model, "a red circle above a blue square", steps=2, plan="regional:layers=nothing_here")
    with pytest.raises(VelodiffError, match="has no option"):
        text2img(model, "a red circle", steps=2, plan="regional:weight=2")


def test_generate_regions_option(tmp_path, capsys):
    from test_invert import cli

    out = tmp_path / "r.png"
    prompt = "a red circle and a blue square"
    regions = "a red circle: 0,0,0.5,1; a blue square: 0.5,0,1,1"
    assert cli("generate", prompt, "-o", str(out), "--steps", "3", "--regions", regions) == 0
    assert "plan cfg+regional)" in capsys.readouterr().out
    args = ("generate", prompt, "-o", str(out), "--steps", "3", "--regions", regions)
    assert cli(*args, "--plan", "regional:base_ratio=0.2,mode=latent") == 0
    assert "plan cfg+regional:base_ratio=0.2,mode=latent)" in capsys.readouterr().out
    assert cli("generate", prompt, "-o", str(out), "--regions", "a red circle: 0,0,2,1") == 2
    err = capsys.readouterr().err.strip()
    assert "must satisfy" in err and "\n" not in err


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_sdxl_runs_both_fusions(tmp_path, mode):
    """SDXL: two text encoders, pooled embeddings and micro-conditioning; the regions' cross-attention
    contexts (or branches) come from the same encoder the pipeline uses."""
    import sd_tiny

    model = velodiff.load(sd_tiny.save_sd(tmp_path / "xl", "sdxl"))
    kw = dict(seeds=[0], steps=3, guidance=2.0, output="latent", height=64, width=64)
    plain = text2img(model, "a red circle above a blue square", **kw).latents
    ruled = text2img(model, "a red circle above a blue square", plan=f"regional:mode={mode}", **kw).latents
    assert torch.isfinite(ruled).all() and not torch.equal(plain, ruled)


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_a_mask_region_is_its_box(model, mode, tmp_path):
    """A region given as a mask image (white = the region) runs exactly as the box it draws."""
    import numpy as np
    from PIL import Image

    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(tmp_path / "left.png")
    (prompt, mask), = parse_regions(f"a blue square: {tmp_path / 'left.png'}").items()
    kw = dict(seeds=[3], steps=4, guidance=2.5, output="latent")
    runs = [text2img(model, "a red circle", plan=[RegionalPrompting(regions={prompt: r}, mode=mode)], **kw)
            for r in (mask, (0.0, 0.0, 0.5, 1.0))]
    assert torch.equal(runs[0].latents, runs[1].latents)


def test_latent_fusion_without_cfg_is_not_scaled(model):
    """Latent mode adds the regions' fused prediction at the guidance scale where CFG runs; at guidance 1
    (no unconditional pass) it is the fused prediction itself, whatever scale= says."""
    from velodiff.pipelines import text2img

    kw = dict(seeds=[0], steps=4, guidance=1.0, output="latent")
    prompt = "a red circle above a blue square"
    one, three = (text2img(model, prompt, plan=f"regional:mode=latent,scale={s}", **kw) for s in (1, 3))
    assert torch.equal(one.latents, three.latents)


def test_a_mask_cell_is_in_the_region_when_at_least_half_of_it_is():
    from velodiff.edit.layout import region_mask

    mask = torch.zeros(4, 4)
    mask[0, :2] = 1.0  # the top-left 2x2 cell: half covered
    mask[2, 2] = 1.0  # the bottom-right cell: a quarter
    assert region_mask(mask, 2, 2).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_overlapping_regions_are_normalised_by_their_total_weight(model):
    """Attention mode divides the fused output by W_bg + sum_i W_i: two regions over the whole image with
    the same prompt (the CLIP tokenizer lower-cases, so both encode alike) and no base share, i.e. weights
    summing to 2 everywhere, sample that prompt exactly, as one such region does."""
    kw = dict(seeds=[3], steps=4, guidance=2.5, output="latent")
    want = text2img(model, "a blue square", **kw).latents
    regions = {"a blue square": (0, 0, 1, 1), "A blue square": (0, 0, 1, 1)}
    rule = RegionalPrompting(regions=regions, base_ratio=0.0, layers=("attn2",))
    got = text2img(model, "a red circle", plan=[rule], **kw).latents
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def trajectory(model, plan, **kw):
    """The sample after every step of a run of the position prompt."""
    xs = []
    text2img(model, "a red circle above a blue square", seeds=[0], guidance=2.5, output="latent", plan=plan,
             callback=lambda info: xs.append(info.x.clone()), **kw)
    return xs


def test_the_fusion_stops_after_its_share_of_the_steps(model):
    """stop=s fuses the regions in the first int(s N) steps only: with stop=0 the run is the plain one,
    and with stop=0.5 of 4 steps the first two steps are the full rule's and the third is not."""
    plain, full, none, half = (trajectory(model, p, steps=4)
                               for p in (None, "regional", "regional:stop=0", "regional:stop=0.5"))
    assert all(torch.equal(a, b) for a, b in zip(none, plain, strict=True))
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])
    assert (half[2] - full[2]).abs().max() > 0.1


def test_latent_fusion_uses_its_own_scale_under_cfg(model):
    """Latent mode's fusion is added at scale= where CFG runs, the run's guidance only by default: scale=0
    leaves the plain guided run (up to batching round-off), scale equal to the guidance is the default."""
    kw = dict(seeds=[0], steps=4, guidance=2.5, output="latent")
    prompt = "a red circle above a blue square"
    plain, off, default, same = (text2img(model, prompt, plan=p, **kw).latents for p in (
        None, "regional:mode=latent,scale=0", "regional:mode=latent", "regional:mode=latent,scale=2.5"))
    assert torch.allclose(off, plain, atol=1e-5), (off - plain).abs().max()
    assert torch.equal(default, same) and (default - plain).abs().max() > 0.1


def test_bootstrapping_runs_in_its_share_of_the_steps(model):
    """Latent mode's bootstrapping (MultiDiffusion Sec. 4.2) changes the run when it covers a step:
    bootstrap=0.5 of 4 steps (steps 0 and 1) differs from bootstrap=0 from the first step on, while
    bootstrap=0.2 of 4 steps covers none (int(0.8) = 0) and is the run without it."""
    without, none, half = (trajectory(model, f"regional:mode=latent,bootstrap={b}", steps=4)
                           for b in (0, 0.2, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(none, without, strict=True))
    assert (half[0] - without[0]).abs().max() > 0.01
