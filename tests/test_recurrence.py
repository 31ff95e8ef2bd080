"""Self-recurrence (plan rule ``recur``, universal guidance): the re-noising is the forward process
q(x_t | x_s) on every schedule kind; with an exact denoiser the recurrence keeps the data distribution
(multistep solvers start the retaken step without history); k = 1 is the plain run, the cost counts
every retaken step; an image does not depend on its batch; bad input is one line."""

import pytest
import torch

import velodiff
from velodiff import VelodiffError
from velodiff.grids import uniform_t
from velodiff.guidance.recurrence import SelfRecurrence
from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise
from velodiff.plan import RunInfo
from velodiff.sampling import StepInfo, sample
from velodiff.schedules import F64, DiscreteVP, get_schedule
from velodiff.solvers import get_solver

MIX = GaussianMixture.random((2,), components=3, seed=1)


@pytest.mark.parametrize("kind", ["scaled_linear", "flow", "edm"])
def test_renoising_is_the_forward_process(kind):
    """x_s drawn from the data's marginal at s, re-noised to t: the marginal at t (mean alpha_t mu,
    covariance alpha_t^2 C + sigma_t^2 I), whatever alpha and sigma the schedule has."""
    sched = DiscreteVP.scaled_linear() if kind == "scaled_linear" else get_schedule(kind)
    ts = uniform_t(sched, 10)
    n, i = 200_000, 6
    x0 = MIX.sample(n, seed=2)
    t_from, t = float(ts[i]), float(ts[i + 1])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    x_s = sched.alpha(t) * x0 + sched.sigma(t) * eps
    rule = SelfRecurrence(k=2)
    rule.begin(RunInfo(schedule=sched, ts=ts, solver=get_solver("ddim"), batch=n, conds={}, seeds=(7,)))
    x_t = rule.redo(StepInfo(i, t, x_s, x0, t_from))
    a, s = float(sched.alpha(t_from)), float(sched.sigma(t_from))
    cov = a * a * MIX.covariance() + s * s * torch.eye(2, dtype=F64)
    scale = float(cov.diagonal().max())
    assert torch.allclose(x_t.mean(0), a * MIX.mean(), atol=0.01 * scale**0.5), kind
    assert torch.allclose(torch.cov(x_t.T), cov, atol=0.02 * scale), (torch.cov(x_t.T), cov)
    assert rule.redo(StepInfo(i, t, x_s, x0, t_from)) is None  # k = 2: the step is taken twice, no more


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc"])
def test_an_exact_denoiser_keeps_the_data_distribution(solver):
    """With the exact mixture denoiser every step taken again from a re-noised sample lands in the same
    marginal: the samples' mean and covariance stay the data's (as without recurrence). A multistep
    solver that kept the other trajectory's history in the retaken step would be off by ~0.4."""
    sched = DiscreteVP.scaled_linear()
    x = starting_noise((2,), 4000, seed=3).to(F64)
    ts = uniform_t(sched, 60)
    res = sample(MixtureDenoiser(MIX, sched), x, ts, solver, plan="recur:k=3", seed=5)
    assert res.nfe == 3 * 60
    assert (res.x.mean(0) - MIX.mean()).abs().max() < 0.06
    assert (torch.cov(res.x.T) - MIX.covariance()).abs().max() < 0.07


def test_k1_is_the_plain_run_and_every_retaken_step_is_counted():
    sched = DiscreteVP.scaled_linear()
    den, x, ts = MixtureDenoiser(MIX, sched), starting_noise((2,), 8, seed=4).to(F64), uniform_t(sched, 10)
    plain = sample(den, x, ts, "dpmpp_2m")
    assert torch.equal(sample(den, x, ts, "dpmpp_2m", plan="recur:k=1").x, plain.x)
    res = sample(den, x, ts, "dpmpp_2m", plan="recur:k=4,start=0.2,stop=0.5")
    assert res.nfe == 10 + 3 * 3  # steps 2, 3, 4 taken four times
    assert not torch.equal(res.x, plain.x)
    again = sample(den, x, ts, "dpmpp_2m", plan="recur:k=4,start=0.2,stop=0.5")
    assert torch.equal(again.x, res.x)  # the recurrence's noise is seeded
    other = sample(den, x, ts, "dpmpp_2m", plan="recur:k=4,start=0.2,stop=0.5", seed=1)
    assert not torch.equal(other.x, res.x)


def test_an_image_does_not_depend_on_its_batch():
    from velodiff.pipelines import text2img

    torch.set_num_threads(1)
    model = velodiff.load("default")
    kw = dict(steps=6, guidance=2.5, output="latent", plan="recur:k=2,stop=0.5")
    both = text2img(model, ["two red circles", "a blue square"], seeds=[0, 1], **kw)
    alone = text2img(model, ["a blue square"], seeds=[1], **kw)
    assert torch.allclose(alone.latents, both.latents[1:], atol=1e-5)
    assert both.nfe == 6 + 3


def test_bad_input_is_one_line():
    from velodiff.edit.inversion import invert_latents

    sched = DiscreteVP.scaled_linear()
    den, x, ts = MixtureDenoiser(MIX, sched), starting_noise((2,), 2, seed=4).to(F64), uniform_t(sched, 4)
    for solver, opts, match in [
        ("euler_ancestral", {}, "'euler_ancestral' draws step noise"),
        ("ddim", {"eta": 0.5}, "'ddim' draws step noise"),
    ]:
        with pytest.raises(VelodiffError, match=match) as e:
            sample(den, x, ts, solver, plan="recur", **opts)
        assert "\n" not in str(e.value)
    with pytest.raises(VelodiffError, match="k") as e:
        sample(den, x, ts, "ddim", plan="recur:k=0")
    assert "\n" not in str(e.value)
    with pytest.raises(VelodiffError, match="retakes steps from fresh noise"):
        invert_latents(den, x, ts, "ddim", plan="recur:k=2")


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm_2"])
def test_churn_is_step_noise_recur_refuses(solver):
    """EDM churn (s_churn > 0) draws noise at each churned step as eta does: 'recur' refuses it."""
    sched = DiscreteVP.scaled_linear()
    den, x, ts = MixtureDenoiser(MIX, sched), starting_noise((2,), 2, seed=4).to(F64), uniform_t(sched, 4)
    assert get_solver(solver).draws_noise({"s_churn": 1.0}) and not get_solver(solver).draws_noise({})
    with pytest.raises(VelodiffError, match=f"'{solver}' draws step noise"):
        sample(den, x, ts, solver, plan="recur", s_churn=1.0)
