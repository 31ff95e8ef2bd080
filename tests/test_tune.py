"""`velodiff tune`: a beam search over plans that writes the fastest plan within the budget, confirmed on
held-out prompts, as a plan file the other commands run; resumable; bad input is one line. (The speed
and quality it reaches on the shipped model are measured in bench/tune, not here.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from velodiff.default_model import default_model_path
from velodiff.eval.tune import SearchSpace, loss, within
from velodiff.plan import Plan


def cli(*args: str) -> int:
    from velodiff.cli import main

    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


@pytest.fixture(autouse=True)
def _needs_model():
    if not (Path(default_model_path()) / "model_index.json").is_file():
        pytest.skip("no shipped default model")


def test_tune_writes_the_fastest_plan_within_budget_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "space.yaml"
    space.write_text("solvers: [ddim]\nnfe: [3, 6]\ngrids: [null]\naxes:\n  guidance: ['cfg:stop=0.5']\n"
                     "  cache: ['deepcache:interval=2']\n")
    out = tmp_path / "tuned"
    args = [
        "tune",
        "--budget",
        "1",
        "--out",
        str(out),
        "--space",
        str(space),
        "--limit",
        "3",
        "--images-per-prompt",
        "1",
        "--calibration-images",
        "1",
        "--no-progress",
    ]
    code, err = cli(*args), capsys.readouterr().err
    assert code == 0, err
    assert "calibrated grid" not in err  # a space that needs no solver calibration says nothing of one
    res = json.loads((out / "tune.json").read_text())
    rows = [r for st in res["stages"] for r in st["rows"]]
    assert {r["plan"] for r in rows} >= {
        "solver=ddim+nfe=3",
        "solver=ddim+nfe=6",
        "solver=ddim+nfe=3+cfg:stop=0.5",
        "solver=ddim+nfe=3+deepcache:interval=2",  # a plan the guidance axis left as it was goes on
    }
    assert all(
        r["loss"]
        == pytest.approx(loss("shapes_eval", res["baseline"]["calibration"]["shapes_eval"], r["shapes_eval"]))
        for r in rows
    )
    assert all(r["loss_se"] >= 0 for r in rows + res["holdout"])  # paired with the baseline's images
    assert "loss (± paired SE)" in (out / "report.md").read_text()

    # with a budget of 1 every plan qualifies: the first held-out round holds the `beam` (3) plans
    # fastest on calibration (fewest evaluations per image, then time), the winner the fastest of them
    def speed(r):
        return (round(r["evals"], 6), r["seconds_per_image"])

    calibrated = sorted(rows, key=speed)
    held = sorted(res["holdout"], key=speed)
    assert {r["plan"] for r in held} == {r["plan"] for r in calibrated[:3]}
    assert res["plan"] == held[0]["plan"] and res["speedup"] > 1
    tm = res["timing"]  # the speed-up of two timings taken in one round (here the first, the baseline's)
    assert tm["round"] == "holdout-1"
    assert res["speedup"] == pytest.approx(tm["baseline_seconds_per_image"] / tm["plan_seconds_per_image"])
    written = (out / "plan.txt").read_text()
    assert written.startswith("# velodiff tune") and str(Plan.parse(f"@{out / 'plan.txt'}")) == res["plan"]
    for f in ("report.md", "pareto.png"):
        assert (out / f).stat().st_size > 0
    assert "Held-out check" in (out / "report.md").read_text()
    # the plan file runs anywhere a plan is taken
    img = tmp_path / "x.png"
    assert cli("generate", "a red circle", "--out", str(img), "--plan", f"@{out / 'plan.txt'}") == 0
    assert img.is_file()
    # resumed: every stage's sweep comes back from its folder, the same plan and timings
    capsys.readouterr()
    assert cli(*args) == 0
    again = json.loads((out / "tune.json").read_text())
    assert again["plan"] == res["plan"] and again["holdout"] == res["holdout"]
    # a later tune here that finds no plan within its budget: the earlier tune's plan.txt is removed,
    # not left to be run as this one's
    from velodiff.eval.tune import TuneConfig, _write

    _write(out, {**again, "plan": None}, TuneConfig(budget=0.01))
    assert not (out / "plan.txt").exists() and json.loads((out / "tune.json").read_text())["plan"] is None


def test_tune_bad_input_is_one_line(tmp_path, capsys):
    for args, message in [
        (["--budget", "-0.1"], "--budget must be a finite number >= 0"),
        (["--budget", "inf"], "--budget must be a finite number >= 0"),
        (["--budget", "0.02", "--metric", "speed"], "--metric 'speed'"),
        # prompt sets read before the calibration, not after it
        (["--budget", "0.02", "--holdout", "v2"], "--holdout: prompts 'v2': not a prompt set"),
        (["--budget", "0.02", "--calibration", str(tmp_path / "none.txt")], "--calibration: prompts"),
    ]:
        assert cli("tune", *args, "--out", str(tmp_path / "t"), "--no-progress") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    space = tmp_path / "bad.yaml"
    space.write_text("solver: [ddim]\n")
    assert cli("tune", "--budget", "0.02", "--out", str(tmp_path / "t"), "--space", str(space)) == 2
    assert "unknown search space key 'solver'" in capsys.readouterr().err
    for text, message in [
        ("solvers: 5\n", "solvers must be a non-empty list of solver names, got 5"),
        ("nfe: [a]\n", "nfe must be a non-empty list of integers, got ['a']"),
        ("grids: [nope]\n", "search space: unknown grid 'nope'"),
        ("solvers: [nope]\n", "search space: unknown solver 'nope'"),
        ("nfe: [0]\n", "search space: plan setting nfe must be in [1, 1000], got 0"),
        ("axes: {cache: [deepcache:intervl=2]}\n", "axes.cache 'deepcache:intervl=2'"),
    ]:
        space.write_text(text)
        assert cli("tune", "--budget", "0.02", "--out", str(tmp_path / "t"), "--space", str(space)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "t").exists()


def test_the_space_drops_rules_this_installation_lacks():
    space = SearchSpace(axes={"cache": ["nosuchcache:interval=2"], "guidance": ["ag:threshold=0.99"]})
    assert space.available().axes == {"guidance": ["ag:threshold=0.99"]}


def test_tune_a_student_against_its_teachers_baseline(tmp_path, capsys, monkeypatch):
    """--baseline-model: the baseline is the teacher's plain run on the same seeds, the plans run on the
    student (here the shipped 4-step student, its own guidance 1)."""
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "space.yaml"
    space.write_text("solvers: [ddim]\nnfe: [2, 4]\ngrids: [trailing]\naxes: {}\n")
    out = tmp_path / "tuned"
    args = [
        "tune",
        "--model",
        "default-4step",
        "--baseline-model",
        "default",
        "--budget",
        "1",
        "--out",
        str(out),
    ]
    args += ["--space", str(space), "--limit", "2", "--images-per-prompt", "1", "--calibration-images", "1"]
    assert cli(*args, "--no-progress") == 0, capsys.readouterr().err
    res = json.loads((out / "tune.json").read_text())
    assert res["model"] == "default-4step" and res["baseline"]["model"] == "default"
    assert res["baseline"]["calibration"]["evals"] == 40  # the teacher: 20 steps x CFG
    assert all(r["evals"] in (2, 4) for st in res["stages"] for r in st["rows"])  # the student: no CFG
    assert res["plan"] == "solver=ddim+nfe=2+grid=trailing" and res["speedup"] > 1
    assert (out / "1-solvers-baseline").is_dir() and "`default`" in (out / "report.md").read_text()


def test_the_calibrated_grid_and_v3_join_the_space_only_where_the_model_has_a_calibration():
    import velodiff
    from velodiff.eval.tune import calibration_check

    model = velodiff.load("default")
    said: list[str] = []
    runs = calibration_check(model, "default", 2.5, said.append)  # shipped beside the default model
    assert not said
    assert runs("unipc", "calibrated", 8) and runs("dpmpp_2m", "calibrated", 5)
    assert not runs("ddim", "calibrated", 8) and not runs("unipc", "calibrated", 12)  # not calibrated
    assert not runs("uni_pc", "calibrated", 8)  # ComfyUI's UniPC (B(h) = h): not what was fitted
    assert runs("dpm_solver_v3", None, 7) and runs("ddim", "trailing", 7)
    runs = calibration_check(model, "default", 7.5, said.append)  # no calibration at this scale
    assert len(said) == 1 and "velodiff calibrate solver --model default --guidance 7.5" in said[0]
    assert not runs("unipc", "calibrated", 8) and not runs("dpm_solver_v3", None, 5)
    assert runs("unipc", None, 8) and runs("ddim", "trailing", 5)


def test_a_loss_of_exactly_the_budget_is_within_it():
    assert 0.825 - 0.8049999999999999 > 0.02 and within(0.825 - 0.8049999999999999, 0.02)  # round-off
    assert within(0.0, 0.0) and within(-0.01, 0.0) and not within(0.0201, 0.02)


def stub_sweeps(monkeypatch, seconds=None):
    """Replace tune's sweeps: the baseline scores 0.9 on calibration and 0.7 held out (other prompts,
    another level), every plan 0.01 below it; a plan's evals are 2 per NFE, its seconds ``seconds[plan]``
    (default 0.2)."""
    import velodiff.eval.tune as tune_mod

    def fake_sweep(model, sw, out, **kw):
        base = 0.7 if sw.prompts == "v1" else 0.9

        def record(plan):
            if plan == "none":
                return {"plan": plan, "shapes_eval": base, "seconds_per_image": 1.0, "evals": 40}
            nfe = int(plan.split("nfe=")[1].split("+")[0])
            return {"plan": plan, "shapes_eval": base - 0.01, "evals": 2 * nfe,
                    "seconds_per_image": (seconds or {}).get(plan, 0.2)}

        return {"records": [record(p) for p in sw.plans]}

    monkeypatch.setattr(tune_mod, "run_sweep", fake_sweep)
    return tune_mod


def test_held_out_losses_are_against_the_held_out_baseline(tmp_path, monkeypatch):
    """The held-out check compares each plan with the baseline on the held-out prompts and seeds, not
    with the calibration's (other prompts: another level)."""
    tune_mod = stub_sweeps(monkeypatch)
    space = SearchSpace(solvers=["ddim"], nfe=[3], grids=[None], axes={})
    res = tune_mod.tune(None, tune_mod.TuneConfig(budget=0.02), space, tmp_path, model_id="m", progress=False,
                        log=lambda line: None)
    assert res["baseline"]["holdout"]["shapes_eval"] == 0.7
    assert [r["loss"] for r in res["holdout"]] == [pytest.approx(0.01)]
    assert res["plan"] == "solver=ddim+nfe=3"


