"""First-Block Cache on the diffusion transformers (velodiff.accel.block_cache, diffusers' hooks): no
reuse is the plain run bit for bit, reuse costs less and is reported approximate, the hooks are gone after
the run, batch compositions that change mid-run (AG) keep their own state, and models it cannot serve
are one line."""

from __future__ import annotations

import pytest
import torch

from conftest import spy_rule
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
    with pytest.raises(VelodiffError, match="needs a first block and at least one more") as e:
        run(models["sd3"], "fbcache:threshold=0.1")  # (two blocks, the last returning no text stream)
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


def test_fbcache_puts_diffusers_own_hooks_where_apply_first_block_cache_does(models):
    """On Flux and PixArt the rule's hooks are those diffusers' apply_first_block_cache registers, block for
    block (the head's on the first, with its threshold; the tail's on the last)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    from velodiff.accel.block_cache import FirstBlockCache, transformer_blocks
    from velodiff.plan import RunInfo

    def hooks(network):
        out = []
        for block in transformer_blocks(network):
            reg = block._diffusers_hook
            h = reg.get_hook("fbc_leader_block_hook") or reg.get_hook("fbc_block_hook")
            out.append((type(h).__name__, getattr(h, "threshold", None), getattr(h, "is_tail", None)))
            for name in ("fbc_leader_block_hook", "fbc_block_hook"):
                reg.remove_hook(name)
        return out

    for kind in ("flux-schnell", "pixart-sigma"):
        net = models[kind].network
        apply_first_block_cache(net, FirstBlockCacheConfig(threshold=0.07))
        want = hooks(net)
        rule = FirstBlockCache(threshold=0.07)
        rule.check(RunInfo(None, None, None, 1, {}, model=models[kind], network=net))
        rule.apply(net)
        assert hooks(net) == want and want[0] == ("FBCHeadBlockHook", 0.07, None), kind
        assert want[-1][2] is True and sum(w[2] is True for w in want) == 1, kind


def test_fbcache_on_sd3_skips_the_middle_blocks_and_runs_the_last(tmp_path):
    """SD3's last block returns no text stream: it runs on every call, the blocks between the first and it
    are skipped on a cached call (threshold 0: the plain run bit for bit)."""
    import json

    from diffusers import SD3Transformer2DModel

    folder = save_tiny("sd3", tmp_path / "sd3")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    net = SD3Transformer2DModel.from_config({**config, "num_layers": 4})
    net.save_pretrained(folder / "transformer", safe_serialization=True)
    m = load(folder)
    m.max_sequence_length = 32
    calls = []
    handles = [b.attn.register_forward_hook(lambda mod, i, o, k=k: calls.append(k))  # (what a block computes)
               for k, b in enumerate(m.network.transformer_blocks)]
    try:
        plain = run(m)
        n = len(calls)
        assert torch.equal(run(m, "fbcache:threshold=0").latents, plain.latents)
        calls.clear()
        reused = run(m, "fbcache:threshold=5")
    finally:
        for h in handles:
            h.remove()
    assert reused.evals < plain.evals and not torch.equal(reused.latents, plain.latents)
    assert calls.count(3) == n // 4 and calls.count(0) == n // 4  # first and last: every call
    assert calls.count(1) == calls.count(2) < n // 4  # the middle: full calls only
    from velodiff.accel.block_cache import FirstBlockCache
    from velodiff.plan import RunInfo

    rule = FirstBlockCache(threshold=5.0)
    rule.check(RunInfo(None, None, None, 1, {}, model=m, network=m.network))
    rule.apply(m.network)  # the tail's hook on the last block that returns both streams
    regs = [getattr(b, "_diffusers_hook", None) for b in m.network.transformer_blocks]
    tails = [getattr(r.get_hook("fbc_block_hook"), "is_tail", None) if r else None for r in regs]
    assert tails == [None, False, True, None]


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


def test_a_cached_call_costs_the_flops_of_the_blocks_it_still_runs(models):
    """fbcache's cached call still runs the first block; TaylorSeer's forecasts every block: fbcache's
    FLOP share is the larger of the two, both below a full call's, and a run costs its full calls plus its
    cached calls at that share."""
    from velodiff.accel import block_cache
    from velodiff.accel.block_cache import FirstBlockCache, TaylorSeer

    m = models["flux-schnell"]
    block_cache._SHARES.pop(m.components["transformer"], None)  # only this test's batch composition
    fb, ts = FirstBlockCache(threshold=5.0), TaylorSeer(interval=3, warmup=1)
    fb_run, ts_run = run(m, [fb]), run(m, [ts])
    (fb_share,) = [v for k, v in fb.shares.items() if k[0] == "fbcache"]
    (ts_share,) = [v for k, v in ts.shares.items() if k[0] == "taylorseer"]
    assert 0 < ts_share < fb_share < 1
    assert fb.cached_evals == 5 and fb_run.evals == pytest.approx(2 * 1 + 2 * 5 * fb_share)
    assert ts_run.evals == pytest.approx(2 * (6 - ts.cached_evals) + 2 * ts.cached_evals * ts_share)


def test_a_rule_counts_the_cached_evaluations_of_each_run_anew(models):
    """The same rule object run twice reports each run's own cached evaluations (as calibration reads
    them per threshold), not a running total."""
    from velodiff.accel.block_cache import FirstBlockCache

    rule = FirstBlockCache(threshold=5.0)
    run(models["pixart-sigma"], [rule])
    first = rule.cached_evals
    run(models["pixart-sigma"], [rule])
    assert first == rule.cached_evals == 5


def test_a_calibration_file_without_reuse_is_refused(models):
    with pytest.raises(VelodiffError) as e:
        run(models["flux-schnell"], "fbcache:threshold=0.1,calibration=x.json")
    assert str(e.value).startswith("plan rule 'fbcache': calibration is read only with reuse=F")


def test_each_per_image_batch_composition_starts_its_own_cache(models):
    """Adaptive guidance drops one image's unconditional row (steps 1-2 here, then every unconditional
    row): each composition's first call is a full evaluation, never a reuse of a call with other rows."""

    spy = spy_rule(lambda req, r: (req.step, {b: v.tolist() for b, v in req.subsets.items()}, r.exact),
                       layer=5)  # between AG (a combiner) and the cache
    m = models["flux-schnell"]
    res = text2img(m, ["a cat", "a red dog"], steps=6, guidance=3.0, seeds=[1, 2], output="latent",
                   plan=["ag:threshold=0.999", "fbcache:threshold=5", spy], **SIZE)
    assert torch.isfinite(res.latents).all()
    first = {}
    for step, subsets, exact in spy.log:
        first.setdefault(str(subsets) + str(step >= 3), (step, exact))
    assert [s for s, _ in first.values()] == [0, 1, 3]  # composition changes at steps 1 and 3
    assert all(exact for _, exact in first.values())


