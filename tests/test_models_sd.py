"""Real-architecture Stable Diffusion models (tiny random weights) loaded through velodiff.models and
run by velodiff's sampling core: loading, errors, and parity with diffusers' own pipelines.

Parity: from the same starting noise and the same time steps, with a solver both implement, the
final latents of velodiff's text2img / img2img / inpaint equal diffusers' (output_type="latent",
latents passed in, guidance on) to float32 round-off, at a square size and at both non-square ones
(a height / width swap anywhere, e.g. in SDXL's size conditioning, shows only there)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm_layout
import sd_tiny
from velodiff.errors import VelodiffError
from velodiff.models import FAMILIES, load
from velodiff.pipelines import img2img, inpaint, text2img

warnings.filterwarnings("ignore", message=".*torchvision.*")
PROMPT = "a photo of a red cube"
H = W = 16  # the tiny VAE's factor is 2: latents 4 x 8 x 8
#: (height, width): square, landscape and portrait
SIZES = [(H, W), (H, W * 3 // 2), (H * 3 // 2, W)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return sd_tiny.Loaded(tmp_path_factory.mktemp("sd"))


def diffusers_times(model, scheduler, steps: int, final: str) -> list[float]:
    """velodiff times for a diffusers scheduler's timesteps, plus the final time it ends at."""
    scheduler.set_timesteps(steps)
    ts = model.schedule.t_from_timestep(scheduler.timesteps.double()).tolist()
    return ts + [model.schedule.t_min if final == "t_min" else 0.0]


