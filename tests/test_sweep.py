"""velodiff bench (the quality-vs-speed sweep): Pareto front properties, sweep parsing and validation,
and one end-to-end run of 3 solvers x 3 NFE that writes JSON, markdown and a Pareto PNG, scores a
configuration equal to the reference at distance 0, and resumes from its own results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from velodiff.errors import VelodiffError
from velodiff.eval.sweep import (
    Sweep,
    config_id,
    load_sweep_file,
    make_sweep,
    pareto_front,
    resolve_prompts,
    run_sweep,
)


def cli(*args: str) -> int:
    """Run the velodiff command in process; its exit status (typer exits on success)."""
    from velodiff.cli import main

    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def test_pareto_front_small_example():
    pts = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.1)]
    assert pareto_front(pts) == [True, True, False, False, True]
    # lower-is-better metrics flip the quality axis
    assert pareto_front([(1.0, 5.0), (2.0, 1.0), (3.0, 2.0)], higher_better=False) == [True, True, False]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_pareto_front_is_exactly_the_undominated_set(pts):
    front = pareto_front(pts)
    assert any(front)

    def dom(a, b):  # a dominates b
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    for p, on in zip(pts, front, strict=True):
        assert on == (not any(dom(q, p) for q in pts))


def test_sweep_values_are_validated(tmp_path):
    s = make_sweep({"solvers": "ddim,unipc", "nfe": "4,8", "guidance": "1,3", "grids": "karras,default"})
    assert len(s.configs()) == 2 * 2 * 2 * 2 and s.grids == ["karras", None]
    for bad in ({"solvers": "nope"}, {"grids": "nope"}, {"nfe": "0"}, {"nfe": "x"}, {"metrics": "psnr"},
                {"guidance": "-1"}, {"quality": "speed"}):
        with pytest.raises(VelodiffError):
            make_sweep(bad)
    y = tmp_path / "s.yaml"
    y.write_text("solvers: [ddim, unipc, dpmpp_2m]\nnfe: [3, 5]\nguidance: 2\nlimit: 4\n")
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"solvers": "ddim,unipc,dpmpp_2m", "nfe": [3, 5], "guidance": [2], "limit": 4}))
    assert make_sweep(load_sweep_file(y)) == make_sweep(load_sweep_file(j))
    (tmp_path / "bad.yaml").write_text("solverz: [ddim]\n")
    with pytest.raises(VelodiffError, match="sweep key"):
        load_sweep_file(tmp_path / "bad.yaml")
    # a file's values of the wrong type or range: one line naming the key, not a failure deep in the run
    for text, key in (("seed: abc", "seed"), ("batch: 1.5", "batch"), ("clip: 5", "clip"),
                      ("limit: -5", "limit"), ("limit: 0", "limit"), ("repeat: true", "repeat"),
                      ("prompts: [1, 2]", "prompts")):
        (tmp_path / "t.yaml").write_text(text + "\n")
        with pytest.raises(VelodiffError, match=key):
            make_sweep(load_sweep_file(tmp_path / "t.yaml"))
    assert Sweep().configs()[0] == {"solver": "dpmpp_2m", "grid": None, "nfe_budget": 4, "guidance": None,
                                    "plan": "none"}
    # plans: a ';'-separated string or a list, canonicalised; a bad one refused before any work
    s = make_sweep({"plans": "none; pag:pag_scale=2+ag:threshold=0.99", "solvers": "ddim", "nfe": "4"})
    assert s.plans == ["none", "ag:threshold=0.99+pag:scale=2"] and len(s.configs()) == 2
    assert {config_id(c) for c in s.configs()} == {"ddim_default_nfe4_gdefault",
                                                  "ddim_default_nfe4_gdefault_ag-threshold-0.99-pag-scale-2"}
    # a plan that sets the solver and NFE runs once, under its own values, not once per solver x NFE
    fixed = make_sweep({"plans": "none;solver=ddim+nfe=6+ag:threshold=0.999", "solvers": "dpmpp_2m,unipc",
                        "nfe": "4,8"}).configs()
    assert len(fixed) == 2 * 2 + 1
    assert fixed[-1] == {"solver": "ddim", "grid": None, "nfe_budget": 6, "guidance": None,
                         "plan": "solver=ddim+nfe=6+ag:threshold=0.999"}
    # ... and is compared with the sweep's plain run (its first solver and NFE: a tune's baseline), not
    # with its own solver and NFE without rules (a settings-only plan was its own plain run: PSNR inf)
    sw = make_sweep({"plans": "none;solver=ddim+nfe=6+ag:threshold=0.999", "solvers": "dpmpp_2m,unipc",
                     "nfe": "4,8"})
    assert sw.plain_config(fixed[-1]) == {"solver": "dpmpp_2m", "grid": None, "nfe_budget": 4,
                                          "guidance": None, "plan": "none"}
    assert sw.plain_config(fixed[1]) == {**fixed[1], "plan": "none"}  # no settings: its own axes
    # a resumed sweep keeps records timed on the same machine only; its axes may grow
    from velodiff.eval.sweep import sweep_key

    one = {"device": "cpu", "dtype": "torch.float32", "threads": 1}
    assert sweep_key(sw, "m", one) != sweep_key(sw, "m", {**one, "threads": 2})
    assert sweep_key(sw, "m", one) != sweep_key(sw, "m", {**one, "device": "cuda:0"})
    assert sweep_key(sw, "m", one) == sweep_key(make_sweep({"solvers": "ddim", "nfe": "2"}), "m", one)
    for bad in ("agg", "ag:threshold=2", "ag+cfg"):
        with pytest.raises(VelodiffError):
            make_sweep({"plans": [bad]})


def test_prompts_from_sets_and_files(tmp_path):
    assert len(resolve_prompts("v1")) == 100 and len(resolve_prompts("v1", limit=5)) == 5
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\na blue square\n")
    assert resolve_prompts(str(f)) == ["a red circle", "a blue square"]
    with pytest.raises(VelodiffError):
        resolve_prompts(str(tmp_path / "missing.txt"))


def _model_path() -> Path:
    from velodiff.default_model import default_model_path

    return Path(os.environ.get("VELODIFF_TEST_MODEL") or default_model_path())


def _bench_args(tmp_path, monkeypatch, sweep_text: str) -> tuple[list[str], Path, Path]:
    """``velodiff bench`` of a sweep file on the shipped model, in a fresh cache: (args, sweep file,
    out folder); skipped where the model is missing."""
    path = _model_path()
    if not (path / "model_index.json").is_file():
        pytest.skip(f"no default model at {path}")
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    sweep, out = tmp_path / "sweep.yaml", tmp_path / "bench"
    sweep.write_text(sweep_text)
    args = ["bench", "--sweep", str(sweep), "--out", str(out), "--model", str(path), "--no-progress"]
    return args, sweep, out


def test_bench_three_solvers_three_nfe_end_to_end(tmp_path, monkeypatch, capsys):
    # the reference is ddim at 3 steps on the model's grid: the ddim/3 configuration must match it exactly
    args, _, out = _bench_args(tmp_path, monkeypatch,
                               "solvers: [ddim, dpmpp_2m, unipc]\nnfe: [1, 2, 3]\nguidance: [2]\nlimit: 2\n"
                               "reference_solver: ddim\nreference_steps: 3\nreference_grid: null\n"
                               "fd_real_per_prompt: 2\n")
    code = cli(*args)
    o, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    recs = res["records"]
    assert len(recs) == 9 == res["configurations"] and not [r for r in recs if "error" in r]
    want = {(s, n) for s in ("ddim", "dpmpp_2m", "unipc") for n in (1, 2, 3)}
    assert {(r["solver"], r["nfe_budget"]) for r in recs} == want
    for r in recs:
        assert r["nfe"] <= r["nfe_budget"] and r["evals"] == 2 * r["nfe"]  # CFG: 2 samples per call
        assert r["seconds_per_image"] > 0 and 0 <= r["shapes_eval"] <= 1 and r["fd_shapes"] >= 0
        assert (out / r["sheet"]).is_file()
    ref = next(r for r in recs if r["solver"] == "ddim" and r["nfe_budget"] == 3)
    assert ref["latent_mse"] == 0.0 and ref["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert max(r["latent_mse"] for r in recs) > 0
    assert any(r["pareto"] for r in recs)
    table = (out / "results.md").read_text()
    assert table.count("\n| ddim ") + table.count("\n| dpmpp_2m ") + table.count("\n| unipc ") == 9
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the references were cached: one file per (prompt, seed)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    # a rerun of the same sweep resumes: every record comes back as it was, and it says so
    capsys.readouterr()
    assert cli(*args) == 0
    assert "bench: resuming" in capsys.readouterr().err
    again = json.loads((out / "results.json").read_text())["records"]
    assert [r["seconds"] for r in again] == [r["seconds"] for r in recs]
    # a record of an older velodiff, without the per-image verdicts a tune's paired errors need, is
    # measured again; the others still resume
    stale = json.loads((out / "results.json").read_text())
    del stale["records"][0]["shapes_correct"]
    (out / "results.json").write_text(json.dumps(stale))
    assert cli(*args) == 0
    redone = json.loads((out / "results.json").read_text())["records"]
    assert "shapes_correct" in redone[0] and redone[0]["seconds"] != recs[0]["seconds"]
    assert [r["seconds"] for r in redone[1:]] == [r["seconds"] for r in recs[1:]]
    # the same configurations on other prompts would replace every result: refused, --replace replaces
    before = (out / "results.json").read_bytes()
    assert cli(*args, "--limit", "1") == 2
    assert "results of another sweep" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    # a sweep asking for fewer configurations in the same folder says which finished ones it replaces
    capsys.readouterr()
    sweep = Path(args[args.index("--sweep") + 1])
    sweep.write_text(sweep.read_text().replace("solvers: [ddim, dpmpp_2m, unipc]", "solvers: [ddim]"))
    before = (out / "results.json").read_bytes()
    assert cli(*args) == 2  # refused: nothing lost
    said = capsys.readouterr().err.strip()
    assert f"bench: {out} holds 6 finished configurations this sweep does not ask for (dpmpp_2m" in said
    assert said.endswith("give another --out to keep them, or --replace to replace them")
    assert (out / "results.json").read_bytes() == before
    assert cli(*args, "--replace") == 0
    said = "".join(capsys.readouterr())
    assert "finished configurations this sweep does not ask for" in said and "results replace them" in said
    assert len(json.loads((out / "results.json").read_text())["records"]) == 3
    # and their sample sheets go with them: the folder's sheets are its records'
    sheets = sorted(p.name for p in (out / "samples").iterdir())
    assert sheets == [f"ddim_default_nfe{n}_g2.png" for n in (1, 2, 3)], sheets


def test_bench_shapes_eval_reads_images_as_eval_shapes_does(tmp_path, monkeypatch, capsys):
    """Regression: the sweep once passed [0, 1] images to ShapesEval (which reads [-1, 1] tensors) and
    scored every record 0. The shipped model draws v1's first prompt (one object) right at 10 NFE."""
    args, _, out = _bench_args(tmp_path, monkeypatch, "solvers: [dpmpp_2m]\nnfe: [10]\nguidance: [2.5]\n"
                               "limit: 1\nimages_per_prompt: 2\nmetrics: [shapes]\n")
    assert cli(*args) == 0, capsys.readouterr().err
    (rec,) = json.loads((out / "results.json").read_text())["records"]
    assert rec["shapes_eval"] == 1.0


