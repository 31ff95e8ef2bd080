"""velodiff.eval.metrics: FD / KID wiring through torchmetrics (exact on a shift), streaming, PSNR / SSIM /
latent MSE identities, CLIP score on a tiny local CLIP, clear errors for absent weights, and the FD-shapes
bar: real vs itself ~ 0 < real vs default-model samples < samples at 2 NFE / from a random network."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from velodiff.errors import VelodiffError
from velodiff.eval import metrics as M


class ChannelMeans(nn.Module):
    """Features = per-channel pixel means (3-d): FD of a shifted set is exactly 3 * shift^2."""

    num_features = 3

    def forward(self, x):
        return x.float().mean(dim=(2, 3))


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 0.5 + 0.25


def test_fd_of_a_shift_is_the_squared_mean_difference_and_streams():
    real = _images(40, 0)
    shift = 0.1
    m = M.DistributionMetrics(ChannelMeans(), kid=True, kid_subset_size=20)
    for i in range(0, 40, 7):  # uneven batches: the statistics are running sums
        m.add_real(real[i : i + 7])
    m.add_fake(real + shift)
    out = m.compute()
    # equal covariances: FD = ||mu_r - mu_g||^2 = 3 shift^2  (Heusel et al. 2017, eq. 6)
    assert out["fd"] == pytest.approx(3 * shift**2, rel=1e-4)
    assert out["n_real"] == out["n_fake"] == 40 and out["name"] == "FD"
    m.reset_fake()
    m.add_fake(real)
    same = m.compute()
    assert same["fd"] < 1e-8 and abs(same["kid"]) < 1e-4 < out["kid"]


def test_pixel_and_latent_distances():
    a = _images(4, 1)
    assert torch.isinf(M.psnr(a, a)).all()
    assert M.psnr(a, (a + 0.1).clamp(0, 1)).mean().item() == pytest.approx(20.0, abs=1e-3)  # 10 log10(1/0.01)
    s = [M.ssim(a, (a + torch.randn_like(a) * k).clamp(0, 1)).mean().item() for k in (0.0, 0.05, 0.2)]
    assert s[0] == pytest.approx(1.0, abs=1e-5) and s[0] > s[1] > s[2]
    z = torch.randn(3, 4, 2, 2)
    assert M.latent_mse(z, z + 0.5).tolist() == pytest.approx([0.25] * 3)
    d = M.reference_distances(z, a[:3], z, a[:3])
    assert d["latent_mse"] == 0 and d["ssim"] == pytest.approx(1.0, abs=1e-5)
    # PSNR per image (10 log10(1 / MSE), pixels in [0, 1]); identical images (inf) leave the mean
    b = a.clone()
    b[1] = (a[1] + 0.2).clamp(0, 1)
    b[2] = (a[2] + 0.1).clamp(0, 1)
    p = M.psnr(a, b)
    assert torch.isinf(p[0]) and p[1] < p[2] and float(p[2]) == pytest.approx(20.0, abs=1e-3)
    d = M.reference_distances(z, a[:3], z, b[:3])
    assert d["psnr"] == pytest.approx(float(p[1:3].mean()), rel=1e-6)


def test_kid_is_reproducible():
    """KID averages over random subsets; the metric draws them from its own seed, so one set of images
    gives one number (and the global random state is left alone)."""

    class Mean(nn.Module):
        num_features = 3

        def forward(self, x):
            return x.float().mean(dim=(2, 3))

    imgs_r, imgs_f = _images(12, 3), _images(12, 4)
    values = []
    for _ in range(2):
        dm = M.DistributionMetrics(Mean(), kid=True, kid_subset_size=5)
        dm.add_real(imgs_r)
        dm.add_fake(imgs_f)
        state = torch.random.get_rng_state()
        values.append(dm.compute()["kid"])
        assert torch.equal(torch.random.get_rng_state(), state)
        torch.manual_seed(len(values))  # another global state: the same KID
    assert values[0] == values[1]


def test_image_inputs_agree():
    from PIL import Image

    arr = (np.random.default_rng(0).random((2, 8, 8, 3)) * 255).astype(np.uint8)
    a = M.as_images(arr)
    b = M.as_images([Image.fromarray(x) for x in arr])
    c = M.as_images(torch.from_numpy(arr).permute(0, 3, 1, 2))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(VelodiffError):
        M.as_images(torch.zeros(2, 4, 8, 8))
    with pytest.raises(VelodiffError, match=r"\[0, 1\]"):  # e.g. a decoder's [-1, 1] output
        M.as_images(torch.full((1, 3, 8, 8), -1.0))
    with pytest.raises(VelodiffError, match="empty"):
        M.as_images([])


def test_absent_weights_are_one_clear_error(tmp_path, capsys):
    from velodiff.cli import main
    from velodiff.eval.features import load_encoder


    with pytest.raises(VelodiffError, match="Inception"):
        M.DistributionMetrics(str(tmp_path / "inception-2015-12-05.pt"))
    with pytest.raises(VelodiffError, match="CLIP"):
        M.ClipScore(tmp_path / "clip")
    with pytest.raises(VelodiffError, match="encoder"):
        load_encoder(tmp_path / "enc.safetensors")
    for args in (["--fd-features", str(tmp_path / "x.pt")], ["--clip", str(tmp_path / "clip")]):
        code = main(["bench", "--out", str(tmp_path / "b"), *args])
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in err


def test_clip_score_with_a_tiny_local_clip(tmp_path):
    from sd_tiny import save_clip

    cs = M.ClipScore(save_clip(tmp_path))
    imgs = _images(3, 2)
    s = cs.update(imgs, ["a red cube", "a blue sphere", "a red cube"])
    assert len(s) == 3 and all(0.0 <= v <= 100.0 for v in s)
    assert cs.update(imgs[:1], ["a red cube"]) == pytest.approx(s[:1], abs=1e-4)  # batch-independent
    assert cs.compute()["n"] == 4


# --- the FD-shapes bar --------------------------------------------------------------------------------


def _model_path() -> Path:
    from velodiff.default_model import default_model_path

    return Path(os.environ.get("VELODIFF_TEST_MODEL") or default_model_path())


def test_fd_shapes_orders_real_good_degraded_random():
    path = _model_path()
    if not (path / "model_index.json").is_file():
        pytest.skip(f"no default model at {path}")
    from diffusers import UNet2DConditionModel

    from velodiff.data.shapes import ShapesWorld
    from velodiff.eval.sweep import resolve_prompts
    from velodiff.models import load
    from velodiff.pipelines import text2img

    texts = resolve_prompts("v1", limit=24)
    seeds = list(range(len(texts)))
    world = ShapesWorld()
    from velodiff.data.shapes import normalize_spec

    specs = [normalize_spec(t) for t in texts]
    real = np.stack([world.render(sp, seed=s).image for sp, s in zip(specs, seeds, strict=True)])
    real2 = np.stack([world.render(sp, seed=100 + s).image for sp, s in zip(specs, seeds, strict=True)])
    model = load(path)
    g = model.default_guidance  # the shipped sampling.json: 2.5

    def gen(m, nfe):
        return text2img(m, texts, seeds=seeds, nfe=nfe, guidance=g, output="tensor").images

    good, two = gen(model, 8), gen(model, 2)
    rand = load(path)
    unet = rand.components["unet"]
    torch.manual_seed(0)
    unet.load_state_dict(UNet2DConditionModel.from_config(unet.config).state_dict())
    random_net = gen(rand, 2)

    m = M.DistributionMetrics("fd-shapes", kid=False)
    m.add_real(real)
    fd = {}
    sets = (("itself", real), ("real", real2), ("model", good), ("2nfe", two), ("random", random_net))
    for name, imgs in sets:
        m.reset_fake()
        m.add_fake(imgs)
        fd[name] = m.compute()["fd"]
    print("FD-shapes:", {k: round(v, 3) for k, v in fd.items()})
    assert m.compute()["name"] == "FD-shapes"
    assert fd["itself"] < 1e-6 * fd["random"]
    # the trained model at 8 NFE is about as close to the renders as other renders of the same prompts
    # (two 24-image sets: FD's sampling noise is of that size); 2 NFE and a random UNet are far off
    assert fd["model"] < 1.5 * fd["real"]
    assert fd["model"] < fd["2nfe"] < fd["random"]
    assert min(fd["2nfe"], fd["random"]) > 1.5 * max(fd["model"], fd["real"])


def test_clip_score_clamps_negative_cosines_to_zero():
    from velodiff.eval.metrics import ClipScore

    cs = ClipScore.__new__(ClipScore)
    cs.size, cs.device, cs.scores = 8, "cpu", []
    cs.model = SimpleNamespace(
        config=SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=8)),
        get_image_features=lambda pixel_values: torch.tensor([[1.0, 0.0]]),
        get_text_features=lambda input_ids, attention_mask: torch.tensor([[-1.0, 0.0]]),
    )
    cs.tokenizer = lambda texts, **kw: {"input_ids": torch.zeros(1, 2, dtype=torch.long),
                                        "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    assert cs.update(torch.rand(1, 3, 8, 8), ["a red cube"]) == [0.0]


# --- review24: the streaming state, KID's exact value, CLIP's crop, per-image distances, timing --------


def _mmd2_unbiased(x, y):
    """KID's exact value on whole sets: the unbiased MMD^2 with the kernel (x.y / d + 1)^3."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_kid_is_the_unbiased_mmd_and_fits_the_smaller_set():
    """With subsets as large as both sets every subset is the whole set: KID is exactly the unbiased MMD^2
    (Binkowski et al. 2018) with zero spread. Sets of unequal sizes draw subsets of the smaller's size; a
    set of fewer than 2 images is refused on either side; kid=False reports FD only."""
    real, fake = _images(10, 5), _images(10, 6) * 0.8
    m = M.DistributionMetrics(ChannelMeans(), kid=True, kid_subset_size=1000)
    m.add_real(real)
    m.add_fake(fake[:1])
    with pytest.raises(VelodiffError, match="at least 2 real and 2 generated"):
        m.compute()
    m.add_fake(fake[1:])
    out = m.compute()
    feats = lambda x: x.double().mean(dim=(2, 3))  # noqa: E731
    assert out["kid"] == pytest.approx(_mmd2_unbiased(feats(real), feats(fake)), rel=1e-5, abs=1e-9)
    assert out["kid"] > 0 and out["kid_std"] <= 1e-3 * out["kid"]  # one subset, drawn 50 times
    uneven = M.DistributionMetrics(ChannelMeans(), kid=True, kid_subset_size=1000)
    uneven.add_real(_images(12, 7))
    uneven.add_fake(fake[:6])
    assert uneven.compute()["n_fake"] == 6  # subsets of 6, not of 12 (more than the fakes)
    no_kid = M.DistributionMetrics(ChannelMeans(), kid=False)
    no_kid.add_real(real)
    no_kid.add_fake(real + 0.1)
    r = no_kid.compute()
    assert "kid" not in r and r["fd"] == pytest.approx(3 * 0.1**2, rel=1e-4)


