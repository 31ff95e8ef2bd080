"""Parity of the basic solvers with diffusers' schedulers, to float tolerance.

Same denoiser on both sides: the exact x0-denoiser of a Gaussian mixture (``velodiff.oracle``) under
Stable Diffusion's schedule (``DiscreteVP.scaled_linear()``; diffusers: scaled_linear 0.00085..0.012,
clip_sample False, set_alpha_to_one False, steps_offset 1). diffusers is fed the output it expects:
eps for the VP schedulers, evaluated at the network input ``scale_model_input`` gives (diffusers'
Euler-family schedulers carry x / alpha = x * sqrt(sigma^2 + 1) and scale it back), and the velocity
eps - x0 for flow matching. velodiff runs on the same times: diffusers' timesteps k mapped by
``t_from_timestep(k)``, followed by t = 0 where diffusers ends at sigma = 0, or by k = 0 (t_min) where
DDIM with set_alpha_to_one=False ends at alphas_cumprod[0]. Stochastic solvers get the same noise.

The remaining differences are float32 rounding: diffusers keeps its schedule tables in float32
(velodiff in float64), so results agree to ~1e-6 on samples of magnitude ~4; the tolerance is 2e-5.

Where velodiff deliberately differs, and so what is not compared:

* ``timestep_spacing="linspace"``: diffusers' Euler-family schedulers keep fractional timesteps and
  interpolate sigma linearly between trained timesteps, velodiff interpolates log(alpha) linearly in t
  (DPM-Solver's convention), so the noise levels differ between trained timesteps; DDIM/DDPM step from
  k to k - N // steps, which for linspace (and for trailing when steps does not divide N, e.g. 12) is
  not the next timestep of the list: diffusers then evaluates the model at a time other than the
  sample's. Parity is checked on "leading" and "trailing", with step counts that divide N = 1000.
* FlowMatchEulerDiscreteScheduler applies its shift twice to its smallest sigma (at construction
  and again in set_timesteps); velodiff's flow-shifted grid shifts once, so the parity schedule is
  ``RectifiedFlow(shift=3.0, t_min=<diffusers' once-shifted sigma_min>)``.
* HeunDiscreteScheduler duplicates its timesteps to fake a two-stage step; velodiff's ``heun`` is one
  step with two evaluations (2 N - 1 in all, the last jump to sigma = 0 being a single Euler step, as
  in diffusers).
* DDPMScheduler draws (and multiplies by ~1e-10) noise on its last step, where velodiff draws none.
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from velodiff import DiscreteVP, RectifiedFlow, make_grid, sample
from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise
from velodiff.schedules import F64

SCHED = DiscreteVP.scaled_linear()
SHAPE = (2, 8)
MIX = GaussianMixture.random(SHAPE, components=3, seed=1)
DEN = MixtureDenoiser(MIX, SCHED)
X = starting_noise(SHAPE, 4, seed=3)  # float64: what is compared is the algorithm, not float32 rounding
SD = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
K_SD = {k: v for k, v in SD.items() if k not in ("clip_sample", "set_alpha_to_one")}  # Euler family
TOL = 2e-5
STEPS = [1, 2, 5, 10, 20]  # divisors of 1000: see DDIM and 'trailing' in the module docstring
SPACINGS = ["leading", "trailing"]


def eps_model(x: torch.Tensor, k) -> torch.Tensor:
    """The oracle as an eps-prediction network of diffusers' integer timestep k."""
    t = SCHED.t_from_timestep(float(k))
    return (x - SCHED.alpha(t) * DEN(x, t)) / SCHED.sigma(t)


def _grid(timesteps: torch.Tensor, last_t: float) -> torch.Tensor:
    ts = SCHED.t_from_timestep(timesteps.to(F64))
    return torch.cat([ts, torch.tensor([last_t], dtype=F64)])


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = float((a - b).abs().max())
    assert err < TOL, f"max |diffusers - velodiff| = {err:.3g}"


