"""The guidance rules against their peers' own code, from the same predictions or the same pipeline.

* APG is diffusers' ``AdaptiveProjectedGuidance`` guider in its ``use_original_formulation`` (the paper's
  Alg. 1, pred_cond + (w - 1) update) at guidance_scale w - 1, step after step: momentum buffer, norm
  threshold, eta, and the guider's start / stop.
* CFG and guidance rescale, on a whole DDIM loop, are diffusers' ``ClassifierFreeGuidance`` guider with
  its ``guidance_rescale``, start and stop; the ``rescale:phi=`` plan rule is the pipelines'
  ``guidance_rescale`` on an eps (SD1) and a v-prediction (SD2) model.
* PAG is ``StableDiffusionPAGPipeline`` / ``StableDiffusionXLPAGPipeline`` /
  ``PixArtSigmaPAGPipeline``: identity self-attention on the ``pag_applied_layers`` (``mid``, a block,
  several, PixArt's ``blocks.1``), pag_scale, with CFG, without it, and with guidance rescale under CFG.
* CFG-Zero* on a whole flow-matching Euler loop is diffusers' ``ClassifierFreeZeroStarGuidance`` guider
  with ``FlowMatchEulerDiscreteScheduler``: zero init, the optimized scale on the velocity, start / stop.
* CFG++ on the tiny SD UNet is the official code's DDIM step (CFGpp-diffusion/CFGpp, ``ddim_cfg++``:
  x0 from the guided eps, re-noised with the unconditional eps) and its k-diffusion Euler form
  (x = denoised + sigma_next * d_uncond), written here from the papers' formulas.
* The CFG interval (Kynkaenniemi et al. 2024) guides exactly the steps whose sigma lies in the interval
  given in sigma and converted to velodiff's schedule time.

The tiny SD models are tests/sd_tiny.py's (random weights, no download)."""

from __future__ import annotations

import warnings

import pytest
import torch

import sd_tiny
from velodiff import DiscreteVP, GuidedCond, ModelDenoiser, RectifiedFlow, make_grid
from velodiff.models import load
from velodiff.pipelines import text2img
from velodiff.sampling import sample
from velodiff.schedules import F64

warnings.filterwarnings("ignore", message=".*[Gg]uiders are currently an experimental.*")
PROMPT = "a photo of a red cube"
H = W = 16  # latents 4 x 8 x 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return sd_tiny.Loaded(tmp_path_factory.mktemp("sd"))