def scheduler(model, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[
        name
    ]
    return cls.from_config(model.components["scheduler_config"])


#: DDIM (set_alpha_to_one=False) ends at the first trained step; Euler and DPM-Solver++ jump to 0
FINAL = {"ddim": "t_min", "euler": "zero", "dpmpp_2m": "zero"}


def noise(seed: int = 0, batch: int = 1, height: int = H, width: int = W) -> torch.Tensor:
    return torch.randn(batch, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(seed))


# --- loading and detection ---------------------------------------------------------------------


def test_families_detected(models):
    assert {"sd1", "sd2", "sdxl"} <= set(FAMILIES)
    assert models["sd1"].family == "sd1" and models["sd1"].prediction_type == "epsilon"
    assert models["sd2"].family == "sd2" and models["sd2"].prediction_type == "v_prediction"
    assert models["sdxl"].family == "sdxl"
    assert models["sd1-inpaint"].is_inpainting and not models["sd1"].is_inpainting
    m = models["sd1"]
    assert m.latent_channels == 4 and m.vae_scale_factor == 2 and m.default_size == (16, 16)


def test_an_lcm_pipeline_folder_is_detected(models, tmp_path):
    """diffusers' LCM folders (model_index LatentConsistencyModelPipeline, an SD 1.x UNet) load as sd1
    without --family (they were refused as no known family)."""
    import json
    import shutil

    lcm = tmp_path / "lcm"
    shutil.copytree(models.folder("sd1"), lcm)
    index = json.loads((lcm / "model_index.json").read_text())
    index["_class_name"] = "LatentConsistencyModelPipeline"
    (lcm / "model_index.json").write_text(json.dumps(index))
    assert load(lcm).family == "sd1"


def test_a_text_encoder_with_an_attention_mask_encodes_as_diffusers(models, tmp_path):
    """A CLIP text encoder configured with use_attention_mask: the mask is the tokenizer's, which
    attends the end token CLIP also pads with (ids != pad masked it: 0.9 off diffusers' embeddings)."""
    import json
    import shutil

    folder = tmp_path / "masked"
    shutil.copytree(models.folder("sd1"), folder)
    cfg = folder / "text_encoder" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "use_attention_mask": True}))
    m = load(folder)
    c = m.encode_prompt(["a red cube"], negative=["blurry"], guided=True)
    pe, ne = m.to_diffusers().encode_prompt("a red cube", "cpu", 1, True, negative_prompt="blurry")
    torch.testing.assert_close(c.cond["encoder_hidden_states"], pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(c.uncond["encoder_hidden_states"], ne, rtol=0, atol=1e-6)


def test_text2img_images_and_counts(models):
    r = text2img(models["sd1"], PROMPT, steps=3, seeds=[1, 2])
    assert len(r.images) == 2 and r.images[0].size == (W, H) and r.images[0].mode == "RGB"
    assert (r.nfe, r.evals, r.steps) == (3, 6, 3)  # CFG: 1 batched call, 2 evaluations per step
    t = text2img(models["sd1"], PROMPT, steps=3, seeds=[2], output="tensor")
    assert t.images.shape == (1, 3, H, W) and 0 <= float(t.images.min()) <= float(t.images.max()) <= 1
    # an image depends on its own seed only, not on the batch it was made in
    torch.testing.assert_close(t.latents[0], r.latents[1], atol=1e-4, rtol=1e-4)
    one = text2img(models["sd1"], PROMPT, nfe=2, guidance=1.0, output="latent")
    assert (one.nfe, one.evals, one.images) == (2, 2, None)


def test_a_size_far_beyond_the_models_warns(models):
    """8192x8192 on the 64x64 model ran for minutes without a word: a size over 16x the trained area
    is said before the run (here the run then stops at latents of another shape)."""
    from velodiff import VelodiffError

    with pytest.warns(UserWarning, match=r"128x64 is 32x the area this model was trained at \(16x16\)"):
        with pytest.raises(VelodiffError, match="latents have shape"):
            text2img(models["sd1"], PROMPT, height=64, width=128, latents=torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_single_file_equals_folder(models, tmp_path, monkeypatch, kind):
    """An original-layout .safetensors (diffusers' from_single_file, configs from a local folder) gives
    the same model as the diffusers folder; without configs the error says what to pass."""
    folder = models.folder(kind)
    save = ldm_layout.save_sd1_single_file if kind == "sd1" else ldm_layout.save_sdxl_single_file
    f = save(folder, tmp_path / f"{kind}.safetensors")
    single = load(f, config=folder)
    assert single.family == kind
    a = text2img(models[kind], PROMPT, steps=2, seeds=[3], output="latent")
    b = text2img(single, PROMPT, steps=2, seeds=[3], output="latent")
    torch.testing.assert_close(a.latents, b.latents)
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(VelodiffError, match="pass config="):
        load(f)  # velodiff's bundled configs are the published (full-size) architectures


# --- parity with diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp_2m"])
def test_parity_sd1_text2img(models, solver, size):
    m = models["sd1"]
    (h, w), steps = size, 6
    z = noise(0, height=h, width=w)
    ref = m.to_diffusers(scheduler(m, solver))(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=z.clone(),
        output_type="latent",
        height=h,
        width=w,
    ).images
    ts = diffusers_times(m, scheduler(m, solver), steps, FINAL[solver])
    r = text2img(
        m, PROMPT, grid=ts, solver=solver, guidance=7.5, latents=z, output="latent", height=h, width=w
    )
    assert r.nfe == steps
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("kind", "solver"), [("sd2", "ddim"), ("sd2", "dpmpp_2m"), ("sdxl", "euler")])
def test_parity_sd2_v_and_sdxl(models, kind, solver, size):
    m = models[kind]
    (h, w), steps, guidance = size, 4, 5.0
    z = noise(1, height=h, width=w)
    ref = m.to_diffusers(scheduler(m, solver))(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=z.clone(),
        output_type="latent",
        height=h,
        width=w,
    ).images
    ts = diffusers_times(m, scheduler(m, solver), steps, FINAL[solver])
    r = text2img(
        m, PROMPT, grid=ts, solver=solver, guidance=guidance, latents=z, output="latent", height=h, width=w
    )
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_parity_sdxl_micro_conditioning(models):
    """SDXL's size and crop conditioning (Podell et al. 2023, Sec. 2.2): original size, crop top-left
    and target size set apart from the image size, as diffusers' pipeline takes them."""
    m = models["sdxl"]
    h, w = SIZES[1]
    z = noise(6, height=h, width=w)
    micro = {"original_size": (40, 24), "crops_coords_top_left": (4, 2), "target_size": (24, 32)}
    ref = m.to_diffusers(scheduler(m, "euler"))(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=5.0,
        latents=z.clone(),
        output_type="latent",
        height=h,
        width=w,
        **micro,
    ).images
    ts = diffusers_times(m, scheduler(m, "euler"), 3, "zero")
    for key, value in micro.items():
        setattr(m, key, value)
    try:
        r = text2img(
            m, PROMPT, grid=ts, solver="euler", guidance=5.0, latents=z, output="latent", height=h, width=w
        )
    finally:
        for key in micro:
            setattr(m, key, None)
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    plain = text2img(
        m, PROMPT, grid=ts, solver="euler", guidance=5.0, latents=z, output="latent", height=h, width=w
    )
    assert not torch.allclose(plain.latents, r.latents)  # the conditioning is used


def test_parity_guidance_rescale_negative_clip_skip(models):
    """Negative prompt, guidance rescale (Lin et al. 2023) and clip_skip=1 (the penultimate CLIP layer
    and the final layer norm; diffusers' own clip_skip path breaks on transformers 5's flattened
    CLIPTextModel, so its embeddings are made here by that definition and passed in)."""
    m = models["sd1"]
    z = noise(2)
    te, tok = m.components["text_encoder"], m.components["tokenizer"]

    def penultimate(text):
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])

    ref = m.to_diffusers(scheduler(m, "ddim"))(
        prompt_embeds=penultimate(PROMPT),
        negative_prompt_embeds=penultimate("blurry ugly painting"),
        num_inference_steps=3,
        guidance_scale=6.0,
        guidance_rescale=0.7,
        latents=z.clone(),
        output_type="latent",
        height=H,
        width=W,
    ).images
    ts = diffusers_times(m, scheduler(m, "ddim"), 3, "t_min")
    m.clip_skip = 1  # ComfyUI's "CLIP Set Last Layer" -2
    try:
        r = text2img(
            m,
            PROMPT,
            negative="blurry ugly painting",
            grid=ts,
            solver="ddim",
            guidance=6.0,
            guidance_rescale=0.7,
            latents=z,
            output="latent",
        )
    finally:
        m.clip_skip = 0
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_torch_noise_matches_diffusers_cpu_generator(models):
    """noise="torch": a seed gives the starting noise of diffusers with a CPU generator (and ComfyUI)."""
    m = models["sd1"]
    ref = m.to_diffusers(scheduler(m, "ddim"))(
        [PROMPT] * 2,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="latent",
        height=H,
        width=W,
    ).images
    ts = diffusers_times(m, scheduler(m, "ddim"), 2, "t_min")
    r = text2img(
        m, [PROMPT] * 2, grid=ts, solver="ddim", guidance=7.5, seeds=[42, 43], noise="torch", output="latent"
    )
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_parity_img2img(models, size):
    from diffusers import StableDiffusionImg2ImgPipeline

    m = models["sd1"]
    h, w = size
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    z0 = m.encode(image)
    steps, strength = 5, 0.6
    pipe = StableDiffusionImg2ImgPipeline(**m.to_diffusers(scheduler(m, "dpmpp_2m")).components)
    ref = pipe(
        PROMPT,
        image=z0,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    ts = diffusers_times(m, scheduler(m, "dpmpp_2m"), steps, "zero")
    r = img2img(
        m, PROMPT, image, strength, grid=ts, solver="dpmpp_2m", guidance=7.5, latents=eps, output="latent"
    )
    assert r.nfe == int(steps * strength)
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    # strength 0 returns the image through the VAE without a network call
    keep = img2img(m, PROMPT, image, 0.0, steps=4, output="tensor")
    assert keep.nfe == 0 and keep.images.shape == (1, 3, h, w)


def test_img2img_lowers_the_final_orders_by_the_whole_grids_length(models):
    """diffusers' DPM-Solver++ 3M lowers its last orders on grids shorter than 15 steps, judged on its
    whole timesteps: 20 steps at strength 0.6 run 12 at full order (velodiff judged the 12, and lowered)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    m = models["sd1"]
    z0 = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    steps, strength = 20, 0.6

    def make():
        return DPMSolverMultistepScheduler.from_config(m.components["scheduler_config"], solver_order=3)

    pipe = StableDiffusionImg2ImgPipeline(**m.to_diffusers(make()).components)
    ref = pipe(PROMPT, image=z0, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    ts = diffusers_times(m, make(), steps, "zero")
    r = img2img(m, PROMPT, None, strength, image_latents=z0, grid=ts, guidance=7.5, latents=eps,
                solver="DPMSolverMultistepScheduler:solver_order=3", output="latent")
    assert r.steps == 12
    torch.testing.assert_close(r.latents, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def test_a_float16_sdxl_as_a_diffusers_pipeline_decodes_as_velodiff_does(models):
    """velodiff keeps SDXL's force_upcast VAE in float32 beside a float16 UNet; the diffusers pipeline of
    those modules gets a float16 copy, which it upcasts at decode (a float32 VAE got float16 latents)."""
    m = load(models.folder("sdxl"), dtype="float16")
    assert m.components["vae"].dtype == torch.float32 and m.components["unet"].dtype == torch.float16
    pipe = m.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    z = noise(3).half()
    ref = pipe(PROMPT, num_inference_steps=2, latents=z, guidance_scale=1.0, output_type="pt").images
    assert pipe.vae is not m.components["vae"] and m.components["vae"].dtype == torch.float32
    r = text2img(m, PROMPT, steps=2, grid=diffusers_times(m, scheduler(m, "ddim"), 2, "t_min"), solver="ddim",
                 guidance=1.0, latents=z.float(), output="tensor")
    torch.testing.assert_close(r.images.float(), ref.float(), atol=2e-2, rtol=0)


def _mask(height: int = H, width: int = W) -> torch.Tensor:
    mask = torch.zeros(1, 1, height, width)
    mask[..., 4:12, 2:10] = 1.0
    return mask


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["sd1", "sd1-inpaint"])
def test_parity_inpaint(models, kind, size):
    """A plain UNet inpaints by masked re-noising each step, an inpainting UNet through its extra
    channels; both equal diffusers' StableDiffusionInpaintPipeline."""
    from diffusers import StableDiffusionInpaintPipeline

    m = models[kind]
    h, w = size
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(4))
    mask = _mask(h, w)
    z0 = m.encode(image)
    masked = m.encode(image * (1 - mask) + 0.5 * mask)
    steps, z = 4, noise(5, height=h, width=w)
    pipe = StableDiffusionInpaintPipeline(**m.to_diffusers(scheduler(m, "ddim")).components)
    ref = pipe(
        PROMPT,
        image=z0,
        mask_image=mask,
        masked_image_latents=masked,
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=z.clone(),
        output_type="latent",
        height=h,
        width=w,
        strength=1.0,
    ).images
    ts = diffusers_times(m, scheduler(m, "ddim"), steps, "t_min")
    r = inpaint(
        m,
        PROMPT,
        image,
        mask,
        grid=ts,
        solver="ddim",
        guidance=7.5,
        latents=z,
        image_latents=z0,
        masked_image_latents=masked,
        output="latent",
    )
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    if kind == "sd1":  # outside the mask (latent pixels wholly outside it) the original latents are kept
        keep = torch.ones(1, 1, h // 2, w // 2, dtype=torch.bool)
        keep[..., 2:6, 1:5] = False
        torch.testing.assert_close(r.latents[keep.expand_as(r.latents)], z0[keep.expand_as(z0)])


def test_inpainting_puts_the_known_part_back_before_a_step_is_retaken(models):
    """Masked re-noising is the outermost rule's after_step: the plan rules' redo (self-recurrence,
    i.e. RePaint's resampling) and the callback see the blended sample, whose kept part is the
    original noised to that time, at every take of every step."""
    from velodiff.plan import Accelerator

    m = models["sd1"]
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4))
    mask = _mask(H, W)
    z0, z = m.encode(image), noise(5)
    keep = F.interpolate(mask, size=z0.shape[-2:]) < 0.5
    keep = keep.expand_as(z0)
    seen = []

    class Spy(Accelerator):  # outside recur: asked before it, at every take
        name, layer = "spy", 5000

        def redo(self, info):
            seen.append(("redo", info.i, info.t, info.x.clone()))

    def callback(info):
        seen.append(("callback", info.i, info.t, info.x.clone()))

    steps = 4
    r = inpaint(m, PROMPT, image, mask, steps=steps, solver="ddim", latents=z, image_latents=z0,
                plan=[Spy(), "recur:k=2"], callback=callback, output="latent")
    assert [w for w, *_ in seen].count("redo") == 2 * steps and len(seen) == 3 * steps
    sched = m.schedule
    for _, i, t, x in seen:
        known = z0 if i == steps - 1 else float(sched.alpha(t)) * z0 + float(sched.sigma(t)) * z
        torch.testing.assert_close(x[keep], known[keep])
    torch.testing.assert_close(r.latents[keep], z0[keep])


