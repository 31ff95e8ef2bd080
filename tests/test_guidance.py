"""Classifier-free guidance: linearity across prediction spaces, diffusers' guidance rescale, the
cost of interval guidance, and honest NFE / evaluation counts from sample()."""

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from velodiff import ClassifierFreeGuidance, Cost, DiscreteVP, GuidedCond, ModelDenoiser, make_grid, sample
from velodiff.denoisers import eps_from_x0
from velodiff.errors import VelodiffError
from velodiff.guidance import GuidanceRescale
from velodiff.sampling import denoise_once
from velodiff.schedules import F64

SCHED = DiscreteVP.scaled_linear()
B, SHAPE = 3, (4, 5)
G = torch.Generator().manual_seed(0)
X = torch.randn(B, *SHAPE, generator=G, dtype=F64)
COND = torch.randn(B, *SHAPE, generator=G, dtype=F64)
UNCOND = torch.zeros(B, *SHAPE, dtype=F64)


def network(x, timestep, cond):
    """A nonlinear, conditioned stand-in for a network (any prediction type)."""
    k = timestep.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
    return torch.tanh(0.7 * x + cond * (1.0 + k)) + 0.3 * cond - 0.2 * k


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [0.05, 0.4, 0.97])
def test_cfg_on_x0_equals_cfg_on_eps(prediction_type, t):
    den = ModelDenoiser(network, SCHED, prediction_type)
    w = 7.5
    x0 = denoise_once(den, X, t, GuidedCond(COND, UNCOND), ClassifierFreeGuidance(scale=w)).x0
    eps_c = eps_from_x0(SCHED, X, t, den(X, t, COND))
    eps_u = eps_from_x0(SCHED, X, t, den(X, t, UNCOND))
    eps_cfg = eps_u + w * (eps_c - eps_u)  # Ho & Salimans 2022, Eq. 6, as diffusers applies it
    assert torch.allclose(eps_from_x0(SCHED, X, t, x0), eps_cfg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("t", [0.1, 0.6, 0.95])
def test_rescale_equals_diffusers_rescale_noise_cfg(phi, t):
    den = ModelDenoiser(network, SCHED, "epsilon")
    w = 6.0
    plan = [ClassifierFreeGuidance(scale=w), GuidanceRescale(phi=phi)]
    x0 = denoise_once(den, X, t, GuidedCond(COND, UNCOND), plan).x0
    eps_c = network(X, SCHED.timestep(t).expand(B), COND)
    eps_u = network(X, SCHED.timestep(t).expand(B), UNCOND)
    ref = rescale_noise_cfg(eps_u + w * (eps_c - eps_u), eps_c, guidance_rescale=phi)
    assert torch.allclose(eps_from_x0(SCHED, X, t, x0), ref, rtol=1e-9, atol=1e-9)


class CountingNetwork:
    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, timestep, cond):
        self.batches.append(x.shape[0])
        return network(x, timestep, cond)


def test_interval_guidance_cost():
    den = ModelDenoiser(network, SCHED)
    both = GuidedCond(COND, UNCOND)

    def cost(t, plan="cfg:scale=5,t_lo=0.2,t_hi=0.6"):
        return denoise_once(den, X, t, both, plan).cost

    assert cost(0.5) == Cost(nfe=1, evals=2)
    assert cost(0.2) == cost(0.6) == Cost(1, 2)
    assert cost(0.1) == cost(0.9) == Cost(1, 1)
    assert cost(0.5, "cfg:scale=1") == Cost(1, 1)  # scale 1: conditional only
    # outside the interval the result is the conditional prediction itself
    assert torch.equal(denoise_once(den, X, 0.9, both, "cfg:scale=5,t_lo=0.2,t_hi=0.6").x0, den(X, 0.9, COND))


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m", "euler_ancestral"])
@pytest.mark.parametrize("interval", [None, (0.2, 0.6), (2.0, 3.0)])
def test_sample_counts_nfe_and_evals(solver, interval):
    net = CountingNetwork()
    lo_hi = {} if interval is None else {"t_lo": interval[0], "t_hi": interval[1]}
    cfg = ClassifierFreeGuidance(scale=4.0, **lo_hi)
    ts = make_grid("uniform", SCHED, 9)
    res = sample(ModelDenoiser(net, SCHED), X, ts, solver, cond=GuidedCond(COND, UNCOND), plan=cfg)
    assert res.nfe == len(net.batches)  # one batched network call per denoiser call
    assert res.evals == sum(net.batches) // B  # network-sample evaluations per image
    guided = sum(b == 2 * B for b in net.batches)
    assert res.evals == res.nfe + guided
    if interval is None:
        assert guided == res.nfe
    elif interval[0] > SCHED.t_max:
        assert guided == 0
    else:
        assert 0 < guided < res.nfe


