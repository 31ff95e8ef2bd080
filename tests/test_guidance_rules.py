"""The guidance family on the plan: each rule's defining property (against its paper's formula, diffusers'
implementation, or an independent computation), the passes it reports, and its one-line refusals.
Network-level rules (PAG, attention maps, composable prompts) run on the shipped default model."""

from pathlib import Path

import pytest
import torch

from velodiff import DiscreteVP, GuidedCond, ModelDenoiser, Plan, RectifiedFlow, VelodiffError, make_grid
from velodiff.denoisers import Cost
from velodiff.guidance import split_prompt
from velodiff.guidance.adaptive import fit_affine
from velodiff.sampling import denoise_once, sample
from velodiff.schedules import F64

SCHED = DiscreteVP.scaled_linear()
B = 3
G = torch.Generator().manual_seed(0)
X = torch.randn(B, 4, 5, generator=G, dtype=F64)
COND = torch.randn(B, 4, 5, generator=G, dtype=F64)
UNCOND = torch.zeros(B, 4, 5, dtype=F64)
BOTH = GuidedCond(COND, UNCOND)


def network(x, timestep, cond):
    k = timestep.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
    return torch.tanh(0.7 * x + cond * (1.0 + k)) + 0.3 * cond - 0.2 * k


TOY = ModelDenoiser(network, SCHED)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    import velodiff
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


PROMPTS = ["a red circle above a blue square", "two green crosses"]


# --- adaptive guidance ---------------------------------------------------------------------------------


def test_ag_between_never_and_always_agreeing():
    ts = make_grid("uniform", SCHED, 8)
    cfg = sample(TOY, X, ts, "dpmpp_2m", cond=BOTH, plan="cfg:scale=3")
    never = sample(TOY, X, ts, "dpmpp_2m", cond=BOTH, plan="ag:scale=3,threshold=1")
    assert torch.equal(never.x, cfg.x) and never.evals == cfg.evals == 16
    always = sample(TOY, X, ts, "dpmpp_2m", cond=BOTH, plan="ag:scale=3,threshold=-1")
    assert always.evals == 2 + 7  # CFG on the first step, then each image's conditional pass only
    cond_only = sample(TOY, X, ts, "dpmpp_2m", cond=COND)
    assert not torch.allclose(always.x, cond_only.x)  # the first, guided step stays in the result


def test_ag_decides_per_image_and_counts_per_image(model):
    """An image's result and cost do not depend on its batch; the batch's evals are the mean."""
    from velodiff.pipelines import text2img

    prompts = [*PROMPTS, "a yellow triangle"]
    kw = dict(steps=10, guidance=2.5, plan="ag:threshold=0.999", output="latent")
    batch = text2img(model, prompts, seeds=[5, 6, 7], **kw)
    alone = [text2img(model, p, seeds=s, **kw) for p, s in zip(prompts, [5, 6, 7], strict=True)]
    for k, r in enumerate(alone):
        assert torch.allclose(batch.latents[k], r.latents[0], atol=1e-4)
    assert batch.evals == pytest.approx(sum(r.evals for r in alone) / 3)
    assert 10 < batch.evals < 20 and len({r.evals for r in alone}) >= 1


# --- LinearAG ------------------------------------------------------------------------------------------


def test_linear_ag_fit_recovers_an_affine_law_and_estimates_are_marked():
    g = torch.Generator().manual_seed(1)
    c, c_prev, u_prev = (torch.randn(2, 4, 8, 8, generator=g, dtype=F64) for _ in range(3))
    coef = torch.tensor([[0.7, -0.2, 0.4], [1.1, 0.3, -0.5]], dtype=F64)
    u = sum(coef[:, k].reshape(2, 1, 1, 1) * v for k, v in enumerate((c, c_prev, u_prev)))
    assert torch.allclose(fit_affine(c, c_prev, u_prev, u), coef, atol=1e-8)
    ts = make_grid("uniform", SCHED, 10)
    res = sample(TOY, X, ts, "ddim", cond=BOTH, plan="linear_ag:scale=3,every=2,warmup=3")
    estimated = [i for i in range(10) if i >= 3 and (i - 3) % 2 == 0]  # steps 3, 5, 7, 9
    assert res.evals == 2 * 10 - len(estimated) and res.nfe == 10
    keep, lower = (sample(TOY, X, ts, "dpmpp_2m", cond=BOTH, plan=f"linear_ag:scale=3,lower_order={v}")
                   for v in ("false", "true"))
    assert keep.evals == lower.evals and not torch.allclose(keep.x, lower.x)  # the solver was told


def test_linear_ag_fits_on_the_latest_step_the_estimated_one_included(monkeypatch):
    """LinearAG (Eq. 8) regresses u_i on (c_i, c_{i-1}, u_{i-1}): after an estimated step, the previous
    pair is that step's conditional prediction and its estimate, not the last full step's."""
    import velodiff.guidance.adaptive as adaptive
    from velodiff.guidance.adaptive import LinearAG

    rule = LinearAG(scale=3.0, every=2, warmup=3)
    fitted_after = []

    def spy(c, c_prev, u_prev, u):
        fitted_after.append(rule.prev[0])  # the step (c_prev, u_prev) come from
        return fit_affine(c, c_prev, u_prev, u)

    monkeypatch.setattr(adaptive, "fit_affine", spy)
    sample(TOY, X, make_grid("uniform", SCHED, 10), "ddim", cond=BOTH, plan=[rule])
    # full steps 1, 2, 4, 6, 8 fit on their previous step; 3, 5, 7, 9 are estimated
    assert fitted_after == [0, 1, 3, 5, 7]


