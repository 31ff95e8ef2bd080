"""Calibrated solvers and grids (velodiff.calibrated, `velodiff calibrate solver`): DPM-Solver-v3 and its
statistics against closed forms, DC compensation and per-step orders as exact identities, GITS and the
grid descent, the artefact's refusals, and the whole path from the command to `--grid calibrated`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from velodiff.calibrated import (
    calibrate_solver,
    denoiser_problem,
    entry_options,
    find_entry,
    gits_grid,
    load_solver_calibration,
    measure_statistics,
    refine_grid,
    save_solver_calibration,
)
from velodiff.errors import VelodiffError
from velodiff.grids import make_grid
from velodiff.oracle import GaussianMixture, MixtureDenoiser
from velodiff.sampling import sample
from velodiff.schedules import get_schedule
from velodiff.solvers.dpm_solver_v3 import ModelStatistics
from velodiff.solvers.unipc import compensate

F64 = torch.float64
SCHED = get_schedule("scaled_linear")


def _noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _mixture(components: int, seed: int, shape=(2, 3, 3)) -> MixtureDenoiser:
    return MixtureDenoiser(GaussianMixture.random(shape, components=components, seed=seed), SCHED)


def test_dpm_solver_v3_with_degenerate_statistics_is_ddim():
    """l = 1, s = b = 0 make DPM-Solver-v3's first-order step DPM-Solver++'s, i.e. DDIM (Zheng et al.
    2023, Sec. 3.2); the tabulated integrals are accurate to ~1e-6."""
    den = _mixture(4, 3)
    x = _noise(16, (2, 3, 3), 0)
    ts = make_grid("logsnr", SCHED, 7)
    lams = SCHED.log_snr(make_grid("logsnr", SCHED, 30)[:-1])
    ems = ModelStatistics.degenerate(lams)
    v3 = sample(den, x, ts, "dpm_solver_v3", ems=ems, order=1, use_corrector=False).x
    ddim = sample(den, x, ts, "ddim").x
    assert float((v3 - ddim).abs().max()) < 1e-4
    assert float((ddim - sample(den, x, ts, "dpmpp_2m").x).abs().max()) > 1e-2  # the check can fail


def test_dpm_solver_v3_half_corrects_only_the_noisier_half():
    """``half``: the corrector runs only at steps above half the schedule's time (the official code's
    option): a grid below it runs as without the corrector, one above it as with it everywhere."""
    den = _mixture(4, 3)
    x = _noise(8, (2, 3, 3), 0)
    ems = ModelStatistics.degenerate(SCHED.log_snr(make_grid("logsnr", SCHED, 30)[:-1]))
    low = make_grid("logsnr", SCHED, 6, t_start=0.45)
    high = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.55], dtype=F64)

    def run(ts, **kw):
        return sample(den, x, ts, "dpm_solver_v3", ems=ems, order=2, **kw).x

    assert torch.equal(run(low, half=True), run(low, use_corrector=False))
    assert torch.equal(run(high, half=True), run(high, use_corrector=True))
    assert not torch.equal(run(high, use_corrector=True), run(high, use_corrector=False))


def test_statistics_of_a_gaussian_are_exact_and_make_v3_exact():
    """For Gaussian data N(mu, diag(v)) the denoiser is linear, so dN/dx is diagonal, sigma^2 / (alpha^2 v
    + sigma^2), and Hutchinson's estimate of its diagonal is exact; f = -l mu is the same for every
    sample, so g is flat once b is fitted and DPM-Solver-v3 solves the ODE in a few steps where DDIM
    cannot (Eq. 9-11)."""
    den = _mixture(1, 5)
    mix = den.mixture
    problem = denoiser_problem(den, _noise(32, (2, 3, 3), 1))
    ems = measure_statistics(problem, points=120, share="none")
    raw = ems.raw
    lam = raw["lambdas"]
    ts = SCHED.t_from_log_snr(lam)
    a, s = SCHED.alpha(ts).reshape(-1, 1, 1, 1), SCHED.sigma(ts).reshape(-1, 1, 1, 1)
    exact_l = s**2 / (a**2 * mix.variances[0] + s**2)
    assert float((raw["l"] - exact_l).abs().max()) < 1e-6
    ref = problem.reference().final
    grid = make_grid("logsnr", SCHED, 4)
    v3 = problem.run(grid, "dpm_solver_v3", {"ems": ems})
    ddim = problem.run(grid, "ddim")
    err_v3, err_ddim = float(((v3 - ref) ** 2).mean()), float(((ddim - ref) ** 2).mean())
    assert err_v3 < 1e-3 * err_ddim, (err_v3, err_ddim)


def test_dc_compensation_and_per_step_orders_are_exact_identities():
    """ratio 1 leaves x0 as evaluated (the Lagrange polynomial at its own node); ratio 0 gives the
    previous evaluation; all-ones ratios and per-step caps equal to the order change nothing."""
    den = _mixture(4, 7)
    x = _noise(8, (2, 3, 3), 2)
    ts = make_grid("karras", SCHED, 8)
    plain = sample(den, x, ts, "unipc").x
    same = sample(den, x, ts, "unipc", dc_ratios=(1.0,) * 8, orders=(2,) * 8).x
    assert torch.equal(plain, same)
    moved = sample(den, x, ts, "unipc", dc_ratios=(1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0)).x
    assert float((moved - plain).abs().max()) > 1e-6

    class Ctx:
        def t(self, i):
            return [0.9, 0.7, 0.5, 0.3][i]

    vals = (torch.tensor([1.0]), torch.tensor([2.0]))  # at t 0.7, 0.5; new at 0.3
    new = torch.tensor([5.0])
    assert torch.allclose(compensate(Ctx(), 3, vals, new, 1.0, 2), new)
    assert torch.allclose(compensate(Ctx(), 3, vals, new, 0.0, 2), vals[-1])


def test_gits_grid_and_descent():
    """The GITS path has exactly N steps from t_max to 0, decreasing; the descent never ends worse than
    it starts and spends at most its runs."""
    problem = denoiser_problem(_mixture(6, 9), _noise(24, (2, 3, 3), 3))
    grid = gits_grid(problem, 5)
    assert len(grid) == 6 and float(grid[0]) == SCHED.t_max and float(grid[-1]) == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    start = make_grid("uniform", SCHED, 5)
    before = problem.score(start, "dpmpp_2m")
    runs0 = problem.evaluations
    refined, after = refine_grid(problem, "dpmpp_2m", start, max_runs=12)
    assert after <= before and after == pytest.approx(problem.score(refined, "dpmpp_2m"))
    assert problem.evaluations - runs0 <= 13 * 5


def test_calibrated_configuration_transfers_to_unseen_noise():
    """Calibrated on one batch of a Gaussian mixture, the fitted UniPC beats every named grid with
    UniPC on a batch of other noise (the calibration property at small scale)."""
    den = _mixture(6, 21)
    cal = denoiser_problem(den, _noise(32, (2, 3, 3), 10))
    test = denoiser_problem(den, _noise(32, (2, 3, 3), 11))
    res = calibrate_solver(cal, [5], methods=("grid", "dc"), solvers=("unipc",), max_runs=16)
    (entry,) = res["entries"]
    ts = torch.tensor(entry["ts"], dtype=F64)
    calibrated = test.score(ts, "unipc", entry_options(entry))
    named = min(test.score(make_grid(g, SCHED, 5), "unipc") for g in ("karras", "logsnr", "uniform"))
    assert calibrated < named


def test_artefact_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    with pytest.raises(VelodiffError, match="velodiff calibrate solver --model M --guidance 2.5"):
        load_solver_calibration("abc", 2.5)
    art = {
        "version": 1,
        "kind": "solver",
        "model_hash": "abc",
        "guidance": 2.5,
        "entries": [{"solver": "unipc", "nfe": 6, "method": "grid", "ts": [1.0, 0.0], "options": {}}],
    }
    path = save_solver_calibration(art, None)
    assert json.loads(path.read_text())["model_hash"] == "abc"
    loaded = load_solver_calibration("abc", 2.5)
    assert find_entry(loaded, "unipc", 6)["method"] == "grid"
    with pytest.raises(VelodiffError, match=r"calibrated: unipc@6\)"):
        find_entry(loaded, "unipc", 5)
    with pytest.raises(VelodiffError, match="is damaged"):  # a hand-edited file: TypeError before
        find_entry({**loaded, "entries": [1, 2]}, "unipc", 6)
    path.write_text("[1, 2]")
    with pytest.raises(VelodiffError, match="is not a velodiff solver calibration"):
        load_solver_calibration("abc", 2.5)
    path = save_solver_calibration(art, None)
    with pytest.raises(VelodiffError, match="another model"):
        load_solver_calibration("xyz", 2.5, path=path)
    with pytest.raises(VelodiffError, match="made at guidance 2.5, not 7.5"):
        load_solver_calibration("abc", 7.5, path=path)
    from velodiff.calibrated.artefact import beside_model_path
    from velodiff.eval.reference import model_hash

    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    h = model_hash(folder)
    beside = save_solver_calibration({**art, "model_hash": h}, None, beside_model_path(folder, 2.5))
    assert beside == folder / "velodiff" / "solver-cfg2.5.json"
    assert model_hash(folder) == h  # the artefact beside the model is not part of its fingerprint
    single = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(4.0)}, str(single))
    renamed = single.rename(tmp_path / "b.safetensors")
    other = tmp_path / "c.safetensors"
    save_file({"w": torch.arange(4.0) + 1}, str(other))
    hb = model_hash(renamed)
    save_file({"w": torch.arange(4.0)}, str(single))
    assert model_hash(single) == hb != model_hash(other)  # a single file's content, not its name
    assert load_solver_calibration(h, 2.5, model_path=folder)["_path"] == str(beside)  # found beside it
    with pytest.raises(VelodiffError, match="no solver calibration"):
        load_solver_calibration(h, 2.5)
    with pytest.raises(VelodiffError, match="below the calibration's minimum"):
        calibrate_solver(denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0)), [2])
    with pytest.raises(VelodiffError, match="no NFE to calibrate"):
        calibrate_solver(denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0)), [])
    with pytest.raises(VelodiffError, match=r"minimum \(by method: dc 4\)"):  # DC fits from the third step
        calibrate_solver(denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0)), [3], methods=["dc"])
    with pytest.raises(VelodiffError, match="add dpm_solver_v3 to the methods"):  # no statistics to run on
        calibrate_solver(denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0)), [4], methods=["grid"],
                         solvers=["dpm_solver_v3"])
    few = denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0))
    few.reference_steps = 10
    with pytest.raises(VelodiffError, match="unipc takes 12 steps; a calibration on a 10-step reference"):
        calibrate_solver(few, [12], methods=["grid"], solvers=["unipc"])
    assert few.evaluations == 0  # refused before the reference is solved
    with pytest.raises(VelodiffError, match="velodiff.ModelDenoiser"):  # a plain function: not AttributeError
        denoiser_problem(lambda x, t: x, _noise(4, (2, 3, 3), 0))
    with pytest.raises(VelodiffError, match=r"made at guidance 2.5, not 2.5000001;.*--guidance 2.5000001"):
        load_solver_calibration("abc", 2.5000001, path=path)  # its file name rounds; the message does not
    # statistics are named by their content and written before the JSON that names them: a kill between
    # the two leaves the old JSON naming the old statistics; the ones no JSON names are removed after
    lam = torch.linspace(-5.0, 5.0, 4, dtype=F64)
    stats = [ModelStatistics(lam, torch.full((4, 1), v, dtype=F64), torch.zeros(4, 1, dtype=F64),
                             torch.zeros(4, 1, dtype=F64)) for v in (1.0, 0.5)]
    first = json.loads(save_solver_calibration(art, stats[0]).read_text())["ems"]
    second = json.loads(save_solver_calibration(art, stats[1]).read_text())["ems"]
    assert first != second
    assert sorted(p.name for p in path.parent.glob("*.safetensors")) == [second]
    # another model's statistics are not "stale": sd[12]'s file names are no glob pattern over sd1's
    sd1 = save_solver_calibration(art, stats[0], tmp_path / "sd1.solver-cfg2.5.json")
    save_solver_calibration(art, stats[1], tmp_path / "sd[12].solver-cfg2.5.json")
    assert (tmp_path / json.loads(sd1.read_text())["ems"]).is_file()


def test_a_calibration_adds_to_the_artefact_for_the_same_model_and_scale(tmp_path, monkeypatch):
    """Calibrating one more NFE (what the missing-entry line tells the user to run) keeps the entries and
    statistics already there; what it fits again replaces the old; new statistics retire the old
    DPM-Solver-v3 entries (fitted on the old ones). Two scales never share a file."""
    from velodiff.calibrated.artefact import solver_calibration_path

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))

    def entry(solver: str, nfe: int, error: float) -> dict:
        return {"solver": solver, "nfe": nfe, "method": "grid", "ts": [1.0, 0.0], "options": {},
                "error": error}

    def art(*entries: dict) -> dict:
        return {"version": 1, "kind": "solver", "model_hash": "abc", "guidance": 2.5,
                "entries": list(entries)}

    lam = torch.linspace(-5.0, 5.0, 4, dtype=F64)
    stats = [ModelStatistics(lam, torch.full((4, 1), v, dtype=F64), torch.zeros(4, 1, dtype=F64),
                             torch.zeros(4, 1, dtype=F64)) for v in (1.0, 0.5)]
    path = save_solver_calibration(art(entry("unipc", 6, 0.1), entry("dpm_solver_v3", 6, 0.2)), stats[0])
    ems = json.loads(path.read_text())["ems"]
    save_solver_calibration(art(entry("unipc", 5, 0.3), entry("unipc", 6, 0.05)), None)
    now = json.loads(path.read_text())
    assert [(e["solver"], e["nfe"], e["error"]) for e in now["entries"]] == [
        ("unipc", 5, 0.3), ("dpm_solver_v3", 6, 0.2), ("unipc", 6, 0.05)]
    assert now["ems"] == ems and (path.parent / ems).is_file()
    save_solver_calibration(art(entry("dpm_solver_v3", 8, 0.01)), stats[1])
    now = json.loads(path.read_text())
    assert [(e["solver"], e["nfe"]) for e in now["entries"]] == [
        ("unipc", 5), ("unipc", 6), ("dpm_solver_v3", 8)]
    assert now["ems"] != ems and not (path.parent / ems).exists()
    assert solver_calibration_path("abc", 7.5) != solver_calibration_path("abc", 7.5000001)
    assert solver_calibration_path("abc", 7.0).name == "solver-abc-cfg7.json"


def test_a_calibrated_entry_runs_only_with_the_options_it_was_fitted_for(tmp_path, monkeypatch):
    """The shipped entries were fitted for velodiff's UniPC (B(h) = e^h - 1); ComfyUI's uni_pc (B(h) = h)
    asking for them is refused with the command that fits its own, which then runs beside them. An
    entry whose options the solver would not take (a damaged file) is refused in one line."""
    import velodiff
    from velodiff.eval.reference import model_hash
    from velodiff.pipelines import text2img

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    model = velodiff.load("default")
    kw = dict(guidance=2.5, output="latent", seeds=[0], nfe=6, grid="calibrated")
    mine = text2img(model, "a red circle", solver="unipc", **kw)
    with pytest.warns(UserWarning, match="fitted on 64x64 images; this run makes 64x96"):
        text2img(model, "a red circle", solver="unipc", height=64, width=96, **kw)
    with pytest.raises(VelodiffError, match=r"fitted for unipc with its own default options, not "
                       r"lower_order_final=always, order=3, solver_type=bh1; .*--nfe 6 --solvers 'uni_pc'"):
        text2img(model, "a red circle", solver="uni_pc", **kw)
    six = make_grid("karras", model.schedule, 6).tolist()
    fitted = {"solver": "unipc", "nfe": 6, "method": "grid", "ts": six, "options": {},
              "configuration": {"lower_order_final": "always", "order": 3, "solver_type": "bh1"}}
    art = {"version": 1, "kind": "solver", "model_hash": model_hash(model.path), "guidance": 2.5,
           "entries": [fitted]}
    save_solver_calibration(art, None)
    assert text2img(model, "a red circle", solver="uni_pc", **kw).ts.tolist() == six
    assert torch.equal(text2img(model, "a red circle", solver="unipc", **kw).latents, mine.latents)
    damaged = {**fitted, "configuration": {}, "options": {"dc_ratios": [1.0, None, 1.0, 1.0, 1.0, 1.0]}}
    save_solver_calibration({**art, "entries": [damaged]}, None)
    with pytest.raises(VelodiffError, match=r"is damaged \(unipc option dc_ratios=\[1.0, None"):
        text2img(model, "a red circle", solver="unipc", **kw)
    # a cache file damaged from outside (truncated): the shipped one beside the model runs, and it is said
    from velodiff.calibrated.artefact import solver_calibration_path

    path = solver_calibration_path(model_hash(model.path), 2.5)
    path.write_text(path.read_text()[:100])
    with pytest.warns(UserWarning, match=r"is not valid JSON.*\(passed over: the run uses .*default-model"):
        assert torch.equal(text2img(model, "a red circle", solver="unipc", **kw).latents, mine.latents)


def test_the_model_hash_sees_an_edit_in_the_middle_of_a_weight_file(tmp_path, monkeypatch):
    """Calibrations and cached references are keyed by the model's hash: an edit of one layer in the
    middle of a large weight file (what ``velodiff erase`` makes of the cross-attention) is another model.
    A large file's digest is remembered by path, size and modification time, so rewriting it is seen."""
    import os

    from velodiff import files
    from velodiff.eval.reference import model_hash

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "MEMO_MIN_BYTES", 1)
    weights = {f"block{i}.weight": torch.full((256, 1024), float(i)) for i in range(5)}  # 5 MiB
    base, edited = tmp_path / "base" / "unet", tmp_path / "edited" / "unet"
    for folder in (base, edited):
        folder.mkdir(parents=True)
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    assert model_hash(base.parent) == model_hash(edited.parent)
    f = edited / "diffusion_pytorch_model.safetensors"
    stamp = f.stat()
    save_file({**weights, "block2.weight": weights["block2.weight"] * 0.5}, str(f))
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert model_hash(edited.parent) != model_hash(base.parent)
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) >= 2  # remembered per file version