def test_bench_records_what_another_tools_sampler_name_ran(tmp_path, monkeypatch, capsys):
    """A1111's "Euler" is velodiff's euler on the 'normal' grid: the record says what ran (not the
    model's default grid) and what was asked, and the table shows both."""
    path = _model_path()
    if not (path / "model_index.json").is_file():
        pytest.skip(f"no default model at {path}")
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    code = cli("bench", "--solvers", "Euler,euler", "--nfe", "3", "--limit", "1", "--metrics", "shapes",
               "--out", str(out), "--model", str(path), "--no-progress")
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    # the command as typed (not the test runner's argv)
    command = result["command"]
    assert command.startswith("velodiff bench ") and "--solvers Euler,euler" in command, command
    alias, own = result["records"]
    assert (alias["solver"], alias["grid"], alias["requested"]) == ("euler", "normal", {"solver": "Euler"})
    assert own["solver"] == "euler" and own["grid"] != "normal" and "requested" not in own
    assert "| Euler (euler) | normal |" in (out / "results.md").read_text()


def test_bench_plans_records_and_distance_to_plain(tmp_path, monkeypatch, capsys):
    """Plans are a sweep axis: each record carries its canonical plan, its evaluations per image, and
    for a plan other than none the distance to the plain run of the same seeds, also when a resumed
    sweep adds the plan later (the plain run is then made again, untimed)."""
    base = "solvers: [dpmpp_2m]\nnfe: [4]\nguidance: [2.5]\nlimit: 2\nmetrics: [shapes]\n"
    args, sweep, out = _bench_args(tmp_path, monkeypatch, base + 'plans: ["none", "ag:threshold=-1"]\n')
    assert cli(*args) == 0, capsys.readouterr().err
    recs = {r["plan"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert recs["none"]["evals"] == 8 and "psnr_vs_plain" not in recs["none"]
    assert recs["ag:threshold=-1"]["evals"] == 2 + 3  # CFG on the first step only
    assert 10 < recs["ag:threshold=-1"]["psnr_vs_plain"] < 100
    sweep.write_text(base + 'plans: ["none", "ag:threshold=-1", "cfg:stop=0.5", "nfe=2"]\n')
    assert cli(*args) == 0
    recs2 = {r["plan"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert 0 < recs2["nfe=2"]["psnr_vs_plain"] < 100  # against the 4-NFE plain run, not itself (inf)
    def kept(r):  # the Pareto mark is recomputed over all records
        return {k: v for k, v in r.items() if k != "pareto"}

    assert kept(recs2["ag:threshold=-1"]) == kept(recs["ag:threshold=-1"])  # resumed, not rerun
    assert recs2["cfg:stop=0.5"]["evals"] == 6 and recs2["cfg:stop=0.5"]["psnr_vs_plain"] > 10
    assert "| plan |" in (out / "results.md").read_text()


def test_a_plan_that_sets_its_own_scale_is_measured_against_the_reference_at_that_scale(
    tmp_path, monkeypatch, capsys
):
    """The reference is solved at the scale that ran: a plan's cfg:scale=4 at that scale, not the
    sweep's (with the reference ddim at 3 steps on the model's grid, both runs are their references)."""
    args, _, out = _bench_args(tmp_path, monkeypatch,
                               "solvers: [ddim]\nnfe: [3]\nguidance: [2]\nlimit: 2\nmetrics: [reference]\n"
                               "reference_solver: ddim\nreference_steps: 3\nreference_grid: null\n"
                               'plans: ["none", "cfg:scale=4"]\n')
    assert cli(*args) == 0, capsys.readouterr().err
    recs = {r["plan"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert recs["cfg:scale=4"]["guidance"] == 4.0 and recs["none"]["guidance"] == 2.0
    assert recs["cfg:scale=4"]["latent_mse"] == 0.0 and recs["none"]["latent_mse"] == 0.0
    assert recs["cfg:scale=4"]["latent_mse_vs_plain"] > 0  # its distance to the plain run stays


def test_bench_fd_kid_ordered_and_equal_to_a_direct_computation(tmp_path, monkeypatch, capsys):
    """The sweep's FD / KID are the numbers DistributionMetrics gives on the same images (regenerated
    here from the recorded prompts and seeds), and they order as they must: the trained model at 8 NFE
    closer to the real renders than at 2 NFE, a random-init UNet farthest (margins as in test_metrics:
    24 prompts, FD-shapes' sampling noise is well below them)."""
    import shutil

    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from velodiff.data.shapes import ShapesWorld, normalize_spec
    from velodiff.eval.metrics import DistributionMetrics
    from velodiff.models import load
    from velodiff.pipelines import text2img

    path = _model_path()
    if not (path / "model_index.json").is_file():
        pytest.skip(f"no default model at {path}")
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    random_model = tmp_path / "random"
    shutil.copytree(path, random_model)
    unet_config = UNet2DConditionModel.load_config(random_model / "unet")
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(unet_config).save_pretrained(random_model / "unet")

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("solvers: [dpmpp_2m]\nnfe: [2, 8]\nguidance: [2.5]\nlimit: 24\nmetrics: [fd]\n"
                     "fd_real_per_prompt: 1\n")
    fd, kid = {}, {}
    for name, model in (("trained", path), ("random", random_model)):
        out = tmp_path / name
        args = ["bench", "--sweep", str(sweep), "--out", str(out), "--model", str(model), "--no-progress"]
        assert cli(*args) == 0, capsys.readouterr().err
        res = json.loads((out / "results.json").read_text())
        for r in res["records"]:
            fd[name, r["nfe_budget"]], kid[name, r["nfe_budget"]] = r["fd_shapes"], r["kid_shapes"]
    print("FD-shapes:", fd, "KID-shapes:", kid)
    assert fd["trained", 8] < fd["trained", 2] < fd["random", 2]
    assert fd["trained", 8] < fd["random", 8]
    assert kid["trained", 8] < kid["trained", 2] < kid["random", 2]

    texts, seeds = res["prompts"], res["seeds"]
    m = load(path)
    images = text2img(m, texts, seeds=seeds, nfe=8, solver="dpmpp_2m", guidance=2.5, output="tensor").images
    world = ShapesWorld(size=int(m.default_size[0]))
    direct = DistributionMetrics("fd-shapes")
    direct.add_real(np.stack([world.render(normalize_spec(t), seed=0).image for t in texts]))
    direct.add_fake(images)
    values = direct.compute()
    assert values["fd"] == pytest.approx(fd["trained", 8], rel=1e-3)
    assert values["kid"] == pytest.approx(kid["trained", 8], rel=1e-3, abs=1e-6)


def test_one_image_per_configuration_skips_fd_before_sampling_and_inf_psnr_is_no_point(tmp_path, monkeypatch,
                                                                                       capsys):
    """FD needs two images: asked for, it is refused before any sampling; by default it is left out and
    the rest runs. A configuration equal to the reference (PSNR inf) is left off the Pareto plot."""
    from velodiff.eval.plots import pareto_png

    recs = [{"solver": "ddim", "nfe": 3, "seconds_per_image": 0.1, "psnr": float("inf"), "pareto": True},
            {"solver": "ddim", "nfe": 2, "seconds_per_image": 0.05, "psnr": 30.0, "pareto": True}]
    assert pareto_png(recs, "psnr", "PSNR")[:8] == b"\x89PNG\r\n\x1a\n"
    from velodiff.eval.report import check_bench_result

    check_bench_result({"records": [{**r, "guidance": 2.0} for r in recs], "n_images": 1, "quality": "psnr"},
                       tmp_path)  # velodiff report takes what velodiff bench writes
    with pytest.raises(VelodiffError, match=r"records\[0\].psnr must be a finite number"):
        check_bench_result({"records": [{**recs[0], "psnr": float("nan"), "guidance": 2.0}], "n_images": 1,
                            "quality": "psnr"}, tmp_path)
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    args = ["bench", "--solvers", "ddim", "--nfe", "2", "--limit", "1", "--out", str(out), "--no-progress"]
    capsys.readouterr()
    assert cli(*args, "--metrics", "fd") == 2
    assert "FD needs at least 2 images per configuration" in capsys.readouterr().err
    assert not list(out.rglob("*.png"))  # refused before sampling
    assert cli(*args) == 0
    (rec,) = json.loads((out / "results.json").read_text())["records"]
    assert "fd_shapes" not in rec and 0 <= rec["shapes_eval"] <= 1


def fake_clock(monkeypatch, ticks):
    """The timing's clock (``velodiff.eval.metrics.time.perf_counter``) reads ``ticks`` in turn."""
    import velodiff.eval.metrics as metrics

    it = iter(ticks)

    class Clock:
        @staticmethod
        def perf_counter():
            return next(it)

    monkeypatch.setattr(metrics, "time", Clock)


def test_repeat_times_each_configuration_n_times_and_reports_the_median(tmp_path, monkeypatch):
    """``repeat`` (``velodiff bench --repeat N``): N timed generations per configuration after one
    warm-up; seconds per image is the median's share (a clock that advances 3, 1, 2 s gives 2 s)."""
    import velodiff
    import velodiff.eval.sweep as sweep_mod
    from velodiff.eval.reference import model_identity

    model = velodiff.load("default")
    calls = []
    real = sweep_mod._generate

    def counted(*a, **kw):
        calls.append(kw.get("solver"))
        return real(*a, **kw)

    monkeypatch.setattr(sweep_mod, "_generate", counted)
    fake_clock(monkeypatch, [0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
    sw = make_sweep({"solvers": "unipc", "nfe": "2", "limit": 2, "images_per_prompt": 1, "repeat": 3,
                     "metrics": []})
    res = run_sweep(model, sw, tmp_path / "s", model_id=model_identity(model), progress=False,
                    log=lambda line: None)
    (rec,) = res["records"]
    assert calls == ["ddim", "unipc", "unipc", "unipc"]  # the warm-up, then three timed runs
    assert rec["seconds"] == [3.0, 1.0, 2.0] and rec["seconds_per_image"] == pytest.approx(2.0 / 2)
    assert res["sweep"]["repeat"] == 3
    assert not any(res["metrics"].values()) and "reference" not in res  # metrics []: none, time only
    assert make_sweep({"metrics": "none"}).metrics == [] and make_sweep({}).metrics is None
    # resumed with a larger repeat, a record timed fewer times is timed again; one timed enough is kept
    monkeypatch.undo()
    once = make_sweep({"solvers": "unipc", "nfe": "2", "limit": 2, "images_per_prompt": 1, "metrics": []})
    twice = make_sweep({"solvers": "unipc", "nfe": "2", "limit": 2, "images_per_prompt": 1, "repeat": 2,
                        "metrics": []})
    kw = dict(model_id=model_identity(model), progress=False, log=lambda line: None)
    assert len(run_sweep(model, once, tmp_path / "r", **kw)["records"][0]["seconds"]) == 1
    again = run_sweep(model, twice, tmp_path / "r", **kw)["records"][0]["seconds"]
    assert len(again) == 2 and run_sweep(model, twice, tmp_path / "r", **kw)["records"][0]["seconds"] == again


def test_cached_references_are_keyed_by_what_makes_the_images(tmp_path):
    """A reference made with a LoRA on top, or in another dtype, is another picture: neither is served
    for the base model in float32 (calibrations, keyed by ``model_identity``, stay shared with a LoRA)."""
    import velodiff
    from velodiff.eval.reference import ReferenceConfig, model_identity, network_identity, reference_runs
    from velodiff.shipped import asset_path

    base = velodiff.load("default")
    lora = velodiff.load("default", lora=asset_path("default-lcm") / "lora", lora_scale=0.5)
    assert model_identity(lora) == model_identity(base) and network_identity(lora) != network_identity(base)
    rc = ReferenceConfig("ddim", 2, None, 2.0)

    def made(model):
        return reference_runs(model, ["a red circle"], [0], rc, cache_dir=tmp_path)[2]

    assert made(base) == {"hits": 0, "computed": 1}
    assert made(lora) == {"hits": 0, "computed": 1}
    assert made(velodiff.load("default", dtype="bfloat16")) == {"hits": 0, "computed": 1}
    assert made(base) == {"hits": 1, "computed": 0}


def test_a_bench_folder_has_one_writer_at_a_time(tmp_path, monkeypatch, capsys):
    """A second bench of the same --out (the two would replace each other's records) is one line while
    the first holds the folder, and writes nothing; the lock goes with the first."""
    from velodiff.files import lock_folder

    sweep = "solvers: [ddim]\nnfe: [1]\nlimit: 1\nmetrics: [shapes]\n"
    args, _, out = _bench_args(tmp_path, monkeypatch, sweep)
    out.mkdir()
    held = lock_folder(out)  # another bench's (an flock is per open file, so per process too)
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"another velodiff process is writing {out}; " in err, err
    assert err.endswith("another --out") and not (out / "results.json").exists()
    held.close()
    assert cli(*args) == 0 and (out / "results.json").is_file()


# --- review24: plan settings on the axes, the limits' edges, the resume key, Pareto's direction, batching --


def test_a_plan_that_sets_its_steps_is_run_and_compared_like_one_that_sets_its_nfe():
    """``steps=6`` in a plan fixes the run's budget as ``nfe=6`` does: one configuration at 6, compared with
    the sweep's own plain run (its first NFE), not with itself."""
    sw = make_sweep({"plans": "none;steps=6", "solvers": "ddim", "nfe": "4,8"})
    configs = sw.configs()
    assert [c["nfe_budget"] for c in configs] == [4, 8, 6]
    assert sw.plain_config(configs[-1]) == {"solver": "ddim", "grid": None, "nfe_budget": 4, "guidance": None,
                                            "plan": "none"}


def test_sweep_limits_take_their_edges():
    from velodiff.limits import MAX_RUNS, MAX_STEPS

    s = make_sweep({"nfe": f"1,{MAX_STEPS}", "guidance": "0,7.5", "repeat": MAX_RUNS, "limit": 1})
    assert s.nfe == [1, MAX_STEPS] and s.guidance == [0.0, 7.5] and s.repeat == MAX_RUNS
    for bad in ({"repeat": 0}, {"repeat": MAX_RUNS + 1}, {"nfe": str(MAX_STEPS + 1)}):
        with pytest.raises(VelodiffError):
            make_sweep(bad)
    with pytest.raises(VelodiffError, match="fixes the guidance scale at 4"):
        make_sweep({"plans": "cfg:scale=4", "guidance": "1,3"})


def test_a_limit_spreads_over_the_set_and_world_prompts_are_new_and_distinct():
    from velodiff.data.shapes import category_of, normalize_spec
    from velodiff.eval.shapes_eval import CATEGORIES, PROMPT_SETS, load_prompts
    from velodiff.eval.sweep import world_prompts

    four = resolve_prompts("v1", limit=4)  # v1 lists its 25 prompts of each category in turn
    assert [category_of(normalize_spec(t)) for t in four] == list(CATEGORIES)
    texts = world_prompts(120)  # the world's own captions repeat from its 100th scene on
    fixed = {p.text for name in PROMPT_SETS for p in load_prompts(name)}
    assert len(texts) == len(set(texts)) == 120 and not set(texts) & fixed


def test_the_pareto_quality_skips_a_constant_metric_and_lower_is_better_where_it_is():
    from velodiff.eval.sweep import mark_pareto, quality_metric

    recs = [{"seconds_per_image": 1.0, "shapes_eval": 0.5, "psnr": 20.0, "latent_mse": 0.1},
            {"seconds_per_image": 2.0, "shapes_eval": 0.5, "psnr": 25.0, "latent_mse": 0.2}]
    assert quality_metric({"records": recs}) == "psnr"  # ShapesEval ranks nothing here
    result = {"records": [dict(r) for r in recs]}
    assert mark_pareto(result, "latent_mse") == "latent_mse"
    assert [r["pareto"] for r in result["records"]] == [True, False]  # slower and a larger error


def test_the_resume_key_holds_what_makes_the_images_not_the_axes_or_the_repeat():
    from velodiff.eval.sweep import sweep_key

    base = {"solvers": "ddim", "nfe": "4", "limit": 2}
    machine = {"device": "cpu", "dtype": "torch.float32", "threads": 1}

    def key(**kw):
        return sweep_key(make_sweep({**base, **kw}), "m", machine)

    assert key() == key(repeat=3) == key(quality="psnr") == key(nfe="4,8", solvers="ddim,unipc")
    for other in ({"seed": 1}, {"images_per_prompt": 2}, {"limit": 3}, {"prompts": "v1-holdout"},
                  {"reference_steps": 50}, {"fd_real_per_prompt": 2}):
        assert key(**other) != key(), other


def _default_model():
    path = _model_path()
    if not (path / "model_index.json").is_file():
        pytest.skip(f"no default model at {path}")
    import velodiff

    return velodiff.load(path)


def test_generating_in_batches_is_generating_the_set_at_once():
    """The sweep's generation in chunks of ``batch``: each image keeps its own seed, and ``evals`` is the
    mean per image over every chunk."""
    import torch

    from velodiff.eval.sweep import _generate

    model = _default_model()
    texts, seeds = ["a red circle", "two blue squares", "a green triangle"], [4, 5, 6]
    lat3, _, res3 = _generate(model, texts, seeds, 3, steps=2, solver="ddim", guidance=2.0)
    lat2, _, res2 = _generate(model, texts, seeds, 2, steps=2, solver="ddim", guidance=2.0)
    assert torch.allclose(lat3, lat2, atol=1e-4) and res3.evals == res2.evals == 4


def test_a_sweep_draws_its_images_prompt_major_and_times_them_per_image(tmp_path, monkeypatch):
    """k images per prompt are prompt j's images j*k .. j*k+k-1 (as ShapesEval reads them), seeds from the
    sweep's; seconds per image is a timed run's seconds over every image, not over the prompts."""
    import velodiff.eval.sweep as sweep_mod
    from velodiff.eval.reference import model_identity

    model = _default_model()
    seen = []
    real = sweep_mod._generate

    def spy(m, texts, seeds, batch, **kw):
        seen.append((list(texts), list(seeds)))
        return real(m, texts, seeds, batch, **kw)

    monkeypatch.setattr(sweep_mod, "_generate", spy)
    fake_clock(monkeypatch, [0.0, 6.0, 100.0, 200.0])
    sw = make_sweep({"solvers": "ddim", "nfe": "1", "limit": 2, "images_per_prompt": 2, "seed": 10,
                     "metrics": ["shapes"]})
    res = run_sweep(model, sw, tmp_path / "s", model_id=model_identity(model), progress=False,
                    log=lambda line: None)
    a, b = res["prompts"]
    assert seen[-1] == ([a, a, b, b], [10, 11, 12, 13])
    (rec,) = res["records"]
    assert rec["seconds"] == [6.0] and rec["seconds_per_image"] == pytest.approx(6.0 / 4)


def test_each_configurations_clip_score_is_its_own_images(tmp_path):
    """The CLIP score of a record is the score of that configuration's images alone (a tiny local CLIP),
    not a running mean over the configurations before it."""
    from sd_tiny import save_clip
    from velodiff.eval.metrics import ClipScore
    from velodiff.eval.reference import model_identity
    from velodiff.pipelines import text2img

    model = _default_model()
    clip = save_clip(tmp_path / "clip")
    sw = make_sweep({"solvers": "ddim", "nfe": "1,3", "guidance": "2", "limit": 2, "metrics": ["clip"],
                     "clip": str(clip)})
    res = run_sweep(model, sw, tmp_path / "s", model_id=model_identity(model), progress=False,
                    log=lambda line: None)
    for rec in res["records"]:
        imgs = text2img(model, res["prompts"], seeds=res["seeds"], nfe=rec["nfe_budget"], solver="ddim",
                        guidance=2.0, output="tensor").images
        direct = ClipScore(clip)
        direct.update(imgs, res["prompts"])
        assert rec["clip_score"] == pytest.approx(direct.compute()["clip_score"], rel=1e-4, abs=1e-4)


def test_bench_options_override_the_sweep_file(tmp_path, monkeypatch, capsys):
    """`velodiff bench --sweep FILE` with options: an option given wins over the file's key (--solvers,
    --seed, --batch), the file's other keys stay (nfe, limit)."""
    import velodiff.eval.sweep as sweep_module
    from velodiff.cli import main

    seen = {}

    def run_sweep(model, sw, out, **kw):
        seen["sweep"] = sw
        return {"records": []}

    monkeypatch.setattr(sweep_module, "run_sweep", run_sweep)
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps({"solvers": "ddim", "nfe": "4,6", "seed": 3, "batch": 2, "limit": 2}))
    try:
        main(["bench", "--sweep", str(f), "--solvers", "unipc", "--seed", "5", "--batch", "4",
              "--no-progress", "--out", str(tmp_path / "b")])
    except SystemExit as e:
        assert not e.code
    sw = seen["sweep"]
    assert (sw.solvers, sw.seed, sw.batch, sw.nfe, sw.limit) == (["unipc"], 5, 4, [4, 6], 2)


def test_review32_the_sweep_table_counts_its_runs_and_threads_in_words():
    """review32: the table's note says '1 timed run' and '1 thread', and the plural for more."""
    from velodiff.eval.sweep import sweep_table

    rec = {"id": "ddim_default_nfe2_g2", "solver": "ddim", "grid": None, "nfe_budget": 2, "guidance": 2.0,
           "steps": 2, "nfe": 2, "evals": 4, "seconds_per_image": 0.1}
    result = {"model": "default", "model_info": "tiny", "n_images": 2, "prompts": ["a red circle"],
              "device": "cpu", "records": [rec]}
    one = sweep_table({**result, "threads": 1, "sweep": {"repeat": 1, "batch": 16}})
    assert "median over 1 timed run of the whole set, batch 16, 1 thread on cpu." in one
    more = sweep_table({**result, "threads": 2, "sweep": {"repeat": 3, "batch": 16}})
    assert "median over 3 timed runs of the whole set, batch 16, 2 threads on cpu." in more


def test_a_metric_read_back_as_an_integer_is_shown_as_a_number_like_the_others():
    """results.json read back holds ShapesEval 0 or 1 as a JSON integer: the table shows 0.000, not 0."""
    from velodiff.eval.sweep import sweep_table

    recs = [{"id": f"r{v}", "solver": "ddim", "grid": None, "nfe_budget": 2, "guidance": 2.0, "steps": 2,
             "nfe": 2, "evals": 4, "seconds_per_image": 0.1, "shapes_eval": v} for v in (0, 1, 0.5)]
    table = sweep_table({"model": "default", "model_info": "tiny", "n_images": 2, "prompts": ["a"],
                         "device": "cpu", "records": recs, "threads": 1, "sweep": {"repeat": 1, "batch": 2}})
    rows = [line for line in table.splitlines() if line.startswith("| ddim")]
    assert [row.split("|")[-3].strip() for row in rows] == ["0.000", "1.000", "0.500"]


def test_review32_a_replaced_records_id_is_no_path_out_of_the_samples_folder(tmp_path, monkeypatch, capsys):
    """review32: the sample sheets of replaced records are deleted by their ids, which come from a file: an
    id that walks out of samples/ ('../x') deletes nothing there."""
    args, _, out = _bench_args(tmp_path, monkeypatch,
                               "solvers: [ddim]\nnfe: [1]\nguidance: [1]\nlimit: 1\nmetrics: [shapes]\n")
    (out / "samples").mkdir(parents=True)
    old = {"kind": "bench", "records": [{"id": "../keep"}, {"id": "gone"}]}  # (a bench's file, edited)
    (out / "results.json").write_text(json.dumps(old))
    (out / "keep.png").write_bytes(b"not a sheet of this folder")
    (out / "samples" / "gone.png").write_bytes(b"a replaced record's sheet")
    assert cli(*args, "--replace") == 0, capsys.readouterr().err
    assert (out / "keep.png").is_file() and not (out / "samples" / "gone.png").exists()


def test_a_list_of_names_keeps_each_names_options():
    """--grids / --solvers split at commas, but a name's own options (karras:sigma_min=0.1,sigma_max=10, a
    list value in brackets) stay with it, as the README's example writes them."""
    from velodiff.eval.sweep import make_sweep

    sw = make_sweep({"grids": "karras:sigma_min=0.1,sigma_max=10,rho=7, trailing",
                     "solvers": "unipc:order=1,use_corrector=false,DPMSolverMultistepScheduler:"
                                "solver_order=2,ddim,unipc:orders=[1,2]", "nfe": "4,8"})
    assert sw.grids == ["karras:sigma_min=0.1,sigma_max=10,rho=7", "trailing"]
    assert sw.solvers == ["unipc:order=1,use_corrector=false", "DPMSolverMultistepScheduler:solver_order=2",
                          "ddim", "unipc:orders=[1,2]"]
    assert sw.nfe == [4, 8]