# --- APG, CFG++, CFG-Zero*, interval ------------------------------------------------------------------


def test_apg_is_cfg_at_eta_1_and_drops_the_parallel_part_at_eta_0():
    cfg = denoise_once(TOY, X, 0.6, BOTH, "cfg:scale=4").x0
    apg1 = denoise_once(TOY, X, 0.6, BOTH, "apg:scale=4,eta=1").x0
    assert torch.allclose(apg1, cfg, rtol=1e-12, atol=1e-12)
    parts = denoise_once(TOY, X, 0.6, BOTH, "apg:scale=4").parts
    c = parts["cond"]
    update = denoise_once(TOY, X, 0.6, BOTH, "apg:scale=4,eta=0").x0 - c
    inner = (update * c).flatten(1).sum(1) / (update.flatten(1).norm(dim=1) * c.flatten(1).norm(dim=1))
    assert inner.abs().max() < 1e-10  # Sadat et al. 2024, Sec. 4.1: only the orthogonal update remains
    capped = denoise_once(TOY, X, 0.6, BOTH, "apg:scale=4,eta=1,norm_threshold=0.1").x0 - c
    assert torch.allclose(capped.flatten(1).norm(dim=1), torch.full((B,), 3 * 0.1, dtype=F64))
    # the cap only shrinks: an update whose norm is below r is left as it is (min(1, r / |D|))
    loose = denoise_once(TOY, X, 0.6, BOTH, "apg:scale=4,eta=1,norm_threshold=1000").x0
    assert torch.allclose(loose, cfg, rtol=1e-12, atol=1e-12)


def test_apg_momentum_accumulates_the_update():
    """APG's momentum (Sadat et al. 2024, Alg. 1; diffusers' MomentumBuffer):
    D_k = (c_k - u_k) + beta D_{k-1}, the guided prediction c + (w - 1) D at eta 1."""
    from velodiff.guidance.apg import AdaptiveProjectedGuidance
    from velodiff.plan import RunInfo

    rule = AdaptiveProjectedGuidance(scale=4.0, momentum=-0.5, eta=1.0)
    rule.begin(RunInfo(SCHED, make_grid("uniform", SCHED, 3), None, B, {}, guidance=4.0))
    g = torch.Generator().manual_seed(5)
    d = None
    for _ in range(3):
        c, u = (torch.randn(B, 4, 5, generator=g, dtype=F64) for _ in range(2))
        d = (c - u) if d is None else (c - u) - 0.5 * d
        assert torch.allclose(rule.combine(None, c, u, None), c + 3 * d, rtol=1e-12, atol=1e-12)
    rule.end()


def test_cfgpp_renoises_with_the_unconditional_noise():
    """One DDIM step under CFG++ (Chung et al. 2024, Eq. 9): x' = alpha' x0_lambda + sigma' eps_u."""
    ts = torch.tensor([0.8, 0.5], dtype=F64)
    got = sample(TOY, X, ts, "ddim", cond=BOTH, plan="cfgpp:scale=0.4").x
    t, tn = 0.8, 0.5
    c, u = TOY(X, t, COND), TOY(X, t, UNCOND)
    x0 = u + 0.4 * (c - u)
    eps_u = (X - SCHED.alpha(torch.tensor(t, dtype=F64)) * u) / SCHED.sigma(torch.tensor(t, dtype=F64))
    want = SCHED.alpha(torch.tensor(tn, dtype=F64)) * x0 + SCHED.sigma(torch.tensor(tn, dtype=F64)) * eps_u
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(VelodiffError, match="use solver ddim, euler or ddpm, not 'dpmpp_2m'"):
        sample(TOY, X, ts, "dpmpp_2m", cond=BOTH, plan="cfgpp")
    with pytest.raises(VelodiffError, match="use s_churn=0"):  # it would be plain CFG at w = lambda
        sample(TOY, X, ts, "euler", cond=BOTH, plan="cfgpp", s_churn=1.0)


def test_cfg_zero_star_matches_diffusers_and_zero_init_costs_nothing():
    from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale

    flow = RectifiedFlow()
    den = ModelDenoiser(network, flow, "flow")
    t = 0.7
    r = denoise_once(den, X, t, BOTH, "cfg_zero:scale=4,zero_init_steps=0")
    v_c, v_u = (X - r.parts["cond"]) / t, (X - r.parts["uncond"]) / t
    s = cfg_zero_star_scale(v_c.flatten(1), v_u.flatten(1)).reshape(-1, 1, 1)
    v = s * v_u + 4 * (v_c - s * v_u)  # diffusers' ClassifierFreeZeroStarGuidance.forward
    assert torch.allclose(r.x0, X - t * v, atol=1e-5)  # diffusers computes s* in float32
    ts = make_grid("uniform", flow, 4)
    res = sample(den, X, ts, "euler", cond=BOTH, plan="cfg_zero:scale=4", callback=lambda i: None)
    assert res.evals == 2 * 3 and res.nfe == 3  # step 0 is zero velocity: no network call
    zero = denoise_once(den, X, 1.0, BOTH, "cfg_zero:scale=4")
    assert torch.equal(zero.x0, X) and zero.cost == Cost(0, 0)
    # every asked branch answered (zero velocity): rules above it (compose, sld) read cond and uncond
    ctx = {"guidance": 4.0, "prompts": ("a AND b",) * B, "encode": lambda texts: COND}
    composed = denoise_once(den, X, 1.0, BOTH, "cfg_zero:scale=4+compose", context=ctx)
    assert torch.equal(composed.x0, X) and {"cond", "uncond", "part1"} <= set(composed.parts)
    with pytest.raises(VelodiffError, match="for flow-matching models"):
        sample(TOY, X, make_grid("uniform", SCHED, 3), cond=BOTH, plan="cfg_zero:scale=3")


