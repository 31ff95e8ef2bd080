"""`velodiff bench solvers`: the sweep's records, the adapter that runs diffusers' schedulers on the
oracle, the written files, and the headline bar at small scale."""

import json

import pytest
import torch

from velodiff.cli import main
from velodiff.eval import solver_bench as sb
from velodiff.grids import make_grid
from velodiff.sampling import sample


def _velodiff(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # typer's standalone mode exits after a command that succeeds
        return int(e.code or 0)


@pytest.fixture(scope="module")
def small_records():
    oracles = sb.make_oracles(samples=24, image_samples=6, image_shape=(1, 4, 4), seed=1)
    return sb.run_sweep(
        oracles, ["ddim", "dpmpp_2m"], ["logsnr", "leading"], [3, 6], ["DPMSolverMultistep", "DDIM", "Heun"]
    )


def test_records_have_the_keys(small_records):
    assert {r["data"] for r in small_records} == {"mixture-2d", "mixture-1x4x4"}
    assert {r["source"] for r in small_records} == {"velodiff", "diffusers"}
    for r in small_records:
        assert set(sb.RECORD_KEYS) <= set(r)
        assert r["nfe_used"] <= r["nfe"] and r["error"] > 0
    # 2 solvers x 2 grids x 2 NFE + 3 schedulers x 2 NFE, per mixture
    assert len(small_records) == 2 * (8 + 6)
    json.dumps(small_records)


def test_starts_and_ends_are_recorded(small_records):
    by = {(r["data"], r["solver"], r["grid"], r["nfe"]): r for r in small_records}
    # DDIM's leading spacing under steps_offset=1 starts at k = 5 * (1000 // 6) + 1 = 831 for 6 steps
    ddim = by[("mixture-2d", "DDIM", "leading", 6)]
    assert ddim["t_start"] == pytest.approx(832 / 1000) and ddim["final"] == "t_min"
    dpm = by[("mixture-2d", "DPMSolverMultistep", "linspace", 6)]
    assert dpm["t_start"] == 1.0 and dpm["final"] == "zero" and dpm["nfe_used"] == 6
    assert dpm["t_last"] == pytest.approx(167 / 1000)  # linspace jumps to 0 from k = 166: its floor
    heun = by[("mixture-2d", "Heun", "linspace", 6)]
    assert heun["steps"] == 3 and heun["nfe_used"] == 5  # 2 n - 1 calls
    assert by[("mixture-2d", "dpmpp_2m", "logsnr", 6)]["t_start"] == 1.0


def test_diffusers_adapter_matches_velodiff_on_the_same_grid():
    """diffusers' DDIM fed the oracle's eps equals velodiff's DDIM on DDIM's own timesteps: the eps,
    timestep and noise-scaling conventions of the adapter are right."""
    oracle = sb.make_oracles(("2d",), samples=16)[0]
    x_d, info = sb.run_diffusers(oracle, "DDIM", 5)
    sched = sb.diffusers_scheduler("DDIM")
    sched.set_timesteps(5)
    ts = oracle.schedule.t_from_timestep(sched.timesteps.to(torch.float64))
    ts = torch.cat([ts, torch.tensor([oracle.schedule.t_min], dtype=torch.float64)])  # ends at k = 0
    x_v = sample(oracle.denoiser, oracle.noise, make_grid(ts.tolist(), oracle.schedule), "ddim").x
    assert info["final"] == "t_min"
    assert sb.rms_error(x_d, x_v) < 1e-5 * sb.rms_error(x_v, torch.zeros_like(x_v))


def test_reference_is_not_the_solver():
    """The reference is the ODE's limit: solvers converge to it as NFE grows, at about their order."""
    oracle = sb.make_oracles(("2d",), samples=32)[0]
    recs = sb.velodiff_records(oracle, ["dpmpp_2m"], ["logsnr"], [10, 40])
    e10, e40 = (r["error"] for r in recs)
    assert e40 < e10 / 8  # second order: (40/10)^2 = 16


def test_every_solver_spends_its_budget_as_the_pipeline_plans_it():
    """A record at NFE n is what `generate --nfe n` runs (one planner, ``SolverSpec.plan_nfe``): dpm_fast
    plans its orders from the budget (Lu et al. 2022, Sec. 3.4), its final jump to t = 0 one evaluation."""
    from velodiff.solvers import get_solver

    oracle = sb.make_oracles(("2d",), samples=8)[0]
    for nfe in (5, 8, 10):
        (rec,) = sb.velodiff_records(oracle, ["dpm_fast"], ["logsnr"], [nfe])
        steps, options = get_solver("dpm_fast").plan_nfe(nfe)
        assert rec["steps"] == steps and options == {"nfe": nfe} and rec["nfe_used"] <= nfe
        ts = make_grid("logsnr", oracle.schedule, steps)
        x = sb.prior_sample(oracle.schedule, float(ts[0]), oracle.noise)
        planned = sample(oracle.denoiser, x, ts, "dpm_fast", nfe=nfe).x
        assert rec["error"] == oracle.error(planned, rec["final"] == "zero")
    assert get_solver("dpmpp_2m").plan_nfe(8) == (8, {})


def test_a_grid_that_gives_another_step_count_is_left_out_not_an_error():
    """Regression (`make demo`'s `velodiff bench solvers` stopped with an error): ComfyUI's ddim_uniform
    gives 7 steps where 6 are asked; dpm_fast's budget planned for 6 no longer fits, so that record is
    left out, and a solver it would push over its budget too; where the grid fits, both are measured."""
    oracle = sb.make_oracles(("2d",), samples=8)[0]
    assert len(make_grid("ddim_uniform", oracle.schedule, 6)) - 1 == 7
    recs = sb.velodiff_records(oracle, ["dpm_fast", "ddim"], ["ddim_uniform", "logsnr"], [6, 15])
    got = {(r["solver"], r["grid"], r["nfe"]) for r in recs}
    assert ("dpm_fast", "ddim_uniform", 15) not in got and ("ddim", "ddim_uniform", 6) not in got
    assert {("dpm_fast", "logsnr", 15), ("ddim", "logsnr", 6)} <= got
    assert all(r["nfe_used"] <= r["nfe"] for r in recs)


def test_markdown_and_plot(small_records):
    md = sb.markdown_report(small_records, command="velodiff bench solvers")
    assert "## mixture-2d" in md and "## mixture-1x4x4" in md and "DPMSolverMultistep" in md
    assert "| NFE | best velodiff" in md
    png = sb.plot_png(small_records)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_writes_files(tmp_path, capsys):
    out = tmp_path / "new" / "bench.json"  # the folder is created: its parent exists
    rc = _velodiff(
        [
            "bench",
            "solvers",
            "--json",
            str(out),
            "--solvers",
            "dpmpp_2m",
            "--grids",
            "logsnr",
            "--nfe",
            "5,6,8,10",
            "--samples",
            "16",
            "--data",
            "2d",
            "--schedulers",
            "DPMSolverMultistep",
            "--no-progress",
        ]
    )
    assert rc == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list) and len(records) == 8
    assert out.with_suffix(".md").read_text().startswith("# Solver benchmark")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    text = capsys.readouterr().out
    assert "NFE  5:" in text and "NFE 10:" in text
    assert "velodiff bench solvers --json" in out.with_suffix(".md").read_text()