def test_rank_by_evaluations_or_by_measured_time(tmp_path, monkeypatch):
    """rank=evals (the default): the fewest evaluations per image win, whatever the clock says;
    rank=time: the fewest measured seconds."""
    tune_mod = stub_sweeps(monkeypatch, {"solver=ddim+nfe=3": 0.5, "solver=ddim+nfe=6": 0.1})
    space = SearchSpace(solvers=["ddim"], nfe=[3, 6], grids=[None], axes={})
    for rank, want in (("evals", "solver=ddim+nfe=3"), ("time", "solver=ddim+nfe=6")):
        cfg = tune_mod.TuneConfig(budget=0.02, beam=1, rank=rank)
        res = tune_mod.tune(None, cfg, space, tmp_path / rank, model_id="m", progress=False,
                            log=lambda line: None)
        assert res["plan"] == want


def test_a_failed_baseline_is_one_line(tmp_path, monkeypatch):
    """A baseline run that failed (its record holds the error, no metric) stops the search in one line that
    says why, not with a KeyError."""
    tune_mod = stub_sweeps(monkeypatch)
    real = tune_mod.run_sweep

    def failing_baseline(model, sw, out, **kw):
        res = real(model, sw, out, **kw)
        res["records"] = [{"plan": "none", "error": "the model returned NaN or inf at step 3"}
                          if r["plan"] == "none" else r for r in res["records"]]
        return res

    monkeypatch.setattr(tune_mod, "run_sweep", failing_baseline)
    space = SearchSpace(solvers=["ddim"], nfe=[3], grids=[None], axes={})
    from velodiff.errors import VelodiffError

    with pytest.raises(VelodiffError, match=r"baseline run failed \(the model returned NaN or inf at"):
        tune_mod.tune(None, tune_mod.TuneConfig(budget=0.02), space, tmp_path, model_id="m", progress=False,
                      log=lambda line: None)