def test_start_stop_and_interval_decide_the_guided_steps():
    ts = make_grid("uniform", SCHED, 10)
    assert sample(TOY, X, ts, "ddim", cond=BOTH, plan="cfg:scale=3,start=0.2,stop=0.7").evals == 10 + 5
    assert sample(TOY, X, ts, "ddim", cond=BOTH, plan="apg:scale=3,stop=0.3").evals == 10 + 3
    # a fraction of the steps, not of the grid's points: int(0.95 * 10) = 9 guided steps
    assert sample(TOY, X, ts, "ddim", cond=BOTH, plan="cfg:scale=3,stop=0.95").evals == 10 + 9
    assert sample(TOY, X, ts, "ddim", cond=BOTH, plan="cfgpp:scale=0.4,stop=0.5").evals == 10 + 5
    with pytest.raises(VelodiffError, match="start .* must not exceed stop"):
        sample(TOY, X, ts, "ddim", cond=BOTH, plan="cfg:scale=3,start=0.8,stop=0.2")


# --- PAG, attention maps, composable prompts (shipped model) -------------------------------------------


def _mid_self_attention(model):
    from velodiff.accel.attention import attention_modules

    return attention_modules(model.components["unet"], False, ("mid",))


def test_pag_perturbs_only_its_rows_and_restores_processors(model):
    from velodiff.accel.attention import IdentitySelfAttention, RowState
    from velodiff.pipelines.common import prepare_cond

    den = model.denoiser
    cond = prepare_cond(model, PROMPTS, None, True, 64, 64)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = 0.6
    mods = _mid_self_attention(model)
    originals = [m.processor for _, m in mods]
    ctx = {"network": model.components["unet"], "guidance": 2.5}
    r = denoise_once(den, x, t, cond, "cfg+pag:scale=2", context=ctx)
    assert [m.processor for _, m in mods] == originals  # put back after the run
    assert r.cost == Cost(1, 3)
    plain = denoise_once(den, x, t, cond, "cfg", context=ctx)
    assert torch.allclose(r.parts["cond"], plain.parts["cond"], atol=1e-5)
    state = RowState(slice(0, 2))
    for _, m in mods:
        m.set_processor(IdentitySelfAttention(m.processor, state))
    try:
        with torch.inference_mode():
            perturbed = den(x, torch.tensor(t, dtype=F64), cond.cond)
    finally:
        for (_, m), p in zip(mods, originals, strict=True):
            m.set_processor(p)
    assert torch.allclose(r.parts["perturbed"], perturbed, atol=1e-5)
    assert not torch.allclose(perturbed, r.parts["cond"], atol=1e-3)
    assert torch.allclose(r.x0, plain.x0 + 2 * (r.parts["cond"] - perturbed), atol=1e-4)  # Ahn et al., Eq. 10


def test_pag_refuses_models_without_matching_self_attention(model):
    from velodiff.pipelines import text2img

    with pytest.raises(VelodiffError, match="plan rule 'pag' needs plain self-attention layers matching"):
        text2img(model, PROMPTS[0], steps=2, plan="pag:applied_layers=nowhere")
    with pytest.raises(VelodiffError, match="plan rule 'pag' needs a network to hook"):
        sample(TOY, X, make_grid("uniform", SCHED, 2), cond=COND, plan="pag")


def test_attention_maps_are_distributions_and_change_nothing(model):
    from velodiff.accel.attention import AttentionMaps
    from velodiff.pipelines import text2img

    cap = AttentionMaps(every=2)
    kw = dict(steps=6, guidance=2.5, seeds=[1, 2], output="latent")
    got = text2img(model, PROMPTS, plan=[cap], **kw)
    plain = text2img(model, PROMPTS, **kw)
    assert torch.allclose(got.latents, plain.latents, atol=1e-4) and got.evals == plain.evals
    assert sorted(cap.maps) == [0, 2, 4]
    m = cap.maps[2]
    assert m.shape == (2, 77, 16, 16) and torch.allclose(m.sum(1), torch.ones(2, 16, 16), atol=1e-4)
    assert all(type(mod.processor).__name__ != "CaptureCrossAttention"
               for mod in model.components["unet"].modules() if hasattr(mod, "processor"))


def test_split_prompt():
    assert split_prompt("a red circle AND a blue square :0.5 AND a cross :-1") == [
        ("a red circle", 1.0), ("a blue square", 0.5), ("a cross", -1.0)]
    assert split_prompt("one thing") == [("one thing", 1.0)]
    with pytest.raises(VelodiffError, match="empty part"):
        split_prompt("a red circle AND :2")
    # a mistyped number is refused, not read as prompt text at weight 1 (a negation lost); other text
    # after ' :' stays text, as A1111 reads it (an emoticon)
    for bad, weight in (("a red triangle AND a triangle :x2", "'x2'"), ("a AND b :\u22122", "'\u22122'"),
                        ("a AND b :1,5", "'1,5'")):
        with pytest.raises(VelodiffError, match=f"weight {weight} is not a number"):
            split_prompt(bad)
    assert split_prompt("a smiley face :) AND a dog :x") == [("a smiley face :)", 1.0), ("a dog :x", 1.0)]


