"""Transformer families (SD3, Flux, PixArt-alpha/sigma) with tiny random weights, loaded through
velodiff.models and run by velodiff's sampling core: detection, defaults, errors, and parity with
diffusers' own pipelines.

Parity: from the same starting noise and the same time steps, with a solver both implement (flow
Euler for SD3 and Flux; DPM-Solver++(2M) and DDIM for PixArt), the final latents of velodiff's
text2img equal diffusers' (output_type="latent", latents passed in) to float32 round-off, at a
square size and at both non-square ones (SD3's patch positions, Flux's packing and position ids,
PixArt-alpha's resolution and aspect-ratio conditioning read height and width apart)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from velodiff.errors import VelodiffError
from velodiff.grids import make_grid
from velodiff.models import FAMILIES, load
from velodiff.models.flux import pack, unpack
from velodiff.models.tiny import save_tiny
from velodiff.pipelines import img2img, text2img
from velodiff.schedules import DiscreteVP, RectifiedFlow

warnings.filterwarnings("ignore", message=".*torchvision.*")
PROMPT = "a photo of a red cat"
H = W = 64  # the tiny VAE's factor is 4: latents 16 x 16
#: (height, width): square, landscape and portrait
SIZES = [(H, W), (H, W * 3 // 2), (H * 3 // 2, W)]
KINDS = ("sd3", "sd3-no-t5", "flux", "flux-schnell", "pixart-sigma", "pixart-alpha")
SEQ = 32  # T5 tokens in these tests (diffusers' max_sequence_length), to keep them fast
DEFAULT_SEQ: dict[str, int] = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {k: save_tiny(k, root / k) for k in KINDS}


@pytest.fixture(scope="module")
def models(folders):
    out = {k: load(p) for k, p in folders.items()}
    out["sd3-drop-t5"] = load(folders["sd3"], family="sd3-no-t5")
    for k, m in out.items():
        DEFAULT_SEQ[k], m.max_sequence_length = m.max_sequence_length, SEQ
    return out


def noise(model, seed: int = 0, batch: int = 1, height: int = H, width: int = W) -> torch.Tensor:
    shape = model.latent_shape(batch, height, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(actual, ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=0)


# --- loading, detection, defaults ---------------------------------------------------------------


def test_families_detected_with_their_defaults(models):
    assert {"sd3", "sd3-no-t5", "flux", "pixart"} <= set(FAMILIES)
    sd3, flux, schnell = models["sd3"], models["flux"], models["flux-schnell"]
    assert sd3.family == "sd3" and sd3.prediction_type == "flow" and isinstance(sd3.schedule, RectifiedFlow)
    assert (sd3.latent_channels, sd3.vae_scale_factor, sd3.default_size) == (16, 4, (64, 64))
    assert (sd3.default_steps, sd3.default_guidance, sd3.default_solver) == (28, 7.0, "euler")
    assert sd3.components["text_encoder_3"] is not None
    assert models["sd3-no-t5"].components["text_encoder_3"] is None  # a folder without T5
    assert models["sd3-drop-t5"].components["text_encoder_3"] is None  # T5 left out at load
    assert flux.family == "flux" and flux.latent_channels == 16 and flux.default_guidance == 1.0
    assert (flux.embedded_guidance, flux.default_steps) == (3.5, 28)
    assert (schnell.embedded_guidance, schnell.default_steps) == (None, 4)
    pix, alpha = models["pixart-sigma"], models["pixart-alpha"]
    assert (
        pix.family == "pixart" and pix.prediction_type == "epsilon" and isinstance(pix.schedule, DiscreteVP)
    )
    assert (pix.latent_channels, alpha.pipeline_class) == (4, "PixArtAlphaPipeline")
    assert DEFAULT_SEQ == {
        "sd3": 256,
        "sd3-no-t5": 256,
        "sd3-drop-t5": 256,
        "flux": 512,
        "flux-schnell": 512,
        "pixart-sigma": 300,
        "pixart-alpha": 120,
    }
    assert (pix.default_steps, pix.default_guidance, pix.default_solver) == (20, 4.5, "dpmpp_2m")


def stop_after_first_step(pipe, i, t, kwargs):
    pipe._interrupt = True  # diffusers skips the remaining steps; the scheduler keeps its sigmas
    return kwargs


def test_grids_are_diffusers(models):
    """SD3's default grid is FlowMatchEulerDiscreteScheduler's (shift 3, twice-shifted sigma_min);
    Flux's ("flux") at the image's resolution-dependent shift is FluxPipeline's."""
    for kind, steps in (("sd3", 28), ("flux", 28), ("flux", 3)):
        m = models[kind]
        pipe = m.to_diffusers()
        pipe.set_progress_bar_config(disable=True)
        pipe(
            PROMPT,
            num_inference_steps=steps,
            height=H,
            width=W,
            output_type="latent",
            max_sequence_length=SEQ,
            guidance_scale=1.0,
            callback_on_step_end=stop_after_first_step,
        )
        ts = make_grid(m.default_grid, m.schedule, steps, **m.grid_options(H, W))
        torch.testing.assert_close(ts, pipe.scheduler.sigmas.double(), atol=1e-6, rtol=0)
    assert models["flux"].default_grid == "flux"
    big = models["flux"].grid_options(1024, 1024)["shift"]
    assert big > models["flux"].grid_options(256, 256)["shift"] > 1.0  # the shift grows with resolution
    # a named grid that takes a shift keeps the size's (it sampled an unshifted grid); others get none
    from velodiff.pipelines.setup import Sampling, make_setup

    m = models["flux"]
    for size in ((H, W), m.default_size):  # at the default size too (the shift was dropped there alone)
        sized = m.grid_options(*size)

        def ts_of(size=size, **sampling):
            return make_setup(m, Sampling.of("t", {"steps": 4, **sampling}), size=size).ts

        torch.testing.assert_close(ts_of(grid="flux"), ts_of())
        shifted = make_grid("flow-shifted", m.schedule, 4, **sized)
        torch.testing.assert_close(ts_of(grid="flow-shifted"), shifted)
        assert not torch.allclose(ts_of(grid="flow-shifted"), make_grid("flow-shifted", m.schedule, 4))
        torch.testing.assert_close(ts_of(grid="karras"), make_grid("karras", m.schedule, 4))
        # ComfyUI's schedulers over a flow's levels take it too (its ModelSamplingFlux shift)
        for name in ("simple", "sgm_uniform", "normal", "beta", "ddim_uniform"):
            torch.testing.assert_close(ts_of(grid=name), make_grid(name, m.schedule, 4, **sized))
            assert not torch.allclose(ts_of(grid=name), make_grid(name, m.schedule, 4))
    sized = m.grid_options(H, W)
    # img2img's start: the flux grid starts at t_start itself, not at its shift
    start = make_grid("flux", m.schedule, 4, t_start=0.6, **sized)
    assert float(start[0]) == 0.6 and bool((start[:-1].diff() < 0).all())


