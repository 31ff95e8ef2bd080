"""Inversion: EDICT's round trip is exact to float round-off (float64, a tiny random UNet; float32, the
shipped model); fixed-point inversion beats DDIM inversion; RF-Inversion on a tiny random flow model; one-line
refusals."""

import math

import pytest
import torch

import velodiff
from conftest import spy_rule
from velodiff import DiscreteVP, GuidedCond, VelodiffError, make_grid
from velodiff.edit.inversion import invert_latents, regenerate_latents
from velodiff.models.base import NetworkDenoiser, UNetNetwork


@pytest.fixture(scope="module")
def tiny64():
    """A random SD1-architecture UNet in float64 over SD's schedule (v-prediction, as the shipped model),
    with random text conditionings."""
    import sd_tiny

    unet = sd_tiny.unet("sd1").double()
    den = NetworkDenoiser(UNetNetwork(unet), DiscreteVP.scaled_linear(), "v_prediction")
    g = torch.Generator().manual_seed(1)
    ehs = {"encoder_hidden_states": torch.randn(2, 6, 32, generator=g, dtype=torch.float64)}
    unc = {"encoder_hidden_states": torch.zeros(2, 6, 32, dtype=torch.float64)}
    z0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    return den, GuidedCond(ehs, unc), z0


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def round_trip(den, cond, z0, ts, method, plan="cfg:scale=3", **kw):
    inv = invert_latents(den, z0, ts, method, cond=cond, plan=plan, **kw)
    back, _, _ = regenerate_latents(den, inv, cond=cond, plan=plan)
    return inv, float((back - z0).abs().max())


def test_edict_round_trip_is_exact_in_float64_and_ddim_is_not(tiny64):
    den, cond, z0 = tiny64
    ts = make_grid("uniform", den.schedule, 10)  # ends at t = 0
    inv, err = round_trip(den, cond, z0, ts, "edict")
    assert inv.latents.dtype == torch.float64 and inv.nfe == 2 * 10
    assert err < 1e-10
    assert float((inv.latents - z0).abs().max()) > 0.5  # it did move: z0 is not the noise
    _, err_ddim = round_trip(den, cond, z0, ts, "ddim")
    assert err_ddim > 1e4 * max(err, 1e-16)


def test_edict_mixing_weight_matters_and_is_checked(tiny64):
    den, cond, z0 = tiny64
    ts = make_grid("uniform", den.schedule, 4)
    a = invert_latents(den, z0, ts, "edict", cond=cond, p=0.93).latents
    b = invert_latents(den, z0, ts, "edict", cond=cond, p=0.8).latents
    assert not torch.allclose(a, b)
    for bad in (0.0, 1.0, -0.5):  # p = 0 would divide by zero in the inverted mixing layers
        with pytest.raises(VelodiffError, match=r"EDICT's mixing weight p must be in \(0, 1\), got"):
            invert_latents(den, z0, ts, "edict", cond=cond, p=bad)
    _, err = round_trip(den, cond, z0, ts, "edict", p=0.8)  # exact at any p: regeneration uses the same
    assert err < 1e-10


def test_ddim_inversion_is_exact_when_the_prediction_does_not_change():
    """A DDIM inversion step (Song et al. 2021, Eq. 13 run backwards) evaluates at the step's lower
    time and re-noises along that prediction: with a constant x0 prediction it is exact,
    alpha(t0) x0 + sigma(t0) eps from alpha(tN) x0 + sigma(tN) eps."""
    from velodiff import ModelDenoiser

    sched = DiscreteVP.scaled_linear()
    g = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    calls = []

    def constant(x, timestep, cond):
        calls.append(float(timestep.reshape(-1)[0]))
        return x0.expand_as(x).clone()

    ts = make_grid("uniform", sched, 6)[:-1]  # ends above t = 0, so the clean end still holds eps
    z = sched.alpha(ts[-1]) * x0 + sched.sigma(ts[-1]) * eps
    inv = invert_latents(ModelDenoiser(constant, sched, "sample"), z, ts, "ddim")
    assert torch.allclose(inv.latents, sched.alpha(ts[0]) * x0 + sched.sigma(ts[0]) * eps, atol=1e-10)
    assert calls[0] == pytest.approx(float(sched.timestep(ts[-1])))  # the first call at the low end


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_fixed_point_beats_ddim_inversion(tiny64, solver):
    den, cond, z0 = tiny64
    ts = make_grid("logsnr", den.schedule, 10)
    _, err_ddim = round_trip(den, cond, z0, ts, "ddim", plan=None)
    sweeps = 8 if solver == "dpmpp_2m" else None
    inv, err_fp = round_trip(
        den, cond, z0, ts, "fixed-point", plan=None, solver=solver, iters=12, sweeps=sweeps
    )
    assert inv.solver == solver
    assert err_fp < err_ddim / 10, (err_fp, err_ddim)
    if solver == "dpmpp_2m":
        assert inv.info["sweeps"] > 1  # a multistep solver's history is replayed