def test_a_single_file_is_hashed_whatever_the_case_of_its_suffix(tmp_path):
    """model.SAFETENSORS loads as model.safetensors does: two such files with other weights are two models
    (their hashes once both were the empty digest: they shared calibrations and cached references)."""
    from velodiff.eval.reference import model_hash

    for name, value in (("a.SAFETENSORS", 0.0), ("b.SafeTensors", 1.0), ("c.safetensors", 1.0)):
        save_file({"w": torch.full((2,), value)}, str(tmp_path / name))
    a, b, c = (model_hash(tmp_path / n) for n in ("a.SAFETENSORS", "b.SafeTensors", "c.safetensors"))
    assert a != b and b == c  # a file's hash is its content's; renaming it keeps its calibrations
    for name, value in ((".hidden.safetensors", 0.0), (".other.safetensors", 1.0)):  # whatever its name
        save_file({"w": torch.full((2,), value)}, str(tmp_path / name))
    assert model_hash(tmp_path / ".hidden.safetensors") == a != model_hash(tmp_path / ".other.safetensors")
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "folder" / "unet" / "MODEL.SAFETENSORS"))
    empty = tmp_path / "empty"
    (empty / "unet").mkdir(parents=True)
    assert model_hash(tmp_path / "folder") != model_hash(empty)