def _scheduler(model, name: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[name]
    return cls.from_config(model.components["scheduler_config"])


def _times(model, name: str, steps: int) -> list[float]:
    """velodiff's grid for a diffusers scheduler's timesteps: DDIM ends at the first trained step, Euler
    at 0."""
    s = _scheduler(model, name)
    s.set_timesteps(steps)
    ts = model.schedule.t_from_timestep(s.timesteps.double()).tolist()
    return ts + [model.schedule.t_min if name == "ddim" else 0.0]


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


# --- APG: diffusers' guider on the same predictions -----------------------------------------------------


@pytest.mark.parametrize(
    ("w", "beta", "r", "eta", "start", "stop"),
    [(4.0, -0.5, 2.0, 0.0, 0.0, 1.0), (3.0, 0.3, 0.0, 0.5, 0.0, 1.0), (6.0, -0.5, 15.0, 1.0, 0.0, 1.0),
     (5.0, -0.5, 1.5, 0.0, 0.2, 0.8), (2.5, 0.0, 1.0, 0.2, 0.0, 1.0)],
)
def test_apg_is_diffusers_guider_in_the_papers_formulation(w, beta, r, eta, start, stop):
    """velodiff's ``apg:scale=w`` is diffusers' AdaptiveProjectedGuidance(guidance_scale=w - 1,
    use_original_formulation=True) (Sadat et al. 2024, Alg. 1: pred_cond + (w - 1) update), on the same
    cond / uncond predictions over a run: the momentum buffer (D + beta D_prev, kept before the norm
    cap), the cap r, eta, and start / stop (off steps: the conditional prediction, momentum untouched)."""
    from diffusers.guiders import AdaptiveProjectedGuidance as DiffusersAPG
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    from velodiff.guidance.apg import AdaptiveProjectedGuidance
    from velodiff.plan import EvalRequest, EvalResult, RunInfo

    sched, steps, b = DiscreteVP.scaled_linear(), 6, 2
    guider = DiffusersAPG(
        guidance_scale=w - 1,
        adaptive_projected_guidance_momentum=beta if beta else None,
        adaptive_projected_guidance_rescale=r,
        eta=eta,
        use_original_formulation=True,
        start=start,
        stop=stop,
    )
    rule = AdaptiveProjectedGuidance(
        scale=w, momentum=beta, norm_threshold=r, eta=eta, start=start, stop=stop
    )
    conds = {"cond": "c", "uncond": "u"}
    rule.begin(RunInfo(sched, make_grid("uniform", sched, steps), None, b, conds, guidance=w))
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        c, u = (torch.randn(b, 4, 6, 6, generator=g) for _ in range(2))
        guider.set_state(i, steps, torch.tensor(900 - 150 * i))
        if i == 0 and beta:  # what the guider's prepare_inputs does at step 0
            guider.momentum_buffer = MomentumBuffer(beta)
        ref = guider.forward(c, u).pred

        def inner(req, c=c, u=u):
            return EvalResult(c, {"cond": c, "uncond": u} if "uncond" in req.branches else {"cond": c})

        req = EvalRequest(i, 0, torch.tensor(0.5, dtype=F64), torch.zeros_like(c), conds)
        got = rule.evaluate(req, inner).x0
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    rule.end()


# --- CFG and guidance rescale: diffusers' guider on a whole DDIM run --------------------------------------


def _toy_eps(x, timestep, cond):
    k = timestep.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
    return torch.tanh(0.7 * x + cond * (1.0 + k)) + 0.3 * cond - 0.2 * k * x


@pytest.mark.parametrize(
    ("w", "phi", "start", "stop"), [(5.0, 0.7, 0.0, 1.0), (4.0, 0.5, 0.2, 0.7), (3.0, 0.0, 0.0, 0.5)]
)
def test_cfg_and_rescale_on_a_ddim_run_are_diffusers_cfg_guider(w, phi, start, stop):
    """A DDIM run of an eps network under ``cfg:scale=w,start,stop+rescale:phi`` is diffusers' DDIMScheduler
    stepped with ClassifierFreeGuidance(guidance_scale=w, guidance_rescale=phi, start, stop): the guided
    steps int(start N) <= i < int(stop N), and rescale_noise_cfg's std over every non-batch dim on eps."""
    from diffusers import DDIMScheduler
    from diffusers.guiders import ClassifierFreeGuidance

    steps, b = 6, 2
    g = torch.Generator().manual_seed(2)
    x_init = torch.randn(b, 4, 5, 5, generator=g, dtype=F64)
    cond, uncond = torch.randn(b, 4, 5, 5, generator=g, dtype=F64), torch.zeros(b, 4, 5, 5, dtype=F64)
    scheduler = DDIMScheduler(**sd_tiny.SD_SCHEDULER)
    scheduler.set_timesteps(steps)
    guider = ClassifierFreeGuidance(guidance_scale=w, guidance_rescale=phi, start=start, stop=stop)
    x = x_init.clone()
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(i, steps, t)
        tt = t.reshape(1).expand(b)
        eps = guider.forward(_toy_eps(x, tt, cond), _toy_eps(x, tt, uncond)).pred
        x = scheduler.step(eps, t, x).prev_sample
    sched = DiscreteVP.scaled_linear()
    ts = sched.t_from_timestep(scheduler.timesteps.double()).tolist() + [sched.t_min]
    plan = f"cfg:scale={w},start={start},stop={stop}" + (f"+rescale:phi={phi}" if phi else "")
    r = sample(ModelDenoiser(_toy_eps, sched), x_init, ts, "ddim", cond=GuidedCond(cond, uncond), plan=plan)
    _close(r.x, x)  # (diffusers' alphas are float32)
    assert r.evals == steps + int(stop * steps) - int(start * steps)


@pytest.mark.parametrize(("kind", "solver"), [("sd1", "ddim"), ("sd2", "ddim")])
def test_rescale_plan_rule_is_diffusers_guidance_rescale(models, kind, solver):
    """``plan="rescale:phi=0.7"`` is StableDiffusionPipeline(guidance_rescale=0.7), on eps (SD1) and on
    v (SD2: diffusers rescales the v prediction the pipeline guides); it also does something."""
    m = models[kind]
    z = _noise(3)
    kw = dict(grid=_times(m, solver, 3), solver=solver, guidance=6.0, latents=z, output="latent", height=H,
              width=W)
    ref = m.to_diffusers(_scheduler(m, solver))(
        PROMPT, num_inference_steps=3, guidance_scale=6.0, guidance_rescale=0.7, latents=z.clone(),
        output_type="latent", height=H, width=W,
    ).images
    r = text2img(m, PROMPT, plan="rescale:phi=0.7", **kw)
    assert r.plan == "cfg+rescale:phi=0.7"
    _close(r.latents, ref)
    assert not torch.allclose(text2img(m, PROMPT, **kw).latents, ref, atol=1e-3)


# --- PAG: diffusers' PAG pipelines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guidance", "pag_scale", "layers", "phi"),
    [(5.0, 3.0, ["mid"], 0.0), (1.0, 3.0, ["mid"], 0.0),
     (5.0, 2.0, ["down_blocks.0", "up_blocks.1.attentions.1"], 0.0), (4.0, 2.5, ["mid"], 0.7),
     (1.0, 3.0, ["mid"], 0.7)],
)
def test_pag_is_diffusers_pag_pipeline(models, guidance, pag_scale, layers, phi):
    """``plan="pag:scale=s,applied_layers=..."`` is StableDiffusionPAGPipeline(pag_scale=s,
    pag_applied_layers=...): the self-attention layers the patterns select (diffusers' re.search and
    its whole-number rule), their maps replaced by the identity on the perturbed rows, and the
    combination uncond + w (cond - uncond) + s (cond - perturbed), or cond + s (cond - perturbed)
    without CFG; guidance rescale under CFG acts on the sum, against the conditional prediction, and
    without CFG (guidance 1) is off, as the pipeline has it."""
    from diffusers import StableDiffusionPAGPipeline

    m = models["sd1"]
    z = _noise(4)
    base = m.to_diffusers(_scheduler(m, "ddim"))
    pipe = StableDiffusionPAGPipeline.from_pipe(base, pag_applied_layers=layers)
    ref = pipe(
        PROMPT, num_inference_steps=3, guidance_scale=guidance, pag_scale=pag_scale, guidance_rescale=phi,
        latents=z.clone(), output_type="latent", height=H, width=W,
    ).images
    plan = f"pag:scale={pag_scale},applied_layers={'|'.join(layers)}"
    r = text2img(
        m, PROMPT, grid=_times(m, "ddim", 3), solver="ddim", guidance=guidance, guidance_rescale=phi,
        plan=plan, latents=z, output="latent", height=H, width=W,
    )
    assert r.evals == (3 if guidance > 1 else 2) * 3
    _close(r.latents, ref)
    plain = text2img(m, PROMPT, grid=_times(m, "ddim", 3), solver="ddim", guidance=guidance, latents=z,
                     output="latent", height=H, width=W)
    assert not torch.allclose(plain.latents, ref, atol=1e-3)  # the perturbed branch changes the result