@pytest.mark.parametrize("method", ["ddim", "edict"])
def test_each_step_numbers_its_evaluations_from_stage_0(tiny64, method):
    """Rules that act once per step read ``stage == 0`` (attention capture, adaptive guidance): the
    evaluations of every step, inverting and regenerating, are its stages 0, 1, ... (they ran on)."""

    den, cond, z0 = tiny64
    ts = make_grid("uniform", den.schedule, 3)
    per_step = 2 if method == "edict" else 1
    spy = spy_rule(lambda req, r: (req.step, req.stage))
    inv = invert_latents(den, z0, ts, method, cond=cond, plan=["cfg:scale=3", spy])
    assert spy.log == [(i, k) for i in reversed(range(3)) for k in range(per_step)]
    if method == "edict":
        regenerate_latents(den, inv, cond=cond, plan=["cfg:scale=3", spy])
        assert spy.log == [(i, k) for i in range(3) for k in range(per_step)]


def test_fixed_point_regenerates_with_its_solver(tiny64):
    """The round trip runs the solver the user samples with: regenerate is sample() with that solver."""
    den, cond, z0 = tiny64
    ts = make_grid("uniform", den.schedule, 6)
    inv = invert_latents(den, z0, ts, "fixed-point", cond=cond.cond, solver="unipc", iters=10)
    back, nfe, _ = regenerate_latents(den, inv, cond=cond.cond)
    direct = velodiff.sample(den, inv.latents, ts, "unipc", cond=cond.cond)
    assert torch.equal(back, direct.x) and nfe == 6


def test_a_solver_names_options_reach_the_inversion(tiny64):
    """'dpmpp_2m:solver_type=heun' is inverted as that solver, not as plain DPM-Solver++ 2M."""
    den, cond, z0 = tiny64
    ts = make_grid("uniform", den.schedule, 4)
    named = invert_latents(den, z0, ts, "fixed-point", cond=cond.cond, solver="dpmpp_2m:solver_type=heun")
    given = invert_latents(den, z0, ts, "fixed-point", cond=cond.cond, solver="dpmpp_2m", solver_type="heun")
    plain = invert_latents(den, z0, ts, "fixed-point", cond=cond.cond, solver="dpmpp_2m")
    assert torch.equal(named.latents, given.latents) and not torch.equal(named.latents, plain.latents)


def test_bad_input_is_one_line(tiny64):
    den, cond, z0 = tiny64
    ts = make_grid("uniform", den.schedule, 4)
    for kw, match in [
        (dict(method="nope"), "unknown inversion method"),
        (dict(method="rf"), "needs a flow model"),
        (dict(method="fixed-point", solver="euler_ancestral"), "stochastic"),
        (dict(method="fixed-point", solver="ddim", eta=0.5), "stochastic"),
        (dict(method="fixed-point", solver="ddim:eta=0.5"), "stochastic"),  # options in the name count
        (dict(method="ddim", solver="euler:s_churn=1"), "inverts its own sampler"),
        (dict(method="edict", solver="dpmpp_2m"), "inverts its own sampler"),
        # a rule deciding each step from the ones before (AG's per-image switch) breaks EDICT's exactness
        (dict(method="edict", plan="ag:scale=3"), "'ag:scale=3' carries state from step to step"),
        (dict(method="fixed-point", plan="apg:momentum=-0.5"), "carries state"),
    ]:
        with pytest.raises(VelodiffError, match=match) as e:
            kw = dict(kw)
            invert_latents(den, z0, ts, kw.pop("method"), cond=cond.cond, **kw)
        assert "\n" not in str(e.value)