def test_reset_fake_starts_the_generated_count_again_and_fd_is_never_negative():
    real = _images(40, 0)
    m = M.DistributionMetrics(ChannelMeans(), kid=False)
    m.add_real(real)
    m.add_fake(real[:30] + 0.1)
    m.reset_fake()
    m.add_fake(real[:5])
    assert m.compute()["n_fake"] == 5 and m.compute()["n_real"] == 40
    for seed in range(6):  # identical sets: FD 0, not a round-off below it
        x = _images(40, seed)
        same = M.DistributionMetrics(ChannelMeans(), kid=False)
        same.add_real(x)
        same.add_fake(x)
        assert 0.0 <= same.compute()["fd"] < 1e-8


def test_an_extractor_without_num_features_is_probed():
    """A module without ``num_features`` gets its feature size from one probe call: the same FD as the
    same module declaring it."""

    class NoDim(nn.Module):
        def forward(self, x):
            return x.float().mean(dim=(2, 3))

    real = _images(20, 0)
    values = []
    for net in (NoDim(), ChannelMeans()):
        m = M.DistributionMetrics(net, kid=False)
        m.add_real(real)
        m.add_fake(real + 0.05)
        values.append(m.compute()["fd"])
    assert values[0] == pytest.approx(values[1]) == pytest.approx(3 * 0.05**2, rel=1e-4)