def test_a_tune_folder_has_one_tuner_at_a_time(tmp_path, capsys):
    """A second tune of the same --out (the two would replace each other's stages and plan) is one line
    while the first holds the folder, before any sampling."""
    from velodiff.files import lock_folder

    out = tmp_path / "t"
    out.mkdir()
    held = lock_folder(out)
    try:
        assert cli("tune", "--budget", "0.02", "--out", str(out), "--no-progress", "--limit", "1") == 2
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"another velodiff process is writing {out}; " in err, err
    assert [p.name for p in out.iterdir()] == [".lock"]


# --- review24: lower-is-better losses, the config's checks, the beam, later held-out rounds -----------


def test_a_loss_is_positive_when_quality_gets_worse_in_either_direction():
    assert loss("shapes_eval", 0.8, 0.7) == pytest.approx(0.1)
    assert loss("fd_shapes", 1.0, 1.5) == pytest.approx(0.5)
    assert loss("latent_mse", 0.1, 0.05) == pytest.approx(-0.05)


def test_a_tune_config_is_checked_before_any_work():
    from velodiff.errors import VelodiffError
    from velodiff.eval.tune import TuneConfig, check_config

    check_config(TuneConfig(budget=0.02, beam=1, rank="time"))
    for bad, message in (({"rank": "speed"}, "--rank 'speed'"), ({"beam": 0}, "--beam must be >= 1")):
        with pytest.raises(VelodiffError, match=message):
            check_config(TuneConfig(budget=0.02, **bad))