def _run_k_diffusion_style(sched, x_vp: torch.Tensor, generator=None) -> torch.Tensor:
    """diffusers' Euler-family loop: the sample is x / alpha; scale_model_input gives x back."""
    x = x_vp / SCHED.alpha(SCHED.t_from_timestep(float(sched.timesteps[0])))
    for k in sched.timesteps:
        out = eps_model(sched.scale_model_input(x, k), k)
        kw = {"generator": generator} if generator is not None else {}
        x = sched.step(out, k, x, **kw).prev_sample
    return x  # sigma = 0 at the end: x / alpha = x


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_eta0(steps, spacing):
    ref = DDIMScheduler(**SD, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    x = X.clone()
    for k in ref.timesteps:
        x = ref.step(eps_model(x, k), k, x, eta=0.0).prev_sample
    # set_alpha_to_one=False: the last step lands on alphas_cumprod[0], i.e. k = 0, t = t_min
    ts = _grid(ref.timesteps, float(SCHED.t_from_timestep(0)))
    res = sample(DEN, X, ts, "ddim")
    _close(x, res.x)
    assert res.nfe == steps


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_eta1_same_noise(steps, spacing):
    ref = DDIMScheduler(**SD, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    z = starting_noise(SHAPE, 4 * steps, seed=11).reshape(steps, 4, *SHAPE)
    x = X.clone()
    for i, k in enumerate(ref.timesteps):
        x = ref.step(eps_model(x, k), k, x, eta=1.0, variance_noise=z[i]).prev_sample
    ts = _grid(ref.timesteps, float(SCHED.t_from_timestep(0)))
    _close(x, sample(DEN, X, ts, "ddim", eta=1.0, noise=lambda i: z[i]).x)


@pytest.mark.parametrize("steps", STEPS)
def test_ddpm_same_noise(steps):
    ref = DDPMScheduler(**{k: v for k, v in SD.items() if k != "set_alpha_to_one"})
    # velodiff's ddpm is the posterior q(x_{t-1} | x_t, x0) with its own variance: "fixed_small"
    # ("fixed_large" would use beta_t instead, a different sampler)
    assert ref.config.variance_type == "fixed_small" and ref.config.timestep_spacing == "leading"
    ref.set_timesteps(steps)
    gen, gen_copy = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = X.clone()
    for k in ref.timesteps:
        x = ref.step(eps_model(x, k), k, x, generator=gen).prev_sample
    # diffusers draws one noise tensor per step, in order (randn_tensor on the CPU)
    z = [torch.randn(X.shape, generator=gen_copy, dtype=X.dtype) for _ in range(steps)]
    ts = _grid(ref.timesteps, 0.0)  # DDPM's last step goes to alpha_cumprod = 1
    _close(x, sample(DEN, X, ts, "ddpm", noise=lambda i: z[i]).x)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler(steps, spacing):
    ref = EulerDiscreteScheduler(**K_SD, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ts = _grid(ref.timesteps, 0.0)
    res = sample(DEN, X, ts, "euler")
    _close(_run_k_diffusion_style(ref, X), res.x)
    assert res.nfe == steps


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_heun(steps, spacing):
    ref = HeunDiscreteScheduler(**K_SD, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    x_ref = _run_k_diffusion_style(ref, X)
    assert len(ref.timesteps) == 2 * steps - 1  # diffusers' duplicated timesteps
    ks = torch.cat([ref.timesteps[:1], ref.timesteps[1::2]])
    res = sample(DEN, X, _grid(ks, 0.0), "heun")
    _close(x_ref, res.x)
    assert res.nfe == 2 * steps - 1 == len(ref.timesteps)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_ancestral_same_noise(steps, spacing):
    ref = EulerAncestralDiscreteScheduler(**K_SD, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    gen, gen_copy = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x_ref = _run_k_diffusion_style(ref, X, gen)
    z = [torch.randn(X.shape, generator=gen_copy, dtype=X.dtype) for _ in range(steps)]
    res = sample(DEN, X, _grid(ref.timesteps, 0.0), "euler_ancestral", noise=lambda i: z[i])
    _close(x_ref, res.x)


@pytest.mark.parametrize("steps", STEPS)
def test_flow_match_euler(steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(steps)
    flow = RectifiedFlow(shift=3.0, t_min=ref.sigma_min)  # see the module docstring
    den = MixtureDenoiser(MIX, flow)
    ts = make_grid("flow-shifted", flow, steps)
    assert torch.allclose(ts, ref.sigmas.to(F64), rtol=1e-6, atol=1e-7)
    x = X.clone()
    for k in ref.timesteps:
        t = float(k) / 1000.0  # diffusers' timestep is sigma * 1000, and sigma = t
        velocity = (x - den(x, t)) / t  # eps - x0, with x = (1 - t) x0 + t eps
        x = ref.step(velocity, k, x).prev_sample
    _close(x, sample(den, X, ts, "euler").x)


def test_euler_ancestral_eta0_is_euler_and_eta1_is_ddpm():
    """k-diffusion's ancestral step with eta = 1 is DDPM's posterior sample; with eta = 0, Euler."""
    ts = make_grid("leading", SCHED, 10, steps_offset=1)
    z = starting_noise(SHAPE, 40, seed=2).reshape(10, 4, *SHAPE)
    noise = lambda i: z[i]  # noqa: E731
    a = sample(DEN, X, ts, "euler_ancestral", noise=noise).x
    b = sample(DEN, X, ts, "ddpm", noise=noise).x
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    c = sample(DEN, X, ts, "euler_ancestral", eta=0.0).x
    assert torch.allclose(c, sample(DEN, X, ts, "euler").x, rtol=0, atol=1e-12)


def test_heun_churn():
    """Churn (EDM Alg. 2) draws noise once per churned step; s_churn = 0 is deterministic; with the
    churn window [s_tmin, s_tmax] empty, churn options change nothing."""
    ts = make_grid("karras", SCHED, 8)
    base = sample(DEN, X, ts, "heun")
    assert torch.equal(base.x, sample(DEN, X, ts, "heun", seed=123).x)
    calls = []

    def noise(i):
        calls.append(i)
        return starting_noise(SHAPE, 4, seed=100 + i)

    churned = sample(DEN, X, ts, "heun", s_churn=10.0, s_tmin=0.5, s_tmax=5.0, noise=noise)
    sig = SCHED.sigma_ve(ts[:-1])
    assert calls == [i for i in range(8) if 0.5 <= float(sig[i]) <= 5.0] and calls
    assert not torch.allclose(churned.x, base.x)
    assert churned.nfe == base.nfe == 2 * 8 - 1
    empty = sample(DEN, X, ts, "heun", s_churn=10.0, s_tmin=100.0, noise=noise)
    assert torch.equal(empty.x, base.x)
    # churn never raises the noise above the schedule's top (t_max): step 0 starts there, no noise
    calls.clear()
    everywhere = sample(DEN, X, ts, "heun", s_churn=10.0, noise=noise)
    assert (
        calls == list(range(1, 8)) and torch.isfinite(everywhere.x).all()
    )  # k-diffusion churns the last too


def test_heun_from_alpha_zero():
    """Rectified flow at t = 1 has alpha = 0 (sigma/alpha infinite): heun's first step is an Euler
    step (one evaluation), the rest are Heun steps; it stays finite and beats Euler at equal NFE."""
    flow = RectifiedFlow()
    den = MixtureDenoiser(MIX, flow)
    x = X[:2]
    ts_heun = make_grid("uniform", flow, 12, final="t_min")
    ts_euler = make_grid("uniform", flow, 23, final="t_min")
    # both grids run from t = 1 to t_min: one reference serves both, by another method (DPM-Solver++
    # 2M on 200 uniform steps: error 5e-3 against scipy's DOP853, vs 0.1 for heun and 2.4 for euler)
    ref = sample(den, x, make_grid("uniform", flow, 200, final="t_min"), "dpmpp_2m").x
    heun = sample(den, x, ts_heun, "heun")
    euler = sample(den, x, ts_euler, "euler")
    assert heun.nfe == euler.nfe == 23
    assert float((heun.x - ref).norm()) < 0.5 * float((euler.x - ref).norm())


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm_2"])
def test_churn_window_includes_its_ends(solver):
    """EDM Alg. 2 line 4 churns where s_tmin <= sigma_i <= s_tmax (k-diffusion's test too): a window
    that is one grid level churns exactly that step."""
    from velodiff import EDM

    sched = EDM()
    den = MixtureDenoiser(MIX, sched)
    ts = make_grid("karras", sched, 8)
    calls = []

    def noise(i):
        calls.append(i)
        return starting_noise(SHAPE, 4, seed=100 + i)

    for j in (2, 5):
        calls.clear()
        level = float(ts[j])  # sigma / alpha on EDM is t itself
        sample(den, X, ts, solver, s_churn=10.0, s_tmin=level, s_tmax=level, noise=noise)
        assert calls == [j]