# --- errors --------------------------------------------------------------------------------------


def test_load_errors(tmp_path):
    with pytest.raises(VelodiffError, match="not a diffusers model folder"):
        load(tmp_path)
    with pytest.raises(VelodiffError, match="does not exist"):
        load(tmp_path / "missing")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(VelodiffError, match=r"pickle checkpoint.*safetensors"):
        load(ckpt)
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(odd))
    with pytest.raises(VelodiffError, match=r"match no known model family.*model\.diffusion_model"):
        load(odd)
    with pytest.raises(VelodiffError, match="unknown model family"):
        load(odd, family="sd9")


def test_ays_on_sdxl_takes_sdxls_published_schedule(models):
    """A named grid's per-model default (LoadedModel.grid_defaults): AYS on SDXL is its SDXL list; a
    call's own model= wins."""
    from velodiff.grids import make_grid
    from velodiff.pipelines.setup import Sampling, make_setup

    m = models["sdxl"]
    ts = make_setup(m, Sampling.of("t", dict(grid="ays", steps=10))).ts
    assert torch.equal(ts, make_grid("ays", m.schedule, 10, model="sdxl"))
    assert not torch.equal(ts, make_grid("ays", m.schedule, 10, model="sd"))
    own = make_setup(m, Sampling.of("t", dict(grid="ays", steps=10, grid_options={"model": "sd"}))).ts
    assert torch.equal(own, make_grid("ays", m.schedule, 10, model="sd"))


def test_a_budget_planned_solver_runs_the_part_of_the_grid_img2img_keeps(models):
    """dpm_fast plans its orders from --nfe over the whole grid; img2img and inpainting run the grid's
    last steps with the orders planned there (the whole budget on the shorter grid was refused)."""
    m = models["sd1"]
    image = torch.rand(1, 3, H, W)
    res = img2img(m, PROMPT, image, 0.8, solver="dpm_fast", nfe=9, output="latent")
    assert res.nfe <= 6 and res.steps == 3  # orders 3, 3, 2, 1 over 4 steps; the last 3 run (its jump: 1)
    res = inpaint(m, PROMPT, image, torch.ones(1, 1, H, W), strength=0.8, solver="dpm_fast", nfe=9,
                  output="latent")
    assert res.steps == 3


def test_generation_errors(models):
    m = models["sd1"]
    with pytest.raises(VelodiffError, match="multiples of 2"):
        text2img(m, PROMPT, height=15, steps=1)
    with pytest.raises(VelodiffError, match=r"height must be a number of pixels in \[1, 8192\] .*, got 0"):
        text2img(m, PROMPT, height=0, steps=1)  # not the model's default size
    with pytest.raises(VelodiffError, match="is not UTF-8 text"):
        text2img(m, "a \udcff cube", steps=1)
    with pytest.raises(VelodiffError, match="prompts must be a string or a list"):
        text2img(m, None, steps=1)
    with pytest.raises(VelodiffError, match=r"must be a loaded model, got str: pass velodiff.load\('default"):
        text2img("default", PROMPT, steps=1)
    with pytest.raises(VelodiffError, match="empty"):
        text2img(m, "  ", steps=1)
    with pytest.raises(VelodiffError, match="no prompt"):
        text2img(m, [], steps=1)
    image = torch.rand(1, 3, H, W)
    with pytest.raises(VelodiffError, match=r"strength must be in \[0, 1\]"):
        img2img(m, PROMPT, image, 1.5)
    with pytest.raises(VelodiffError, match=r"strength 0.4 of 2 steps runs no step.*0.5 or more"):
        img2img(m, PROMPT, image, 0.4, steps=2)  # diffusers refuses it too; strength 0 is the VAE round trip
    with pytest.raises(VelodiffError, match=r"0.5 of 1 step runs no step.*strength to 1, or"):
        img2img(m, PROMPT, image, 0.5, steps=1)  # a 1-step student: only strength 1 runs its step
    with pytest.raises(VelodiffError, match="init image is 16x16"):
        img2img(m, PROMPT, image, 0.5, height=32)
    with pytest.raises(VelodiffError, match=r"init image is 16x16 \(width x height\) but 32x16"):
        img2img(m, PROMPT, image, 0.5, width=32)
    with pytest.raises(VelodiffError, match="2 init images for 3 images; give one, or one per image"):
        img2img(m, [PROMPT] * 3, image.expand(2, -1, -1, -1), 0.5)
    from PIL import Image

    with pytest.raises(VelodiffError, match="mode 'CMYK'"):
        img2img(m, PROMPT, Image.new("CMYK", (W, H)), 0.5)
    with pytest.raises(VelodiffError, match="mask is 8x8 but the image is 16x16"):
        inpaint(m, PROMPT, image, torch.ones(1, 1, 8, 8))
    with pytest.raises(VelodiffError, match="mode 'P'"):
        inpaint(m, PROMPT, image, Image.new("P", (W, H)))
    with pytest.raises(VelodiffError, match="the mask covers nothing"):  # the picture came back unchanged
        inpaint(m, PROMPT, image, Image.new("L", (W, H)))
    thin = torch.zeros(1, 1, H, W)
    thin[..., :, 1] = 1.0  # one pixel wide, off the latent grid's sample points: nothing to repaint
    with pytest.raises(VelodiffError, match="thinner than the latent grid"):
        inpaint(m, PROMPT, image, thin)
    with pytest.raises(VelodiffError, match=r"the init image's width must be a number of pixels in"):
        img2img(m, PROMPT, torch.zeros(1, 3, 2, 8200), 0.5)
    with pytest.raises(VelodiffError, match="unknown noise mode 'bogus'"):  # also where it is not read
        img2img(m, PROMPT, image, 0.0, noise="bogus")
    with pytest.raises(VelodiffError, match=r"values in \[0, 1\]"):
        inpaint(m, PROMPT, image, torch.full((1, 1, H, W), float("nan")))
    with pytest.raises(VelodiffError, match=r"array must be \(H, W, 3\)"):
        img2img(m, PROMPT, np.zeros((H, W, 4), np.float32), 0.5)
    z = torch.zeros(1, 4, H // 2, W // 2)  # the tiny models' VAE halves the size
    with pytest.raises(VelodiffError, match=r"image_latents have shape \(1, 4, 8, 8\); expected .* 32x32"):
        img2img(m, PROMPT, None, 0.5, image_latents=z, height=32, width=32)  # was: a 16x16 image
    with pytest.raises(VelodiffError, match=r"image_latents have shape \(1, 3, 8, 8\)"):
        img2img(m, PROMPT, None, 0.5, image_latents=z[:, :3])
    # latents given beside an image are that image's (a 16x16 result came back for a 32x32 image)
    with pytest.raises(VelodiffError, match=r"image_latents have shape \(1, 4, 8, 8\); expected .* 32x32"):
        img2img(m, PROMPT, torch.rand(1, 3, 32, 32), 0.5, image_latents=z)

    with pytest.raises(VelodiffError, match=r"masked_image_latents must be a tensor .*, got list"):
        inpaint(models["sd1-inpaint"], PROMPT, image, torch.ones(1, 1, H, W), masked_image_latents=[1])
    for bad, expect in (
        (dict(guidance_interval=(1,)), r"guidance_interval must be a pair of times .*, got \(1,\)"),
        (dict(seeds=1.5), "seeds must be an integer or a list of integers, got 1.5"),
        (dict(latents=[[1.0]]), r"latents must be a floating-point tensor"),
        (dict(negative=5), "negative must be a string or a list of strings"),
        (dict(callback=5), "callback must be a function"),
        (dict(grid_options={"bogus": 1}), "grid 'karras' has no option 'bogus'; its options: t_start, rho"),
        (dict(grid_options={"rho": "x"}), r"grid 'karras' with options \{'rho': 'x'\}"),
        (dict(grid=5), r"a grid is a name or a list of times \(numbers\), got int"),
        # the Python keywords as the commands and plan settings bound them, and of their kind: a size of
        # 64.9 ran at 64, bool latents ran as 0 / 1 noise, 999 999 steps ran for hours
        (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.bool)),
         r"latents must be a floating-point tensor \(B, C, h, w\), got a bool tensor of shape \(1, 4, 8, 8"),
        (dict(height=16.5), r"height must be a number of pixels in \[1, 8192\] \(an integer\), got 16.5"),
        (dict(width="16"), r"width must be a number of pixels in \[1, 8192\] \(an integer\), got '16'"),
        (dict(steps=1001), r"steps must be in \[1, 1000\], got 1001"),
        (dict(nfe=5000, steps=None), r"nfe must be in \[1, 1000\], got 5000"),
        (dict(seeds=list(range(70_000))), "70000 images in one call; at most 65536"),
    ):
        with pytest.raises(VelodiffError, match=expect):
            text2img(m, PROMPT, **{"steps": 1, "grid": "karras", **bad})
    assert text2img(m, PROMPT, steps=1, seeds=np.int64(3), output="latent").seeds == [3]  # numpy's ints too
    for strength in (None, torch.tensor([0.5, 0.6])):
        with pytest.raises(VelodiffError, match="strength must be a number, got"):
            img2img(m, PROMPT, image, strength, steps=2)