def test_rf_inversion_on_a_tiny_flow_model(tmp_path):
    from velodiff.models.tiny import save_tiny
    from velodiff.pipelines.invert import invert

    flux = velodiff.load(save_tiny("flux", tmp_path / "flux"))
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = invert(flux, img, "a red cube", "rf", steps=8, gamma=0.0)
    assert plain.result.solver == "euler"
    controlled = invert(flux, img, "a red cube", "rf", steps=8, gamma=0.0, eta=0.9, stop=0.5)
    # the reverse controller pulls the regeneration toward the image (Rout et al. 2024)
    assert controlled.metrics["latent_max_error"] < plain.metrics["latent_max_error"]
    assert (controlled.metrics["eta"], controlled.metrics["stop"]) == (0.9, 0.5)  # the JSON tells them apart
    # gamma = 1 drives the inversion onto the drawn noise y1 (the conditional field's endpoint)
    to_noise = invert(flux, img, "a red cube", "rf", steps=8, gamma=1.0, measure=False)
    from velodiff.noise import randn

    y1 = randn(tuple(to_noise.latents.shape), 0)
    assert float((to_noise.latents - y1).abs().max()) < 1e-4
    with pytest.raises(VelodiffError, match="alpha"):
        invert(flux, img, "a red cube", "edict", steps=4)


def test_edict_on_the_shipped_model_is_exact_and_edits(model):
    from velodiff.pipelines import text2img
    from velodiff.pipelines.invert import invert

    img = text2img(model, "a red circle", seeds=[0], steps=8, guidance=2.5, output="tensor").images
    edict = invert(model, img, "a red circle", "edict", steps=8, guidance=2.5)
    ddim = invert(model, img, "a red circle", "ddim", steps=8, guidance=2.5)
    m = edict.metrics
    assert m["latent_max_error"] <= 1e-5 and m["psnr"] > 80
    assert ddim.metrics["latent_max_error"] > 100 * max(m["latent_max_error"], 1e-7)
    assert {"method", "steps", "latent_max_error", "latent_rms_error", "psnr"} <= set(m)
    assert m["plan"] == "cfg"  # what the round trip ran with
    edited = edict.regenerate("a blue circle", output="tensor")
    assert not torch.allclose(edited.latents, edict.z0)
    assert math.isfinite(m["psnr_input"])
    with pytest.raises(VelodiffError, match="stochastic"):  # the pipeline keeps the options of the name
        invert(model, img, "a red circle", "ddim", solver="ddim:eta=1", steps=8)


def test_fixed_point_runs_what_the_models_calibration_holds(model, monkeypatch):
    """The inversion and its regeneration sample with the run's solver options as the other pipelines
    resolve them: DPM-Solver-v3's shipped statistics, a calibrated grid's fitted per-step options."""
    from velodiff.pipelines import invert as inv_module

    seen = []

    def spy(real):
        return lambda *a, **kw: seen.append(set(kw) | set(kw.get("solver_options") or {})) or real(*a, **kw)

    for name in ("invert_latents", "regenerate_latents"):
        monkeypatch.setattr(inv_module, name, spy(getattr(inv_module, name)))
    img = torch.rand(1, 3, 64, 64)
    inv = inv_module.invert(model, img, "a red circle", "fixed-point", solver="dpm_solver_v3", steps=4)
    assert inv.metrics["latent_max_error"] < 10 and "ems" in seen[-1]
    inv = inv_module.invert(model, img, "a red circle", "fixed-point", solver="unipc", grid="calibrated",
                            steps=8)
    inv.regenerate("a blue circle")
    assert all({"dc_ratios", "orders", "disable_corrector"} <= kw for kw in seen[-2:])


def test_pipeline_refusals(model):
    from velodiff.pipelines.invert import invert

    with pytest.raises(VelodiffError, match="multiples of 4"):
        invert(model, torch.rand(1, 3, 62, 64), "a red circle", "ddim", steps=2)
    with pytest.raises(VelodiffError, match="needs a flow model"):
        invert(model, torch.rand(1, 3, 64, 64), "a red circle", "rf", steps=2)
    with pytest.raises(VelodiffError, match="stochastic"):
        invert(model, torch.rand(1, 3, 64, 64), "a red circle", "fixed-point", solver="ddpm", steps=2)
    image = torch.rand(1, 3, 64, 64)
    for kw, message in ((dict(p="0.5"), "p must be a number, got '0.5'"),
                        (dict(iters=2.5), "iters must be an integer, got 2.5")):
        with pytest.raises(VelodiffError, match=message):
            invert(model, image, "a red circle", "fixed-point" if "iters" in kw else "edict", steps=2, **kw)
    # another method's option would be ignored (eta here is RF-Inversion's controller, not DDIM's eta)
    for method, kw, owner in (("ddim", dict(eta=0.5), "rf"), ("edict", dict(iters=3), "fixed-point"),
                              ("fixed-point", dict(p=0.9), "edict")):
        with pytest.raises(VelodiffError, match=f"{next(iter(kw))} is an option of method '{owner}', not of"):
            invert(model, image, "a red circle", method, steps=2, **kw)


