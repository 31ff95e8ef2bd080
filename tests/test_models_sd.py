"""Real-architecture Stable Diffusion models (tiny random weights) loaded through velodiff.models and
run by velodiff's sampling core: loading, errors, and parity with diffusers' own pipelines.

Parity: from the same starting noise and the same time steps, with a solver both implement, the
final latents of velodiff's text2img / img2img / inpaint equal diffusers' (output_type="latent",
latents passed in, guidance on) to float32 round-off."""

from __future__ import annotations

import warnings

import pytest
import torch

import sd_tiny
from velodiff.models import FAMILIES, load
from velodiff.pipelines import text2img

warnings.filterwarnings("ignore", message=".*torchvision.*")
PROMPT = "a photo of a red cube"
H = W = 16  # the tiny VAE's factor is 2: latents 4 x 8 x 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {
        "sd1": sd_tiny.save_sd(root / "sd1", "sd1"),
        "sd2": sd_tiny.save_sd(root / "sd2", "sd2", prediction_type="v_prediction"),
        "sdxl": sd_tiny.save_sd(root / "sdxl", "sdxl"),
        "sd1-inpaint": sd_tiny.save_sd(root / "sd1-inpaint", "sd1", inpainting=True),
    }


@pytest.fixture(scope="module")
def models(folders):
    return {k: load(p) for k, p in folders.items()}


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


def noise(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


# --- loading and detection ---------------------------------------------------------------------


def test_families_detected(models):
    assert {"sd1", "sd2", "sdxl"} <= set(FAMILIES)
    assert models["sd1"].family == "sd1" and models["sd1"].prediction_type == "epsilon"
    assert models["sd2"].family == "sd2" and models["sd2"].prediction_type == "v_prediction"
    assert models["sdxl"].family == "sdxl"
    assert models["sd1-inpaint"].is_inpainting and not models["sd1"].is_inpainting
    m = models["sd1"]
    assert m.latent_channels == 4 and m.vae_scale_factor == 2 and m.default_size == (16, 16)


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


# --- parity with diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp_2m"])
def test_parity_sd1_text2img(models, solver):
    m = models["sd1"]
    steps, z = 6, noise(0)
    ref = m.to_diffusers(scheduler(m, solver))(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=z.clone(),
        output_type="latent",
        height=H,
        width=W,
    ).images
    ts = diffusers_times(m, scheduler(m, solver), steps, FINAL[solver])
    r = text2img(m, PROMPT, grid=ts, solver=solver, guidance=7.5, latents=z, output="latent")
    assert r.nfe == steps
    torch.testing.assert_close(r.latents, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
