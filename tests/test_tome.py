"""Token merging (``tome``, Bolya & Hoffman 2023) on the UNet's self-attention: bit for bit the peer
``tomesd`` on the same weights (first destination per window), no merging is the plain run, the
processors and hooks are restored after a run, random destinations are a pure function of the seed,
and settings that merge nothing or models without self-attention are one line."""

from __future__ import annotations

import pytest
import torch

import velodiff
from velodiff.accel.tome import bipartite_soft_matching_2d
from velodiff.pipelines import text2img

torch.set_num_threads(1)
TEXTS = ["a red circle", "two green crosses"]
KW = dict(steps=4, seeds=[0, 1], output="latent")


@pytest.fixture(scope="module")
def model():
    return velodiff.load("default")


@pytest.mark.parametrize(("ratio", "max_downsample"), [(0.5, 8), (0.3, 2)])
def test_equals_tomesd_on_the_same_unet(ratio, max_downsample):
    tomesd = pytest.importorskip("tomesd")
    model = velodiff.load("default")  # fresh: tomesd's class swap must come before any diffusers hook
    unet = model.components["unet"]
    tomesd.apply_patch(unet, ratio=ratio, max_downsample=max_downsample, use_rand=False)
    try:
        peer = text2img(model, TEXTS, **KW).latents
    finally:
        tomesd.remove_patch(unet)
    plain = text2img(model, TEXTS, **KW).latents
    ours = text2img(
        model, TEXTS, plan=f"tome:ratio={ratio},max_downsample={max_downsample},use_rand=false", **KW
    )
    assert (peer - plain).abs().max() > 1e-2  # the peer merged something
    torch.testing.assert_close(ours.latents, peer, rtol=0, atol=1e-6)


def test_an_image_merges_alike_alone_and_in_a_batch(model):
    """The random destinations are one draw per call for the whole batch: an image without CFG is the
    same alone (an odd batch) and beside another (tomesd takes the first destinations for odd batches
    only, so a server batching two such jobs changed both images, by up to 18 levels of 255)."""
    kw = dict(steps=4, output="latent", guidance=1.0, plan="tome:ratio=0.5,max_downsample=8,use_rand=true")
    alone = text2img(model, TEXTS[:1], seeds=[0], **kw).latents
    pair = text2img(model, TEXTS[:2], seeds=[0, 1], **kw).latents
    torch.testing.assert_close(pair[:1], alone, rtol=0, atol=1e-5)
    first = text2img(model, TEXTS[:1], seeds=[0], **{**kw, "plan": kw["plan"].replace("true", "false")})
    assert (first.latents - alone).abs().max() > 1e-3  # the destinations were drawn, not the first


def test_no_merging_is_the_plain_run_and_nothing_outlives_a_run(model):
    unet = model.components["unet"]
    before = {n: type(m.attn1.processor) for n, m in unet.named_modules() if hasattr(m, "attn1")}
    plain = text2img(model, TEXTS, **KW).latents
    assert torch.equal(text2img(model, TEXTS, plan="tome:ratio=0,max_downsample=8", **KW).latents, plain)
    merged = text2img(model, TEXTS, plan="tome:max_downsample=8", **KW).latents
    assert not torch.equal(merged, plain)
    again = text2img(model, TEXTS, plan="tome:max_downsample=8", **KW).latents
    assert torch.equal(merged, again)  # the random destinations restart from the seed every run
    other = text2img(model, TEXTS, plan="tome:max_downsample=8,seed=1", **KW).latents
    assert not torch.equal(merged, other)
    after = {n: type(m.attn1.processor) for n, m in unet.named_modules() if hasattr(m, "attn1")}
    assert after == before
    assert torch.equal(text2img(model, TEXTS, **KW).latents, plain)


def test_merge_keeps_every_destination_and_unmerge_restores_the_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8 * 6, 5, generator=g)
    merge, unmerge = bipartite_soft_matching_2d(x, 8, 6, 2, 2, 10, torch.Generator().manual_seed(3))
    y = merge(x)
    assert y.shape == (2, 48 - 10, 5)
    back = unmerge(y)
    assert back.shape == x.shape
    # every token is either itself (kept or a destination that received nothing) or a merged average
    same = (back - x).abs().amax(-1) < 1e-6
    assert 48 - 2 * 10 <= int(same[0].sum()) < 48
    m0, u0 = bipartite_soft_matching_2d(x, 8, 6, 2, 2, 0, None)
    assert torch.equal(u0(m0(x)), x)


def test_bad_settings_are_one_line(model, tmp_path):
    with pytest.raises(velodiff.VelodiffError, match="merges nothing on this UNet.*max_downsample=2"):
        text2img(model, TEXTS, plan="tome", **KW)  # tomesd's default: full resolution, none here
    with pytest.raises(velodiff.VelodiffError, match="'max_downsample' is 1, 2, 4 or 8, got 3"):
        text2img(model, TEXTS, plan="tome:max_downsample=3", **KW)
    with pytest.raises(velodiff.VelodiffError, match=r"ratio=0.01 of the 64 tokens .* use ratio >= 0.0156"):
        text2img(model, TEXTS, plan="tome:max_downsample=8,ratio=0.01", **KW)  # merges no token at 8x8
    with pytest.raises(velodiff.VelodiffError, match="seed is read only with use_rand=true"):
        text2img(model, TEXTS, plan="tome:max_downsample=2,use_rand=false,seed=7", **KW)
    from velodiff.plan import Plan

    with pytest.raises(velodiff.VelodiffError, match="'p2p' and 'tome' are both attention processors"):
        Plan.parse("p2p+tome:max_downsample=2")  # tome reorders tokens: copied self-attention would not align
    from velodiff.models.tiny import save_tiny

    dit = velodiff.load(save_tiny("pixart-sigma", tmp_path / "pixart"))
    with pytest.raises(velodiff.VelodiffError, match="is for UNets"):
        text2img(dit, "a cat", steps=2, height=64, width=64, plan="tome")