def test_compose_sums_the_parts_terms(model):
    from velodiff.pipelines.common import prepare_cond

    prompt = "a red circle AND a blue square :0.5"
    cond = prepare_cond(model, [prompt], None, True, 64, 64)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    ctx = {"network": model.components["unet"], "guidance": 3.0, "prompts": (prompt,),
           "encode": lambda texts: prepare_cond(model, texts, None, False, 64, 64)}
    r = denoise_once(model.denoiser, x, 0.5, cond, "cfg+compose", context=ctx)
    assert r.cost == Cost(1, 3)
    with torch.inference_mode():
        t = torch.tensor(0.5, dtype=F64)
        c0, c1 = (model.denoiser(x, t, prepare_cond(model, [p], None, False, 64, 64))
                  for p in ("a red circle", "a blue square"))
        u = model.denoiser(x, t, cond.uncond)
    want = u + 3.0 * (c0 - u) + 3.0 * 0.5 * (c1 - u)  # Liu et al. 2022, Eq. 10
    assert torch.allclose(r.x0, want, atol=1e-4)
    # at w = 1 there is no CFG rule; the sum still needs (and evaluates) the unconditional branch
    r1 = denoise_once(model.denoiser, x, 0.5, cond, "compose", context={**ctx, "guidance": 1.0})
    assert r1.cost == Cost(1, 3)
    assert torch.allclose(r1.x0, u + (c0 - u) + 0.5 * (c1 - u), atol=1e-4)


def test_sld_is_diffusers_safe_guidance_on_eps(model):
    """Safe Latent Diffusion (Schramowski et al. 2023, Eqs. 3-6) as diffusers' StableDiffusionPipelineSafe
    computes it on the noise predictions, at the first (momentum-free) evaluation after the warm-up; with
    the gate always open (mu = 1) it is guidance away from the concept's prediction: u + w (c - S)."""
    from velodiff.denoisers import broadcast_time, eps_from_x0
    from velodiff.pipelines.common import prepare_cond

    prompt = "a green triangle"
    cond = prepare_cond(model, [prompt], None, True, 64, 64)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))

    def encode(texts):
        return prepare_cond(model, texts, None, False, 64, 64)

    ctx = {"network": model.components["unet"], "guidance": 3.0, "prompts": (prompt,), "encode": encode}
    t = torch.tensor(0.5, dtype=F64)
    with torch.inference_mode():
        c, u, s = (model.denoiser(x, t, k) for k in (cond.cond, cond.uncond, encode(["triangle"])))
    eps_c, eps_u, eps_s = (eps_from_x0(model.schedule, x, t, v) for v in (c, u, s))
    r = denoise_once(model.denoiser, x, 0.5, cond, "cfg+sld:concept=triangle,sld_warmup_steps=0", context=ctx)
    assert r.cost == Cost(1, 3)  # the concept's branch in the same batched call
    scale = torch.clamp((eps_c - eps_s).abs() * 1000, max=1.0)  # diffusers' defaults (MEDIUM)
    mu = torch.where(eps_c - eps_s >= 0.01, torch.zeros_like(scale), scale)
    eps = eps_u + 3.0 * (eps_c - eps_u - mu * (eps_s - eps_u))
    tb = broadcast_time(t, x)
    want = (x - model.schedule.sigma(tb).float() * eps) / model.schedule.alpha(tb).float()  # x = a x0 + s eps
    assert torch.allclose(r.x0, want, atol=1e-4)
    open_gate = "cfg+sld:concept=triangle,sld_warmup_steps=0,sld_guidance_scale=1e9,sld_threshold=1e9"
    r = denoise_once(model.denoiser, x, 0.5, cond, open_gate + ",sld_momentum_scale=0", context=ctx)
    assert torch.allclose(r.x0, u + 3.0 * (c - s), atol=1e-4)
    warm = denoise_once(model.denoiser, x, 0.5, cond, "cfg+sld:concept=triangle", context=ctx)
    assert torch.allclose(warm.x0, u + 3.0 * (c - u), atol=1e-4)  # step 0 < the warm-up's 10: CFG alone
    with pytest.raises(VelodiffError, match="needs the concept to avoid"):
        denoise_once(model.denoiser, x, 0.5, cond, "cfg+sld", context=ctx)


