"""The budgeted cache schedule (velodiff.accel.cache_schedule): the dynamic program returns a schedule
with the requested number of full steps, step 0 full, and the least drift of every such schedule
(checked against all of them on small cases)."""

from __future__ import annotations

import itertools
import random

import pytest

from conftest import spy_rule
from velodiff.accel.cache_schedule import budgeted_schedule, schedule_drift


def brute_force(changes, full):
    n = len(changes)
    best = None
    for rest in itertools.combinations(range(1, n), full - 1):
        s = [i == 0 or i in rest for i in range(n)]
        d = schedule_drift(changes, s)
        best = d if best is None or d < best else best
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_is_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    changes = [rng.random() ** 2 for _ in range(n)]
    for full in range(1, n + 1):
        s = budgeted_schedule(changes, full)
        assert len(s) == n and s[0] and sum(s) == full
        assert schedule_drift(changes, s) == pytest.approx(brute_force(changes, full), abs=1e-12)


def test_full_steps_go_where_features_change():
    changes = [0.0, 0.01, 0.01, 0.5, 0.6, 0.5, 0.01, 0.01, 0.01, 0.01]
    s = budgeted_schedule(changes, 4)
    assert s[0] and sum(s[3:6]) == 3  # the fast-changing stretch is computed, the flat ones reused
    assert (
        budgeted_schedule(changes, 10) == [True] * 10
        and budgeted_schedule(changes, 1) == [True] + [False] * 9
    )
    with pytest.raises(ValueError):
        budgeted_schedule([0.0, -1.0], 1)


def test_deepcache_budget_schedule_uses_the_models_calibration(tmp_path, monkeypatch, capsys):
    """`velodiff calibrate cache` saves the model's curves by its hash; deepcache:schedule=budget finds
    them and runs the dynamic program's full steps (as many as 1:N); a missing or foreign calibration is
    one line."""
    import json
    from pathlib import Path

    import velodiff
    from velodiff.accel.cache_schedule import budgeted_schedule
    from velodiff.accel.calibration import cache_calibration_path, step_changes
    from velodiff.accel.deepcache import DeepCache
    from velodiff.cli import main
    from velodiff.default_model import default_model_path
    from velodiff.errors import VelodiffError
    from velodiff.eval.reference import model_hash
    from velodiff.pipelines import text2img

    path = Path(default_model_path())
    if not (path / "model_index.json").is_file():
        pytest.skip("no shipped default model")
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    model = velodiff.load(path)
    rule = DeepCache(interval=3, schedule="budget")
    with pytest.raises(VelodiffError, match="velodiff calibrate cache --model default$"):
        text2img(model, "a red circle", steps=12, plan=[rule])
    try:
        main(["calibrate", "cache", "--limit", "2", "--steps", "12"])
    except SystemExit as e:
        assert not e.code
    artefact = cache_calibration_path(model_hash(path))
    assert "wrote" in capsys.readouterr().out and artefact.is_file()
    res = text2img(
        model,
        ["a red circle", "two blue squares"],
        steps=12,
        guidance=2.5,
        seeds=[0, 1],
        plan=[rule],
        output="latent",
    )
    expected = budgeted_schedule(
        step_changes(
            json.loads(artefact.read_text()), res.ts.tolist(), ["mid_block", "up_blocks.0", "up_blocks.1"]
        ),
        4,
    )
    assert sorted(rule.full_steps) == [i for i, f in enumerate(expected) if f] and len(rule.full_steps) == 4
    six = DeepCache(full=6, schedule="budget")  # the budget as a number of full evaluations
    text2img(model, ["a red circle", "two blue squares"], steps=12, seeds=[0, 1], plan=[six], output="latent")
    chosen = budgeted_schedule(step_changes(json.loads(artefact.read_text()), res.ts.tolist(),
                                            ["mid_block", "up_blocks.0", "up_blocks.1"]), 6)
    assert sorted(six.full_steps) == [i for i, f in enumerate(chosen) if f] and len(six.full_steps) == 6
    assert len(DeepCache(full=5, schedule="nonuniform").plan_steps(20)) == 5
    for plan, match in (("deepcache:full=6", "full is read only with schedule=budget or nonuniform"),
                        ("deepcache:schedule=budget,full=6,interval=2", "give interval or full")):
        with pytest.raises(VelodiffError, match=match):
            text2img(model, "a red circle", steps=12, plan=plan, output="latent")
    made_at = json.loads(artefact.read_text())["guidance"]
    assert made_at == model.default_guidance == 2.5  # the run above was at the calibration's scale
    with pytest.warns(UserWarning, match=r"made at guidance 2\.5, this run is at 6.*--guidance 6$"):
        text2img(model, "a red circle", steps=12, guidance=6.0, plan=[rule], output="latent")
    other = tmp_path / "other.json"
    other.write_text(artefact.read_text().replace(model_hash(path), "0" * 16))
    with pytest.raises(VelodiffError, match="made for another model"):
        text2img(model, "a red circle", steps=12, plan=f"deepcache:schedule=budget,calibration={other}")
    good = json.loads(artefact.read_text())
    block = next(iter(good["rate"]))
    negative = {**good["rate"], block: [-1.0] * len(good["t_mid"])}
    short = {**good["rate"], block: good["rate"][block][:2]}
    for damaged, what in (({"rate": None}, "rate is not a table"), ({"rate": negative}, f"curve of {block}"),
                          ({"rate": short}, f"curve of {block}")):
        other.write_text(json.dumps({**good, **damaged}))
        with pytest.raises(VelodiffError, match=f"is damaged \\(.*{what}.*velodiff calibrate cache"):
            text2img(model, "a red circle", steps=12, plan=f"deepcache:schedule=budget,calibration={other}")


