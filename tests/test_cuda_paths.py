"""Paths a static device audit found mixing CPU and CUDA tensors, run on a CUDA model (skipped without
one; tests/test_devices.py checks what the meta device can stand in for on a CPU machine)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"


@pytest.fixture(scope="module")
def model():
    import velodiff

    return velodiff.load("default", device=DEVICE, dtype=torch.float32)


def test_the_diffusion_classifier_reads_a_cuda_models_latents(model) -> None:
    from velodiff.edit.classify import classify
    from velodiff.pipelines.text2img import text2img

    img = text2img(model, "a red circle", seeds=[0], steps=8, output="tensor").images
    result = classify(model, img, ["a red circle", "a blue square"], rounds=((4, 1),))
    assert result.evaluations == 8 and all(e == e for e in result.errors)  # finite, every pair scored


def test_reward_steering_of_a_batch_with_and_without_a_target(model) -> None:
    from velodiff.pipelines.text2img import text2img

    res = text2img(model, ["two red circles", "a photo of a cat"], seeds=[0, 1], steps=4,
                   plan="reward:target=count,scale=0.2", output="latent")
    assert bool(torch.isfinite(res.latents).all())


def test_dpm_solver_v3_statistics_of_a_cuda_denoiser(model) -> None:
    from velodiff.calibrated.ems import measure_statistics
    from velodiff.calibrated.problem import denoiser_problem

    prompts = ["a red circle", "a blue square"]
    shape = (2, *model.latent_shape(1, *model.default_size)[1:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(prompts, guided=False)
    problem = denoiser_problem(model.denoiser, x.to(DEVICE), cond)
    ems = measure_statistics(problem, points=4)
    assert all(bool(torch.isfinite(v).all()) for v in ems.raw.values() if isinstance(v, torch.Tensor))


def test_edict_regenerates_from_a_callers_cpu_latents(model) -> None:
    from velodiff.pipelines.invert import invert
    from velodiff.pipelines.text2img import text2img

    img = text2img(model, "a red circle", seeds=[0], steps=4, output="tensor").images
    inv = invert(model, img, "a red circle", "edict", steps=4)
    out = inv.regenerate("a blue circle", latents=inv.result.latents.cpu(), output="tensor")
    assert bool(torch.isfinite(out.latents).all())


def test_nv_noise_is_this_gpus_own() -> None:
    """velodiff.philox draws what this GPU's torch.randn draws for a tensor no larger than its resident
    threads (an SD latent), on the first call of a generator and on the next (A1111's NV = its GPU)."""
    import numpy as np

    from velodiff.philox import PhiloxGenerator

    gpu = torch.Generator(DEVICE).manual_seed(1234)
    ours = PhiloxGenerator(1234)
    for _ in range(2):
        want = torch.randn((1, 4, 64, 64), generator=gpu, device=DEVICE).cpu()
        got = torch.from_numpy(np.asarray(ours.randn((1, 4, 64, 64))))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