def test_bench_takes_the_calibrated_grid_and_other_tools_names():
    from velodiff.eval.sweep import make_sweep

    s = make_sweep({"solvers": "DPM++ 2M,uni_pc", "grids": "calibrated,gits,align_your_steps"})
    assert s.solvers == ["DPM++ 2M", "uni_pc"] and s.grids == ["calibrated", "gits", "align_your_steps"]
    with pytest.raises(VelodiffError, match="unknown grid"):
        make_sweep({"grids": "nope"})


def test_calibration_of_an_alias_is_stored_under_its_velodiff_solver():
    problem = denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0))
    heun = "DPMSolverMultistepScheduler:solver_type=heun"
    res = calibrate_solver(problem, [3], methods=["grid"], solvers=[heun], max_runs=2)
    assert [e["solver"] for e in res["entries"]] == ["dpmpp_2m"]
    # fitted with the alias's options, and saved with them: a run of the plain name reproduces the fit
    assert res["entries"][0]["options"]["solver_type"] == "heun"
    ts = torch.tensor(res["entries"][0]["ts"], dtype=F64)
    assert problem.score(ts, "dpmpp_2m", {"solver_type": "heun"}) == res["entries"][0]["error"]
    with pytest.raises(VelodiffError, match="'dpmpp_2m' twice with different options"):
        calibrate_solver(problem, [3], methods=["grid"], solvers=["dpmpp_2m", "DPM++ 2M"], max_runs=2)


def test_the_cache_artefact_never_hides_the_one_beside_the_model(tmp_path, monkeypatch, capsys):
    """A calibration of one more NFE (what the missing-entry line tells the user to run) writes the cache's
    artefact; the entries and statistics beside the shipped model still run. A plan's cfg:scale is the
    scale the artefact is looked up by."""
    import velodiff
    from velodiff.cli import main
    from velodiff.eval.reference import model_hash
    from velodiff.pipelines import text2img

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    model = velodiff.load("default")
    kw = dict(guidance=2.5, output="latent", seeds=[0])
    before = text2img(model, "a red circle", nfe=6, grid="calibrated", solver="unipc", **kw)
    with pytest.raises(VelodiffError, match="solver --model default --guidance 2.5 --nfe 4 --solvers"):
        text2img(model, "a red circle", nfe=4, grid="calibrated", solver="unipc", **kw)
    four = make_grid("karras", model.schedule, 4).tolist()
    entry = {"solver": "unipc", "nfe": 4, "method": "grid", "ts": four, "options": {}}
    save_solver_calibration({"version": 1, "kind": "solver", "model_hash": model_hash(model.path),
                             "guidance": 2.5, "entries": [entry]}, None)
    assert text2img(model, "a red circle", nfe=4, grid="calibrated", solver="unipc", **kw).ts.tolist() == four
    again = text2img(model, "a red circle", nfe=6, grid="calibrated", solver="unipc", **kw)
    assert torch.equal(again.latents, before.latents)  # the shipped entry, not hidden by the cache's file
    assert text2img(model, "a red circle", nfe=6, solver="dpm_solver_v3", **kw).nfe == 6  # its statistics
    with pytest.raises(VelodiffError, match="at guidance 4"):  # not the --guidance default's artefact
        text2img(model, "a red circle", nfe=6, grid="calibrated", solver="unipc", plan="cfg:scale=4", **kw)
    # loaded with options that are the files' own (the shipped model is an sd1 v-prediction model): the
    # same identity, the shipped calibration; with another prediction type, another network, and the
    # line that says how to calibrate it names the option
    for how in ({"family": "sd1"}, {"prediction_type": "v_prediction"}):
        same = velodiff.load("default", **how)
        res = text2img(same, "a red circle", nfe=6, grid="calibrated", solver="unipc", **kw)
        assert torch.equal(res.latents, before.latents)
    eps = velodiff.load("default", prediction_type="epsilon")
    with pytest.raises(VelodiffError, match="--model default --prediction-type epsilon --guidance 2.5"):
        text2img(eps, "a red circle", nfe=6, grid="calibrated", solver="unipc", **kw)
    code = main(["calibrate", "solver", "--nfe", ",", "--guidance", "2.5"])
    assert code == 2 and "names no NFE" in capsys.readouterr().err