def test_numpy_images_and_masks_as_diffusers_takes_them():
    """(H, W, 3) arrays (floats in [0, 1] or uint8) and (H, W) masks (floats, bool, uint8) read as the
    same tensors the PIL and tensor paths give."""
    from velodiff.pipelines.images import image_tensor, mask_tensor

    rgb = torch.rand(1, 3, 4, 6)
    hwc = rgb[0].permute(1, 2, 0).numpy()
    assert torch.equal(image_tensor(hwc), rgb)
    assert torch.equal(image_tensor(hwc[None]), rgb)
    u8 = (hwc * 255).round().astype(np.uint8)
    assert torch.allclose(image_tensor(u8), rgb, atol=0.5 / 255 + 1e-6)
    holes = np.zeros((4, 6), bool)
    holes[1:3, 2:5] = True
    want = torch.from_numpy(holes).float()[None, None]
    for m in (holes, holes.astype(np.float32), holes.astype(np.uint8) * 255):
        assert torch.equal(mask_tensor(m), want)
    with pytest.raises(VelodiffError, match=r"values in \[0, 1\]"):
        mask_tensor(holes.astype(np.float32) * 3)
    import warnings

    read_only = u8.copy()
    read_only.flags.writeable = False  # np.asarray(pil_image) is: torch warned 'not writable'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(image_tensor(read_only), image_tensor(u8))


def test_long_prompt_truncated_with_warning(models):
    long = " ".join(["red cube"] * 40 + ["green sphere"])
    with pytest.warns(UserWarning, match=r"dropped: '.*green sphere'"):
        cond = models["sd1"].encode_prompt([long])
    assert cond.cond["encoder_hidden_states"].shape[1] == 77


def test_bundled_single_file_configs(tmp_path, monkeypatch):
    """The bundled configs build the published architectures (parameter counts of SD 1.5's UNet and
    SDXL's UNet / OpenCLIP-bigG text tower), and the CLIP vocabulary tokenizes as CLIP does."""
    import json

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from velodiff.models.configs import clip_tokenizer, published_folder

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path))
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for name, millions in (("sd15", 859.5), ("sdxl", 2567.5)):
        folder = published_folder(name)
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - millions) < 1.0
        assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert published_folder("sdxl") == folder  # written once