def test_regenerate_keeps_solver_options_apart_and_honours_or_refuses_a_callback(model):
    """A solver's own eta reaches the fixed-point regeneration beside RF-Inversion's (it failed with 'got
    multiple values for eta', after the inversion's work); a callback that stops a ddim regeneration is
    reported as a stop after that step; EDICT, whose coupled steps take no callback, refuses one instead
    of never calling it; latents of another shape and an unknown output are one line."""
    from velodiff.pipelines.invert import invert

    image = torch.rand(1, 3, 64, 64)
    inv = invert(model, image, "a red circle", "fixed-point", solver="ddim", solver_options={"eta": 0.0},
                 steps=3, measure=False)
    assert inv.regenerate(output="latent").nfe == 3
    ddim = invert(model, image, "a red circle", "ddim", steps=3, measure=False)
    calls = []
    r = ddim.regenerate(output="latent", callback=lambda info: calls.append(info.i) or True)
    assert calls == [0] and r.stopped and r.steps == 1 and r.nfe == 1
    edict = invert(model, image, "a red circle", "edict", steps=2, measure=False)
    with pytest.raises(VelodiffError, match="^a callback runs with the ddim and fixed-point regenerations"):
        edict.regenerate(callback=lambda info: None)
    with pytest.raises(VelodiffError, match=r"latents must be a tensor of the inverted latents' shape"):
        ddim.regenerate(latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(VelodiffError, match="unknown output 'bogus'"):
        ddim.regenerate(output="bogus")


def cli(*args: str) -> int:
    from velodiff.cli import main

    try:
        return main(list(args))
    except SystemExit as e:  # typer's standalone mode exits after a successful command
        return int(e.code or 0)


def test_cli_writes_the_metrics_and_refuses_in_one_line(tmp_path, capsys):
    import json

    from PIL import Image

    src = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src)
    out = tmp_path / "m.json"
    args = ["invert", str(src), "--prompt", "a red square", "--steps", "3", "--threads", "1"]
    assert cli(*args, "--method", "edict", "--json", str(out), "-o", str(tmp_path / "r.png")) == 0
    m = json.loads(out.read_text())
    assert m["method"] == "edict" and m["steps"] == 3 and m["latent_max_error"] <= 1e-5
    assert {"latent_rms_error", "psnr", "psnr_input"} <= set(m)
    assert (tmp_path / "r.png").is_file()
    for bad, match in [
        (["--method", "nope", "--json", str(out)], "unknown inversion method"),
        (["--method", "rf", "--json", str(out)], "needs a flow model"),
        (["--method", "fixed-point", "--solver", "ddpm", "--json", str(out)], "stochastic"),
        (["--method", "edict"], "nothing to write"),
        (["--method", "edict", "--eta", "0.5", "--json", str(out)], "--eta is read only with --method rf"),
        (["--method", "ddim", "--iters", "2", "--json", str(out)], "--iters is read only with"),
        (["--method", "fixed-point", "--p", "0.9", "--json", str(out)], "--p is read only with --method e"),
    ]:
        capsys.readouterr()
        assert cli(*args, *bad) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err
    Image.new("RGB", (62, 64)).save(tmp_path / "odd.png")
    assert cli("invert", str(tmp_path / "odd.png"), "--prompt", "x", "--json", str(out)) == 2


def linear_eps(k):
    """A model whose eps prediction is linear in x: eps = k x on channels 0-1, -k x on channels 2-3, so
    every DDIM step is linear with two slopes; the eps Jacobian k stands in for a guided model's, which
    grows with the guidance scale."""
    from velodiff import ModelDenoiser

    kk = torch.tensor([k, k, -k, -k], dtype=torch.float64).view(1, 4, 1, 1)
    return ModelDenoiser(lambda x, timestep, cond: kk * x, DiscreteVP.scaled_linear(), "epsilon")


