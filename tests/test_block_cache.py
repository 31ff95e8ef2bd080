"""First-Block Cache on the diffusion transformers (velodiff.accel.block_cache, diffusers' hooks): no
reuse is the plain run bit for bit, reuse costs less and is reported approximate, the hooks are gone after
the run, batch compositions that change mid-run (AG) keep their own state, and models it cannot serve
are one line."""

from __future__ import annotations

import pytest
import torch

from velodiff.errors import VelodiffError
from velodiff.models import load
from velodiff.models.tiny import save_tiny
from velodiff.pipelines import text2img

SIZE = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    out = {}
    for kind in ("flux-schnell", "pixart-sigma", "sd3"):
        m = load(save_tiny(kind, root / kind))
        m.max_sequence_length = 32
        out[kind] = m
    return out


def run(model, plan=None, **kw):
    return text2img(model, "a cat", steps=6, guidance=3.0, seeds=[1], output="latent", plan=plan, **SIZE,
                    **kw)


def hook_names(network):
    names = set()
    for m in network.modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None:
            names |= set(reg.hooks)
    return names


@pytest.mark.parametrize("kind", ["flux-schnell", "pixart-sigma"])
def test_fbcache_reuses_and_cleans_up(models, kind):
    m = models[kind]
    plain = run(m)
    assert torch.equal(run(m, "fbcache:threshold=0").latents, plain.latents)  # never reuses
    reused = run(m, "fbcache:threshold=5")  # every evaluation after the first reuses the blocks
    assert not torch.equal(reused.latents, plain.latents)
    assert plain.evals == 12 and 2 < reused.evals < 12  # cached evaluations cost their FLOP share
    assert not {n for n in hook_names(m.components["transformer"]) if "fbc" in n or "probe" in n}
    assert torch.equal(run(m).latents, plain.latents)  # nothing left behind
    mixed = run(m, "ag:threshold=0.5+fbcache:threshold=5")  # CFG, then cond-only calls: own states
    assert torch.isfinite(mixed.latents).all() and mixed.evals < reused.evals


def test_fbcache_refusals(models):
    with pytest.raises(VelodiffError, match="returns no text stream") as e:
        run(models["sd3"], "fbcache")
    assert "\n" not in str(e.value)
    import velodiff
    from velodiff.default_model import default_model_path

    unet = velodiff.load(default_model_path())
    with pytest.raises(VelodiffError, match="use deepcache on a UNet"):
        text2img(unet, "a red circle", steps=2, plan="fbcache")


@pytest.mark.parametrize("kind", ["flux-schnell", "pixart-sigma", "sd3"])
def test_taylorseer_forecasts_between_full_evaluations_and_cleans_up(models, kind):
    m = models[kind]
    plain = run(m)
    assert torch.equal(run(m, "taylorseer:interval=1").latents, plain.latents)  # forecasts nothing
    fore = run(m, "taylorseer:interval=3,warmup=1")  # calls 0, 1, 4: full; 2, 3, 5: forecast
    assert not torch.equal(fore.latents, plain.latents) and torch.isfinite(fore.latents).all()
    assert plain.evals == 12 and 6 < fore.evals < 12  # 3 full calls x 2 rows, the rest at their FLOP share
    reuse = run(m, "taylorseer:interval=3,warmup=1,order=0")  # order 0: plain reuse of the outputs
    assert not torch.equal(reuse.latents, fore.latents)
    # the FLOP shares are counted once per shape for the process, not again in every run
    import torch.utils.flop_counter as counter

    counted = []
    real = counter.FlopCounterMode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(counter, "FlopCounterMode", lambda *a, **k: counted.append(1) or real(*a, **k))
        assert run(m, "taylorseer:interval=3,warmup=1").evals == fore.evals and not counted
    with pytest.raises(VelodiffError, match="warmup"):  # a forecast needs a full evaluation before it
        run(m, "taylorseer:warmup=0")
    assert "taylorseer_cache" not in hook_names(m.components["transformer"])
    assert torch.equal(run(m).latents, plain.latents)
    with pytest.raises(VelodiffError, match="a feature cache"):
        run(m, "taylorseer+fbcache")


def test_fbcache_reuse_interpolates_the_calibrated_thresholds_log_linearly():
    from velodiff.accel.calibration import fbcache_threshold

    art = {"fbcache": {"thresholds": [0.01, 0.02, 0.04], "reuse": [0.1, 0.3, 0.5]}}
    assert fbcache_threshold(art, 0.3) == pytest.approx(0.02)
    assert fbcache_threshold(art, 0.2) == pytest.approx((0.01 * 0.02) ** 0.5)
    assert fbcache_threshold(art, 0.4) == pytest.approx((0.02 * 0.04) ** 0.5)
    assert fbcache_threshold(art, 0.05) == pytest.approx(0.005)  # below the table: linear to 0
    assert fbcache_threshold(art, 0.9) == 0.04  # beyond it: the largest calibrated


def test_fbcache_reuse_takes_the_threshold_from_the_models_calibration(models, tmp_path, monkeypatch):
    from velodiff.accel.calibration import calibrate_cache, fbcache_threshold, save_cache_calibration

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    m = models["flux-schnell"]
    with pytest.raises(VelodiffError, match="velodiff calibrate cache"):
        run(m, "fbcache:reuse=0.5")  # no calibration yet: one line naming the command
    art = calibrate_cache(m, ["a cat", "a dog"], [1, 2], steps=4, guidance=3.0)
    table = art["fbcache"]
    assert len(table["reuse"]) == len(table["thresholds"]) and all(0 <= f <= 1 for f in table["reuse"])
    assert table["reuse"][-1] > table["reuse"][0]  # larger thresholds reuse more
    save_cache_calibration(art)
    assert fbcache_threshold(art, 0.0) == 0.0
    mid = 0.5 * (table["reuse"][0] + table["reuse"][-1])
    th = fbcache_threshold(art, mid)
    assert table["thresholds"][0] <= th <= table["thresholds"][-1]
    plain = run(m)
    assert torch.equal(run(m, "fbcache:reuse=0").latents, plain.latents)
    assert run(m, f"fbcache:reuse={table['reuse'][-1]:.6f}").evals < plain.evals
    with pytest.raises(VelodiffError, match="threshold or reuse"):
        run(m, "fbcache:reuse=0.5,threshold=0.1")
    saved = tmp_path / "calibration" / f"cache-{art['model_hash']}.json"
    with pytest.raises(VelodiffError, match="another model"):
        run(models["pixart-sigma"], f"fbcache:reuse=0.5,calibration={saved}")
    assert "fbcache" not in calibrate_cache(load("default"), ["a red circle"], [1], steps=3)  # a UNet