def test_calibrate_command_then_calibrated_grid_and_v3(tmp_path, monkeypatch, capsys):
    """`velodiff calibrate solver` writes the artefact; text2img with grid="calibrated" runs exactly the
    calibrated times; dpm_solver_v3 finds its statistics; without an artefact both are one line."""
    import velodiff
    from velodiff.cli import main
    from velodiff.default_model import default_model_path
    from velodiff.pipelines import text2img

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    bare = tmp_path / "default"  # the shipped model without the calibration that ships beside it
    bare.mkdir()
    for part in Path(default_model_path()).iterdir():
        if part.name != "velodiff":
            (bare / part.name).symlink_to(part)
    model = velodiff.load(bare)
    with pytest.raises(VelodiffError, match="velodiff calibrate solver --model"):
        text2img(model, "a red circle", nfe=4, guidance=2.5, grid="calibrated", solver="unipc")
    with pytest.raises(VelodiffError, match="velodiff calibrate solver --model"):
        text2img(model, "a red circle", nfe=4, guidance=2.5, solver="dpm_solver_v3")
    args = "calibrate solver --nfe 4 --guidance 2.5 --methods grid,dpm_solver_v3 --solvers unipc".split()
    args += "--limit 2 --max-runs 2 --reference-steps 40".split()
    try:
        main(args)
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert "wrote" in out and "unipc NFE  4" in out
    res = text2img(
        model, "a red circle", nfe=4, guidance=2.5, grid="calibrated", solver="unipc", output="latent"
    )
    from velodiff.calibrated import find_entry as find
    from velodiff.eval.reference import model_hash

    art = load_solver_calibration(model_hash(model.path), 2.5)
    assert res.ts.tolist() == find(art, "unipc", 4)["ts"] and res.nfe == 4
    gits = text2img(model, "a red circle", nfe=4, guidance=2.5, grid="gits", solver="unipc", output="latent")
    assert torch.equal(gits.latents, res.latents)  # ComfyUI's name for the model's own GITS grid
    v3 = text2img(model, "a red circle", nfe=4, guidance=2.5, solver="dpm_solver_v3", output="latent")
    assert v3.nfe == 4 and bool(torch.isfinite(v3.latents).all())
    with pytest.raises(VelodiffError, match="at guidance 7.5"):
        text2img(model, "a red circle", nfe=4, guidance=7.5, grid="calibrated", solver="unipc")
    capsys.readouterr()
    out_png = tmp_path / "a.png"
    args = ["generate", "a red circle", "-o", str(out_png), "--guidance", "2.5", "--solver", "unipc"]
    try:
        main([*args, "--grid", "calibrated", "--nfe", "4"])
    except SystemExit as e:
        assert not e.code
    assert "unipc on calibrated, 4 steps, 4 NFE" in capsys.readouterr().out and out_png.is_file()
    # a damaged entry whose grid has other steps than its NFE is refused, not silently run
    damaged = json.loads(Path(art["_path"]).read_text())
    damaged["entries"] = [{**e, "ts": [1.0, 0.0]} if (e["solver"], e["nfe"]) == ("unipc", 4) else e
                          for e in damaged["entries"]]
    Path(art["_path"]).write_text(json.dumps(damaged))
    with pytest.raises(VelodiffError, match="has 1 steps, not 4; calibrate again"):
        text2img(model, "a red circle", nfe=4, guidance=2.5, grid="calibrated", solver="unipc")
    assert main([*args, "--steps", "2", "--nfe", "4"]) == 2
    assert "give --steps or --nfe, not both" in capsys.readouterr().err
    # --beside-model: the artefact travels in the model's folder (its hash unchanged), not the cache
    cached = sorted((tmp_path / "cache").rglob("*"))
    hash_before = model_hash(bare)
    args = f"calibrate solver --model {bare} --beside-model --nfe 3 --guidance 2.5 --methods grid".split()
    try:
        main([*args, *"--solvers ddim --limit 2 --max-runs 1 --reference-steps 20".split()])
    except SystemExit as e:
        assert not e.code
    beside = bare / "velodiff" / "solver-cfg2.5.json"
    assert beside.is_file() and f"wrote {beside}" in capsys.readouterr().out
    assert model_hash(bare) == hash_before and sorted((tmp_path / "cache").rglob("*")) == cached
    ran = text2img(velodiff.load(bare), "a red circle", nfe=3, guidance=2.5, grid="calibrated", solver="ddim",
                   output="latent")
    assert ran.ts.tolist() == json.loads(beside.read_text())["entries"][0]["ts"]


def test_a_killed_calibration_writes_nothing_and_keeps_the_last_artefact(tmp_path, monkeypatch, capsys):
    """Killed mid-run (here: interrupted inside the grid descent), the command leaves the previous
    artefact as it was and no half-written file; run again, it starts clean."""
    import velodiff.calibrated.calibrate as cal
    from velodiff.cli import main

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    args = "calibrate solver --nfe 3 --guidance 2.5 --methods grid --solvers ddim --limit 2".split()
    args += "--max-runs 1 --reference-steps 20".split()

    def run() -> None:
        try:
            main(args)
        except SystemExit as e:
            assert not e.code

    run()
    (path,) = (tmp_path / "calibration").glob("solver-*.json")
    before = path.read_bytes()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "refine_grid", killed)
    with pytest.raises(SystemExit) as e:  # the CLI turns the interrupt into exit status 130
        main(args)
    assert e.value.code == 130
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    monkeypatch.undo()
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    run()
    assert json.loads(path.read_text())["entries"][0]["solver"] == "ddim"
    capsys.readouterr()
    args[args.index("grid")] = "grid,dc"  # DC needs 4 NFE: left out at 3, and the output says so
    run()
    assert "dc left out at NFE 3 (it needs at least 4)" in capsys.readouterr().out


def test_a_grid_suffix_keeps_each_steps_fitted_options():
    """img2img and inpainting run the grid from a later step: the per-step options a calibration fitted
    move with their steps."""
    from velodiff.pipelines.setup import Setup
    from velodiff.solvers import get_solver

    setup = Setup(
        get_solver("unipc"),
        torch.linspace(1, 0, 5),
        4,
        2.5,
        None,
        {"dc_ratios": (1.0, 0.9, 1.1, 1.0), "orders": (1, 2, 3, 2), "disable_corrector": (0, 2), "x": 1},
    )
    tail = setup.from_step(2)
    assert tail.ts.tolist() == [0.5, 0.25, 0.0]
    assert tail.options == {"dc_ratios": (1.1, 1.0), "orders": (3, 2), "disable_corrector": (0,), "x": 1}