@pytest.mark.parametrize("adaptive", [0.002, 0.05])
def test_pag_adaptive_scale_is_diffusers_pag_adaptive_scale(models, adaptive):
    """``pag:adaptive_scale=a`` is the PAG pipeline's pag_adaptive_scale: the scale s - a (1000 - t) at
    each step's timestep, never below 0 (at 0.05 it is 0 after the first step: no perturbed pass there)."""
    from diffusers import StableDiffusionPAGPipeline

    m = models["sd1"]
    z = _noise(5)
    pipe = StableDiffusionPAGPipeline.from_pipe(m.to_diffusers(_scheduler(m, "ddim")))
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=4.0, pag_scale=3.0, pag_adaptive_scale=adaptive,
               latents=z.clone(), output_type="latent", height=H, width=W).images
    r = text2img(m, PROMPT, grid=_times(m, "ddim", 4), solver="ddim", guidance=4.0,
                 plan=f"pag:scale=3,adaptive_scale={adaptive}", latents=z, output="latent", height=H, width=W)
    _close(r.latents, ref)
    plain = text2img(m, PROMPT, grid=_times(m, "ddim", 4), solver="ddim", guidance=4.0, plan="pag:scale=3",
                     latents=z, output="latent", height=H, width=W)
    assert not torch.allclose(plain.latents, r.latents, atol=1e-4)  # the adaptive scale changed the run
    # a step whose scale is 0 runs no perturbed pass (at 0.05: none below t = 940)
    live = sum(3.0 - adaptive * (1000 - float(t)) > 0 for t in pipe.scheduler.timesteps)
    assert r.evals == 2 * 4 + live and (live == 4 if adaptive == 0.002 else live < 4)