def clean_latents(seed=3):
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fixed_point_gain_inverts_an_x_independent_step_in_one_iteration():
    """AIDI's gain g_i = alpha_i / alpha_{i+1}: with an eps prediction that does not depend on x, a DDIM
    step is x_{i+1} = (alpha_{i+1} / alpha_i) x_i + const, whose inverse slope is g_i, so one iteration
    x_i <- x_i + g_i (x_{i+1} - step_i(x_i)) per step inverts it exactly, from a first guess far off."""
    from velodiff import ModelDenoiser

    z0 = clean_latents()
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    den = ModelDenoiser(lambda x, timestep, cond: eps.expand_as(x).clone(), DiscreteVP.scaled_linear())
    ts = make_grid("uniform", den.schedule, 4)
    inv, err = round_trip(den, None, z0, ts, "fixed-point", plan=None, solver="ddim", iters=1)
    assert inv.info["iterations"] == 4 and inv.info["residual"] > 1  # the one update did all the work
    assert err < 1e-12


def test_fixed_point_anderson_converges_where_the_plain_iteration_diverges():
    """The plain iteration's error factor on a linear step is k (sigma_i - alpha_i sigma_{i+1} /
    alpha_{i+1}) (module docstring): above 1 near t_max here, so it diverges; Anderson mixing (depth 3,
    as AIDI) converges to the tolerance and the round trip is exact to round-off."""
    k = 2.0
    den, z0 = linear_eps(k), clean_latents()
    ts = make_grid("uniform", den.schedule, 4)
    a, s = den.schedule.alpha(ts), den.schedule.sigma(ts)
    assert max(k * float(s[i] - a[i] * s[i + 1] / a[i + 1]) for i in range(4)) > 1  # plain: expansive
    inv, err = round_trip(den, None, z0, ts, "fixed-point", plan=None, solver="ddim", iters=8, tol=1e-9)
    assert inv.info["residual"] <= 1e-9
    assert err < 1e-10


def test_fixed_point_keeps_its_best_sweep():
    """With a multistep solver a sweep can make the trajectory worse (here the two after the best, which end
    the iteration); the noise returned is the best sweep's: its own solver run lands at the forward error
    reported, and it is the noise a run stopped at that sweep returns."""
    den, z0 = linear_eps(0.25), clean_latents()
    ts = make_grid("logsnr", den.schedule, 8)
    inv, err = round_trip(den, None, z0, ts, "fixed-point", plan=None, solver="dpmpp_2m", iters=2)
    kept = inv.info["kept_sweep"]
    assert inv.info["sweeps"] == kept + 2  # two worse sweeps in a row end it
    assert err == pytest.approx(inv.info["forward_error"], rel=1e-9)
    stopped = invert_latents(den, z0, ts, "fixed-point", solver="dpmpp_2m", iters=2, sweeps=kept)
    assert torch.equal(inv.latents, stopped.latents)


def test_regenerate_starts_from_the_given_latents():
    """regenerate_latents(latents=edited) runs the inverted sampler from the edited latents (a latent
    edit), not from the inversion's own."""
    den, z0 = linear_eps(0.5), clean_latents()
    ts = make_grid("uniform", den.schedule, 4)
    inv = invert_latents(den, z0, ts, "ddim")
    edited = inv.latents.flip(0)  # the two images' noises swapped
    back, _, _ = regenerate_latents(den, inv, latents=edited)
    assert torch.equal(back, velodiff.sample(den, edited, ts, "ddim").x)
    assert not torch.allclose(back, regenerate_latents(den, inv)[0])


def gaussian_flow():
    """The exact flow denoiser of data N(0, I): x_t = (1 - t) x0 + t eps, E[x0 | x_t] = (1 - t) x_t /
    ((1 - t)^2 + t^2)."""
    from velodiff import ModelDenoiser, RectifiedFlow

    def net(x, t, cond):
        t = t.view(-1, 1, 1, 1)
        return (1 - t) * x / ((1 - t) ** 2 + t**2)

    return ModelDenoiser(net, RectifiedFlow(), "sample", timestep=lambda t: t)


def test_rf_batch_inverts_each_image_toward_its_own_noise():
    """RF-Inversion of a batch: image k is steered toward its own target noise y1 = randn(seed + k) (the
    same image twice gives two noises), so row k is image k inverted alone with seed + k; at gamma = 1
    the inversion lands on that noise."""
    from velodiff.noise import randn

    flow, z = gaussian_flow(), clean_latents()[:1]
    ts = make_grid("uniform", flow.schedule, 4)
    pair = torch.cat([z, z])
    both = invert_latents(flow, pair, ts, "rf", gamma=0.5, seed=7).latents
    for k in range(2):
        alone = invert_latents(flow, z, ts, "rf", gamma=0.5, seed=7 + k).latents
        assert torch.allclose(both[k : k + 1], alone, atol=1e-12)
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    to_noise = invert_latents(flow, pair, ts, "rf", gamma=1.0, seed=7).latents
    for k in range(2):
        assert torch.allclose(to_noise[k : k + 1], randn((1, *z.shape[1:]), 7 + k).double(), atol=1e-12)