def test_the_flop_share_is_measured_per_latent_size(models):
    """A cached call's share is measured for each input shape: what a run at one size reports does not
    depend on a run at another size before it."""
    from velodiff.accel import block_cache

    m = models["pixart-sigma"]
    net = m.components["transformer"]
    run(m, "fbcache:threshold=5")  # 64x64 first
    big = {"height": 128, "width": 128}
    kw = dict(steps=6, guidance=3.0, seeds=[1], output="latent", plan="fbcache:threshold=5", **big)
    after = text2img(m, "a cat", **kw)
    block_cache._SHARES.pop(net, None)
    alone = text2img(m, "a cat", **kw)
    assert after.evals == alone.evals


def test_reuse_reads_a_calibration_whose_reuse_dips_as_its_running_maximum():
    """A measured reuse fraction can dip at a larger threshold (noise): the map takes the running maximum,
    so a larger reuse never maps to a smaller threshold."""
    import numpy as np

    from velodiff.accel.calibration import fbcache_threshold

    art = {"fbcache": {"thresholds": [0.01, 0.02, 0.04, 0.08], "reuse": [0.1, 0.4, 0.3, 0.6]}}
    assert fbcache_threshold(art, 0.5) == pytest.approx((0.04 * 0.08) ** 0.5)  # between 0.4 and 0.6
    ths = [fbcache_threshold(art, float(r)) for r in np.linspace(0.0, 0.7, 36)]
    assert ths == sorted(ths)