def test_kid_subsets_follow_the_metrics_own_seed():
    real, fake = _images(30, 1), _images(30, 2) * 0.9

    def kid(seed):
        m = M.DistributionMetrics(ChannelMeans(), kid=True, kid_subsets=5, kid_subset_size=6, seed=seed)
        m.add_real(real)
        m.add_fake(fake)
        return m.compute()["kid"]

    assert kid(3) == kid(3) and kid(3) != kid(0)


def _stub_clip(size=8, image_features=None):
    cs = M.ClipScore.__new__(M.ClipScore)
    cs.size, cs.device, cs.scores = size, "cpu", []
    cs.model = SimpleNamespace(
        config=SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=8)),
        get_image_features=image_features or (lambda pixel_values: torch.ones(len(pixel_values), 2)),
        get_text_features=lambda input_ids, attention_mask: torch.ones(len(input_ids), 2),
    )
    cs.tokenizer = lambda texts, **kw: {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long),
                                        "attention_mask": torch.ones(len(texts), 2, dtype=torch.long)}
    return cs


def test_clip_pixels_are_the_centre_crop_of_the_shorter_side_normalised():
    """CLIP's preprocessing: the shorter side resized to the model's size, the centre square cropped,
    then (x - mean) / std per channel. A wide or tall image in thirds (0, 0.5, 1) keeps only its middle
    third."""
    cs = _stub_clip(size=8)
    mean = torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
    wide = torch.zeros(1, 3, 8, 24)
    wide[..., 8:16], wide[..., 16:] = 0.5, 1.0
    for img in (wide, wide.transpose(-1, -2).contiguous()):
        px = cs._pixels(img)
        assert px.shape == (1, 3, 8, 8)
        assert torch.allclose(px * std + mean, torch.full((1, 3, 8, 8), 0.5), atol=1e-4)
    flat = cs._pixels(torch.full((2, 3, 8, 8), 0.5))
    assert torch.allclose(flat, ((0.5 - mean) / std).expand(2, 3, 8, 8), atol=1e-5)