def test_a_damaged_model_folder_is_one_line(tmp_path):
    """A folder missing its tokenizer (transformers built an empty one: a 10 000-token ValueError at the
    first prompt) or with a config value the class cannot build from (an IndexError deep in diffusers)
    is refused when it loads, naming the component."""
    import json
    import shutil

    from velodiff.default_model import default_model_path

    src = default_model_path()
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(src, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    with pytest.raises(VelodiffError, match="cannot load tokenizer/ .* the folder is missing"):
        load(no_tok)
    bad_vae = tmp_path / "bad-vae"
    shutil.copytree(src, bad_vae)
    cfg = json.loads((bad_vae / "vae" / "config.json").read_text())
    cfg["block_out_channels"] = []
    (bad_vae / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VelodiffError, match="cannot load vae/ from"):
        load(bad_vae)
    # a config that is no JSON object (an AttributeError on 'list'), weights without one of the module's
    # tensors (torch's "Cannot copy out of meta tensor" when the model moved)
    listed = tmp_path / "listed-config"
    shutil.copytree(src, listed)
    (listed / "unet" / "config.json").write_text("[]")
    with pytest.raises(VelodiffError, match=r"unet/config.json is damaged: a config is a JSON object"):
        load(listed)
    short = tmp_path / "short-weights"
    shutil.copytree(src, short)
    from safetensors.torch import load_file, save_file

    weights = next((short / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    del state["conv_in.weight"]
    save_file(state, str(weights))
    with pytest.raises(VelodiffError, match=r"^cannot load unet/ from .*: its weights lack conv_in.weight$"):
        load(short)
    with pytest.raises(VelodiffError, match="prediction_type 'flow' does not fit this model: its schedule"):
        load(src, prediction_type="flow")  # (it ran, making wrong images)
    for name in ("", 5, None):
        with pytest.raises(VelodiffError, match="load takes a shipped model's name"):
            load(name)
    from pathlib import Path

    assert load(Path("default")).path == load("default").path  # a Path of the name names it too



def test_a_registered_family_is_asked_by_priority_and_built_with_the_load_options(tmp_path):
    """README's "Adding a family": ``register_family(name, detect, build, priority=)``; load asks the
    families' detect in priority order and builds with dtype, device, prediction_type and config; the
    family= option forces one; an unregistered name is refused."""
    from pathlib import Path

    from velodiff.default_model import default_model_path
    from velodiff.models import register_family
    from velodiff.models.sd import build_sd

    folder = tmp_path / "mine"
    folder.mkdir()
    for part in Path(default_model_path()).iterdir():
        (folder / part.name).symlink_to(part)
    (folder / "MINE").write_text("a marker only this family detects")
    built = []

    def build(src, **kw):
        built.append(sorted(kw))
        model = build_sd(src, family="sd1", **kw)
        model.family = "mine"
        return model

    register_family("mine", lambda src: (Path(src.path) / "MINE").is_file(), build, priority=100)
    try:
        assert load(folder).family == "mine"
        assert built == [["config", "device", "dtype", "prediction_type"]]
        assert load(folder, family="sd1").family == "sd1"  # forced: the marker is not asked
        assert load(default_model_path()).family == "sd1" and len(built) == 1
    finally:
        FAMILIES.pop("mine")
    with pytest.raises(VelodiffError, match="unknown model family 'mine'"):
        load(folder, family="mine")


def test_inpainting_reads_its_mask_and_makes_its_masked_image_as_diffusers_does(models):
    """A mask value of exactly 0.5 repaints (diffusers binarizes mask >= 0.5); an inpainting UNet's
    masked image is the image with the repainted pixels gray (diffusers: image * (mask < 0.5) in
    [-1, 1]), encoded after the image itself."""
    m = models["sd1-inpaint"]
    h, w = m.default_size
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    half = torch.zeros(1, 1, h, w)
    half[..., : w // 2] = 0.5
    binary = (half >= 0.5).float()
    seen, encode = [], m.encode
    m.encode = lambda x: (seen.append(x.clone()), encode(x))[1]
    try:
        a = inpaint(m, PROMPT, image, half, steps=2, seeds=[0], output="latent")
    finally:
        del m.encode
    assert torch.equal(seen[0], image) and torch.equal(seen[1], image * (1 - binary) + 0.5 * binary)
    b = inpaint(m, PROMPT, image, binary, steps=2, seeds=[0], output="latent")
    assert torch.equal(a.latents, b.latents)


def test_strength_keeps_diffusers_share_of_the_steps(models):
    """diffusers' get_timesteps: int(steps * strength) steps run (truncated, not rounded), from the step
    steps - that; img2img at 10 steps and strength 0.55 runs 5."""
    from velodiff.pipelines.img2img import start_index

    assert [start_index(10, s) for s in (0.0, 0.29, 0.55, 0.99, 1.0)] == [10, 8, 5, 1, 0]
    image = torch.rand(1, 3, *models["sd1"].default_size, generator=torch.Generator().manual_seed(1))
    r = img2img(models["sd1"], PROMPT, image, strength=0.55, steps=10, solver="ddim", output="latent")
    assert r.steps == 5


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
def test_a_diffusers_class_name_runs_as_from_config_of_the_models_scheduler(models, name):
    """``--solver DPMSolverMultistepScheduler`` on a model is diffusers' ``pipe.scheduler =
    DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``: the model's timestep_spacing
    ("leading") and steps_offset come with it, where the class alone spaces by "linspace"."""
    m = models["sd1"]
    assert m.components["scheduler_config"]["timestep_spacing"] == "leading"
    sched = scheduler(m, name)
    z = noise(4)
    ref = m.to_diffusers(sched)(PROMPT, num_inference_steps=5, guidance_scale=7.5, latents=z.clone(),
                                output_type="latent").images
    r = text2img(m, PROMPT, steps=5, solver=type(sched).__name__, guidance=7.5, latents=z, output="latent")
    assert r.grid == "leading"
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_a_truncated_prompt_warns_at_every_call_under_the_callers_filters(models):
    """The truncation warning comes at every call (not only the first, Python's default), yet the caller's
    own filters still decide: under simplefilter('error') it raises (it was forced to 'always')."""
    import warnings

    m, long = models["sd1"], "a red circle " * 40
    for _ in range(2):
        with pytest.warns(UserWarning, match="tokens; the text encoder reads 77"):
            text2img(m, long, steps=1, output="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="tokens; the text encoder reads 77"):
            text2img(m, long, steps=1, output="latent")


def test_a_truncated_negative_prompt_is_named_by_its_text(models):
    """The warning quotes the text it cut: a long negative prompt was reported as "prompt 1"; and it is the
    one message (transformers' own log line said the run 'will result in indexing errors')."""
    import logging

    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    m = models["sd1"]
    try:
        with pytest.warns(UserWarning, match="the text 'a blurry square a blurry square ") as got:
            text2img(m, "a red circle", negative="a blurry square " * 40, steps=1, output="latent")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any("red circle" in str(w.message) for w in got)
    assert not [line for line in logged if "sequence length" in line]


# --- review23: prompt encoding, refiner conditioning, partial-strength inpainting ----------------


def test_sdxl_prompt_encoding_is_diffusers_with_and_without_a_negative_prompt(models):
    """SDXL as StableDiffusionXLPipeline.encode_prompt: a negative prompt given is encoded (both encoders'
    penultimate states and the projected pooled output), even with force_zeros_for_empty_prompt, which
    zeros the unconditional embeddings only when no negative prompt is given; clip_skip counts from the
    penultimate layer (diffusers reads the negative prompt's at the penultimate layer whatever clip_skip
    is, velodiff as ComfyUI and A1111 at the same layer as the prompt's: only the prompt's is compared)."""
    m = models["sdxl"]
    assert m.force_zeros_for_empty_prompt
    pipe = m.to_diffusers()
    for negative, clip_skip in (("blurry ugly painting", 0), (None, 0), ("blurry", 1)):
        m.clip_skip = clip_skip
        try:
            c = m.encode_prompt([PROMPT], None if negative is None else [negative], guided=True)
        finally:
            m.clip_skip = 0
        with torch.no_grad():
            pe, ne, pp, npp = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=True, negative_prompt=negative,
                                                 clip_skip=clip_skip or None)
        pairs = [(c.cond["encoder_hidden_states"], pe), (c.cond["text_embeds"], pp),
                 (c.uncond["text_embeds"], npp)]
        if not clip_skip:
            pairs.append((c.uncond["encoder_hidden_states"], ne))
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert bool(ne.abs().amax() > 0) == (negative is not None)


def test_inpainting_below_full_strength_starts_from_the_noised_image_as_diffusers(models):
    """strength < 1 on a plain UNet: the run starts from the original's latents noised to the first kept
    step (diffusers' add_noise with the same noise the re-noising uses), not from pure noise, and keeps
    diffusers' int(steps x strength) steps."""
    from diffusers import StableDiffusionInpaintPipeline

    m = models["sd1"]
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4))
    mask = _mask(H, W)
    z0, masked = m.encode(image), m.encode(image * (1 - mask) + 0.5 * mask)
    steps, strength = 5, 0.6
    pipe = StableDiffusionInpaintPipeline(**m.to_diffusers(scheduler(m, "ddim")).components)
    ref = pipe(PROMPT, image=z0, mask_image=mask, masked_image_latents=masked, strength=strength,
               num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(7),
               output_type="latent", height=H, width=W).images
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    ts = diffusers_times(m, scheduler(m, "ddim"), steps, "t_min")
    r = inpaint(m, PROMPT, image, mask, strength, grid=ts, solver="ddim", guidance=7.5, latents=eps,
                image_latents=z0, output="latent")
    assert r.steps == int(steps * strength)
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_parity_sdxl_refiner_conditions_on_the_aesthetic_scores(models, tmp_path):
    """An SDXL refiner folder (one projected text encoder, requires_aesthetics_score) loads as sdxl and
    runs img2img as diffusers' StableDiffusionXLImg2ImgPipeline: time_ids carry the aesthetic score 6 for
    the prompt and 2.5 for the negative in place of the target size, and its empty negative prompt is
    encoded (force_zeros_for_empty_prompt false)."""
    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=5 * 8 + 32, cross_attention_dim=48,
    )
    sd_tiny._scale_weights(unet, 1)
    tok = sd_tiny.clip_tokenizer()
    StableDiffusionXLImg2ImgPipeline(
        vae=sd_tiny.vae(force_upcast=True), text_encoder=None, tokenizer=None,
        text_encoder_2=sd_tiny.text_encoder(tok, hidden=48, projection=32, seed=2), tokenizer_2=tok,
        unet=unet.eval(), scheduler=DDIMScheduler(**sd_tiny.SD_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    ).save_pretrained(str(tmp_path / "refiner"))
    m = load(tmp_path / "refiner")
    assert (m.family, m.requires_aesthetics_score, m.force_zeros_for_empty_prompt) == ("sdxl", True, False)
    pipe = m.to_diffusers(scheduler(m, "ddim"))
    z0 = torch.randn(1, 4, H // 2, W * 3 // 4, generator=torch.Generator().manual_seed(3))
    steps, strength = 5, 0.6
    ref = pipe(PROMPT, image=z0, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    ts = diffusers_times(m, scheduler(m, "ddim"), steps, "t_min")
    r = img2img(m, PROMPT, None, strength, image_latents=z0, grid=ts, solver="ddim", guidance=5.0,
                latents=eps,
                output="latent", height=H, width=W * 3 // 2)
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_loaded_with_records_only_what_differs_from_the_files(models, tmp_path):
    """LoadedModel.loaded_with (a model's identity: its calibrations' key) holds a forced family or
    prediction type only where it is not the files' own; a scheduler config without prediction_type is
    diffusers' default, epsilon."""
    import json
    import shutil

    from velodiff.models.loading import inspect_source, loaded_with

    sd2 = inspect_source(models.folder("sd2"))  # v_prediction in its scheduler config
    assert loaded_with(sd2, None, None, None) == {}
    assert loaded_with(sd2, None, "sd2", "v_prediction") == {}
    assert loaded_with(sd2, None, "sd1", "epsilon") == {"family": "sd1", "prediction_type": "epsilon"}
    bare = tmp_path / "bare"
    shutil.copytree(models.folder("sd1"), bare)
    cfg = bare / "scheduler" / "scheduler_config.json"
    kept = {k: v for k, v in json.loads(cfg.read_text()).items() if k != "prediction_type"}
    cfg.write_text(json.dumps(kept))
    assert loaded_with(inspect_source(bare), None, None, "epsilon") == {}
    v = loaded_with(inspect_source(bare), None, None, "v_prediction")
    assert v == {"prediction_type": "v_prediction"}


def test_dtype_names_take_the_short_aliases():
    """load(dtype=...) takes float32 / bfloat16 / float16 and the short names fp32 / bf16 / fp16 of each."""
    from velodiff.models.base import resolve_dtype

    for names, dtype in ((("float32", "fp32"), torch.float32), (("bfloat16", "bf16"), torch.bfloat16),
                         (("float16", "fp16"), torch.float16)):
        assert all(resolve_dtype(n) is dtype for n in names)
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(VelodiffError, match="unknown dtype 'half'"):
        resolve_dtype("half")


def test_clip_skip_is_bounded_by_the_shallowest_text_encoder(models):
    """--clip-skip K reads the K-th layer from the end of every CLIP encoder: refused where an encoder has
    K layers or fewer (SDXL's CLIP-L has 12 beside bigG's 32: K = 12 fails on CLIP-L), taken below."""
    from types import SimpleNamespace

    from velodiff.models.loading import set_clip_skip

    def encoder(layers):
        return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers))

    xl = SimpleNamespace(family="sdxl", uses_clip_skip=True, clip_skip=0,
                         components={"text_encoder": encoder(12), "text_encoder_2": encoder(32)})
    with pytest.raises(VelodiffError, match="--clip-skip 12: the text encoder has 12 layers; skip fewer"):
        set_clip_skip(xl, 12)
    set_clip_skip(xl, 11)
    assert xl.clip_skip == 11
    m = models["sd1"]  # 2 layers
    with pytest.raises(VelodiffError, match="--clip-skip 2: the text encoder has 2 layers"):
        set_clip_skip(m, 2)
    assert m.clip_skip == 0


def test_img2img_from_pixels_is_diffusers_with_the_posterior_mode(models, monkeypatch):
    """The init image goes through the VAE as diffusers' img2img puts it ([0, 1] -> [-1, 1], posterior,
    x scaling_factor): diffusers samples the posterior and velodiff takes its mode, so diffusers' sample is
    made the mode here and the final latents must agree (the parity tests above pass latents to both)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    m = models["sd1"]
    h, w = SIZES[2]
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    steps, strength = 4, 0.5
    pipe = StableDiffusionImg2ImgPipeline(**m.to_diffusers(scheduler(m, "ddim")).components)
    ref = pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    eps = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    ts = diffusers_times(m, scheduler(m, "ddim"), steps, "t_min")
    r = img2img(m, PROMPT, image, strength, grid=ts, solver="ddim", guidance=7.5, latents=eps,
                output="latent")
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_a_users_lora_on_a_folder_with_its_own_keeps_each_adapters_scale(tmp_path):
    """load(folder, lora=X, lora_scale=s) on a folder with its own lora/ (the shipped LCM student): the
    folder's adapter stays at scale 1 and X's change of the fused weights is s times what X changes alone."""
    from peft import LoraConfig

    import velodiff
    from velodiff.models.lora import save_lora

    unet = velodiff.load("default", fuse_lora=False).components["unet"]
    with torch.inference_mode(False):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_lora(unet, tmp_path / "mine")

    def weights(name, **kw):
        return velodiff.load(name, **kw).components["unet"].state_dict()

    base, alone = weights("default"), weights("default", lora=tmp_path / "mine")
    own, both = weights("default-lcm"), weights("default-lcm", lora=tmp_path / "mine", lora_scale=0.5)
    assert max(float((alone[k] - base[k]).abs().max()) for k in base) > 1e-3
    assert max(float((own[k] - base[k]).abs().max()) for k in base) > 1e-3  # the student's own adapter
    for k in base:
        torch.testing.assert_close(both[k] - own[k], 0.5 * (alone[k] - base[k]), rtol=0, atol=1e-5)


def test_one_negative_prompt_in_a_list_serves_every_prompt(models):
    """negative=[n] for several prompts is n for each (as a string is); another count than 1 or one per
    prompt is refused in one line."""
    m = models["sd1"]
    prompts = ["a red cube", "a blue sphere"]
    listed = m.encode_prompt(prompts, ["blurry"], guided=True)
    each = m.encode_prompt(prompts, ["blurry", "blurry"], guided=True)
    torch.testing.assert_close(listed.uncond["encoder_hidden_states"], each.uncond["encoder_hidden_states"])
    torch.testing.assert_close(listed.cond["encoder_hidden_states"], each.cond["encoder_hidden_states"])
    with pytest.raises(VelodiffError, match="3 negative prompts for 2 prompts; give one or one per prompt"):
        m.encode_prompt(prompts, ["blurry"] * 3, guided=True)


def test_the_truncation_warning_names_exactly_the_words_dropped(models):
    """CLIP keeps 75 tokens between its start and end tokens: of 75 one-token words and one more, the last
    word is what is dropped, and named (whatever its tokens)."""
    text = " ".join(["red"] * 75 + ["green"])
    with pytest.warns(UserWarning, match=r"the text encoder reads 77, so these words were dropped: 'green'$"):
        models["sd1"].encode_prompt([text], guided=False)


def test_a_guidance_distilled_unet_gets_the_lcm_embedding_of_its_scale_minus_one():
    """A UNet with time_cond_proj_dim (the shipped guidance-distilled student) takes the embedded scale w as
    diffusers' LatentConsistencyModelPipeline gives it: get_guidance_scale_embedding(w - 1), in the prompt's
    and the negative's conditioning alike."""
    from diffusers import LatentConsistencyModelPipeline

    import velodiff

    m = velodiff.load("default-guided")
    dim = m.unet.config.time_cond_proj_dim
    assert dim and m.embedded_guidance == 2.5
    for w in (2.5, 4.0):
        m.embedded_guidance = w
        c = m.encode_prompt(["a red circle"], guided=True)
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1.0]), dim)
        torch.testing.assert_close(c.cond["timestep_cond"], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(c.uncond["timestep_cond"], want, rtol=0, atol=1e-6)


def test_only_a_force_upcast_vae_is_kept_in_float32_and_only_beside_float16(models):
    """As diffusers: a float16 model keeps its VAE in float16 unless the VAE's config says force_upcast
    (SDXL's), which then runs in float32; bfloat16 does not overflow, so no VAE is upcast beside it."""
    sd1 = load(models.folder("sd1"), dtype="float16").components
    assert sd1["vae"].dtype == sd1["unet"].dtype == torch.float16
    xl = load(models.folder("sdxl"), dtype="bfloat16").components
    assert xl["vae"].dtype == xl["unet"].dtype == torch.bfloat16


def test_family_prediction_type_and_default_grid_read_from_the_folders_configs(models, tmp_path):
    """A UNet of 1024-wide cross-attention is SD2's (OpenCLIP ViT-H) even without linear projections (SD 2.0
    base); a prediction_type given to load wins over the scheduler config's; a zero-terminal-SNR scheduler
    samples on diffusers' trailing spacing, others on Karras times."""
    import json

    from velodiff.models.loading import Source
    from velodiff.models.sd import default_grid_for, detect_sd1, detect_sd2

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    src = Source(tmp_path, "folder", model_index={"_class_name": "StableDiffusionPipeline"})
    assert detect_sd2(src) and not detect_sd1(src)
    assert load(models.folder("sd1"), prediction_type="v_prediction").prediction_type == "v_prediction"
    assert default_grid_for({"rescale_betas_zero_snr": True}) == ("trailing", {})
    assert default_grid_for({"rescale_betas_zero_snr": False}) == ("karras", {})


def test_the_families_defaults_are_the_readmes(models):
    """README, Defaults per model: 25 steps of DPM-Solver++(2M) on Karras times, guidance 7.5 (SDXL 5.0)."""
    for kind, guidance in (("sd1", 7.5), ("sd2", 7.5), ("sdxl", 5.0)):
        m = models[kind]
        assert (m.default_steps, m.default_solver, m.default_grid, m.default_guidance) == (
            25, "dpmpp_2m", "karras", guidance), kind


def test_a_plan_rules_own_prompt_on_an_inpainting_unet_gets_the_mask_channels(models):
    """SLD's concept prompt is one more branch of the same call: on an inpainting UNet (9 input channels) it
    carries the mask and the masked image's latents as the run's prompts do (without them the call fails)."""
    m = models["sd1-inpaint"]
    h, w = m.default_size
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    plain = inpaint(m, PROMPT, image, _mask(h, w), steps=3, seeds=[0], guidance=3.0, output="latent")
    safe = inpaint(m, PROMPT, image, _mask(h, w), steps=3, seeds=[0], guidance=3.0, output="latent",
                   plan="sld:concept=triangle,sld_warmup_steps=0")
    assert torch.isfinite(safe.latents).all() and not torch.equal(safe.latents, plain.latents)


def test_a1111_cpu_noise_is_diffusers_with_a_generator_per_image(models):
    """noise="a1111-cpu": each image's own CPU generator gives its starting noise and then each ancestral
    step's noise, draw after draw: diffusers with a list of CPU generators (one per image) draws the same
    (prepare_latents, then EulerAncestralDiscreteScheduler.step), as A1111 does with "RNG: CPU"."""
    from diffusers import EulerAncestralDiscreteScheduler

    m = models["sd1"]
    sched = EulerAncestralDiscreteScheduler.from_config(m.components["scheduler_config"])
    ref = m.to_diffusers(sched)(
        [PROMPT] * 2,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(s) for s in (42, 7)],
        output_type="latent",
        height=H,
        width=W,
    ).images
    ts = diffusers_times(m, EulerAncestralDiscreteScheduler.from_config(m.components["scheduler_config"]), 4,
                         "zero")
    kw = dict(grid=ts, solver="euler_ancestral", guidance=7.5, output="latent", height=H, width=W)
    r = text2img(m, [PROMPT] * 2, seeds=[42, 7], noise="a1111-cpu", **kw)
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    alone = text2img(m, PROMPT, seeds=[7], noise="a1111-cpu", **kw)  # an image's noise is its own seed's
    torch.testing.assert_close(alone.latents, r.latents[1:], atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_torch_noise_is_diffusers_with_one_generator_for_the_batch_and_its_steps(models):
    """noise="torch": one CPU generator draws the batch's starting noise and then each ancestral step's
    noise for the whole batch, as diffusers does with one CPU generator (prepare_latents, then
    EulerAncestralDiscreteScheduler.step from the same generator)."""
    from diffusers import EulerAncestralDiscreteScheduler

    m = models["sd1"]
    sched = EulerAncestralDiscreteScheduler.from_config(m.components["scheduler_config"])
    ref = m.to_diffusers(sched)(
        [PROMPT] * 2, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(42),
        output_type="latent", height=H, width=W,
    ).images
    ts = diffusers_times(m, EulerAncestralDiscreteScheduler.from_config(m.components["scheduler_config"]), 4,
                         "zero")
    r = text2img(m, [PROMPT] * 2, seeds=[42, 43], noise="torch", grid=ts, solver="euler_ancestral",
                 guidance=7.5, output="latent", height=H, width=W)
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


# --- review29: the generator noise modes against more of diffusers' stochastic schedulers -----------------

#: diffusers schedulers that draw step noise from the pipeline's generator(s), with the pipeline's call
#: keywords: (class name, from_config flags, pipeline keywords)
_R29_STOCHASTIC = {
    "ddpm": ("DDPMScheduler", {}, {}),
    "ddim-eta": ("DDIMScheduler", {}, {"eta": 1.0}),
    "kdpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", {}, {}),
    "lcm": ("LCMScheduler", {}, {}),
}