def test_sizes_are_checked(models):
    with pytest.raises(VelodiffError, match="multiples of 8 for flux"):
        models["flux"].latent_shape(1, 68, 64)
    with pytest.raises(VelodiffError, match="multiples of 8 for sd3"):
        models["sd3"].latent_shape(1, 64, 36)
    assert models["pixart-sigma"].latent_shape(2, 40, 64) == (2, 4, 10, 16)
    assert models["flux"].size_factor == 2 * models["flux"].vae_scale_factor  # its 2x2 patches


def test_the_server_refuses_a_size_the_patches_do_not_divide_before_queueing(folders):
    """Flux packs 2x2 latent pixels per token: a width the VAE's factor divides but the patch does not is
    refused when the job is checked, not in the worker after it was accepted."""
    from velodiff.serve.engine import Engine, Request

    engine = Engine(str(folders["flux"]), device="cpu")
    f = engine.model(None)[0].vae_scale_factor
    with pytest.raises(VelodiffError, match=f"not a positive multiple of {2 * f}"):
        engine.check(Request(prompt="a red circle", width=3 * f, height=2 * f, steps=2))
    engine.check(Request(prompt="a red circle", width=4 * f, height=2 * f, steps=2))


# --- parity with diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("kind", "guidance"), [("sd3", 5.0), ("sd3-no-t5", 4.0), ("sd3-drop-t5", 1.0)])
def test_parity_sd3_flow_euler(models, kind, guidance, size):
    m = models[kind]
    pipe = m.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    H, W = size  # noqa: N806 - the module's names, for this size
    z = noise(m, height=H, width=W)
    ref = pipe(
        PROMPT,
        negative_prompt="blurry",
        num_inference_steps=5,
        guidance_scale=guidance,
        latents=z.clone(),
        height=H,
        width=W,
        output_type="latent",
        max_sequence_length=SEQ,
    ).images
    sigmas = pipe.scheduler.sigmas.double().tolist()
    r = text2img(
        m,
        PROMPT,
        negative="blurry",
        grid=sigmas,
        solver="euler",
        guidance=guidance,
        latents=z,
        output="latent",
        height=H,
        width=W,
    )
    assert (r.nfe, r.evals) == (5, 10 if guidance != 1.0 else 5)
    close(r.latents, ref)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    ("kind", "true_cfg", "embedded"), [("flux", 1.0, 3.5), ("flux", 3.0, 2.0), ("flux-schnell", 1.0, None)]
)
def test_parity_flux(models, kind, true_cfg, embedded, size):
    """Flux: packed latents, image ids, embedded guidance (dev), optional true CFG with a negative prompt."""
    m = models[kind]
    pipe = m.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    H, W = size  # noqa: N806
    z = noise(m, seed=1, height=H, width=W)
    extra = {"negative_prompt": "blurry", "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    ref = pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=embedded or 0.0,
        latents=pack(z),
        height=H,
        width=W,
        output_type="latent",
        max_sequence_length=SEQ,
        **extra,
    ).images
    ref = unpack(ref, H // 4, W // 4)
    m.embedded_guidance = embedded
    try:
        r = text2img(
            m,
            PROMPT,
            negative="blurry" if true_cfg > 1 else None,
            grid=pipe.scheduler.sigmas.tolist(),
            solver="euler",
            guidance=true_cfg,
            latents=z,
            output="latent",
            height=H,
            width=W,
        )
    finally:
        m.embedded_guidance = 3.5 if kind == "flux" else None
    close(r.latents, ref)


def test_flux_torch_noise_matches_diffusers_cpu_generator(models):
    """noise="torch" draws what FluxPipeline draws (before packing) from a CPU generator."""
    m = models["flux-schnell"]
    pipe = m.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        [PROMPT] * 2,
        num_inference_steps=2,
        height=H,
        width=W,
        output_type="latent",
        max_sequence_length=SEQ,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images
    r = text2img(
        m,
        [PROMPT] * 2,
        steps=2,
        grid=pipe.scheduler.sigmas.tolist(),
        seeds=[7, 8],
        noise="torch",
        output="latent",
        height=H,
        width=W,
    )
    close(r.latents, unpack(ref, H // 4, W // 4))


def pixart_scheduler(model, solver: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = model.components["scheduler_config"]
    if (
        solver == "ddim"
    ):  # diffusers' DDIM steps by num_train_timesteps // steps: consistent with 'leading' only
        return DDIMScheduler.from_config(
            cfg, clip_sample=False, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True
        )
    return DPMSolverMultistepScheduler.from_config(cfg)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    ("kind", "solver"), [("pixart-sigma", "dpmpp_2m"), ("pixart-sigma", "ddim"), ("pixart-alpha", "dpmpp_2m")]
)
def test_parity_pixart(models, kind, solver, size):
    """PixArt: T5 with attention mask, learned-variance channels dropped, alpha's resolution conditioning."""
    m = models[kind]
    pipe = m.to_diffusers(pixart_scheduler(m, solver))
    pipe.set_progress_bar_config(disable=True)
    H, W = size  # noqa: N806
    z = noise(m, seed=2, height=H, width=W)
    ref = pipe(
        "A Photo of a RED cat ",
        num_inference_steps=6,
        guidance_scale=4.5,
        latents=z.clone(),
        height=H,
        width=W,
        output_type="latent",
        max_sequence_length=SEQ,
        use_resolution_binning=False,
    ).images
    ts = m.schedule.t_from_timestep(pipe.scheduler.timesteps.double()).tolist() + [0.0]
    r = text2img(
        m,
        "A Photo of a RED cat ",
        grid=ts,
        solver=solver,
        guidance=4.5,
        latents=z,
        output="latent",
        height=H,
        width=W,
    )
    close(r.latents, ref)


def test_pixart_defaults_are_its_pipelines(models):
    """Nothing given (solver, grid, steps, guidance): the PixArt pipeline's own defaults, its
    DPMSolverMultistepScheduler's linspace timesteps included (20 steps: 999 ... 50, then 0)."""
    m = models["pixart-sigma"]
    pipe = m.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    z = noise(m, seed=1)
    ref = pipe(PROMPT, latents=z.clone(), output_type="latent", height=H, width=W, max_sequence_length=SEQ,
               use_resolution_binning=False).images
    r = text2img(m, PROMPT, latents=z, output="latent", height=H, width=W)
    assert m.schedule.timestep(r.ts[:-1]).round().tolist() == pipe.scheduler.timesteps.tolist()
    close(r.latents, ref)


def test_pixart_alpha_conditions_on_size(models):
    """The 1024-px alpha model's output depends on the (height, width) it is told; sigma's does not."""
    for kind, depends in (("pixart-alpha", True), ("pixart-sigma", False)):
        m = models[kind]
        a = m.encode_prompt([PROMPT], guided=False, height=64, width=64)
        b = m.encode_prompt([PROMPT], guided=False, height=128, width=64)
        x = noise(m)
        same = torch.equal(m.denoiser(x, 0.5, a), m.denoiser(x, 0.5, b))
        assert same != depends


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_images_match_diffusers(models, kind):
    """Decoding (scaling and shift factor of the SD3 / Flux VAE) as diffusers decodes."""
    m = models[kind]
    pipe = m.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    z = noise(m, seed=3)
    ref = pipe(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=1.0 if kind == "sd3" else 3.5,
        height=H,
        width=W,
        latents=z if kind == "sd3" else pack(z),
        output_type="pt",
        max_sequence_length=SEQ,
    ).images
    r = text2img(
        m,
        PROMPT,
        grid=pipe.scheduler.sigmas.tolist(),
        guidance=1.0,
        latents=z,
        output="tensor",
        height=H,
        width=W,
    )
    assert r.images.shape == (1, 3, H, W)
    torch.testing.assert_close(r.images, ref, atol=1e-5, rtol=0)


# --- generation through the pipelines -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "flux-schnell", "pixart-sigma"])
def test_text2img_defaults_make_images(models, kind):
    m = models[kind]
    seeds = [1, 2] if kind == "sd3" else [1]
    r = text2img(m, PROMPT, steps=2, seeds=seeds, height=H, width=W)
    assert len(r.images) == len(seeds) and r.images[0].size == (W, H) and r.images[0].mode == "RGB"
    assert (r.nfe, r.evals) == (2, 4 if m.default_guidance != 1.0 else 2)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_img2img_runs_from_noised_image(models, kind):
    m = models[kind]
    img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    r = img2img(m, PROMPT, img, strength=0.5, steps=4, output="tensor")
    assert r.steps == 2 and r.images.shape == (1, 3, H, W)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_img2img_keeps_the_fraction_of_the_steps_as_diffusers_sd3_and_flux_pipelines(models, kind):
    """SD3's and Flux's img2img pipelines start at int(steps - steps x strength) (one step more than
    SD's int(steps x strength) when that is not whole): the same steps, times and latents here, on the
    default grid, for strengths that round either way."""
    import diffusers

    from velodiff.models.flux import unpack

    m = models[kind]
    cls = diffusers.StableDiffusion3Img2ImgPipeline if kind == "sd3" else diffusers.FluxImg2ImgPipeline
    pipe = cls(**m.to_diffusers().components)
    pipe.set_progress_bar_config(disable=True)
    shape = m.latent_shape(1, H, W)
    z0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for steps, strength in ((4, 0.3), (7, 0.6), (5, 0.4), (3, 1.0)):  # 1: every step, from the top
        times: list[float] = []

        def record(p, i, t, kwargs, times=times):
            times.append(float(t))
            return kwargs

        ref = pipe(PROMPT, image=z0, strength=strength, num_inference_steps=steps, height=H, width=W,
                   max_sequence_length=SEQ, generator=torch.Generator().manual_seed(7), output_type="latent",
                   guidance_scale=2.0 if kind == "sd3" else 3.5,
                   callback_on_step_end=record).images
        ref = unpack(ref, shape[-2], shape[-1]) if kind == "flux" else ref
        eps = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        r = img2img(m, PROMPT, None, strength, image_latents=z0, steps=steps, latents=eps, output="latent",
                    guidance=2.0 if kind == "sd3" else 1.0, height=H, width=W)
        assert r.steps == len(times) == steps - int(steps - steps * strength)
        assert float(r.ts[0]) == pytest.approx(times[0] / 1000, abs=1e-6)
        close(r.latents, ref)


def test_bench_pipeline_records(folders, tmp_path):
    """`velodiff bench pipeline`'s measurement on one model: both records, equal outputs."""
    from velodiff.eval.pipeline_bench import bench_model, pipeline_table

    recs = bench_model("sd3-no-t5", folders["sd3-no-t5"], nfe=2, runs=1, device="cpu", dtype="float32")
    assert [r["impl"] for r in recs] == ["velodiff", "diffusers"]
    for r in recs:
        assert {"model", "impl", "nfe", "seconds_median", "peak_mb", "max_abs_diff"} <= set(r)
        assert r["nfe"] == 2 and r["seconds_median"] > 0 and r["peak_mb"] > 0
    assert recs[0]["max_abs_diff"] <= recs[0]["tolerance"]
    assert "| sd3-no-t5 (sd3) | cpu / float32 | 2 |" in pipeline_table(recs)


def test_bench_pipeline_takes_a_model_folder_and_shipped_names(folders, tmp_path, capsys):
    """--model is any model a command takes: a folder (here PixArt, compared at its own size with diffusers'
    resolution binning off), a shipped model by name; anything else is one line naming the shipped ones."""
    from velodiff.cli import main
    from velodiff.eval.pipeline_bench import model_folders
    from velodiff.shipped import shipped_path

    out = tmp_path / "bp.json"
    with pytest.raises(SystemExit) as e:
        main(["bench", "pipeline", "--model", str(folders["pixart-sigma"]), "--nfe", "2", "--runs", "1",
              "--json", str(out), "--no-progress", "--cache", str(tmp_path / "tiny")])
    assert not e.value.code
    recs = json.loads(out.read_text())
    assert {r["model"] for r in recs} == {str(folders["pixart-sigma"])} and recs[0]["family"] == "pixart"
    assert recs[0]["max_abs_diff"] <= recs[0]["tolerance"]
    assert model_folders(["default-4step"], tmp_path) == {"default-4step": shipped_path("default-4step")}
    bad = ["bench", "pipeline", "--model", "default,no-such-model", "--json", str(tmp_path / "x.json")]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'no-such-model' does not exist") and "default-4step" in err
    assert not (tmp_path / "x.json").exists()


def test_flow_scheduler_keys_velodiff_does_not_build_are_refused():
    """A FlowMatchEulerDiscreteScheduler config with a linear time shift, a shift_terminal or karras /
    exponential / beta sigmas asks for another grid than velodiff builds: refused in one line (it sampled
    the default grid, up to 0.6 away in sigma)."""
    from velodiff.models.dit import flow_schedule

    base = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    assert flow_schedule({**base, "time_shift_type": "exponential", "use_karras_sigmas": False}).shift == 3.0
    for key, value in (("time_shift_type", "linear"), ("shift_terminal", 0.1), ("use_karras_sigmas", True),
                       ("use_beta_sigmas", True), ("invert_sigmas", True)):
        with pytest.raises(VelodiffError, match=f"scheduler config {key}="):
            flow_schedule({**base, key: value})


def test_clip_skip_is_refused_where_the_prompt_encoder_does_not_take_it(folders):
    """PixArt (T5 alone) and Flux read no CLIP layer count: --clip-skip is one line there (it was
    accepted and ignored); SD3's CLIP encoders take it."""
    from velodiff.commands.image_run import ImageRun

    for kind in ("pixart-sigma", "flux"):
        run = ImageRun(model=str(folders[kind]), device="cpu", dtype="float32", clip_skip=1)
        run.check()
        with pytest.raises(VelodiffError, match="--clip-skip: this .* model's prompt encoder does not take"):
            run.load()
    run = ImageRun(model=str(folders["sd3"]), device="cpu", dtype="float32", clip_skip=1)
    run.check()
    assert run.load().clip_skip == 1


def test_quantization_error_is_measured_at_a_flows_noise_scale(models):
    """One evaluation's quantization error is taken at x_t of the prior's scale at t (a flow's x at
    t = 0.5 has std sqrt(0.5^2 + 0.5^2) for unit data, not 1)."""
    pytest.importorskip("torchao")
    from velodiff.accel.quantize import Int8, evaluation_error
    from velodiff.noise import randn

    m = models["sd3"]
    seen, den = [], m.denoiser
    m.denoiser = lambda x, t, cond: (seen.append(x.clone()), den(x, t, cond))[1]
    try:
        err = evaluation_error(m, Int8(), t=0.5, seed=3)
    finally:
        m.denoiser = den
    assert 0 < err < 0.1
    z = randn(m.latent_shape(1, *m.default_size), 3)
    torch.testing.assert_close(seen[0], z * 0.5**0.5)


def test_the_flow_match_class_named_for_a_flow_model_runs_its_pipelines_grid(models):
    """``FlowMatchEulerDiscreteScheduler`` on a model whose own scheduler it is runs as that model's
    diffusers pipeline does with it: SD3's lets the scheduler space the steps (flow-shifted), FluxPipeline
    passes its own sigmas at the image's shift (flux); the times equal the default run's."""
    from velodiff.pipelines.setup import Sampling, make_setup

    for kind, grid in (("sd3", "flow-shifted"), ("flux", "flux")):
        m = models[kind]
        named = make_setup(m, Sampling.of("t", {"steps": 4, "solver": "FlowMatchEulerDiscreteScheduler"}),
                           size=(H, W))
        own = make_setup(m, Sampling.of("t", {"steps": 4, "solver": "euler"}), size=(H, W))
        assert named.grid == grid == m.default_grid and named.solver.name == "euler"
        torch.testing.assert_close(named.ts, own.ts, atol=0, rtol=0)


def test_a_prompt_past_t5s_length_warns_with_its_text_and_what_was_dropped(models):
    """SEQ T5 tokens are read; the rest is named, and so is the text it was cut from."""
    long = "a red circle " * 10 + "and a green triangle"
    with pytest.warns(UserWarning, match=rf"the text 'a red circle .*T5 tokens; the model reads {SEQ} ") as w:
        text2img(models["pixart-sigma"], long, steps=1, output="latent")
    assert any("green triangle" in str(m.message) for m in w)


# --- review23: img2img from pixels, default grids at non-square sizes, strength 1 ----------------


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_img2img_from_pixels_is_diffusers_with_the_posterior_mode(models, kind, monkeypatch):
    """The image goes through the VAE as diffusers' SD3 / Flux img2img pipelines put it, (mode - shift_factor)
    x scaling_factor, at a non-square size: diffusers samples the posterior, velodiff takes its mode, so
    diffusers' sample is made the mode here and the final latents must agree."""
    import diffusers
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    m = models[kind]
    cls = diffusers.StableDiffusion3Img2ImgPipeline if kind == "sd3" else diffusers.FluxImg2ImgPipeline
    pipe = cls(**m.to_diffusers().components)
    pipe.set_progress_bar_config(disable=True)
    h, w = SIZES[1]
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(5))
    shape = m.latent_shape(1, h, w)
    steps, strength = 4, 0.5
    ref = pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, height=h, width=w,
               max_sequence_length=SEQ, generator=torch.Generator().manual_seed(7), output_type="latent",
               guidance_scale=1.0 if kind == "sd3" else 3.5).images
    ref = unpack(ref, shape[-2], shape[-1]) if kind == "flux" else ref
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(7))  # both draw it before packing
    r = img2img(m, PROMPT, image, strength, steps=steps, latents=eps, guidance=1.0, output="latent")
    close(r.latents, ref)