def test_a_guidance_sweep_missing_one_scales_calibration_is_refused_before_any_image(tmp_path, capsys):
    """eval shapes checks every scale's run first: a scale without a calibration no longer ends the sweep
    after the others ran, with nothing written."""
    from velodiff.cli import main

    out = tmp_path / "r.json"
    try:
        code = main(["eval", "shapes", "--json", str(out), "--solver", "dpm_solver_v3",
                     "--guidance", "2.5,1.7", "--limit", "1", "--steps", "2", "--threads", "1"])
    except SystemExit as e:
        code = int(e.code or 0)
    o, err = capsys.readouterr()
    assert code == 2 and "no solver calibration for this model at guidance 1.7" in err
    assert "guidance 2.5:" not in o and not out.exists()


def test_the_objectives_geometric_mean_of_each_images_mse_and_the_mean():
    """geomean (the default): exp(mean_i log MSE_i), which one chaotic image cannot own; mse: the
    latent MSE the bars use. An outlier image moves the mean far more than the geometric mean."""
    problem = denoiser_problem(_mixture(2, 1), _noise(3, (2, 3, 3), 0))
    problem.reference_steps = 10
    ref = problem.reference().final
    g = torch.Generator().manual_seed(2)
    x = ref + 0.1 * torch.randn(ref.shape, generator=g, dtype=F64)
    per = ((x - ref) ** 2).flatten(1).mean(1)
    assert problem.objective == "geomean"
    assert problem.error(x) == pytest.approx(float(per.log().mean().exp()), rel=1e-12)
    problem.objective = "mse"
    assert problem.error(x) == pytest.approx(float(((x - ref) ** 2).mean()), rel=1e-12)
    outlier = x.clone()
    outlier[0] += 3.0
    mse_ratio = problem.error(outlier) / problem.error(x)
    problem.objective = "geomean"
    assert mse_ratio > 10 * problem.error(outlier) / problem.error(x)


def test_the_per_step_search_returns_the_error_of_what_it_returns():
    """search_steps keeps a change only when it beats the best so far, and reports that best's error."""
    from velodiff.calibrated.calibrate import search_steps

    problem = denoiser_problem(_mixture(3, 2), _noise(6, (2, 3, 3), 0))
    problem.reference_steps = 60
    ts = make_grid("karras", SCHED, 6)
    start = {"order": 2}
    err0 = problem.score(ts, "unipc", start)
    best, err = search_steps(problem, ts, start, err0)
    assert err < err0 and err == problem.score(ts, "unipc", best)


def test_dc_ratios_compensate_at_their_own_step():
    """DC-Solver's ratio i moves step i's prediction (Zhao et al. 2024): with one ratio off 1, the run
    equals the plain one up to that step and differs from it on."""
    den, x = _mixture(3, 4), _noise(4, (2, 3, 3), 1)
    ts = make_grid("karras", SCHED, 8)

    def xs(**opts):
        seen = []
        sample(den, x, ts, "unipc", callback=lambda info: seen.append(info.x.clone()), **opts)
        return seen

    plain, dc = xs(), xs(dc_ratios=(1.0, 1.0, 1.0, 1.3, 1.0, 1.0, 1.0, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], dc[:3], strict=True))
    assert not torch.allclose(plain[3], dc[3])


@pytest.mark.parametrize("seed", [21, 5])
def test_v3_calibration_keeps_the_corrector_setting_with_the_smaller_error(seed):
    from test_calibrated import _mixture, _noise
    from velodiff.calibrated import calibrate_solver, denoiser_problem

    problem = denoiser_problem(_mixture(6, seed), _noise(16, (2, 3, 3), 10))
    res = calibrate_solver(problem, [5], methods=("dpm_solver_v3",), solvers=("dpmpp_2m",), max_runs=1,
                           ems_points=20)
    (v3,) = [e for e in res["entries"] if e["solver"] == "dpm_solver_v3"]
    ts = torch.tensor(v3["ts"], dtype=torch.float64)
    on = problem.score(ts, "dpm_solver_v3", {"ems": res["ems"], "use_corrector": True})
    off = problem.score(ts, "dpm_solver_v3", {"ems": res["ems"], "use_corrector": False})
    assert v3["error"] == pytest.approx(min(on, off))
    assert v3["options"].get("use_corrector", True) == (on <= off)


def _artefact(model_hash: str = "abc", guidance: float = 2.5, *entries: dict, **extra) -> dict:
    return {"version": 1, "kind": "solver", "model_hash": model_hash, "guidance": guidance,
            "entries": list(entries), **extra}


def _entry(solver: str = "unipc", nfe: int = 6, error: float = 0.1, **extra) -> dict:
    return {"solver": solver, "nfe": nfe, "method": "grid", "ts": [1.0, 0.0], "options": {}, "error": error,
            **extra}


def test_a_calibration_adds_only_to_an_artefact_of_its_own_model_and_scale(tmp_path):
    """An artefact written at a given path (--beside-model) replaces one made there for other weights or
    another guidance scale instead of merging their entries, fitted for something else, into it."""
    path = tmp_path / "solver.json"
    save_solver_calibration(_artefact("abc", 2.5, _entry(nfe=5)), None, path)
    save_solver_calibration(_artefact("xyz", 2.5, _entry(nfe=6)), None, path)  # the weights changed
    assert [(e["nfe"]) for e in json.loads(path.read_text())["entries"]] == [6]
    save_solver_calibration(_artefact("xyz", 7.0, _entry(nfe=8)), None, path)
    assert [(e["nfe"]) for e in json.loads(path.read_text())["entries"]] == [8]


def test_entries_of_one_solver_and_nfe_for_two_configurations_are_both_kept(tmp_path, monkeypatch):
    """velodiff's UniPC and ComfyUI's uni_pc (another configuration of the same solver) at one NFE are two
    entries: calibrating one keeps the other; a new calibration's baselines replace the old ones."""
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    mine = _entry(error=0.1)
    comfy = _entry(error=0.2, configuration={"lower_order_final": "always", "order": 3, "solver_type": "bh1"})
    save_solver_calibration(_artefact("abc", 2.5, mine, baselines={"6": {"error": 0.5}}), None)
    path = save_solver_calibration(_artefact("abc", 2.5, comfy, baselines={"6": {"error": 0.4}}), None)
    art = load_solver_calibration("abc", 2.5)
    assert find_entry(art, "unipc", 6, {})["error"] == 0.1
    assert find_entry(art, "unipc", 6, comfy["configuration"])["error"] == 0.2
    assert json.loads(path.read_text())["baselines"] == {"6": {"error": 0.4}}


def test_the_cache_artefact_is_looked_up_before_the_one_beside_the_model(tmp_path, monkeypatch):
    """Both hold unipc at 6 NFE: the cache's (the user's own, newer calibration) is the one a run takes."""
    from velodiff.calibrated.artefact import beside_model_path, find_entry_in, load_solver_calibrations
    from velodiff.eval.reference import model_hash

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    h = model_hash(folder)
    save_solver_calibration(_artefact(h, 2.5, _entry(error=0.3)), None, beside_model_path(folder, 2.5))
    cache = save_solver_calibration(_artefact(h, 2.5, _entry(error=0.1)), None)
    arts = load_solver_calibrations(h, 2.5, model_path=folder)
    assert arts[0]["_path"] == str(cache) and len(arts) == 2
    entry, _ = find_entry_in(arts, "unipc", 6)
    assert entry["error"] == 0.1