def test_step_changes_integrate_the_calibrated_rate_at_each_steps_midpoint():
    """A step's expected change is the calibrated rate at the middle of the step times its length."""
    from velodiff.accel.calibration import step_changes

    mids = [0.1 * k for k in range(1, 10)]
    # rate(t) = t and 2t, listed from the noisiest time as a calibration writes them
    art = {"t_mid": mids[::-1], "rate": {"a": mids[::-1], "b": [2 * m for m in mids[::-1]]}}
    got = step_changes(art, [1.0, 0.5, 0.2, 0.0], ["a"])
    assert got == pytest.approx([0.0, 0.75 * 0.5, 0.35 * 0.3])
    assert step_changes(art, [1.0, 0.5, 0.2, 0.0], ["a", "b"]) == pytest.approx([1.5 * v for v in got])


def test_the_calibration_stores_each_measured_change_as_a_rate_at_its_steps_midpoint():
    """calibrate cache's artefact: the change measured at step i (from the evaluation at ts[i-1] to the
    one at ts[i]) is stored as a rate at the step's middle time, so rate * step length gives the change
    back, averaged over every image whatever the batches (here of 2 and 1); made at the model's
    default guidance when none is given."""
    import numpy as np

    import velodiff
    from velodiff.accel.calibration import calibrate_cache
    from velodiff.accel.hooks import FeatureChange
    from velodiff.pipelines import text2img

    model = velodiff.load("default")
    prompts, seeds = ["a red circle", "two blue squares", "a green cross"], [0, 1, 2]
    art = calibrate_cache(model, prompts, seeds, steps=3, batch=2)
    probe = FeatureChange()
    res = text2img(model, prompts, seeds=seeds, steps=3, plan=[probe], output="latent")
    ts = res.ts.double().numpy()
    assert art["t_mid"] == pytest.approx(((ts[:-2] + ts[1:-1]) / 2).tolist())
    dt = ts[:-2] - ts[1:-1]
    curves = probe.curves()
    assert set(art["rate"]) == set(curves) and len(curves["mid_block"]) == 2
    for block, curve in curves.items():
        assert (np.asarray(art["rate"][block]) * dt).tolist() == pytest.approx(curve, rel=1e-3)
    assert art["guidance"] == model.default_guidance and art["images"] == 3