def test_the_fbcache_table_records_each_thresholds_reuse_and_rms_distance_to_the_plain_run(models):
    from velodiff.accel.block_cache import FirstBlockCache
    from velodiff.accel.calibration import fbcache_table

    m = models["pixart-sigma"]
    table = fbcache_table(m, ["a cat"], [1], guidance=3.0, thresholds=(5.0,))
    kw = dict(steps=int(m.default_steps), guidance=3.0, seeds=[1], output="latent")
    plain = text2img(m, ["a cat"], **kw).latents
    rule = FirstBlockCache(threshold=5.0)
    cached = text2img(m, ["a cat"], plan=[rule], **kw)
    assert table["steps"] == m.default_steps and rule.cached_evals > 0
    assert table["rms_to_plain"] == pytest.approx([float((cached.latents - plain).pow(2).mean().sqrt())])
    assert table["reuse"] == pytest.approx([rule.cached_evals / cached.nfe])


def test_review36_plain_fbcache_runs_the_calibrated_threshold_of_the_default_reuse(models, monkeypatch):
    """review36: fbcache without threshold=T or reuse=F runs at the threshold its model's calibration maps
    DEFAULT_REUSE (0.3) to; reuse=F maps F; threshold=T is T as given (no calibration read)."""
    from velodiff.accel import calibration
    from velodiff.accel.block_cache import DEFAULT_REUSE, FirstBlockCache

    art = {"fbcache": {"thresholds": [0.01, 0.02, 0.04], "reuse": [0.1, 0.3, 0.5]}}
    monkeypatch.setattr(calibration, "load_cache_calibration", lambda *a, **k: art)
    assert DEFAULT_REUSE == 0.3
    for rule, want in ((FirstBlockCache(), 0.02), (FirstBlockCache(reuse=0.5), 0.04),
                       (FirstBlockCache(threshold=0.07), 0.07)):
        run(models["flux-schnell"], [rule])
        assert rule.threshold_in_force == pytest.approx(want), rule


def test_a_set_knows_which_cache_rules_read_the_models_calibration():
    """A set whose plan reads the model's cache calibration is refused on a resume after a new calibration:
    plain fbcache (its threshold the calibration's) and deepcache's budget do; a given threshold does not."""
    from velodiff.sets.fingerprint import uses_calibration

    for plan in ("fbcache", "fbcache:reuse=0.5", "deepcache:schedule=budget", "cfg+fbcache"):
        assert uses_calibration({"plan": plan}), plan
    for plan in ("fbcache:threshold=0.1", "deepcache", "deepcache:schedule=nonuniform", "none"):
        assert not uses_calibration({"plan": plan}), plan


def test_review36_fbcache_without_a_threshold_needs_a_loaded_model(models):
    """review36: fbcache on a bare network (no loaded model: no calibration to read) is one line unless
    threshold=T is given."""
    from velodiff.accel.block_cache import FirstBlockCache
    from velodiff.plan import RunInfo

    net = models["flux-schnell"].network
    for rule in (FirstBlockCache(), FirstBlockCache(reuse=0.5)):
        with pytest.raises(VelodiffError, match="without threshold=T it needs a loaded model"):
            rule.check(RunInfo(None, None, None, 1, {}, model=None, network=net))
    FirstBlockCache(threshold=0.1).check(RunInfo(None, None, None, 1, {}, model=None, network=net))