@pytest.mark.parametrize("field", [{"ts": ["1.0", 0.0]}, {"nfe": "6"}, {"nfe": 6.0}])
def test_an_entry_with_a_malformed_field_is_refused_as_damaged(field):
    art = {**_artefact("abc", 2.5, {**_entry(), **field}), "_path": "x.json"}
    with pytest.raises(VelodiffError, match=r"x.json is damaged \(malformed entries\)") as e:
        find_entry(art, "unipc", 6)
    assert "\n" not in str(e.value)


def test_statistics_need_four_points():
    problem = denoiser_problem(_mixture(1, 5), _noise(4, (2, 3, 3), 1))
    with pytest.raises(VelodiffError, match="at least 4 points, got 3"):
        measure_statistics(problem, points=3)
    assert problem.evaluations == 0


def test_statistics_shared_per_channel_are_the_channel_mean_of_the_exact_diagonal():
    """share="channel" (the default): one l per channel and time, for Gaussian data the spatial mean of
    the exact Jacobian diagonal sigma^2 / (alpha^2 v + sigma^2)."""
    den = _mixture(1, 5)
    problem = denoiser_problem(den, _noise(8, (2, 3, 3), 1))
    problem.reference_steps = 20
    raw = measure_statistics(problem, points=12).raw
    assert raw["l"].shape[1:] == raw["s"].shape[1:] == raw["b"].shape[1:] == (2, 1, 1)
    ts = SCHED.t_from_log_snr(raw["lambdas"])
    a, s = SCHED.alpha(ts).reshape(-1, 1, 1, 1), SCHED.sigma(ts).reshape(-1, 1, 1, 1)
    exact = (s**2 / (a**2 * den.mixture.variances[0] + s**2)).mean(dim=(2, 3), keepdim=True)
    assert float((raw["l"] - exact).abs().max()) < 1e-6


def test_gits_fine_times_always_hold_t_max_t_min_and_zero():
    from velodiff.calibrated.grids import gits_indices

    for n in (11, 50, 201, 202, 301):
        idx = gits_indices(n)
        assert idx[0] == 0 and idx[-2:] == [n - 2, n - 1] and idx == sorted(set(idx))


def test_a_gits_step_costs_the_rms_error_of_a_ddim_step_from_the_reference():
    """C[i, j] (Chen et al. 2024, Sec. 4) is the RMS distance from the reference's x_j of one DDIM step
    from the reference's x_i at t_i to t_j, as velodiff's own DDIM takes it."""
    from velodiff.calibrated.grids import gits_costs, gits_indices

    den = _mixture(3, 4)
    problem = denoiser_problem(den, _noise(6, (2, 3, 3), 2))
    problem.reference_steps = 30
    traj = problem.reference()
    ts, cost = gits_costs(problem, traj)
    idx = gits_indices(len(traj.ts))
    for i, j in [(0, 1), (0, 7), (3, 12), (10, len(idx) - 2), (5, len(idx) - 1)]:
        step = sample(den, traj.xs[idx[i]], ts[[i, j]], "ddim").x
        rms = float(((step - traj.xs[idx[j]]) ** 2).mean().sqrt())
        assert float(cost[i, j]) == pytest.approx(rms, rel=1e-6, abs=1e-12)
    assert bool(torch.isinf(cost[3, :4]).all())


def test_the_grid_descent_spends_at_most_its_runs():
    den = _mixture(3, 4)
    problem = denoiser_problem(den, _noise(6, (2, 3, 3), 2))
    problem.reference_steps = 30
    problem.reference()
    for max_runs in (1, 4, 7):
        before = problem.evaluations
        refine_grid(problem, "dpmpp_2m", make_grid("uniform", SCHED, 5), max_runs=max_runs)
        assert problem.evaluations - before <= max_runs * 5


def test_a_problem_is_one_line_on_a_grid_off_t_max_solves_its_reference_once_and_scores_nan_as_inf():
    problem = denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0))
    problem.reference_steps = 10
    with pytest.raises(VelodiffError, match="a calibration grid starts at t_max=1, not 0.5"):
        problem.run(torch.tensor([0.5, 0.0], dtype=F64), "ddim")
    problem.reference()
    spent = problem.evaluations
    assert problem.reference() is problem.reference() and problem.evaluations == spent
    from velodiff.calibrated import Problem

    nan = Problem(SCHED, problem.x, lambda ts, spec, o, cb: torch.full_like(problem.x, float("nan")),
                  problem.denoise)
    nan._reference = problem.reference()
    assert nan.score(make_grid("karras", SCHED, 4), "ddim") == float("inf")
    from velodiff.calibrated import model_problem

    with pytest.raises(VelodiffError, match="2 prompts but 1 seeds"):
        model_problem(None, ["a", "b"], [1], 2.5)


class _ScoreAnything:
    """A problem whose every change lowers the error: shows which choices a fit tries."""

    def __init__(self):
        self.calls = 0

    def score(self, ts, solver, options):
        self.calls += 1
        return 1.0 / (1 + self.calls)


def test_dc_ratios_leave_the_first_two_steps_and_the_last_alone_and_the_search_leaves_the_last():
    """DC's compensation needs two earlier points and none applies on the final jump to 0 (MIN_NFE's
    reason); the per-step search chooses for every step but the last (the jump)."""
    from velodiff.calibrated.calibrate import fit_ratios, search_steps

    ts = make_grid("karras", SCHED, 6)
    opts, _ = fit_ratios(_ScoreAnything(), ts, {}, 1.0, max_runs=40)
    ratios = opts["dc_ratios"]
    assert len(ratios) == 6 and ratios[:2] == (1.0, 1.0) and ratios[-1] == 1.0 and ratios[2:5] != (1.0,) * 3
    best, _ = search_steps(_ScoreAnything(), ts, {"order": 2}, 1.0)
    assert best["order"] == 3  # choices up to order 3 are tried, so the cap is 3
    assert best["orders"][-1] == 2 and 5 not in best["disable_corrector"]


def test_a_stochastic_solver_is_refused_before_anything_runs():
    problem = denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0))
    with pytest.raises(VelodiffError, match="deterministic one-call-per-step"):
        calibrate_solver(problem, [4], methods=["grid"], solvers=["euler_a"])
    assert problem.evaluations == 0


def test_the_baseline_is_the_best_uncalibrated_named_grid_and_entries_keep_their_configuration():
    """The baseline an NFE's entries are compared with is the least error of the plain solvers on the
    named grids (not DPM-Solver-v3, which runs on calibrated statistics); an alias's entry records the
    configuration it was fitted for; the dc method calibrates UniPC even when not listed."""
    from velodiff.calibrated.calibrate import _named_grids

    problem = denoiser_problem(_mixture(3, 2), _noise(6, (2, 3, 3), 0))
    problem.reference_steps = 40
    heun = "DPMSolverMultistepScheduler:solver_type=heun"
    res = calibrate_solver(problem, [4], methods=["grid", "dpm_solver_v3", "dc"], solvers=[heun], max_runs=2,
                           ems_points=12)
    assert sorted(e["solver"] for e in res["entries"]) == ["dpm_solver_v3", "dpmpp_2m", "unipc"]
    (fitted,) = [e for e in res["entries"] if e["solver"] == "dpmpp_2m"]
    assert fitted["configuration"] == {"solver_type": "heun"}
    errors = [(problem.score(ts, s, o), s) for s, o in (("dpmpp_2m", {"solver_type": "heun"}), ("unipc", {}))
              for _, ts in _named_grids(problem, 4)]
    best = min(errors)
    assert res["baselines"]["4"]["error"] == best[0] and res["baselines"]["4"]["solver"] == best[1]