def test_the_beam_keeps_its_width_and_every_beam_plan_gets_each_option(tmp_path, monkeypatch):
    """After a stage the beam is the ``beam`` fastest plans within the budget; the next axis adds each of
    its options to every one of them. The metric's sweep measures what that metric needs."""
    tune_mod = stub_sweeps(monkeypatch)
    asked = []
    fake = tune_mod.run_sweep

    def spy(model, sw, out, **kw):
        asked.append(sw.metrics)
        return fake(model, sw, out, **kw)

    monkeypatch.setattr(tune_mod, "run_sweep", spy)
    space = SearchSpace(solvers=["ddim"], nfe=[3, 4, 5], grids=[None],
                        axes={"cache": ["deepcache:interval=2"]})
    res = tune_mod.tune(None, tune_mod.TuneConfig(budget=0.02, beam=2), space, tmp_path, model_id="m",
                        progress=False, log=lambda line: None)
    solvers, cache = res["stages"]
    assert solvers["beam"] == ["solver=ddim+nfe=3", "solver=ddim+nfe=4"]
    assert {r["plan"] for r in cache["rows"]} == {"solver=ddim+nfe=3+deepcache:interval=2",
                                                  "solver=ddim+nfe=4+deepcache:interval=2"}
    assert len(cache["beam"]) == 2
    assert res["speedup"] == pytest.approx(1.0 / 0.2)  # the baseline's 1 s over the plan's 0.2 s
    assert all(a == ["shapes"] for a in asked)

    class Stop(Exception):
        pass

    def first_sweep(model, sw, out, **kw):
        asked.append(sw.metrics)
        raise Stop

    asked.clear()
    monkeypatch.setattr(tune_mod, "run_sweep", first_sweep)
    with pytest.raises(Stop):  # KID comes with FD: the fd metric's sweep
        tune_mod.tune(None, tune_mod.TuneConfig(budget=1.0, metric="kid_shapes"), space, tmp_path / "kid",
                      model_id="m", progress=False, log=lambda line: None)
    assert asked == [["fd"]]