def test_sld_momentum_builds_over_the_steps():
    """SLD's momentum (Schramowski et al. 2023, Eqs. 7-8, as diffusers' StableDiffusionPipelineSafe
    updates it): g_S + s_m nu_k, then nu_{k+1} = beta nu_k + (1 - beta) (g_S + s_m nu_k), over DDIM steps."""
    from velodiff.denoisers import eps_from_x0

    safety = torch.randn(B, 4, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    ts = make_grid("uniform", SCHED, 4)
    opts = ("sld_warmup_steps=1,sld_guidance_scale=50,sld_threshold=0.2,"
            "sld_momentum_scale=0.3,sld_mom_beta=0.4")
    got = sample(TOY, X, ts, "ddim", cond=BOTH, plan=f"cfg:scale=3+sld:concept=x,{opts}",
                 context={"encode": lambda texts: safety, "guidance": 3.0}).x
    x, nu = X.clone(), torch.zeros_like(X)
    for i in range(4):
        t, tn = ts[i], ts[i + 1]
        c, u, s = (TOY(x, t, k) for k in (COND, UNCOND, safety))
        eps_c, eps_u, eps_s = (eps_from_x0(SCHED, x, t, v) for v in (c, u, s))
        mu = ((eps_c - eps_s).abs() * 50).clamp(max=1.0).masked_fill(eps_c - eps_s >= 0.2, 0.0)
        g_s = mu * (eps_s - eps_u) + 0.3 * nu
        nu = 0.4 * nu + 0.6 * g_s
        x0 = u + 3 * (c - u) + (3 * SCHED.sigma(t) / SCHED.alpha(t) * g_s if i >= 1 else 0)
        eps = (x - SCHED.alpha(t) * x0) / SCHED.sigma(t)
        x = SCHED.alpha(tn) * x0 + SCHED.sigma(tn) * eps if tn > 0 else x0
    assert torch.allclose(got, x, rtol=1e-10, atol=1e-10)


def test_a_runs_recorded_plan_string_reproduces_it(model):
    """Rules of one layer stack in the plan string's order (read inner to outer), str() writes that
    order, and the plan a pipeline adds CFG to keeps it: rerunning result.plan gives the same latents.
    compose wraps the other terms whatever the order (PAG's perturbed branch copies part 0's
    conditioning, as its conditional prediction is part 0's)."""
    from velodiff.pipelines import text2img

    assert str(Plan.parse("compose+pag")) == "pag+compose"
    for text in ("pag+compose", "sld:concept=x+pag", "ag:threshold=0.99+pag", "deepcache+attention_maps"):
        plan = Plan.parse(text)
        names = [r.name for r in plan.rules]
        assert str(plan) == text and [r.name for r in Plan.parse(str(plan)).rules] == names
        assert [r.name for r in plan.without_settings().rules] == names
        assert [r.name for r in plan.with_rules([]).rules] == names
    prompts = ["a red circle AND a blue square", "a red circle AND a blue square"]
    for guidance in (2.5, 1.0):
        kw = dict(guidance=guidance, steps=3, seeds=[1, 2], output="latent")
        first = text2img(model, prompts, plan="pag+compose", **kw)
        again = text2img(model, prompts, plan=first.plan, **kw)
        assert torch.equal(first.latents, again.latents), (guidance, first.plan)
    other = text2img(model, prompts, plan="compose+pag", **kw)
    assert torch.equal(other.latents, first.latents)


def test_compose_stacks_with_per_image_adaptive_guidance(model):
    from velodiff.pipelines import text2img

    prompts = ["a red circle AND a blue square", "two green crosses AND a yellow triangle"]
    r = text2img(model, prompts, steps=6, seeds=[1, 2], plan="ag:threshold=0.99+compose", output="latent")
    assert r.plan == "ag:threshold=0.99+compose" and torch.isfinite(r.latents).all()
    with pytest.warns(UserWarning, match="add the plan rule compose"):
        text2img(model, prompts[0], steps=2, output="latent")


# --- through the pipelines and the CLI ---------------------------------------------------------------


def test_pipeline_plan_errors_are_one_line(model):
    from velodiff.pipelines import text2img

    for kw, message in [
        ({"plan": "ag+cfg"}, "plan rules 'ag' and 'cfg' both claim the 'uncond' branch"),
        ({"plan": "ag:threshold=1.5"}, "plan rule 'ag' option 'threshold' must be in [-1, 1]"),
        ({"plan": "cfgpp"}, "plan rule 'cfgpp' re-noises inside the solver step"),
        ({"plan": "cfg_zero"}, "plan rule 'cfg_zero' is for flow-matching models"),
        ({"plans": "ag"}, "text2img() got an unknown keyword 'plans'"),
        # at scale 1 (a student's) a CFG variant would only be reported, never act
        ({"plan": "ag", "guidance": 1.0}, "plan rule 'ag' acts on classifier-free guidance, which is off"),
        ({"plan": "cfg:stop=0.5", "guidance": 1.0}, "which is off at scale 1"),
    ]:
        with pytest.raises(VelodiffError) as e:
            text2img(model, PROMPTS[0], steps=2, **kw)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_pipeline_result_names_the_plan_that_ran(model):
    from velodiff.pipelines import text2img

    r = text2img(model, PROMPTS[0], steps=3, guidance=2.0, guidance_rescale=0.5, plan="pag", output="latent")
    assert r.plan == "cfg+pag+rescale:phi=0.5" and r.evals == 9
    assert text2img(model, PROMPTS[0], steps=3, guidance=1.0, output="latent").plan == "none"
    assert text2img(model, PROMPTS[0], steps=2, plan="ag:scale=2", guidance=1.0, output="latent").evals > 2
    with pytest.warns(UserWarning, match="the negative prompt acts on classifier-free guidance"):
        text2img(model, PROMPTS[0], steps=2, guidance=1.0, negative="blue", output="latent")
    assert str(Plan.parse(r.plan)) == r.plan
    # the call's interval and rescale configure the CFG velodiff adds: dropped only with a word
    with pytest.warns(UserWarning, match="the plan's own rule guides .*: no effect"):
        text2img(model, PROMPTS[0], steps=2, plan="cfg:scale=3", guidance_interval=(0.2, 0.8),
                 output="latent")
    with pytest.warns(UserWarning, match="guidance is 1: no effect"):
        text2img(model, PROMPTS[0], steps=2, guidance=1.0, guidance_interval=(0.2, 0.8), output="latent")
    with pytest.warns(UserWarning, match="the plan's rescale:phi=0.3 is used, not guidance rescale 0.7"):
        text2img(model, PROMPTS[0], steps=2, plan="rescale:phi=0.3", guidance_rescale=0.7, output="latent")


def cli(*args: object) -> int:
    """The velodiff command in process; its exit status (typer exits on success)."""
    from velodiff.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


def test_cli_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table layout (80 columns print a block per rule)
    assert cli("generate", "a red circle", "--out", str(tmp_path / "a.png"), "--plan", "agg") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown plan rule 'agg'; valid: ag, ")
    assert not list(tmp_path.iterdir())
    out = tmp_path / "b.png"
    assert cli("generate", "a red circle", "-o", str(out), "--steps", "4", "--plan", "ag:threshold=0.9") == 0
    assert out.is_file() and "plan ag:threshold=0.9)" in capsys.readouterr().out
    sheet = tmp_path / "maps.png"
    assert cli("generate", "a red circle", "-o", str(out), "--steps", "3", "--attention-maps", sheet) == 0
    from PIL import Image

    with Image.open(sheet) as im:  # the image and one map per token: a, red, circle
        assert im.size[0] == 4 * 128 + 3 * 2
    assert cli("plans") == 0
    listing = capsys.readouterr().out
    from velodiff.plan import rule_table

    names = [r["name"] for r in rule_table()]
    assert len(names) >= 26
    first_column = {line.split("│")[1].strip() for line in listing.splitlines() if line.count("│") > 2}
    assert set(names) <= first_column  # every registered rule is listed
    # and has its row in the README's rule table (int4 and fp8 in int8's row)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
    assert set(names) - {"int4", "fp8"} <= rows
    assert "`int4`" in readme and "`fp8`" in readme


# --- per-block hooks (diffusers.hooks.HookRegistry) on the UNet and the DiT families --------------------


@pytest.fixture(scope="module")
def tiny_dits(tmp_path_factory):
    import velodiff
    from velodiff.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("dits")
    return {k: velodiff.load(save_tiny(k, root / k)) for k in ("sd3", "flux", "pixart-sigma")}


def test_feature_change_hooks_every_family_and_comes_off(model, tiny_dits):
    from velodiff.accel.hooks import FeatureChange, network_blocks
    from velodiff.pipelines import text2img

    fc = FeatureChange()
    text2img(model, PROMPTS, steps=6, plan=[fc, "ag:threshold=0.99"], output="latent")
    curves = fc.curves()
    assert list(curves) == [n for n, _ in network_blocks(model.components["unet"])]
    assert list(curves)[:1] == ["down_blocks.0"] and "mid_block" in curves
    assert all(len(v) == 5 and all(c > 0 for c in v) for v in curves.values())  # steps 1..5 vs the one before
    assert all(not getattr(m, "_diffusers_hook", None) or m._diffusers_hook.get_hook(fc.hooks.name) is None
               for _, m in network_blocks(model.components["unet"]))
    for kind, dit in tiny_dits.items():
        fc = FeatureChange(blocks=("transformer_blocks",))
        text2img(dit, "a red cube", steps=3, plan=[fc], output="latent")
        assert fc.curves() and all(n.startswith(("transformer_blocks", "single_transformer_blocks"))
                                   for n in fc.curves()), kind


def test_feature_change_is_the_relative_l1_change_of_each_blocks_output(model):
    """The values the cache calibration fits schedules to: per step, each image's |y_i - y_(i-1)|_1 /
    |y_(i-1)|_1 of the block's output, averaged over the batch (checked on the mid block with a plain
    forward hook; guidance 1, so every row is the conditional branch)."""
    from velodiff.accel.hooks import FeatureChange
    from velodiff.pipelines import text2img

    outputs = []
    mid = model.components["unet"].mid_block
    handle = mid.register_forward_hook(lambda m, i, out: outputs.append(out.detach().flatten(1).float()))
    fc = FeatureChange(blocks=("mid_block",))
    try:
        text2img(model, PROMPTS, steps=4, solver="ddim", guidance=1.0, plan=[fc], output="latent")
    finally:
        handle.remove()
    assert len(outputs) == 4
    pairs = zip(outputs, outputs[1:], strict=False)
    want = [float(((b - a).abs().sum(1) / a.abs().sum(1)).mean()) for a, b in pairs]
    assert fc.curves()["mid_block"] == pytest.approx(want, rel=1e-6)


def test_pag_and_attention_maps_on_dits(tiny_dits):
    from velodiff.accel.attention import AttentionMaps
    from velodiff.pipelines import text2img

    pixart = tiny_dits["pixart-sigma"]
    r = text2img(pixart, "a red cube", steps=3, guidance=2.0, plan="pag:applied_layers=transformer_blocks.1",
                 output="latent")
    assert r.evals == 9 and r.plan == "cfg+pag:applied_layers=transformer_blocks.1"
    maps = AttentionMaps()
    text2img(pixart, "a red cube", steps=2, plan=[maps], output="latent")
    assert len(maps.maps) == 2
    with pytest.raises(VelodiffError, match=r"model's are in transformer_blocks \(e.g. applied_layers="):
        text2img(tiny_dits["sd3"], "a red cube", steps=2, plan="pag")  # no mid block; its dual attention's
    assert text2img(tiny_dits["sd3"], "a red cube", steps=2, plan="pag:applied_layers=transformer",
                    output="latent").plan.endswith("pag:applied_layers=transformer")


def test_joint_attention_maps_are_the_image_to_text_block_of_diffusers_own_softmax(tiny_dits, monkeypatch):
    """SD3 and Flux have joint attention only: the captured map of each joint layer is the image-to-text
    block of the softmax diffusers' own processor computes (recorded at its scaled_dot_product_attention,
    Flux's rotary embedding included), renormalised over the text; the sample is bit for bit the same."""
    import torch.nn.functional as F

    from velodiff.accel.attention import CaptureJointAttention, ProcessorSwap, RowState
    from velodiff.accel.attention import joint_attention_modules as joint
    from velodiff.pipelines import text2img

    state, real_sdpa, recorded, captured = RowState(rows=slice(0, 2)), F.scaled_dot_product_attention, [], []
    run = dict(steps=1, guidance=1.0, seeds=[3, 4], output="latent")

    def sdpa(query, key, value, *args, **kwargs):
        if len(recorded) < len(captured):  # (the joint layers' calls; Flux's single-stream blocks pass)
            q, k = query.double(), key.double()
            recorded.append((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1))
        return real_sdpa(query, key, value, *args, **kwargs)

    def capture(name, module, original):
        return CaptureJointAttention(original, state, captured.append)

    for kind, image_first in (("sd3", True), ("flux", False)):
        dit, swap = tiny_dits[kind], ProcessorSwap()
        assert (mods := joint(dit.network)), kind
        swap.install(mods, capture)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        try:
            got = text2img(dit, ["a red cube", "a blue ball"], **run)
        finally:
            swap.restore()
            monkeypatch.setattr(F, "scaled_dot_product_attention", real_sdpa)
        assert len(captured) == len(recorded) == len(mods), kind
        for maps, probs in zip(captured, recorded, strict=True):
            n, t = maps.shape[1:]
            block = probs[:, :, :n, n:] if image_first else probs[:, :, t:, :t]
            want = (block / block.sum(-1, keepdim=True)).mean(1)
            assert torch.allclose(maps.double(), want, atol=1e-5), kind
        captured.clear(), recorded.clear()
        assert torch.equal(got.latents, text2img(dit, ["a red cube", "a blue ball"], **run).latents), kind


def test_attention_maps_on_joint_attention_change_nothing_and_are_restored(tiny_dits):
    from velodiff.accel.attention import AttentionMaps, joint_attention_modules
    from velodiff.pipelines import text2img

    for kind in ("sd3", "flux"):
        dit = tiny_dits[kind]
        before = [type(m.processor) for _, m in joint_attention_modules(dit.network)]
        cap = AttentionMaps()
        kw = dict(steps=2, guidance=2.0, seeds=[1], output="latent", width=64, height=64)
        got = text2img(dit, "a red cube", plan=[cap], **kw)
        assert torch.equal(got.latents, text2img(dit, "a red cube", **kw).latents), kind
        m, (h, w) = cap.maps[1], got.latents.shape[-2:]
        assert m.shape[0] == 1 and m.shape[2:] == (h, w), kind
        assert torch.allclose(m.sum(1), torch.ones(1, h, w), atol=1e-5), kind
        assert [type(m.processor) for _, m in joint_attention_modules(dit.network)] == before, kind


def test_context_tokens_are_the_positions_the_network_attends_to(model, tiny_dits):
    """CLIP's context has its start token at position 0 (SD, SDXL, and the front of SD3's); T5's has none
    (PixArt, Flux's joint context): the first word is position 1 or 0."""
    assert model.context_tokens("a red circle") == [(1, "a</w>"), (2, "red</w>"), (3, "circle</w>")]
    assert tiny_dits["sd3"].context_tokens("a red cube")[0] == (1, "a</w>")
    for kind in ("flux", "pixart-sigma"):
        assert tiny_dits[kind].context_tokens("a red cube") == [(0, "\u2581a"), (1, "\u2581red"),
                                                               (2, "\u2581cube")], kind
    from velodiff.edit.collage import _phrase_token_indices
    from velodiff.edit.p2p import word_positions
    from velodiff.plan import RunInfo

    for m, first in ((model, 1), (tiny_dits["pixart-sigma"], 0)):  # the words layout and p2p steer
        run = RunInfo(None, None, None, 1, {}, model=m, network=m.network)
        assert m.context_offset() == first
        assert word_positions(run, "a red cube", "red") == [first + 1]
        assert _phrase_token_indices(m, "a red cube") == [first, first + 1, first + 2, first + 3]


def test_attention_sheet_captions_only_the_prompts_tokens(monkeypatch):
    """A heat map per token at its own position in the context (``context_tokens``' pairs), none for a
    token past the context the network read (a prompt past the token limit)."""
    import numpy as np
    from PIL import Image

    import velodiff.images
    from velodiff.accel.attention import attention_sheet

    seen = {}
    monkeypatch.setattr(velodiff.images, "image_grid", lambda cells, **kw: seen.update(kw, cells=cells))
    maps = torch.zeros(1, 77, 9, 9)
    maps.view(1, 77, 81)[0, torch.arange(77), torch.arange(77)] = 1  # position p lights pixel p
    tokens = [(i + 1, f"w{i}") for i in range(80)]  # the 76th word onwards is past the context
    attention_sheet({0: maps}, tokens, Image.new("RGB", (9, 9)))
    cells, captions = seen["cells"][1:], seen["captions"][1:]
    assert len(cells) == 76 and captions[-1] == "w75"
    assert all(np.asarray(c)[..., 0].argmax() == k + 1 for k, c in enumerate(cells))  # each word its own map


def test_grad_is_honoured_inside_no_grad_and_every_rule_is_ended():
    """grad=True samples with gradients even inside a caller's no_grad / inference_mode (it inherited
    them silently); a rule whose end() raises neither keeps the others on the network nor hides the
    run's own error."""
    from velodiff.plan import Accelerator

    ts = make_grid("uniform", SCHED, 3)
    x = X.clone().requires_grad_(True)
    for outer in (torch.no_grad, torch.inference_mode):
        with outer():
            out = sample(TOY, x, ts, "ddim", cond=COND, grad=True).x
        assert out.requires_grad and not out.is_inference()

    ended: list[str] = []

    class Ends(Accelerator):
        name, layer = "ends", 0

        def end(self) -> None:
            ended.append("ends")

    class BadEnd(Accelerator):
        name, layer = "bad_end", 1

        def end(self) -> None:
            raise RuntimeError("end failed")

    def stop(info):
        raise ValueError("the run's own error")

    with pytest.raises(ValueError, match="the run's own error"):
        sample(TOY, X, ts, "ddim", cond=COND, plan=[Ends(), BadEnd()], callback=stop)
    assert ended == ["ends"]
    with pytest.raises(RuntimeError, match="end failed"):  # a run that went well: the end's error
        sample(TOY, X, ts, "ddim", cond=COND, plan=[Ends(), BadEnd()])
    assert ended == ["ends", "ends"]


def test_review32_a_plans_own_rescale_at_the_calls_phi_is_no_warning():
    """review32: the warning that the plan's rescale wins is for a phi other than the call's; the same phi
    twice is one rescale and no warning."""
    import warnings

    from velodiff.pipelines.setup import resolve_plan

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = resolve_plan("rescale:phi=0.5", 3.0, rescale=0.5)
    assert str(plan).count("rescale") == 1 and plan.find("rescale").phi == 0.5


def test_review32_a_weight_that_is_no_number_is_refused_after_a_space_too():
    """review32: 'a triangle : x2' (a space after the colon, which a numeric weight may have too) is
    refused as ':x2' is; a colon inside the text is no weight."""
    with pytest.raises(VelodiffError, match="weight 'x2' is not a number"):
        split_prompt("a red circle AND a triangle : x2")
    assert split_prompt("a sign saying: stop AND a dog :2") == [("a sign saying: stop", 1.0), ("a dog", 2.0)]
    assert split_prompt("a screen at 4:3x AND a dog") == [("a screen at 4:3x", 1.0), ("a dog", 1.0)]


def test_review32_pag_runs_its_perturbed_pass_only_in_its_steps(model):
    """review32: pag's start / stop still bound the steps that pay the perturbed pass (the scale at a step
    outside them is 0, adaptive or not)."""
    from velodiff.pipelines import text2img

    for plan in ("pag:scale=2,stop=0.5", "pag:scale=2,adaptive_scale=0.001,stop=0.5"):
        r = text2img(model, PROMPTS[0], steps=4, solver="ddim", guidance=2.0, plan=plan, output="latent")
        assert r.evals == 4 * 2 + 2, (plan, r.evals)  # CFG's 2 a step, then the perturbed row in 2 steps


def test_review36_the_attention_sheet_captions_t5_tokens_without_the_word_marker(monkeypatch):
    """review36: a T5 context's tokens (PixArt, Flux: '\u2581red') are captioned as words, as CLIP's
    ('red</w>') are."""
    from PIL import Image

    import velodiff.images
    from velodiff.accel.attention import attention_sheet

    seen = {}
    monkeypatch.setattr(velodiff.images, "image_grid", lambda cells, **kw: seen.update(kw))
    tokens = [(0, "\u2581a"), (1, "\u2581red"), (3, "cube</w>")]
    attention_sheet({0: torch.rand(1, 5, 4, 4)}, tokens, Image.new("RGB", (4, 4)))
    assert seen["captions"] == ["image", "a", "red", "cube"]


def test_review36_attention_maps_layers_select_joint_layers_too(tiny_dits):
    """review36: attention_maps' layers (regular expressions of layer names) pick SD3's and Flux's joint
    layers as they pick cross-attention layers: one name is that layer; a name that matches none is one
    line, not every joint layer."""
    from velodiff.accel.attention import AttentionMaps, joint_attention_modules
    from velodiff.pipelines import text2img

    for kind in ("sd3", "flux"):
        dit = tiny_dits[kind]
        names = [n for n, _ in joint_attention_modules(dit.network)]
        assert names, kind
        assert [n for n, _ in joint_attention_modules(dit.network, (names[-1] + "$",))] == [names[-1]]
        with pytest.raises(VelodiffError, match="no matching cross- or joint attention layers"):
            text2img(dit, "a red cube", steps=1, seeds=[1], output="latent",
                     plan=[AttentionMaps(layers=("no_such_layer",))])


def test_review36_context_tokens_stop_at_the_context_the_encoder_reads(model):
    """review36: a prompt past CLIP's 77 tokens: context_tokens gives the positions the network attends to
    (1..75), none past the context."""
    positions = [k for k, _ in model.context_tokens(" ".join(["red"] * 100))]
    assert positions == list(range(1, 76))