def _r29_diffusers_and_velodiff(m, name, mode, seeds, steps=4, **velodiff_kw):
    """(diffusers' latents, velodiff's latents) of one stochastic scheduler: diffusers with one CPU
    generator seeded seeds[0] (mode "torch") or a list of CPU generators, one per seed (A1111's modes);
    velodiff with the solver, grid and options ``from_diffusers`` maps the scheduler to."""
    import diffusers

    from velodiff.aliases import from_diffusers

    cls, flags, call = _R29_STOCHASTIC[name]

    def make():
        return getattr(diffusers, cls).from_config(m.components["scheduler_config"], **flags)

    gen = (torch.Generator().manual_seed(seeds[0]) if mode == "torch"
           else [torch.Generator().manual_seed(s) for s in seeds])
    ref = m.to_diffusers(make())([PROMPT] * len(seeds), num_inference_steps=steps, guidance_scale=7.5,
                                 generator=gen, output_type="latent", height=H, width=W, **call).images
    r = from_diffusers(make())
    options = {**dict(r.solver_options), **({"eta": call["eta"]} if "eta" in call else {})}
    out = text2img(m, [PROMPT] * len(seeds), seeds=seeds, noise=mode, steps=steps, solver=r.solver,
                   grid=r.grid, grid_options=dict(r.grid_options) or None, final=r.final,
                   solver_options=options or None, guidance=7.5, output="latent", height=H, width=W,
                   **velodiff_kw)
    return ref, out.latents