def test_a_winner_of_a_later_held_out_round_is_timed_again_beside_the_baseline(tmp_path, monkeypatch):
    """The fastest plan on calibration fails the held-out check; the next round's winner is then timed again
    side by side with the baseline (the baseline ran in the first round only)."""
    import velodiff.eval.tune as tune_mod

    folders = []

    def fake_sweep(model, sw, out, **kw):
        folders.append(out.name)
        held = sw.prompts == "v1"
        base = 0.7 if held else 0.9

        def record(plan):
            if plan == "none":
                secs = 1.0 if held else 1.1
                return {"plan": plan, "shapes_eval": base, "seconds_per_image": secs, "evals": 40}
            nfe = int(plan.split("nfe=")[1].split("+")[0])
            lost = 0.1 if (held and nfe == 3) else 0.01
            secs = 0.25 if out.name == "holdout-timing" else 0.2
            return {"plan": plan, "shapes_eval": base - lost, "evals": 2 * nfe, "seconds_per_image": secs}

        return {"records": [record(p) for p in sw.plans]}

    monkeypatch.setattr(tune_mod, "run_sweep", fake_sweep)
    space = SearchSpace(solvers=["ddim"], nfe=[3, 6], grids=[None], axes={})
    res = tune_mod.tune(None, tune_mod.TuneConfig(budget=0.02, beam=1), space, tmp_path, model_id="m",
                        progress=False, log=lambda line: None)
    assert res["plan"] == "solver=ddim+nfe=6" and folders[-1] == "holdout-timing"
    assert res["timing"]["round"] == "holdout-timing" and res["speedup"] == pytest.approx(1.0 / 0.25)


def test_the_command_hands_its_options_to_the_tune(tmp_path, monkeypatch, capsys):
    """tune's --images-per-prompt (held out) and --calibration-images are the config's two counts, not
    each other's; --budget, --beam, --rank, --limit, --repeat and the prompt sets reach it too."""
    import velodiff.eval.tune as tune_module
    from velodiff.cli import main

    seen = {}

    def run_tune(model, cfg, space, out, **kw):
        seen["cfg"], seen["name"] = cfg, kw["model_name"]
        return {"plan": "none", "speedup": 1.0}

    monkeypatch.setattr(tune_module, "tune", run_tune)
    try:
        main(["tune", "--budget", "0.05", "--out", str(tmp_path / "t"), "--images-per-prompt", "3",
              "--calibration-images", "1", "--beam", "2", "--rank", "time", "--limit", "5", "--repeat", "2",
              "--calibration", "v1", "--holdout", "v1-holdout", "--no-progress"])
    except SystemExit as e:
        assert not e.code
    c = seen["cfg"]
    assert (c.images_per_prompt, c.calibration_images, c.budget, c.beam) == (3, 1, 0.05, 2)
    assert (c.rank, c.limit, c.repeat, c.calibration_prompts, c.holdout_prompts) == (
        "time", 5, 2, "v1", "v1-holdout")
    assert seen["name"] == "default"