def test_command_refuses_a_missing_parent(tmp_path, capsys):
    rc = _velodiff(["bench", "solvers", "--json", str(tmp_path / "a" / "b" / "x.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --json: the folder") and err.count("\n") == 1


def test_bar_at_small_scale():
    """The headline bar on the 2-D oracle under SD's schedule: velodiff's best solver+grid has at most
    0.5x the error of diffusers' DPMSolverMultistepScheduler (default config) at NFE 5, 6, 8, 10."""
    oracle = sb.make_oracles(("2d",), samples=128)[0]
    records = sb.velodiff_records(oracle, sb.deterministic_solvers(), ["logsnr", "karras"], sb.BAR_NFES)
    records += sb.diffusers_records(oracle, [sb.BAR_BASELINE], sb.BAR_NFES)
    rows = sb.bar_ratios(records)
    assert sb.bar_verdict(rows) == "met", sb.bar_table(rows)


def test_the_oracle_denoiser_is_the_posterior_mean():
    """GaussianMixture.x0, the exact denoiser every solver error here is measured with, equals E[x0 | x_t]
    computed independently: Bayes' rule by quadrature over a fine grid of x0 (1-D, three components;
    2-D, two components with unequal variances per axis)."""
    from velodiff.oracle import GaussianMixture

    def t(values):
        return torch.tensor(values, dtype=torch.float64)

    F64 = torch.float64
    for mix, lim, n in [
        (GaussianMixture(t([0.2, 0.5, 0.3]), t([[-1.5], [0.3], [2.0]]), t([[0.05], [0.2], [0.1]])),
         5.0, 200001),
        (GaussianMixture(t([0.6, 0.4]), t([[-1.0, 0.5], [1.0, -0.5]]), t([[0.1, 0.3], [0.2, 0.05]])),
         4.0, 1201),
    ]:
        d = mix.means.shape[1]
        axis = torch.linspace(-lim, lim, n, dtype=F64)
        pts = torch.cartesian_prod(*[axis] * d).reshape(-1, d)  # the grid of x0
        prior = sum(w * torch.exp(-0.5 * ((pts - m) ** 2 / v).sum(-1)) / torch.sqrt((2 * torch.pi * v).prod())
                    for w, m, v in zip(mix.weights, mix.means, mix.variances, strict=True))
        for a, s in [(0.9, 0.4), (0.5, 0.85)]:
            x = torch.tensor([[0.3] * d, [-0.8] * d], dtype=F64)
            like = torch.exp(-0.5 * ((x[:, None] - a * pts[None]) ** 2).sum(-1) / s**2)  # N(x; a x0, s^2)
            post = prior[None] * like
            want = (post[..., None] * pts[None]).sum(1) / post.sum(1, keepdim=True)
            assert torch.allclose(mix.x0(x, torch.tensor(a), torch.tensor(s)), want, atol=1e-6)


@pytest.mark.parametrize("solver,why", [("dpm_adaptive", "error control needs"), ("dpm_solver_v3", "fitted"),
                                        ("euler_ancestral", "stochastic")])
def test_solvers_that_cannot_run_at_a_given_nfe_are_refused(tmp_path, capsys, solver, why):
    """An adaptive solver spends what its error controller needs (25 evaluations credited to NFE 5
    would win the column), DPM-Solver-v3 needs a model's statistics, an ancestral one draws noise."""
    rc = _velodiff(["bench", "solvers", "--json", str(tmp_path / "b.json"), "--solvers", solver,
                    "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and why in err and err.count("\n") == 1


# --- review24: the error's definition, the summaries' choices, the records' ends, Euler's start --------


def test_rms_error_is_the_rms_per_coordinate_over_samples():
    x = torch.zeros(2, 4, dtype=torch.float64)
    ref = torch.tensor([[1.0] * 4, [3.0] * 4], dtype=torch.float64)
    assert sb.rms_error(x, ref) == pytest.approx(5.0**0.5)  # sqrt(mean(4 * 1, 4 * 9) / 4)


def _rec(solver, grid, nfe, error, source="velodiff"):
    return {"source": source, "solver": solver, "grid": grid, "nfe": nfe, "error": error, "t_start": 1.0,
            "data": sb.BAR_DATA}


def test_summaries_pick_the_smallest_errors_and_the_bar_needs_every_nfe():
    recs = [_rec("ddim", "logsnr", 5, 0.4), _rec("ddim", "logsnr", 6, 0.2), _rec("ddim", "karras", 5, 0.1),
            _rec("ddim", "karras", 6, 0.3), _rec("dpmpp_2m", "logsnr", 5, 0.05),
            _rec("dpmpp_2m", "logsnr", 6, 0.5),
            _rec(sb.BAR_BASELINE, "linspace", 5, 0.2, "diffusers"),
            _rec(sb.BAR_BASELINE, "linspace", 6, 0.4, "diffusers")]
    # ddim: geometric means sqrt(0.4 * 0.2) on logsnr, sqrt(0.1 * 0.3) on karras
    assert sb.best_grids(recs, sb.BAR_DATA) == {"ddim": "karras", "dpmpp_2m": "logsnr"}
    rows = sb.bar_ratios(recs, nfes=(5, 6))
    assert [(r["solver"], r["grid"], r["ratio"]) for r in rows] == [
        ("dpmpp_2m", "logsnr", pytest.approx(0.25)), ("ddim", "logsnr", pytest.approx(0.5))]
    assert sb.bar_verdict(rows, 0.5) == "met" and sb.bar_verdict(rows, 0.4) == "NOT met"
    # a run that left out some of the bar's NFEs does not judge them, nor fail the bar for them
    rows = sb.bar_ratios(recs, nfes=(5, 6, 8, 10))
    assert sb.bar_verdict(rows, 0.5) == "not judged (NFE 8, 10 not measured)"
    assert sb.bar_verdict(rows, 0.4) == "NOT met"


def test_a_record_ends_where_its_grid_jumps_to_zero_and_euler_starts_from_its_own_noise_scale():
    """A velodiff record that jumps to t = 0 names the time it jumps from; diffusers' Euler (its sigma-space
    state, initial noise times ``init_noise_sigma``) fed the oracle's eps is velodiff's Euler on Euler's own
    timesteps (fractional ones interpolated a little differently: 1e-3 apart)."""
    oracle = sb.make_oracles(("2d",), samples=16)[0]
    (rec,) = sb.velodiff_records(oracle, ["ddim"], ["logsnr"], [5])
    ts = make_grid("logsnr", oracle.schedule, 5)
    assert rec["final"] == "zero" and rec["t_last"] == pytest.approx(float(ts[-2])) and rec["t_last"] > 0
    x_d, info = sb.run_diffusers(oracle, "Euler", 6)
    sched = sb.diffusers_scheduler("Euler")
    sched.set_timesteps(info["steps"])
    ts = oracle.schedule.t_from_timestep(sched.timesteps.to(torch.float64))
    ts = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    x_v = sample(oracle.denoiser, oracle.noise, make_grid(ts.tolist(), oracle.schedule), "euler").x
    assert info["final"] == "zero"
    assert sb.rms_error(x_d, x_v) < 1e-2 * sb.rms_error(x_v, torch.zeros_like(x_v))


def test_the_report_writes_the_command_as_typed_and_nfe_zero_is_refused(tmp_path, capsys):
    """The markdown report's command line is the command as typed: an off switch as its --no- form;
    --nfe 0 (no run spends no evaluation) is refused in one line before any work."""
    out = tmp_path / "b.json"
    args = ["bench", "solvers", "--json", str(out), "--solvers", "ddim", "--grids", "logsnr", "--nfe", "3",
            "--samples", "8", "--data", "2d", "--schedulers", "none"]
    assert _velodiff([*args, "--no-progress"]) == 0
    md = out.with_suffix(".md").read_text()
    assert " --no-progress" in md and " --progress" not in md
    capsys.readouterr()
    assert _velodiff([*args[:8], "--nfe", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nfe takes comma-separated integers in [1, 1000], got '0'" in err


def test_review32_the_bar_verdict_is_on_stdout_and_no_rows_is_not_judged(tmp_path, capsys):
    """review32: a run that measured none of the bar's NFEs says so on stdout (not only in the markdown),
    and an empty bar table is 'not judged', never 'met'."""
    out = tmp_path / "b.json"
    assert _velodiff(["bench", "solvers", "--json", str(out), "--solvers", "ddim", "--grids", "logsnr",
                      "--nfe", "3", "--samples", "8", "--data", "2d", "--schedulers", "none",
                      "--no-progress"]) == 0
    said = "not judged (NFE 5, 6, 8, 10 not measured)"
    assert f"\n  {said}\n" in capsys.readouterr().out
    assert f"): {said}" in out.with_suffix(".md").read_text()
    assert sb.bar_verdict([]) == "not judged"
