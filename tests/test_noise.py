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


def test_philox4x32_10_gives_random123s_known_answers():
    """Philox4x32-10 against the known-answer vectors of Random123 (Salmon et al.; tests/kat_vectors)."""
    import numpy as np

    from velodiff.philox import philox4x32

    cases = [((0, 0, 0, 0), (0, 0), "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              "d16cfe09 94fdcceb 5001e420 24126ea1")]
    for counter, key, want in cases:
        out = philox4x32([np.array([c], dtype=np.uint64) for c in counter], key)
        assert " ".join(f"{int(w[0]):08x}" for w in out) == want


def test_nv_noise_is_what_torch_draws_on_an_nvidia_gpu():
    """``torch.manual_seed(0); torch.randn(3, 4, device="cuda")`` on NVIDIA cards (the values A1111's
    rng_philox.py documents), to float32 round-off (the GPU's fast single-precision sin and log); a
    generator's next call moves the Philox offset by one block, as torch's does for a tensor of this size."""
    from velodiff.philox import PhiloxGenerator

    cuda = torch.tensor([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    g = PhiloxGenerator(0)
    torch.testing.assert_close(torch.from_numpy(g.randn((3, 4))), cuda, atol=1e-6, rtol=0)
    again = torch.from_numpy(g.randn((3, 4)))
    assert not torch.allclose(again, cuda, atol=0.1)
    assert (PhiloxGenerator(0).randn((3, 4)) == PhiloxGenerator(2**64).randn((3, 4))).all()  # seeds mod 2**64


@pytest.mark.parametrize("mode", ["a1111-cpu", "a1111-nv"])
def test_a1111_starting_noise_is_each_images_first_draw(mode):
    """A1111's starting noise: image i's own generator (seed i), its first draw of one image's shape, so
    an image's noise does not depend on the batch; the NV source differs from the CPU one."""
    from velodiff.noise import GeneratorNoise
    from velodiff.philox import PhiloxGenerator
    from velodiff.pipelines.common import initial_noise

    shape = (3, 4, 8, 6)
    z = initial_noise(shape, [11, 12, 2**40], mode)
    for k, s in enumerate([11, 12, 2**40]):
        first = (torch.randn((1, 4, 8, 6), generator=torch.Generator().manual_seed(s)) if mode == "a1111-cpu"
                 else torch.from_numpy(PhiloxGenerator(s).randn((1, 4, 8, 6))))
        assert torch.equal(z[k : k + 1], first)
    assert not torch.equal(initial_noise(shape, [11], "a1111-cpu"), initial_noise(shape, [11], "a1111-nv"))
    with pytest.raises(velodiff.VelodiffError, match="CPU, NV"):
        GeneratorNoise(shape, [1], "GPU")


def test_nv_noise_is_a1111s_nv_source_to_the_bit():
    """Draws of A1111's NV source (modules/rng_philox.py, run once to make these numbers) for a seed below
    2**32 and one above (the seed's two 32-bit words are Philox's key, low first), first call and next."""
    from velodiff.philox import PhiloxGenerator

    a1111 = {
        123456789: ([1.784683346748352, -1.0230505466461182, 0.34125426411628723, 0.6574200391769409,
                     0.7365415096282959, 0.002613071585074067],
                    [0.03261640667915344, -0.44882893562316895, -0.7612088322639465, 0.9849835634231567,
                     -0.20761464536190033, -1.2576748132705688]),
        2**40 + 5: ([1.0671086311340332, -1.1719361543655396, 0.7128459215164185, 0.028116507455706596,
                     -0.6532652378082275, 0.14947544038295746],
                    [-1.500787377357483, 1.5850324630737305, -0.5683088898658752, -0.5756992697715759,
                     0.9272921085357666, 0.5100623369216919]),
    }
    for seed, draws in a1111.items():
        g = PhiloxGenerator(seed)
        for want in draws:
            assert g.randn((2, 3)).ravel().tolist() == want


def test_cuda_noise_is_one_nvidia_generator_for_the_batch():
    """noise cuda: what diffusers draws with one CUDA generator, computed here: the batch's starting noise
    is the generator's first call over the whole batch, step i's noise its call i + 1."""
    from velodiff.noise import GeneratorNoise
    from velodiff.philox import PhiloxGenerator
    from velodiff.pipelines.common import initial_noise

    shape = (2, 4, 8, 6)
    g = PhiloxGenerator(77)
    first, second, third = (torch.from_numpy(g.randn(shape)) for _ in range(3))
    assert torch.equal(initial_noise(shape, [77, 78], "cuda"), first)
    streams = GeneratorNoise(shape, [77, 78], "NV", per_image=False)
    assert torch.equal(streams(1), third) and torch.equal(streams(0), second)
    assert not torch.equal(initial_noise(shape, [77, 78], "a1111-nv")[1], first[1])  # image 2: seed 78's


# --- review28 ---------------------------------------------------------------------------------------------


def test_prior_sample_has_the_marginal_std_of_unit_variance_data():
    """x_T = noise * sqrt(alpha^2 + sigma^2): 1 for VP and for a flow at t = 1, sqrt(1 + sigma^2) for EDM
    (about sigma), sqrt(alpha^2 + sigma^2) for a flow's intermediate time."""
    from velodiff import EDM, DiscreteVP, RectifiedFlow
    from velodiff.noise import prior_sample

    z = randn(SHAPE, 0, dtype=torch.float64)
    vp = DiscreteVP.scaled_linear()
    assert torch.allclose(prior_sample(vp, 1.0, z), z, rtol=1e-12, atol=0)
    assert torch.allclose(prior_sample(RectifiedFlow(), 1.0, z), z, rtol=1e-12, atol=0)
    assert torch.allclose(prior_sample(EDM(), 80.0, z), z * (1 + 80.0**2) ** 0.5, rtol=1e-12, atol=0)
    flow = prior_sample(RectifiedFlow(), 0.3, z)
    assert torch.allclose(flow, z * (0.7**2 + 0.3**2) ** 0.5, rtol=1e-12, atol=0)


def test_step_noise_is_fresh_per_step_and_not_the_initial_noise():
    """A stochastic solver's noise is a fresh draw per step, none of them the initial noise of the seed."""
    like = torch.zeros(SHAPE)
    g = GaussianNoise(like, 3)
    draws = [g(i) for i in range(4)] + [randn(SHAPE, 3)]
    for a in range(len(draws)):
        for b in range(a):
            assert not torch.allclose(draws[a], draws[b]), (a, b)
    assert torch.equal(GaussianNoise(like, 3)(2), draws[2])  # a pure function of (seed, step)


def test_brownian_increments_are_unit_normal_and_one_path_across_step_counts():
    """BrownianNoise's increments are normalized to unit variance, and they are increments of one path:
    two steps of a finer grid add up (sqrt-weighted) to the one step of a coarser grid over the same
    interval, for the same seed (k-diffusion's BrownianTreeNoiseSampler)."""
    like = torch.zeros(64, 64, 4)
    fine = BrownianNoise(like, 3, torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64))
    coarse = BrownianNoise(like, 3, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    for w in (fine(0), fine(1), fine(2), coarse(1)):
        assert abs(float(w.std()) - 1.0) < 0.03 and abs(float(w.mean())) < 0.03
    joined = (fine(0) + fine(1)) * 0.5  # sqrt(.25) (n0 + n1) = W(1) - W(.5) = sqrt(.5) n
    assert torch.allclose(joined, coarse(0) * 0.5**0.5, rtol=0, atol=1e-5)
    assert torch.allclose(fine(2), coarse(1), rtol=0, atol=1e-5)


def test_a_64_bit_seed_is_not_a_32_bit_seed_with_a_key():
    """(seed, *key) -> noise is one-to-one where a part has 64 bits: seed s + 2**32 is not seed s with key
    (1,) (a stochastic solver's step 0 at seed s was once the starting noise of s + 2**32), nor s + 2**32
    with key (3,) the step 3 of s; seeds and keys below 2**32 keep the draws they always had."""
    import numpy as np

    shape, s = (1, 4, 8, 8), 12345
    assert not torch.equal(GaussianNoise(torch.zeros(shape), s)(0), randn(shape, s + 2**32))
    assert not torch.equal(GaussianNoise(torch.zeros(shape), s)(3), randn(shape, s + 2**32, 3))
    assert not torch.equal(randn(shape, 2**32), randn(shape, 0, 1))
    assert torch.equal(randn(shape, -1), randn(shape, 2**64 - 1))
    for key in [(5,), (5, 1, 3), (2**32 - 1, 7)]:
        state = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint64)
        want = torch.randn(shape, generator=torch.Generator().manual_seed(int(state[0] >> np.uint64(1))))
        assert torch.equal(randn(shape, *key), want), key


# --- review29 ---------------------------------------------------------------------------------------------


def test_one_generator_modes_seed_with_the_first_seed_only_and_cast_step_noise():
    """noise torch / cuda: one generator seeded with the first seed draws the batch (the other seeds say
    nothing, as diffusers' single generator); step noise comes on the sample's dtype, the float32 draw
    cast (diffusers' CPU draws in float16 / bfloat16 are the float32 ones cast too)."""
    from velodiff.noise import GeneratorNoise
    from velodiff.pipelines.common import initial_noise

    shape = (2, 4, 8, 6)
    for mode in ("torch", "cuda"):
        assert torch.equal(initial_noise(shape, [42, 43], mode), initial_noise(shape, [42, 999], mode))
        assert not torch.equal(initial_noise(shape, [42, 43], mode), initial_noise(shape, [41, 43], mode))
    g = torch.Generator().manual_seed(42)
    draws = [torch.randn(shape, generator=g) for _ in range(3)]
    assert torch.equal(initial_noise(shape, [42, 43], "torch"), draws[0])
    half = GeneratorNoise(shape, [42, 43], "CPU", per_image=False, dtype=torch.float16)
    assert half(1).dtype == torch.float16 and torch.equal(half(1), draws[2].half())
    g16 = torch.Generator().manual_seed(42)
    assert torch.equal(torch.randn(shape, generator=g16, dtype=torch.float16), draws[0].half())


def test_a1111_brownian_noise_spans_the_grids_sigmas_and_is_one_signed_path():
    """SigmaBrownianNoise: its trees span [least positive sigma, largest sigma] of the grid (A1111's
    create_noise_sampler); an increment backwards is minus the forward one, increments over two halves add
    up to the whole (one path per image), an empty interval is zero, a query past the range (a last step to
    sigma 0) reads at its end (an empty interval there), and image k's path is its own seed's whatever the
    batch."""
    from velodiff import DiscreteVP, make_grid
    from velodiff.noise import SigmaBrownianNoise

    sched = DiscreteVP.scaled_linear()
    ts = make_grid("karras", sched, 6, final="zero")
    like = torch.zeros(2, 4, 8, 8)
    w = SigmaBrownianNoise(like, [5, 9], ts, sched)
    sig = sched.sigma_ve(ts[:-1].double())
    assert (w.lo, w.hi) == (float(sig.min()), float(sig.max()))
    t0, t1, t2 = (float(ts[k]) for k in (0, 2, 4))
    s0, s1, s2 = (float(sched.sigma_ve(t)) for t in (t0, t1, t2))
    torch.testing.assert_close(w.between(t2, t0), -w.between(t0, t2), atol=1e-6, rtol=0)
    whole = w.between(t0, t2) * (s0 - s2) ** 0.5
    parts = w.between(t0, t1) * (s0 - s1) ** 0.5 + w.between(t1, t2) * (s1 - s2) ** 0.5
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=0)
    assert torch.equal(w.between(t1, t1), torch.zeros_like(like))
    # the last step, from the least positive sigma to 0: 0 reads at the range's low end, an empty interval
    assert torch.equal(w(5), torch.zeros_like(like)) and float(sched.sigma_ve(float(ts[5]))) == w.lo
    torch.testing.assert_close(w(4), w.between(float(ts[4]), float(ts[5])), atol=0, rtol=0)
    alone = SigmaBrownianNoise(like[1:], [9], ts, sched)
    torch.testing.assert_close(alone.between(t0, t2), w.between(t0, t2)[1:], atol=1e-6, rtol=0)
    assert not torch.allclose(w.between(t0, t2)[0], w.between(t0, t2)[1])
