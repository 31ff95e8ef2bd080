"""The noise contract (velodiff.noise): noise is drawn in float32 on the CPU from (seed, key) and then
cast, so the dtype of the noise or of the model never changes which numbers are drawn."""

from __future__ import annotations

import importlib

import pytest
import torch

import velodiff
from velodiff.noise import BrownianNoise, GaussianNoise, _generator, check_seed, randn

SHAPE = (2, 4, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_randn_in_a_dtype_is_the_float32_draw_cast(dtype):
    for seed, key in ((0, ()), (7, (1, 3)), (123456789, (2,))):
        z32 = randn(SHAPE, seed, *key)
        z = randn(SHAPE, seed, *key, dtype=dtype)
        assert z32.dtype == torch.float32 and z.dtype == dtype
        assert torch.equal(z, z32.to(dtype))  # bit for bit (torch.equal: same values, same dtype)
        assert torch.equal(randn(SHAPE, seed=seed, dtype=dtype), randn(SHAPE, seed=seed).to(dtype))
    # float64 is the float32 draw widened, not a fresh float64 draw (which would differ)
    z64 = randn(SHAPE, 5, dtype=torch.float64)
    assert torch.equal(z64.float(), randn(SHAPE, 5))
    fresh = torch.randn(SHAPE, generator=_generator(5), dtype=torch.float64)  # same generator, float64 draw
    assert not torch.equal(z64, fresh)


def test_a_seed_is_torchs_64_bit_seed() -> None:
    """Negative seeds wrap to 64 bits as torch's manual_seed does (-1 is 2**64 - 1, -3 is not 3); a seed
    outside [-2**63, 2**64) is refused in one line."""
    assert torch.equal(randn(SHAPE, -1), randn(SHAPE, 2**64 - 1))
    assert not torch.equal(randn(SHAPE, -3), randn(SHAPE, 3))
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(velodiff.VelodiffError, match="outside torch's seed range"):
            check_seed(bad)
    from velodiff.pipelines.common import initial_noise

    with pytest.raises(velodiff.VelodiffError, match="outside torch's seed range"):
        initial_noise((2, 4, 8, 8), [2**64 - 1, 2**64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_step_noise_follows_the_sample_dtype_by_casting(dtype):
    like = torch.zeros(SHAPE, dtype=dtype)
    assert torch.equal(GaussianNoise(like, 3)(4), GaussianNoise(like.float(), 3)(4).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_brownian_step_noise_is_the_float32_path_cast(dtype):
    """The SDE solvers' Brownian-tree noise: built and drawn in float32, then cast, like the rest; seeds
    2**31 apart are different paths."""
    ts = torch.linspace(1.0, 0.0, 6, dtype=torch.float64) * 999
    like = torch.zeros(SHAPE, dtype=dtype)
    ours, ref = BrownianNoise(like, 3, ts), BrownianNoise(like.float(), 3, ts)
    for i in range(5):
        assert torch.equal(ours(i), ref(i).to(dtype))
    assert not torch.equal(BrownianNoise(like.float(), 3 + 2**31, ts)(0), ref(0))


def devices() -> list[str]:
    """Every device this machine has: the CPU, and CUDA / MPS where present (a GPU runner checks those)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noise_is_the_same_on_every_device(device, dtype):
    """Drawn on the CPU and moved: the numbers do not depend on the device asked for."""
    for seed, key in ((0, ()), (11, (1, 2))):
        z = randn(SHAPE, seed, *key, device=device, dtype=dtype)
        assert z.device.type == device and z.dtype == dtype
        assert torch.equal(z.cpu(), randn(SHAPE, seed, *key).to(dtype))
        assert torch.equal(GaussianNoise(z, seed)(3).cpu(), GaussianNoise(z.cpu(), seed)(3))


@pytest.fixture(scope="module")
def default_runs():
    """text2img on the shipped default model (4 steps, 1 image) in float32 and bfloat16 (plus one float16
    step), recording the starting noise and the starting sample each run was given."""
    from velodiff.default_model import default_model_path

    t2i = importlib.import_module("velodiff.pipelines.text2img")
    seen: dict[str, list[torch.Tensor]] = {"z": [], "x": []}
    initial_noise, run = t2i.initial_noise, t2i.run

    def noise(*args, **kwargs):
        z = initial_noise(*args, **kwargs)
        seen["z"].append(z.clone())
        return z

    def first_sample(model, setup, opts, x, *args, **kwargs):
        seen["x"].append(x.clone())
        return run(model, setup, opts, x, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(t2i, "initial_noise", noise)
    mp.setattr(t2i, "run", first_sample)
    try:
        images = {}
        for dt, steps in (("float32", 4), ("bfloat16", 4), ("float16", 1)):
            model = velodiff.load(default_model_path(), dtype=dt)
            # guidance 7.5 (the family's, before the shipped sampling.json): the bounds below were measured so
            images[dt] = t2i.text2img(
                model, "a red circle", steps=steps, seeds=3, guidance=7.5, output="tensor"
            ).images
    finally:
        mp.undo()
    return images, seen


def test_initial_noise_is_the_same_whatever_the_model_dtype(default_runs):
    _, seen = default_runs
    assert len(seen["z"]) == len(seen["x"]) == 3
    for key in ("z", "x"):
        assert all(t.dtype == torch.float32 for t in seen[key])
        assert all(torch.equal(seen[key][0], t) for t in seen[key][1:]), key
    assert torch.equal(seen["z"][0], randn(tuple(seen["z"][0].shape), 3))


def test_bfloat16_gives_the_float32_image(default_runs):
    """Measured on the shipped model, CPU, 4 steps, float32 vs bfloat16 weights (seed: max |diff|, mean
    |diff| of the [0, 1] images): 0: 0.30, 0.017; 1: 0.059, 0.0048; 2: 0.091, 0.0068; 3 (this test): 0.089,
    0.0067; 7: 0.18, 0.012. Bounds 0.4 and 0.03 hold for every seed measured, with margin for other CPUs'
    bfloat16 kernels; an image from other noise (float32, seed 4 or 0 vs 3) is 0.24-0.30 away in mean."""
    images, _ = default_runs
    a, b = images["float32"], images["bfloat16"].float()
    assert a.shape == b.shape and a.dtype == torch.float32
    d = (a - b).abs()
    assert d.max().item() < 0.4 and d.mean().item() < 0.03, (d.max().item(), d.mean().item())
    assert (a - a.roll(1, -1)).abs().mean() > 0.02  # not a flat image, so the bound means something


@pytest.mark.skipif(devices() == ["cpu"], reason="needs a GPU (CUDA or MPS): the image on it vs the CPU's")
@pytest.mark.parametrize("device", [d for d in devices() if d != "cpu"])
def test_a_gpu_gives_the_cpu_image(device):
    """The same seed on the shipped model in float32: the GPU's image is the CPU's up to kernel round-off
    (bounded as bfloat16 vs float32 is above; the measured figure is printed for the record)."""
    from velodiff.default_model import default_model_path
    from velodiff.pipelines import text2img

    images = {}
    for where in ("cpu", device):
        model = velodiff.load(default_model_path(), device=where)
        images[where] = text2img(
            model, "a red circle", steps=4, seeds=[3], guidance=7.5, output="tensor"
        ).images.cpu()
    d = (images["cpu"] - images[device]).abs()
    print(f"{device} vs cpu: max {d.max().item():.4g}, mean {d.mean().item():.4g}")
    assert d.max().item() < 0.4 and d.mean().item() < 0.03