def test_guidance_errors():
    den = ModelDenoiser(network, SCHED)
    ts = make_grid("uniform", SCHED, 4)
    with pytest.raises(VelodiffError, match="scale"):
        ClassifierFreeGuidance(scale=-1.0)
    with pytest.raises(VelodiffError, match="phi"):
        GuidanceRescale(phi=1.5)
    with pytest.raises(VelodiffError, match="interval"):
        sample(den, X, ts, cond=GuidedCond(COND, UNCOND), plan="cfg:scale=5,t_lo=0.6,t_hi=0.2")
    with pytest.raises(VelodiffError, match="GuidedCond"):
        sample(den, X, ts, cond=COND, plan="cfg:scale=5")
    with pytest.raises(VelodiffError, match="needs a guidance scale"):
        sample(den, X, ts, cond=GuidedCond(COND, UNCOND), plan="cfg")


def test_rescale_on_a_v_prediction_model_equals_diffusers_guidance_rescale():
    """diffusers rescales the pipeline's noise_pred, which is v on a v-prediction model (as Lin et al.
    rescale theirs): the shipped model at phi 0.7 against StableDiffusionPipeline, DDIM, its own steps."""
    from diffusers import DDIMScheduler

    import velodiff
    from velodiff.pipelines import text2img

    m = velodiff.load("default")
    assert m.prediction_type == "v_prediction"
    ddim = DDIMScheduler.from_config(m.components["scheduler_config"])
    ddim.set_timesteps(3)
    ts = m.schedule.t_from_timestep(ddim.timesteps.double()).tolist() + [m.schedule.t_min]
    z = torch.randn(1, *m.latent_shape(1, 64, 64)[1:], generator=torch.Generator().manual_seed(0))
    prompt = "a red circle above a blue square"
    pipe = m.to_diffusers(DDIMScheduler.from_config(m.components["scheduler_config"]))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, num_inference_steps=3, guidance_scale=6.0, guidance_rescale=0.7, latents=z.clone(),
               output_type="latent", height=64, width=64).images
    r = text2img(m, prompt, grid=ts, solver="ddim", guidance=6.0, guidance_rescale=0.7, latents=z,
                 output="latent")
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
@pytest.mark.parametrize("alpha, sigma", [(0.6, 0.8), (1.0, 3.0), (0.25, 0.75), (0.9, 0.05)])
def test_prediction_conversions_invert_each_other_on_any_schedule(prediction_type, alpha, sigma):
    """prediction_from_x0 is x0_from_alpha_sigma's inverse for any alpha, sigma: VP (alpha^2 + sigma^2
    = 1), EDM (alpha = 1) and flows (alpha + sigma = 1); v = alpha eps - sigma x0 whatever the schedule."""
    from velodiff.denoisers import prediction_from_x0, x0_from_alpha_sigma

    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    out = prediction_from_x0(prediction_type, x, x0, alpha, sigma)
    torch.testing.assert_close(x0_from_alpha_sigma(prediction_type, x, out, alpha, sigma), x0)
    eps = (x - alpha * x0) / sigma
    want = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0, "flow": eps - x0}
    if prediction_type != "flow" or alpha + sigma == 1.0:  # a flow's velocity is defined on a flow
        torch.testing.assert_close(out, want[prediction_type])


def test_the_distillers_v_to_x0_is_the_conversion_on_a_vp_schedule():
    """x0_from_v_vp (alpha x - sigma v, the distillers' form) is x0_from_alpha_sigma's v-prediction where
    alpha^2 + sigma^2 = 1."""
    from velodiff.denoisers import prediction_from_x0, x0_from_v_vp

    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    v = prediction_from_x0("v_prediction", x, x0, 0.6, 0.8)
    torch.testing.assert_close(x0_from_v_vp(x, v, 0.6, 0.8), x0)


def test_model_denoiser_gives_the_network_its_own_timestep_map():
    seen = []

    def net(x, timestep, cond):
        seen.append(timestep)
        return torch.zeros_like(x)

    sched = DiscreteVP.scaled_linear()
    x = torch.ones(2, 3, dtype=F64)
    ModelDenoiser(net, sched, timestep=lambda t: t * 7.0)(x, 0.5)
    ModelDenoiser(net, sched)(x, 0.5)
    assert torch.allclose(seen[0], torch.full((2,), 3.5, dtype=F64))
    assert torch.allclose(seen[1], torch.full((2,), 499.0, dtype=F64))  # diffusers' k for t = (k + 1) / N


def test_conditionings_with_other_keys_are_not_batched():
    """cond and uncond mappings batch key by key; a key one of them lacks (or adds) is one line, never
    a KeyError or a key silently dropped from the batch."""
    from velodiff.denoisers import concat_cond

    t = torch.zeros(1, 3)
    assert concat_cond({"a": t}, {"a": t})["a"].shape == (2, 3)
    for a, b in (({"a": t}, {"a": t, "b": t}), ({"a": t, "b": t}, {"a": t})):
        with pytest.raises(VelodiffError, match="different keys"):
            concat_cond(a, b)
