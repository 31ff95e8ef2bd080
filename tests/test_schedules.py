"""Noise schedules: exact round trips, monotone log-SNR, VP identities, and diffusers' numbers.

Property tests (hypothesis) run over each schedule's trained range [t_min, t_max]. diffusers keeps
its schedules in float32 (betas, then a float32 cumprod); velodiff computes in float64, so
"exactly" below means: equal to diffusers' own formula evaluated in float64 to float64 rounding,
and equal to diffusers' float32 tensors to float32 rounding of a 1000-term cumprod.
"""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from hypothesis import given, settings
from hypothesis import strategies as st

from velodiff import EDM, ContinuousVP, DiscreteVP, RectifiedFlow, get_schedule
from velodiff.errors import VelodiffError
from velodiff.schedules import F64

SCHEDULES = {
    "linear": DiscreteVP.linear(),
    "scaled_linear": DiscreteVP.scaled_linear(),
    "squaredcos_cap_v2": DiscreteVP.squaredcos_cap_v2(),
    "scaled_linear_zero_snr": DiscreteVP.scaled_linear().rescale_zero_terminal_snr(),
    "squaredcos_zero_snr": DiscreteVP.squaredcos_cap_v2().rescale_zero_terminal_snr(),
    "linear_zero_snr": DiscreteVP.linear().rescale_zero_terminal_snr(),
    "vp": ContinuousVP(),
    "edm": EDM(),
    "flow": RectifiedFlow(),
    "flow_shift3": RectifiedFlow(shift=3.0),
}
VP = [k for k, s in SCHEDULES.items() if isinstance(s, DiscreteVP | ContinuousVP)]
FRACTION = st.floats(0.0, 1.0, allow_nan=False)


def _t(sched, u: float) -> float:
    """The point a fraction u of the way across the trained range."""
    return sched.t_min + u * (sched.t_max - sched.t_min)


@pytest.mark.parametrize("name", SCHEDULES)
@settings(max_examples=100, deadline=None)
@given(u=FRACTION)
def test_log_snr_round_trip(name, u):
    sched = SCHEDULES[name]
    t = _t(sched, u)
    lam = sched.log_snr(t)
    back = float(sched.t_from_log_snr(lam))
    assert abs(back - t) <= 1e-6 * max(1.0, t), (t, float(lam), back)


@pytest.mark.parametrize("name", SCHEDULES)
@settings(max_examples=100, deadline=None)
@given(u=FRACTION, gap=st.floats(1e-6, 1.0))
def test_log_snr_strictly_decreasing(name, u, gap):
    sched = SCHEDULES[name]
    t1 = _t(sched, u * (1 - gap))
    t2 = _t(sched, u * (1 - gap) + gap)
    assert t2 > t1
    assert float(sched.log_snr(t1)) > float(sched.log_snr(t2))


@pytest.mark.parametrize("name", VP)
@settings(max_examples=100, deadline=None)
@given(u=st.floats(0.0, 1.0))
def test_vp_unit_variance(name, u):
    sched = SCHEDULES[name]
    t = u * sched.t_max  # from clean data (t = 0) up
    a, s = float(sched.alpha(t)), float(sched.sigma(t))
    assert a * a + s * s == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_clean_endpoint(name):
    sched = SCHEDULES[name]
    assert float(sched.alpha(0.0)) == 1.0
    assert float(sched.sigma(0.0)) == 0.0
    assert float(sched.log_snr(0.0)) == math.inf


@pytest.mark.parametrize("name", SCHEDULES)
def test_sigma_ve_round_trip_on_grid(name):
    sched = SCHEDULES[name]
    ts = torch.linspace(sched.t_min, sched.t_max, 101, dtype=F64)[:-1]  # sigma_ve(t_max) may be inf
    back = sched.t_from_sigma_ve(sched.sigma_ve(ts))
    assert torch.allclose(back, ts, rtol=1e-9, atol=1e-9)