def test_pag_on_sdxl_is_diffusers_sdxl_pag_pipeline(models):
    """The default ``pag`` (scale 3, layers 'mid': both of SDXL's mid-block transformer layers) on the
    tiny SDXL with Euler is StableDiffusionXLPAGPipeline's defaults."""
    from diffusers import StableDiffusionXLPAGPipeline

    m = models["sdxl"]
    z = _noise(5)
    pipe = StableDiffusionXLPAGPipeline.from_pipe(m.to_diffusers(_scheduler(m, "euler")))
    ref = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=z.clone(), output_type="latent",
               height=H, width=W).images
    r = text2img(m, PROMPT, grid=_times(m, "euler", 3), solver="euler", guidance=5.0, plan="pag", latents=z,
                 output="latent", height=H, width=W)
    assert r.plan == "cfg+pag"
    _close(r.latents, ref)


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_pag_on_pixart_is_diffusers_pixart_sigma_pag_pipeline(tmp_path, guidance):
    """On a DiT (tiny PixArt-Sigma, DPM-Solver++ 2M): ``pag:applied_layers=blocks.1`` is
    PixArtSigmaPAGPipeline's default pag_applied_layers "blocks.1", with CFG and without."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPAGPipeline

    from velodiff.models.tiny import save_tiny

    m = load(save_tiny("pixart-sigma", tmp_path / "pixart"))
    m.max_sequence_length = 32
    base = m.to_diffusers(DPMSolverMultistepScheduler.from_config(m.components["scheduler_config"]))
    pipe = PixArtSigmaPAGPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(m.latent_shape(1, 64, 64), generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=guidance, latents=z.clone(), height=64, width=64,
               output_type="latent", max_sequence_length=32, use_resolution_binning=False).images
    ts = m.schedule.t_from_timestep(pipe.scheduler.timesteps.double()).tolist() + [0.0]
    r = text2img(m, PROMPT, grid=ts, solver="dpmpp_2m", guidance=guidance, plan="pag:applied_layers=blocks.1",
                 latents=z, output="latent", height=64, width=64)
    _close(r.latents, ref)


# --- CFG-Zero*: diffusers' guider on a whole flow-matching Euler run ---------------------------------------


def _toy_velocity(x, timestep, cond):
    """A flow network's output, v = eps - x0 (diffusers' convention), with timestep = 1000 t."""
    k = (timestep / 1000.0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.6 * x + cond * (1.0 + k)) + 0.4 * cond - 0.3 * k * x


@pytest.mark.parametrize(("steps", "zero_init", "w", "start", "stop", "shift", "phi"),
                         [(6, 1, 4.0, 0.0, 1.0, 1.0, 0.0), (6, 2, 3.0, 0.0, 0.5, 1.0, 0.0),
                          (5, 0, 5.0, 0.2, 1.0, 1.0, 0.0), (6, 1, 3.0, 0.4, 1.0, 1.0, 0.0),
                          (6, 1, 4.0, 0.0, 1.0, 3.0, 0.0), (6, 0, 4.0, 0.0, 1.0, 3.0, 0.7)])
def test_cfg_zero_star_run_is_diffusers_guider_with_flow_match_euler(
    steps, zero_init, w, start, stop, shift, phi
):
    """A flow Euler run under ``cfg_zero`` is FlowMatchEulerDiscreteScheduler stepped with diffusers'
    ClassifierFreeZeroStarGuidance: s* = <v_c, v_u> / |v_u|^2 on the velocity the network outputs,
    zero velocity on the first ``zero_init_steps`` steps (here without a network call; also before the
    guider's start, as diffusers checks zero init first), start / stop (its cond-only steps); and its
    evals count only the steps that ran the network; also on SD3's shifted sigmas (shift 3), and with
    guidance rescale on the velocity (diffusers' zero init gives NaN under rescale: std of zeros)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    b = 2
    g = torch.Generator().manual_seed(6)
    x_init = torch.randn(b, 4, 5, 5, generator=g)
    cond, uncond = torch.randn(b, 4, 5, 5, generator=g), torch.zeros(b, 4, 5, 5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    guider = ClassifierFreeZeroStarGuidance(
        guidance_scale=w, zero_init_steps=zero_init, start=start, stop=stop, guidance_rescale=phi
    )
    x = x_init.clone()
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(i, steps, t)
        tt = t.reshape(1).expand(b)
        v = guider.forward(_toy_velocity(x, tt, cond), _toy_velocity(x, tt, uncond)).pred
        x = scheduler.step(v, t, x).prev_sample
    den = ModelDenoiser(_toy_velocity, RectifiedFlow(), "flow")
    plan = f"cfg_zero:scale={w},zero_init_steps={zero_init},start={start},stop={stop}"
    plan += f"+rescale:phi={phi}" if phi else ""
    r = sample(den, x_init.double(), scheduler.sigmas.double(), "euler", cond=GuidedCond(cond.double(),
               uncond.double()), plan=plan)
    torch.testing.assert_close(r.x.float(), x, atol=1e-5, rtol=1e-5)
    guided = {i for i in range(int(start * steps), int(stop * steps)) if i >= zero_init}
    assert r.evals == (steps - zero_init) + len(guided)


# --- CFG++: the official algorithm on the tiny SD UNet ------------------------------------------------------


def _embeddings(m):
    pipe = m.to_diffusers(_scheduler(m, "ddim"))
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    return pipe.unet, cond, uncond


@pytest.mark.parametrize("lam", [0.6, 0.3])
def test_cfgpp_ddim_is_the_official_ddim_cfgpp_step(models, lam):
    """CFG++ DDIM (Chung et al. 2024, Alg. 1; the official ``ddim_cfg++``): x0 from the guided eps
    eps_u + lambda (eps_c - eps_u), re-noised with eps_u: z' = sqrt(abar') x0 + sqrt(1 - abar') eps_u,
    at diffusers' DDIM timesteps and alphas (the official code reads alphas one index later)."""
    m = models["sd1"]
    unet, c_emb, u_emb = _embeddings(m)
    steps = 4
    s = _scheduler(m, "ddim")
    s.set_timesteps(steps)
    abar, skip = s.alphas_cumprod.double(), s.config.num_train_timesteps // steps
    z = _noise(7)
    x = z.double()
    with torch.no_grad():
        for t in s.timesteps:
            out = unet(torch.cat([x, x]).float(), t, encoder_hidden_states=torch.cat([u_emb, c_emb])).sample
            eps_u, eps_c = out.double().chunk(2)
            eps = eps_u + lam * (eps_c - eps_u)
            a, prev = abar[t], int(t) - skip
            a_prev = abar[prev] if prev >= 0 else abar[0]  # set_alpha_to_one=False: the first trained step
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_u
    r = text2img(m, PROMPT, grid=_times(m, "ddim", steps), solver="ddim", guidance=7.5,
                 plan=f"cfgpp:scale={lam}", latents=z, output="latent", height=H, width=W)
    _close(r.latents, x.float())


def test_cfgpp_euler_is_k_diffusions_euler_cfgpp_form(models):
    """CFG++ Euler in k-diffusion's sigma (the official repo's and ComfyUI's euler_cfg_pp form):
    denoised = x - sigma eps_lambda, x' = denoised + sigma' (x - denoised_u) / sigma, ending at sigma 0
    on the guided denoised; at diffusers' Euler sigmas and timesteps, from its init_noise_sigma."""
    m = models["sd1"]
    unet, c_emb, u_emb = _embeddings(m)
    steps, lam = 4, 0.5
    s = _scheduler(m, "euler")
    s.set_timesteps(steps)
    z = _noise(8)
    x = z.double() * float(s.init_noise_sigma)
    sig = s.sigmas.double()
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            x_in = (x / (sig[i] ** 2 + 1).sqrt()).float()
            out = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([u_emb, c_emb])).sample
            eps_u, eps_c = out.double().chunk(2)
            denoised, denoised_u = x - sig[i] * (eps_u + lam * (eps_c - eps_u)), x - sig[i] * eps_u
            x = denoised + sig[i + 1] * (x - denoised_u) / sig[i]
    r = text2img(m, PROMPT, grid=_times(m, "euler", steps), solver="euler", guidance=7.5,
                 plan=f"cfgpp:scale={lam}", latents=z, output="latent", height=H, width=W)
    _close(r.latents, x.float())


def test_cfgpp_ddpm_is_the_ancestral_cfgpp_step_of_k_diffusion():
    """CFG++ on DDPM (DDIM eta = 1) is the ancestral CFG++ step (ComfyUI's euler_ancestral_cfg_pp form,
    written here from k-diffusion's own ``get_ancestral_step`` and ``to_d``): in sigma = sigma / alpha,
    x' = denoised + sigma_down (x - denoised_u) / sigma + sigma_up z, from the same z each step."""
    import kdiffusion

    k = kdiffusion.load_k_sampling()
    if k is None:
        pytest.skip("k-diffusion is not installed")
    sched, steps, lam = DiscreteVP.scaled_linear(), 6, 0.5
    ts = make_grid("uniform", sched, steps)
    g = torch.Generator().manual_seed(12)
    x_init = torch.randn(2, 4, 5, 5, generator=g, dtype=F64)
    cond, uncond = torch.randn(2, 4, 5, 5, generator=g, dtype=F64), torch.zeros(2, 4, 5, 5, dtype=F64)
    zs = [torch.randn(2, 4, 5, 5, generator=g, dtype=F64) for _ in range(steps)]
    den = ModelDenoiser(_toy_eps, sched)
    r = sample(den, x_init, ts, "ddpm", cond=GuidedCond(cond, uncond), plan=f"cfgpp:scale={lam}",
               noise=lambda i: zs[i])
    alpha, sig = sched.alpha(ts), sched.sigma(ts) / sched.alpha(ts)
    x = x_init / alpha[0]  # k-diffusion's x = x_VP / alpha
    for i in range(steps):
        t = ts[i]
        c, u = (den(x * alpha[i], t, y) for y in (cond, uncond))
        denoised = u + lam * (c - u)
        if sig[i + 1] == 0:
            x = denoised
            break
        down, up = k.get_ancestral_step(sig[i], sig[i + 1], eta=1.0)
        x = denoised + k.to_d(x, sig[i], u) * down + zs[i] * up
    torch.testing.assert_close(r.x, x * alpha[-1], atol=1e-10, rtol=1e-10)


# --- the CFG interval, given in sigma -----------------------------------------------------------------------


def test_cfg_interval_guides_the_steps_whose_sigma_lies_in_the_interval():
    """Kynkaenniemi et al. 2024 guide where sigma (k-diffusion's sigma / alpha) lies in the interval; given
    there and converted to velodiff's schedule time, ``cfg:t_lo,t_hi`` guides exactly those steps of a
    Karras grid (its bounds between grid points), and each such step is CFG, each other the cond pass."""
    from conftest import spy_rule

    sched = DiscreteVP.scaled_linear()
    ts = make_grid("karras", sched, 12)
    sigma = (sched.sigma(ts) / sched.alpha(ts))[:-1]
    lo, hi = float(sigma[8:10].mean()), float(sigma[2:4].mean())  # EDM2's (0.28, 5.42] on this grid's scale

    def t_of(s: float) -> float:  # the schedule time of a sigma (monotone): bisection
        a, b = float(sched.t_min), float(sched.t_max)
        for _ in range(200):
            mid = (a + b) / 2
            a, b = (mid, b) if float(sched.sigma(torch.tensor(mid, dtype=F64)) / sched.alpha(
                torch.tensor(mid, dtype=F64))) < s else (a, mid)
        return (a + b) / 2

    spy = spy_rule(lambda req, res: (req.step, "uncond" in res.parts))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=F64)
    both = GuidedCond(torch.randn(2, 4, 5, 5, generator=g, dtype=F64), torch.zeros(2, 4, 5, 5, dtype=F64))
    den = ModelDenoiser(_toy_eps, sched)
    r = sample(den, x, ts, "ddim", cond=both, plan=[spy, f"cfg:scale=3,t_lo={t_of(lo)},t_hi={t_of(hi)}"])
    want = [bool(lo < s <= hi) for s in sigma.tolist()]
    assert [guided for _, guided in spy.log] == want and sum(want) == 6
    assert r.evals == len(want) + sum(want)


# --- Adaptive Guidance: the switch per image, from a plain CFG run's own predictions ------------------------


def test_ag_guides_each_image_until_its_first_agreeing_step_then_as_cfg_stopped_there():
    """Adaptive Guidance (Castillo et al. 2023; velodiff compares x0 predictions, see guidance/adaptive.py)
    has no peer implementation; this is its definition checked from outside: an image is guided up to
    and including the first step where cos(x0_c, x0_u) > threshold, read off a plain CFG run (the two
    runs agree until then), and runs only its conditional pass after; each image's result is then
    that image alone under ``cfg:stop`` at its switch."""
    from conftest import spy_rule

    sched, steps, b = DiscreteVP.scaled_linear(), 10, 3
    ts = make_grid("uniform", sched, steps)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(b, 4, 5, 5, generator=g, dtype=F64)
    cond, uncond = torch.randn(b, 4, 5, 5, generator=g, dtype=F64), torch.zeros(b, 4, 5, 5, dtype=F64)
    den = ModelDenoiser(_toy_eps, sched)
    cos_log = spy_rule(lambda req, res: torch.nn.functional.cosine_similarity(
        res.parts["cond"].flatten(1), res.parts["uncond"].flatten(1), dim=1))
    sample(den, x, ts, "ddim", cond=GuidedCond(cond, uncond), plan=[cos_log, "cfg:scale=3"])
    cos = torch.stack(cos_log.log)  # (steps, images)

    def switch(th: float) -> list[int]:  # each image's first step with cos > th (steps: never)
        return [next((i for i in range(steps) if cos[i, k] > th), steps) for k in range(b)]

    levels = sorted(set(cos.flatten().tolist()))
    th = next(th for th in ((p + q) / 2 for p, q in zip(levels, levels[1:], strict=False))
              if len(set(switch(th))) == b and max(switch(th)) < steps - 1)
    last = switch(th)
    rows = spy_rule(lambda req, res: None if "uncond" not in req.branches else (
        set(range(b)) if "uncond" not in req.subsets else set(req.subsets["uncond"].tolist())), layer=5)
    r = sample(den, x, ts, "ddim", cond=GuidedCond(cond, uncond), plan=[rows, f"ag:scale=3,threshold={th!r}"])
    want = [{k for k in range(b) if i <= last[k]} or None for i in range(steps)]
    assert rows.log == want
    assert r.evals == pytest.approx(steps + sum(k + 1 for k in last) / b)
    for k in range(b):
        alone = sample(den, x[k : k + 1], ts, "ddim", cond=GuidedCond(cond[k : k + 1], uncond[k : k + 1]),
                       plan=f"cfg:scale=3,stop={(last[k] + 1.5) / steps!r}")
        torch.testing.assert_close(r.x[k : k + 1], alone.x, atol=1e-12, rtol=1e-12)


def test_linear_ag_estimate_is_exact_and_guides_where_the_law_is_affine():
    """LinearAG's online fit (u_i ~ b0 c_i + b1 c_{i-1} + b2 u_{i-1}) recovers an unconditional x0 that is
    an exact multiple of the conditional one, so its estimated steps guide as CFG does with the real u:
    the whole run equals ``cfg`` while spending fewer evaluations."""
    sched, steps = DiscreteVP.scaled_linear(), 10
    ts = make_grid("uniform", sched, steps)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 5, 5, generator=g, dtype=F64)

    def x0_net(x, timestep, cond):  # prediction_type "sample": the network returns x0; uncond = 0.5 cond
        k = timestep.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
        return cond * (torch.tanh(0.8 * x) + 0.3 * k)

    den = ModelDenoiser(x0_net, sched, "sample")
    both = GuidedCond(torch.ones_like(x), torch.full_like(x, 0.5))
    cfg = sample(den, x, ts, "ddim", cond=both, plan="cfg:scale=3")
    lin = sample(den, x, ts, "ddim", cond=both, plan="linear_ag:scale=3,every=2,warmup=3")
    assert lin.evals == 2 * steps - 4 and cfg.evals == 2 * steps
    torch.testing.assert_close(lin.x, cfg.x, atol=1e-6, rtol=1e-6)