def test_rf_reverse_controller_acts_on_the_first_stop_share_of_the_steps():
    """The controlled reverse field v + eta ((x - y0) / t - v) (Rout et al. 2024, Eq. 15) runs on the
    first ``stop`` share of the steps: stop = 0 is the plain flow; at eta = 1 a controlled step to t = 0
    lands on the image y0, so stop = 1 returns it, and stop = (n - 1) / n is the controlled run to the
    last time, then one plain step."""
    from dataclasses import replace

    flow, z0 = gaussian_flow(), clean_latents()
    n = 4
    ts = make_grid("uniform", flow.schedule, n)
    inv = invert_latents(flow, z0, ts, "rf", gamma=0.5)
    plain, _, _ = regenerate_latents(flow, inv)
    assert float((plain - z0).abs().max()) > 0.1  # the plain flow alone does not return the image
    assert torch.equal(regenerate_latents(flow, inv, eta=1.0, stop=0.0)[0], plain)
    assert torch.allclose(regenerate_latents(flow, inv, eta=1.0, stop=1.0)[0], z0, atol=1e-12)
    head, _, _ = regenerate_latents(flow, replace(inv, ts=ts[:-1]), eta=1.0, stop=1.0)
    tail, _, _ = regenerate_latents(flow, replace(inv, ts=ts[-2:], latents=head, reference=None))
    out, _, _ = regenerate_latents(flow, inv, eta=1.0, stop=(n - 1) / n)
    assert torch.allclose(out, tail, atol=1e-12) and not torch.allclose(out, z0, atol=1e-6)


def test_rf_settings_and_a_nan_model_are_refused_in_one_line():
    """gamma, eta and stop outside [0, 1] are refused (the CLI relies on these checks), and a model
    returning NaN during an inversion stops it with one line instead of NaN noise."""
    from velodiff import ModelDenoiser

    flow, z0 = gaussian_flow(), clean_latents()
    ts = make_grid("uniform", flow.schedule, 2)
    cases = [(lambda g=g: invert_latents(flow, z0, ts, "rf", gamma=g), r"gamma must be in \[0, 1\]")
             for g in (-0.1, 1.5)]
    inv = invert_latents(flow, z0, ts, "rf")
    cases += [(lambda kw=kw: regenerate_latents(flow, inv, **kw), r"eta and stop must be in \[0, 1\]")
              for kw in (dict(eta=1.5), dict(eta=-0.5), dict(eta=0.5, stop=1.5), dict(eta=0.5, stop=-0.1))]
    nan = ModelDenoiser(lambda x, t, c: torch.full_like(x, math.nan), DiscreteVP.scaled_linear())
    for method in ("ddim", "edict", "fixed-point"):
        cases.append((lambda m=method: invert_latents(nan, z0, make_grid("uniform", nan.schedule, 2), m),
                      "the model returned NaN or inf during inversion"))
    for call, match in cases:
        with pytest.raises(VelodiffError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_cli_p_and_edit_are_the_apis(tmp_path):
    """--p with --method edict is EDICT's mixing weight (the API's inversion at that p, taken, not refused),
    and --edit regenerates the inversion under the edit prompt: the metrics and the image written are
    the API's, and the metrics file is strict JSON (an infinite PSNR is written as null)."""
    import json

    import numpy as np
    from PIL import Image

    from velodiff.pipelines.invert import invert

    src = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src)
    out, js = tmp_path / "e.png", tmp_path / "m.json"
    assert cli("invert", str(src), "--prompt", "a red square", "--method", "edict", "--p", "0.8", "--steps",
               "3", "--edit", "a blue square", "--threads", "1", "--json", str(js), "-o", str(out)) == 0
    torch.set_num_threads(1)
    inv = invert(velodiff.load("default"), Image.open(src).convert("RGB"), "a red square", "edict", p=0.8,
                 steps=3)
    def no_constant(name):
        raise AssertionError(f"{name} in the metrics file: not JSON")

    m = json.loads(js.read_text(), parse_constant=no_constant)  # an exact round trip's PSNR is null
    assert m["edit"] == "a blue square" and m["out"] == str(out) and m["p"] == 0.8
    assert m["latent_rms_error"] == pytest.approx(inv.metrics["latent_rms_error"], rel=1e-6)
    want = inv.regenerate("a blue square").images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