@pytest.mark.parametrize("mode", ["torch", "a1111-cpu"])
@pytest.mark.parametrize("name", list(_R29_STOCHASTIC))
def test_generator_noise_is_diffusers_for_each_stochastic_scheduler(models, name, mode):
    """noise="torch" is diffusers with one CPU generator and "a1111-cpu" diffusers with a list of CPU
    generators, for every scheduler that draws step noise from it: DDPM (no draw at t = 0), DDIM with
    eta (a draw on every step), KDPM2 ancestral (one draw per step, in its second-order half) and LCM
    (no draw on its last step): starting noise, then step i's noise as draw i + 1."""
    m = models["sd1"]
    ref, got = _r29_diffusers_and_velodiff(m, name, mode, [42, 7])
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    if mode == "a1111-cpu":  # per image: image 2 alone is image 2 of the batch
        _, alone = _r29_diffusers_and_velodiff(m, name, mode, [7])
        torch.testing.assert_close(alone, got[1:], atol=1e-4 * float(ref.abs().max()), rtol=0)



@pytest.mark.parametrize("flags", [{}, {"use_karras_sigmas": True}], ids=["leading", "karras"])
def test_a1111_sde_noise_is_diffusers_dpmsolver_sde_with_a_tree_per_image(models, flags):
    """noise="a1111-cpu" / "a1111-nv" on DPM++ SDE: per-image Brownian trees over [least positive sigma,
    largest sigma] seeded with the images' seeds, what diffusers' DPMSolverSDEScheduler draws with
    noise_sampler_seed = the list of seeds (k-diffusion's BrownianTreeNoiseSampler, as A1111 seeds it);
    the trees do not depend on the source (CPU or NV), and velodiff's own trees are another image. The
    tolerance is the trees' float32 ends in diffusers (4e-4 of the latents' scale measured)."""
    from diffusers import DPMSolverSDEScheduler

    from velodiff.aliases import from_diffusers

    m = models["sd1"]
    latents = noise(1, batch=2)
    cfg = m.components["scheduler_config"]
    ref = m.to_diffusers(DPMSolverSDEScheduler.from_config(cfg, noise_sampler_seed=[42, 7], **flags))(
        [PROMPT] * 2, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="latent",
        height=H, width=W,
    ).images
    r = from_diffusers(DPMSolverSDEScheduler.from_config(cfg, **flags))
    kw = dict(steps=4, solver=r.solver, grid=r.grid, grid_options=dict(r.grid_options) or None, final=r.final,
              guidance=7.5, output="latent", height=H, width=W)
    got = {mode: text2img(m, [PROMPT] * 2, seeds=[42, 7], noise=mode, latents=latents, **kw).latents
           for mode in ("a1111-cpu", "a1111-nv", "velodiff")}
    scale = float(ref.abs().max())
    torch.testing.assert_close(got["a1111-cpu"], ref, atol=2e-3 * scale, rtol=0)
    assert torch.equal(got["a1111-nv"], got["a1111-cpu"])
    assert float((got["velodiff"] - ref).abs().max()) > 0.1 * scale
    alone = text2img(m, PROMPT, seeds=[7], noise="a1111-cpu", latents=latents[1:], **kw).latents
    torch.testing.assert_close(alone, got["a1111-cpu"][1:], atol=1e-4 * scale, rtol=0)