def test_feature_change_is_the_conditional_rows_change_between_the_steps_first_evaluations():
    """The instrument's curve at step i is |y_i - y_(i-1)|_1 / |y_(i-1)|_1 of the block's output on the
    conditional rows, mean over the images, between the first-stage evaluations of steps i-1 and i (a
    two-stage solver's second evaluation and CFG's unconditional rows are not part of it)."""
    import velodiff
    from velodiff.accel.hooks import FeatureChange, HookSet, output_hook
    from velodiff.pipelines import text2img

    model = velodiff.load("default")
    outputs, probe = [], FeatureChange(blocks=("mid_block",))
    spy = spy_rule(lambda req, r: (req.stage, req.rows("cond")))
    hooks = HookSet("test_mid_block_outputs")
    hooks.add(model.network.mid_block, output_hook(lambda out: outputs.append(out.detach().clone())))
    try:
        text2img(model, ["a red circle", "two blue squares"], seeds=[0, 1], steps=4, solver="heun",
                 guidance=2.5, plan=[spy, probe], output="latent")
    finally:
        hooks.remove()
    assert len(outputs) == len(spy.log) > 4  # one network call per evaluation, some of them second stages
    firsts = [out[rows].flatten(1) for out, (stage, rows) in zip(outputs, spy.log, strict=True) if stage == 0]
    pairs = zip(firsts[:-1], firsts[1:], strict=True)
    expected = [float(((b - a).abs().sum(1) / a.abs().sum(1)).mean()) for a, b in pairs]
    assert probe.curves()["mid_block"] == pytest.approx(expected, rel=1e-5)


def test_a_damaged_or_foreign_cache_calibration_is_one_line(tmp_path):
    """Another kind or version of artefact, a first-block-cache table with a zero threshold or lists of
    two lengths, and a block the calibration has no curve for are refused in one line."""
    import json

    import velodiff
    from velodiff.accel.calibration import load_cache_calibration, step_changes
    from velodiff.errors import VelodiffError
    from velodiff.eval.reference import model_identity

    model = velodiff.load("default")
    good = {"version": 1, "kind": "cache", "model_hash": model_identity(model), "guidance": 2.5,
            "t_mid": [0.8, 0.5, 0.2], "rate": {"mid_block": [1.0, 2.0, 3.0]},
            "fbcache": {"thresholds": [0.01, 0.02], "reuse": [0.1, 0.5]}}
    p = tmp_path / "c.json"
    kind = r"is not a velodiff cache calibration \(version 1\)"
    table = "is damaged .the first-block-cache table is not lists of positive thresholds"
    for damaged, what in [({"kind": "solver"}, kind), ({"version": 2}, kind),
                          ({"fbcache": {"thresholds": [0.0, 0.02], "reuse": [0.1, 0.5]}}, table),
                          ({"fbcache": {"thresholds": [0.01, 0.02, 0.04], "reuse": [0.1, 0.5]}}, table)]:
        p.write_text(json.dumps({**good, **damaged}))
        with pytest.raises(VelodiffError, match=what) as e:
            load_cache_calibration(model, p)
        assert "\n" not in str(e.value)
    p.write_text(json.dumps(good))
    art = load_cache_calibration(model, p)
    with pytest.raises(VelodiffError, match="no curve for up_blocks.0; calibrate the model again"):
        step_changes(art, [1.0, 0.5, 0.0], ["mid_block", "up_blocks.0"])


def test_step_0_is_full_whatever_the_budget():
    """Step 0 has no earlier feature to reuse: it is full even when the budget asks for none."""
    changes = [0.0, 0.3, 0.1, 0.2]
    for full in (0, -2):
        assert budgeted_schedule(changes, full) == [True, False, False, False]


def test_calibrate_cache_options_reach_the_measurement(tmp_path, monkeypatch, capsys):
    """calibrate cache's --guidance, --steps, --solver, --limit and --seed are what the measurement runs
    with (prompts spread over the set, seeds from --seed); without --guidance, the model's default."""
    import velodiff.accel.calibration as calibration
    from velodiff.cli import main

    seen = []

    def measure(model, prompts, seeds, *, steps=50, solver="dpmpp_2m", guidance=None, batch=16):
        seen.append(dict(prompts=len(prompts), seeds=list(seeds), steps=steps, solver=solver,
                         guidance=guidance))
        return {"images": len(prompts), "rate": [[0.0]]}

    monkeypatch.setattr(calibration, "calibrate_cache", measure)
    monkeypatch.setattr(calibration, "save_cache_calibration", lambda art: tmp_path / "cache.json")
    for extra in (["--guidance", "4"], []):
        try:
            main(["calibrate", "cache", "--limit", "3", "--steps", "5", "--solver", "ddim", "--seed", "9",
                  *extra])
        except SystemExit as e:
            assert not e.code
    want = [dict(prompts=3, seeds=[9, 10, 11], steps=5, solver="ddim", guidance=g) for g in (4.0, 2.5)]
    assert seen == want