def test_clip_score_refuses_a_prompt_count_other_than_the_image_count():
    cs = _stub_clip(image_features=lambda pixel_values: torch.ones(1, 2))
    with pytest.raises(VelodiffError, match="2 images for 1 prompts"):
        cs.update(torch.rand(2, 3, 8, 8), ["a red cube"])


def test_distances_are_per_image_and_shapes_must_agree():
    """latent MSE, PSNR and SSIM are one value per sample (each that sample's own); the reference run's
    images must have the same shape (no broadcasting of one image over a batch); a run identical to its
    reference has PSNR inf."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    z = torch.zeros(3, 4, 2, 2)
    assert M.latent_mse(z, z + torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1)).tolist() == [0.0, 1.0, 4.0]
    a = _images(3, 1)
    b = (a + torch.randn_like(a) * torch.tensor([0.02, 0.1, 0.3]).view(3, 1, 1, 1)).clamp(0, 1)
    s = M.ssim(a, b)
    assert s.shape == (3,)
    for i in range(3):
        alone = tm_ssim(b[i : i + 1], a[i : i + 1], data_range=1.0)
        assert float(s[i]) == pytest.approx(float(alone), abs=1e-5)
    for fn in (M.psnr, M.ssim):
        with pytest.raises(VelodiffError, match="shapes differ"):
            fn(a[:2], a[:1])
    d = M.reference_distances(z, a, z, a)
    assert d["psnr"] == float("inf") and d["latent_mse"] == 0.0


def test_time_repeats_warms_up_then_times_and_returns_the_first_timed_result():
    calls = []

    def fn():
        calls.append(len(calls))
        return len(calls)

    first, times = M.time_repeats(fn, repeat=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and first == 3


def test_features_of_uint8_and_float_images_agree_and_are_standardised():
    """The FD-shapes encoder reads uint8 images as x / 255; its features are standardised by clean real
    scenes' statistics (``calibrate``: 2000 scenes of seed 3000), so on the first 256 of those scenes every
    feature is about mean 0, standard deviation 1."""
    from velodiff.eval.features import load_encoder, make_dataset

    enc = load_encoder()
    x, _ = make_dataset(256, seed=3000, degrade_fraction=0.0)
    with torch.no_grad():
        f = enc(x)
        assert torch.allclose(f, enc(x.float() / 255.0), atol=1e-5)
    assert float(f.mean(0).abs().max()) < 0.3
    assert 0.85 < float(f.std(0).min()) and float(f.std(0).max()) < 1.15


def test_calibrate_standardises_the_features_of_its_own_scenes(tmp_path):
    from velodiff.errors import VelodiffError as Err
    from velodiff.eval.features import ShapesEncoder, calibrate, load_encoder, make_dataset, save_encoder

    torch.manual_seed(0)
    enc = calibrate(ShapesEncoder(), n=48, seed=5)
    x, _ = make_dataset(48, seed=5, degrade_fraction=0.0)
    with torch.no_grad():
        f = enc(x).double()
    assert float(f.mean(0).abs().max()) < 1e-4 and torch.allclose(f.std(0), torch.ones(64, dtype=f.dtype),
                                                                   atol=1e-4)
    save_encoder(enc, tmp_path / "other.safetensors", {"version": "fd-shapes-v1"})
    with pytest.raises(Err, match="is not a fd-shapes-v2 network"):
        load_encoder(tmp_path / "other.safetensors")


def test_inception_torchscript_reads_uint8_and_float_images_alike(tmp_path):
    """The FID network is fed 0-255 floats: a uint8 image as it is, a float image in [0, 1] times 255."""

    class Means(nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    f = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(Means()), str(f))
    net, name = M.feature_extractor(f)
    assert name == "FID"
    u8 = (torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    want = u8.float().mean(dim=(2, 3))
    assert torch.allclose(net(u8), want, atol=1e-3) and torch.allclose(net(u8.float() / 255), want, atol=1e-3)


def test_clip_score_summary_is_the_mean_and_spread_of_the_image_scores():
    cs = _stub_clip()
    cs.scores = [10.0, 20.0, 30.0]
    out = cs.compute()
    assert out["clip_score"] == pytest.approx(20.0) and out["n"] == 3
    assert out["clip_score_std"] == pytest.approx(float(np.std([10.0, 20.0, 30.0])))