def test_a1111_brownian_range_in_img2img_is_the_grid_that_runs(models, monkeypatch):
    """img2img with an A1111 mode on an SDE sampler: the per-image trees span the sigmas of the steps that
    run (A1111's sample_img2img builds its noise sampler over sigma_sched, the grid from the denoising
    strength on), not the whole grid of the step count."""
    import velodiff.noise
    from velodiff.pipelines import common

    spans = []

    class Spy(velodiff.noise.SigmaBrownianNoise):
        def __init__(self, like, seeds, ts, schedule):
            super().__init__(like, seeds, ts, schedule)
            spans.append((self.lo, self.hi, ts.clone()))

    monkeypatch.setattr(common, "SigmaBrownianNoise", Spy)
    m = models["sd1"]
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    r = img2img(m, PROMPT, image, strength=0.5, steps=6, solver="dpmpp_sde", seeds=[4], noise="a1111-cpu",
                guidance=3.0, output="latent")
    (lo, hi, ts), = spans
    assert torch.equal(ts, r.ts) and len(r.ts) < 7
    sig = m.schedule.sigma_ve(r.ts.double())
    assert hi == float(sig[0]) and lo == float(sig[sig > 0].min())


def test_torch_noise_feeds_diffusers_sde_solver_and_given_latents_draw_no_start(models):
    """noise="torch" with DPM-Solver++ SDE: diffusers' sde-dpmsolver++ draws each step's Gaussian from the
    pipeline's generator, and velodiff's sde_dpmpp_2m takes the same draws (its Brownian tree is A1111's
    way, not diffusers'); with latents given, diffusers draws no starting noise from the generator, so
    neither does velodiff: step i takes draw i."""
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    from velodiff.aliases import from_diffusers

    m = models["sd1"]
    kw = dict(guidance_scale=7.5, output_type="latent", height=H, width=W)
    make = lambda: DPMSolverMultistepScheduler.from_config(  # noqa: E731
        m.components["scheduler_config"], algorithm_type="sde-dpmsolver++")
    gen = torch.Generator().manual_seed(42)
    ref = m.to_diffusers(make())([PROMPT] * 2, num_inference_steps=4, generator=gen, **kw).images
    r = from_diffusers(make())
    out = text2img(m, [PROMPT] * 2, seeds=[42, 43], noise="torch", steps=4, grid=r.grid, final=r.final,
                   grid_options=dict(r.grid_options) or None, solver=r.solver,
                   solver_options=dict(r.solver_options) or None, guidance=7.5, output="latent", height=H,
                   width=W)
    torch.testing.assert_close(out.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    z = noise(3)
    sched = EulerAncestralDiscreteScheduler.from_config(m.components["scheduler_config"])
    ref = m.to_diffusers(sched)(PROMPT, num_inference_steps=4, latents=z.clone(),
                                generator=torch.Generator().manual_seed(5), **kw).images
    ts = diffusers_times(m, EulerAncestralDiscreteScheduler.from_config(m.components["scheduler_config"]), 4,
                         "zero")
    got = text2img(m, PROMPT, seeds=[5], noise="torch", latents=z, grid=ts, solver="euler_ancestral",
                   guidance=7.5, output="latent", height=H, width=W)
    torch.testing.assert_close(got.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


def test_torch_sde_noise_with_given_latents_and_dpmpp_sde_trees(models):
    """noise="torch" on the SDE solvers with latents given: DPM++ 2M SDE takes step i's Gaussian as draw i of
    the generator (diffusers' sde-dpmsolver++ with latents= and generator=, nothing drawn for the start),
    with a list of seeds only the first seeding it; DPM++ SDE's part-step increments are velodiff's own
    per-image trees (diffusers' DPMSolverSDEScheduler seeds its tree apart from the generator), so it is
    noise="velodiff"'s image."""
    from diffusers import DPMSolverMultistepScheduler

    from velodiff.aliases import from_diffusers

    m = models["sd1"]
    z = noise(2, batch=2)
    cfg = m.components["scheduler_config"]
    ref = m.to_diffusers(DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="sde-dpmsolver++"))(
        [PROMPT] * 2, num_inference_steps=4, latents=z.clone(), generator=torch.Generator().manual_seed(42),
        guidance_scale=7.5, output_type="latent", height=H, width=W,
    ).images
    r = from_diffusers(DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="sde-dpmsolver++"))
    kw = dict(steps=4, grid=r.grid, final=r.final, grid_options=dict(r.grid_options) or None, guidance=7.5,
              output="latent", height=H, width=W, latents=z)
    got = text2img(m, [PROMPT] * 2, seeds=[42, 99], noise="torch", solver=r.solver,
                   solver_options=dict(r.solver_options) or None, **kw).latents
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    sde = {mode: text2img(m, [PROMPT] * 2, seeds=[42, 43], noise=mode, solver="dpmpp_sde", **kw).latents
           for mode in ("torch", "velodiff")}
    torch.testing.assert_close(sde["torch"], sde["velodiff"], atol=1e-5 * float(ref.abs().max()), rtol=0)
