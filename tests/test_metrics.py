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
    from transformers import CLIPConfig, CLIPModel

    from sd_tiny import clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    tok = clip_tokenizer()
    cfg.text_config.vocab_size = len(tok)
    CLIPModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cs = M.ClipScore(tmp_path)
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