def _diffusers_betas_f64(name: str) -> torch.Tensor:
    """diffusers' beta formulas (DDPMScheduler.__init__) evaluated in float64."""
    if name == "linear":
        return torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    if name == "scaled_linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_matches_diffusers_alphas_cumprod(name):
    sched = getattr(DiscreteVP, name)()
    ref = DDPMScheduler(
        beta_schedule=name,
        beta_start=0.00085 if name == "scaled_linear" else 1e-4,
        beta_end=0.012 if name == "scaled_linear" else 0.02,
    )
    # to float32 rounding: diffusers computes betas and a 1000-term cumprod in float32 (the cosine
    # schedule's last factor, 1 - 0.999, loses 4 more digits to cancellation in float32)
    rel = (sched.alphas_cumprod / ref.alphas_cumprod.to(F64) - 1).abs()
    assert float(rel[:-1].max()) < 4e-6 and float(rel[-1]) < (3e-5 if name == "squaredcos_cap_v2" else 4e-6)
    assert torch.allclose(sched.betas, ref.betas.to(F64), rtol=1e-6, atol=0)
    if name == "squaredcos_cap_v2":
        # diffusers' cosine betas come as float32 only; compare to that rounding
        assert torch.allclose(sched.betas, betas_for_alpha_bar(1000).to(F64), rtol=1e-6, atol=0)
    else:
        # diffusers' formula in float64: equal to float64 rounding
        acp = torch.cumprod(1.0 - _diffusers_betas_f64(name), 0)
        assert torch.allclose(sched.alphas_cumprod, acp, rtol=1e-13, atol=0)
    # at integer timesteps k (t = (k + 1) / N) the interpolated schedule is the table itself
    ks = torch.arange(1000, dtype=F64)
    alpha2 = sched.alpha(sched.t_from_timestep(ks)) ** 2
    assert torch.allclose(alpha2, sched.alphas_cumprod, rtol=1e-13, atol=0)
    assert torch.equal(sched.timestep(sched.t_from_timestep(ks)), ks)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_snr_matches_diffusers(name):
    base = getattr(DiscreteVP, name)()
    ours = base.rescale_zero_terminal_snr()
    ref = rescale_zero_terminal_snr(base.betas.clone())  # diffusers' function, run in float64
    assert torch.allclose(ours.betas, ref, rtol=1e-12, atol=1e-15)
    # the terminal step has (numerically) zero SNR: diffusers' 2^-24 floor on alphas_cumprod where
    # the step before stays above it (see the test below for linear betas)
    if name != "linear":
        assert float(ours.alphas_cumprod[-1]) == pytest.approx(2.0**-24)
    via_config = DiscreteVP.from_diffusers_config({"beta_schedule": name, "rescale_betas_zero_snr": True})
    assert torch.equal(via_config.betas, ours.betas)


def test_zero_snr_via_get_schedule_and_errors():
    assert torch.equal(
        get_schedule("scaled_linear", zero_snr=True).betas,
        DiscreteVP.scaled_linear().rescale_zero_terminal_snr().betas,
    )
    with pytest.raises(VelodiffError, match="discrete"):
        get_schedule("edm", zero_snr=True)
    with pytest.raises(VelodiffError, match="valid: "):
        get_schedule("nope")
    with pytest.raises(VelodiffError, match="betas"):
        DiscreteVP(torch.tensor([0.1, 1.5]))
    for bad, expect in (
        (lambda: DiscreteVP.linear(beta_start=float("nan")), "betas must be"),
        (lambda: RectifiedFlow(t_max=5), r"RectifiedFlow: needs 0 < t_min < t_max <= 1, .*t_max=5"),
        (lambda: RectifiedFlow(shift=0), "shift must be a finite number > 0"),
        (lambda: EDM(t_min=90), r"EDM: needs 0 < t_min < t_max \(finite\)"),
        (lambda: EDM(t_max=float("inf")), "t_max=inf"),
        (lambda: ContinuousVP(beta_0=0.1, beta_1=0.05), "0 <= beta_0 < beta_1"),
        (lambda: get_schedule("edm", rho=7), "schedule 'edm': .*'rho'"),
    ):
        with pytest.raises(VelodiffError, match=expect):
            bad()


def test_zero_snr_floor_keeps_log_snr_strictly_decreasing():
    """Linear betas rescaled to zero terminal SNR leave alphas_cumprod < 2^-24 on the steps before
    the last, so alpha = 0 is stored below half of those (diffusers' 2^-24 floor would make
    log-SNR rise at the last step); positive values are never changed."""
    sched = DiscreteVP.linear().rescale_zero_terminal_snr()
    acp = sched.alphas_cumprod
    assert bool((sched.log_alphas[1:] < sched.log_alphas[:-1]).all())
    assert float(acp[-1]) == pytest.approx(0.5 * float(acp[-2])) and float(acp[-2]) < 2.0**-24
    assert torch.allclose(acp[:-1], torch.cumprod(1.0 - sched.betas, 0)[:-1], rtol=1e-13, atol=0)


def test_schedule_edges_and_conventions():
    """ContinuousVP refuses beta_0 = beta_1 (t(lambda) divides by their difference); EDM's network time
    is c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1); a config's trained_betas are the schedule
    (diffusers' DDPMScheduler with the same trained_betas has the same alphas_cumprod)."""
    with pytest.raises(VelodiffError, match="0 <= beta_0 < beta_1"):
        ContinuousVP(beta_0=1.0, beta_1=1.0)
    sig = torch.tensor([0.002, 1.0, 80.0], dtype=F64)
    assert torch.allclose(EDM().timestep(sig), torch.log(sig) / 4, rtol=1e-15, atol=0)
    betas = torch.linspace(2e-4, 0.03, 100, dtype=F64) ** 1.1
    sched = DiscreteVP.from_diffusers_config({"trained_betas": betas.tolist(), "beta_schedule": "linear"})
    ref = DDPMScheduler(num_train_timesteps=100, trained_betas=betas.tolist())
    assert torch.allclose(sched.alphas_cumprod, ref.alphas_cumprod.to(F64), rtol=1e-5, atol=0)
    assert torch.equal(sched.betas, betas)