class _Target:
    """A problem whose error is the distance of one grid time to a target (the descent's own view)."""

    schedule = SCHED

    def __init__(self, k: int, target: float):
        self.k, self.target = k, target

    def score(self, ts, solver, options):
        return abs(float(ts[self.k]) - self.target)


@pytest.mark.parametrize(("k", "target"), [(1, 0.4), (1, 0.97), (3, 0.2)])
def test_the_grid_descent_follows_the_error_towards_either_neighbour(k, target):
    """Each interior time moves towards the earlier or the later neighbour (t_min for the last), and the
    step keeps its size while it gains: a time the error wants elsewhere gets near it."""
    start = make_grid("uniform", SCHED, 4)  # 1, 0.667, 0.334, 0.001, 0
    ts, err = refine_grid(_Target(k, target), "ddim", start, max_runs=60)
    assert err < 0.02 and abs(float(ts[k]) - target) == err
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0 and bool((ts[1:] < ts[:-1]).all())


def test_an_image_that_matches_the_reference_exactly_does_not_zero_every_candidates_error():
    """geomean: an image at MSE 0 (a point of the reference itself) counts at a floor, so candidates
    still differ by their other images' errors instead of all scoring 0."""
    problem = denoiser_problem(_mixture(2, 1), _noise(3, (2, 3, 3), 0))
    problem.reference_steps = 10
    ref = problem.reference().final
    near, far = ref.clone(), ref.clone()
    near[1:] += 0.01
    far[1:] += 0.1
    assert 0 < problem.error(near) < problem.error(far)


def test_dpm_solver_v3_gets_its_grid_descent_without_the_grid_method(monkeypatch):
    """The dpm_solver_v3 method fits v3's grid too (its statistics and grid go together); the other
    solvers' grids descend only with the grid method."""
    import velodiff.calibrated.calibrate as cal

    seen, real = [], cal.refine_grid
    monkeypatch.setattr(cal, "refine_grid", lambda problem, solver, *a, **k: seen.append(solver)
                        or real(problem, solver, *a, **k))
    problem = denoiser_problem(_mixture(3, 2), _noise(6, (2, 3, 3), 0))
    problem.reference_steps = 40
    calibrate_solver(problem, [4], methods=["dpm_solver_v3"], solvers=["dpmpp_2m"], max_runs=2, ems_points=12)
    assert seen == ["dpm_solver_v3"]


def test_an_entry_fitted_by_dc_then_the_search_says_both(monkeypatch):
    import velodiff.calibrated.calibrate as cal

    monkeypatch.setattr(cal, "fit_ratios", lambda problem, ts, options, err, **k: (
        {**options, "dc_ratios": (1.0,) * (len(ts) - 1)}, err / 2))
    monkeypatch.setattr(cal, "search_steps", lambda problem, ts, options, err, **k: (
        {**options, "orders": (2,) * (len(ts) - 1)}, err / 2))
    problem = denoiser_problem(_mixture(2, 1), _noise(4, (2, 3, 3), 0))
    problem.reference_steps = 40
    res = calibrate_solver(problem, [4], methods=["grid", "dc", "search"], solvers=["unipc"], max_runs=1)
    (entry,) = res["entries"]
    assert entry["method"] == "dc+search" and {"dc_ratios", "orders"} <= set(entry["options"])


def test_a_configuration_leaves_out_the_options_a_calibration_fits():
    """An entry is matched on the options it was fitted for, not on those it fitted (a run passing its
    own dc_ratios or orders still takes velodiff's UniPC entry)."""
    from velodiff.calibrated.calibrate import configuration
    from velodiff.solvers import get_solver

    fitted = {"dc_ratios": (1.0, 0.9), "orders": (1, 2), "disable_corrector": (0,), "use_corrector": False}
    assert configuration(get_solver("unipc"), fitted) == {}
    assert configuration(get_solver("unipc"), {**fitted, "order": 3}) == {"order": 3}


def test_dc_ratios_keep_only_moves_that_lower_the_error():
    """On a flat error no move is kept: the ratios stay 1 (no compensation) and the error is the start's."""
    from velodiff.calibrated.calibrate import fit_ratios

    class Flat:
        def score(self, ts, solver, options):
            return 0.5

    opts, err = fit_ratios(Flat(), make_grid("karras", SCHED, 6), {}, 0.5, max_runs=20)
    assert opts["dc_ratios"] == (1.0,) * 6 and err == 0.5


def test_the_descent_starts_from_the_best_of_the_named_grids_and_gits():
    """With no run left for the descent, the entry is its start: the least error among the named grids
    and the GITS grid (here GITS's)."""
    from velodiff.calibrated.calibrate import _named_grids

    problem = denoiser_problem(_mixture(4, 1), _noise(6, (2, 3, 3), 1))
    problem.reference_steps = 60
    gits = gits_grid(problem, 3)
    named = min(problem.score(ts, "dpmpp_2m") for _, ts in _named_grids(problem, 3))
    assert problem.score(gits, "dpmpp_2m") < named
    res = calibrate_solver(problem, [3], methods=["grid"], solvers=["dpmpp_2m"], max_runs=1)
    (entry,) = res["entries"]
    assert entry["ts"] == gits.tolist() and entry["error"] == problem.score(gits, "dpmpp_2m")


# --- review20: exact identities of UniPC's calibrated options and of DPM-Solver-v3 ---------------------


class _TimeOnly:
    """A denoiser whose x0 depends on the time alone: x0(t) = sum_k c_k u(t)^k, u = t or the log-SNR."""

    def __init__(self, schedule, coeffs, in_log_snr: bool) -> None:
        self.schedule, self.coeffs, self.in_log_snr = schedule, coeffs, in_log_snr

    def value(self, t: float) -> torch.Tensor:
        u = float(self.schedule.log_snr(torch.tensor(t, dtype=F64))) if self.in_log_snr else float(t)
        return sum(c * u**k for k, c in enumerate(self.coeffs))

    def __call__(self, x, t, cond=None):
        return self.value(float(t)).expand_as(x).clone()


_C = [torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.1]), torch.tensor([-0.04, 0.03]),
      torch.tensor([0.2, -0.1])]