@pytest.mark.parametrize("size", SIZES[1:])
def test_flux_default_grid_at_a_non_square_size_is_fluxpipelines(models, size):
    """FluxPipeline's shift grows with the image's token count, (h / 16) x (w / 16): at 64x96 and 96x64 the
    default grid is its sigmas (a height read for the width shifts by the wrong count)."""
    from velodiff.pipelines.setup import Sampling, make_setup

    m = models["flux"]
    h, w = size
    pipe = m.to_diffusers()
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPT, num_inference_steps=4, height=h, width=w, output_type="latent", max_sequence_length=SEQ,
         guidance_scale=1.0, callback_on_step_end=stop_after_first_step)
    ts = make_setup(m, Sampling.of("t", {"steps": 4}), size=(h, w)).ts
    torch.testing.assert_close(ts, pipe.scheduler.sigmas.double(), atol=1e-6, rtol=0)


def test_bench_pipeline_ratio_is_velodiffs_time_over_diffusers_and_the_bar_needs_equal_outputs(folders,
                                                                                              monkeypatch):
    """ratio_median is the median over pairs of velodiff's seconds / diffusers' (velodiff twice as slow: 2);
    the table's bar fails a model whose outputs differ beyond the tolerance, however fast it is."""
    import velodiff.eval.pipeline_bench as pb

    real = pb.timed

    def timed(fn, device):
        _, _, mb, out = real(fn, device)
        slow = fn.__name__ == "run_velodiff"
        return (2.0 if slow else 1.0), (6.0 if slow else 2.0), mb, out

    monkeypatch.setattr(pb, "timed", timed)
    recs = pb.bench_model("sd3-no-t5", folders["sd3-no-t5"], nfe=2, runs=1, device="cpu", dtype="float32")
    assert recs[0]["ratio_median"] == pytest.approx(2.0) and recs[0]["cpu_ratio_median"] == pytest.approx(3.0)
    assert "FAIL" in pb.pipeline_table(recs)  # too slow
    fast = [{**r, "ratio_median": 0.9} for r in recs]
    row = [ln for ln in pb.pipeline_table(fast).splitlines() if ln.startswith("| sd3-no-t5")]
    assert len(row) == 1 and row[0].endswith("| pass |")
    assert "Peak MB on the CPU is the whole process's resident set" in pb.pipeline_table(fast)
    off = [{**r, "ratio_median": 0.9, "max_abs_diff": 10 * r["tolerance"]} for r in recs]
    assert "| FAIL |" in pb.pipeline_table(off) and "| pass |" not in pb.pipeline_table(off)


def test_review32_the_pipeline_tables_cpu_memory_note_only_for_a_cpu_run():
    """review32: the note that the CPU's peak MB is the process's resident set is for CPU rows; a table of
    GPU runs (each call's peak allocated memory) does not carry it."""
    import velodiff.eval.pipeline_bench as pb

    def pair(device):
        rec = {"model": "sd3-no-t5", "family": "sd3", "device": device, "dtype": "float16", "nfe": 2,
               "seconds_median": 1.0, "ratio_median": 0.9, "cpu_ratio_median": 1.0, "peak_mb": 100.0,
               "max_abs_diff": 0.0, "tolerance": 1e-3}
        return [{**rec, "impl": "velodiff"}, {**rec, "impl": "diffusers"}]

    note = "Peak MB on the CPU is the whole process's resident set"
    assert note not in pb.pipeline_table(pair("cuda:0"))
    assert note in pb.pipeline_table(pair("cpu"))


def test_review36_bench_pipeline_checks_every_name_before_building_a_model(tmp_path, capsys):
    """review36: --model sd15,no-such-model is one line before the tiny sd15 is built into --cache; an
    empty list is one line; a .safetensors file is a model as a folder is (not skipped)."""
    from velodiff.cli import main
    from velodiff.eval.pipeline_bench import model_folders

    cache = tmp_path / "tiny"
    for models, needle in (("sd15,no-such-model", "model 'no-such-model' does not exist"),
                           (",", "--models needs at least one name")):
        code = main(["bench", "pipeline", "--model", models, "--json", str(tmp_path / "x.json"), "--cache",
                     str(cache), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and needle in err and "\n" not in err, (models, err)
    assert not cache.exists() and not (tmp_path / "x.json").exists()
    single = tmp_path / "m.safetensors"
    single.write_bytes(b"")
    assert model_folders([str(single)], cache) == {str(single): single}