def test_dc_compensation_of_a_higher_order_than_the_solver_is_exact_on_a_polynomial():
    """dc_order 3 on UniPC-2 keeps the four evaluations its Lagrange polynomial needs: where x0 is a cubic
    in t, the compensated x0 of a step is that cubic at t_i + (rho_i - 1)(t_i - t_{i-1}), exactly."""
    den = _TimeOnly(SCHED, _C, in_log_snr=False)
    x = _noise(3, (2,), 4)
    ts = make_grid("logsnr", SCHED, 8)
    ratios = (1.0,) * 4 + (0.8,) + (1.0,) * 3
    seen = []
    sample(den, x, ts, "unipc", dc_ratios=ratios, dc_order=3, callback=lambda info: seen.append(info.x0))
    t4, t3 = float(ts[4]), float(ts[3])
    torch.testing.assert_close(seen[4][0], den.value(0.8 * t4 + 0.2 * t3), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(seen[3][0], den.value(t3), rtol=0, atol=0)  # ratio 1: as evaluated


def _exact_step(den, x, t_s: float, t_t: float) -> torch.Tensor:
    """The probability-flow ODE's exact step for an x0 that is a polynomial in the log-SNR lambda:
    x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lambda x0(lambda) dlambda (Lu et al. 2022b, Eq. 9)."""
    import math

    sched = den.schedule
    lam_s, lam_t = (float(sched.log_snr(torch.tensor(v, dtype=F64))) for v in (t_s, t_t))
    sig_s, sig_t = (float(sched.sigma(torch.tensor(v, dtype=F64))) for v in (t_s, t_t))

    def antiderivative(lam):  # of e^lam sum_k c_k lam^k (integrating by parts k times)
        return math.exp(lam) * sum(
            c * sum((-1) ** j * math.perm(k, j) * lam ** (k - j) for j in range(k + 1))
            for k, c in enumerate(den.coeffs)
        )

    return (sig_t / sig_s) * x + sig_t * (antiderivative(lam_t) - antiderivative(lam_s))


def test_unipc_per_step_orders_cap_their_own_step():
    """``orders[i]`` caps step i's predictor: UniP-3 is exact where x0 is quadratic in the log-SNR (its
    order conditions), UniP-2 (rho = 1/2) is not, so with one step capped to 2 exactly that step and the
    two warm-up steps leave the exact solution."""
    den = _TimeOnly(SCHED, _C[:3], in_log_snr=True)
    x = _noise(3, (2,), 5)
    ts = make_grid("logsnr", SCHED, 8, final="t_min")
    for j in (3, 5):
        orders = tuple(2 if i == j else 3 for i in range(8))
        seen = [x]
        sample(den, x, ts, "unipc_3", orders=orders, use_corrector=False, lower_order_final=False,
               callback=lambda info, seen=seen: seen.append(info.x))  # fmt: skip
        off = [i for i in range(8)
               if float((seen[i + 1] - _exact_step(den, seen[i], float(ts[i]), float(ts[i + 1]))).abs().max())
               > 1e-6]  # fmt: skip (exact to ~1e-7 of e^lambda's cancellation; off by > 1e-3)
        assert off == [0, 1, j], (j, off)


def test_dpm_solver_v3_converges_under_any_statistics():
    """Eq. 10 is the exact solution for any l, s, b (they only choose what is extrapolated), so with
    arbitrary smooth statistics DPM-Solver-v3 still converges to the ODE's solution at its order
    (predictor alone: order 2, measured 2.0; with the corrector 2.7; order 1 alone 0.95)."""
    import math as m

    from velodiff.oracle import reference_sample, starting_noise
    from velodiff.schedules import ContinuousVP

    sched = ContinuousVP()
    den = MixtureDenoiser(GaussianMixture.random((2,), components=3, seed=1, min_var=0.2, max_var=0.5), sched)
    x = starting_noise((2,), 32, seed=3)
    lams = sched.log_snr(make_grid("logsnr", sched, 40, final="t_min"))
    u = lams.reshape(-1, 1)
    ems = ModelStatistics(lams, 1 + 0.3 * torch.sin(u) + torch.tensor([0.0, 0.2]),
                          0.2 * torch.cos(0.7 * u) - torch.tensor([0.1, 0.0]),
                          0.1 * u + torch.tensor([0.05, -0.1]))
    for opts, order in (({}, 2), ({"use_corrector": False}, 2), ({"order": 1, "use_corrector": False}, 1)):
        errs = []
        for n in (24, 48):
            ts = make_grid("logsnr", sched, n, final="t_min")
            out = sample(den, x, ts, "dpm_solver_v3", ems=ems, **opts).x
            errs.append(float((out - reference_sample(den, x, ts)).norm(dim=1).mean()))
        assert m.log2(errs[0] / errs[1]) > order - 0.3, (opts, errs)


def test_dpm_solver_v3_derivative_estimates():
    """g's derivatives at lams[0]: the Taylor conditions give a quadratic's g', g'' exactly; pseudo-order
    gives the divided differences times k!: (g0 - g1) / (l0 - l1) and 2 g[l0, l1, l2] (= g'' for a
    quadratic) on unequal spacings."""
    from velodiff.solvers.dpm_solver_v3 import _derivatives

    lams = [0.4, 0.9, -0.3]  # base point, the newer point, an older point (the corrector's order)
    a, b, c = 0.7, -1.3, 2.1

    def g(v):
        return torch.tensor([a + b * (v - lams[0]) + c * (v - lams[0]) ** 2], dtype=F64)

    gs = [g(v) for v in lams]
    d1, d2 = _derivatives(lams, gs, pseudo=False)
    torch.testing.assert_close(d1, torch.tensor([b], dtype=F64))
    torch.testing.assert_close(d2, torch.tensor([2 * c], dtype=F64))
    p1, p2 = _derivatives(lams, gs, pseudo=True)
    torch.testing.assert_close(p1, (gs[0] - gs[1]) / (lams[0] - lams[1]))
    torch.testing.assert_close(p2, torch.tensor([2 * c], dtype=F64))


def test_dpm_solver_v3_of_order_p_is_exact_on_a_polynomial_of_degree_p_minus_1():
    """With l = 1, s = b = 0 (g = -x0) the Taylor-condition predictor of order p integrates x0 exactly
    where it is a polynomial of degree p - 1 in the log-SNR (E_k of the module docstring): order 4 on a
    cubic is exact from its fourth step on, to its integral tables' accuracy (7e-5 at the end)."""
    den = _TimeOnly(SCHED, _C, in_log_snr=True)
    x = _noise(3, (2,), 6)
    ts = make_grid("logsnr", SCHED, 10, final="t_min")
    ems = ModelStatistics.degenerate(SCHED.log_snr(make_grid("logsnr", SCHED, 30, final="t_min")))
    seen = [x]
    sample(den, x, ts, "dpm_solver_v3", ems=ems, order=4, use_corrector=False, lower_order_final=False,
           callback=lambda info: seen.append(info.x))  # fmt: skip
    errs = [float((seen[i + 1] - _exact_step(den, seen[i], float(ts[i]), float(ts[i + 1]))).abs().max())
            for i in range(10)]  # fmt: skip
    assert max(errs[3:]) < 3e-4 and min(errs[:3]) > 1e-2, errs  # (order 3 there: off by > 4e-3)


def test_calibrate_solver_options_reach_the_calibration_problem(tmp_path, monkeypatch):
    """calibrate solver's --reference-steps, --objective, --limit, --seed, --nfe, --methods and --solvers
    are what the fit is given (its batch: the noise of seeds 7 and 8), recorded in the artefact."""
    import velodiff
    import velodiff.calibrated as calibrated
    from velodiff.cli import main
    from velodiff.noise import prior_sample
    from velodiff.pipelines.common import initial_noise

    seen = {}

    def fit(problem, nfes, methods, solvers, **kw):
        seen.update(reference_steps=problem.reference_steps, objective=problem.objective, x=problem.x,
                    nfes=list(nfes), methods=list(methods), solvers=list(solvers))
        return {"entries": [], "baselines": {}, "ems": None, "evaluations": 0}

    monkeypatch.setattr(calibrated, "calibrate_solver", fit)
    out = tmp_path / "c.json"
    try:
        main(["calibrate", "solver", "--guidance", "2.5", "--nfe", "5,6", "--methods", "grid", "--solvers",
              "ddim", "--reference-steps", "40", "--objective", "mse", "--limit", "2", "--seed", "7",
              "--out", str(out)])
    except SystemExit as e:
        assert not e.code
    assert (seen["reference_steps"], seen["objective"]) == (40, "mse")
    assert (seen["nfes"], seen["methods"], seen["solvers"]) == ([5, 6], ["grid"], ["ddim"])
    m = velodiff.load("default")
    z = initial_noise(m.latent_shape(2, *m.default_size), [7, 8])
    torch.testing.assert_close(seen["x"], prior_sample(m.schedule, m.schedule.t_max, z).double())
    art = json.loads(out.read_text())
    assert (art["reference_steps"], art["seed"], art["images"], art["guidance"]) == (40, 7, 2, 2.5)
