"""Classifier guidance with a noise-aware classifier (Dhariwal & Nichol): the shipped noise-aware pair
counter reads counts from noisy latents, guidance by a classifier of x_t moves the sample toward its
target, and the counter refuses a model whose latents it was not trained on."""

import pytest
import torch

import velodiff
from velodiff import VelodiffError
from velodiff.guidance.classifier import ClassifierGuidance


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from velodiff.default_model import default_model_path

    return velodiff.load(default_model_path())


def test_the_shipped_counter_reads_noisy_latents(model):
    """On scenes it never saw: nearly exact at low noise, still better than chance half way (where the
    layout is decided), and no better than always 'absent' at pure noise."""
    from velodiff.guidance.noisy_counter import accuracy, encode_dataset, load_noisy_counter

    z, counts = encode_dataset(model, 200, seed=9000)
    counter = load_noisy_counter(model)
    low, mid, pure = (accuracy(counter, z, counts, model.schedule, f) for f in (0.1, 0.5, 1.0))
    assert low["named_pairs"] >= 0.9, low
    assert mid["named_pairs"] > pure["named_pairs"] + 0.2, (mid, pure)


def test_noisy_guidance_steers_toward_the_target(model):
    """A noise-aware classifier from Python, read on x_t itself: 'bright' vs 'dark' latents. Guiding toward
    'bright' raises the final latents' mean (D&N's sign and step), scale 0 changes nothing."""
    from velodiff.pipelines import text2img

    seen = []

    def brightness(x, log_snr):
        """p(bright | x_t) held at 1/2, its log's gradient 1/2 at every latent element (never saturates)"""
        seen.append(torch.as_tensor(log_snr))
        m = (x - x.detach()).flatten(1).sum(1)
        return torch.stack([m, -m], dim=1)

    kw = dict(seeds=[0, 1], steps=8, guidance=2.5, output="latent")
    prompts = ["two red circles", "three blue squares"]
    def run(target, scale):
        return text2img(model, prompts, **kw, plan=[ClassifierGuidance(brightness, [target] * 2, scale=scale,
                                                                        through="noisy")])

    plain = text2img(model, prompts, **kw)
    zero, bright, dark = run(0, 0), run(0, 0.5), run(1, 0.5)
    assert torch.equal(zero.latents, plain.latents)
    runs = {"plain": plain, "bright": bright, "dark": dark}
    mean = {k: r.latents.mean(dim=(1, 2, 3)) for k, r in runs.items()}
    assert (mean["bright"] > mean["plain"] + 0.05).all(), mean
    assert (mean["dark"] < mean["plain"] - 0.05).all(), mean
    # the classifier saw the log-SNR of each step, from the noisiest up (two guided runs of 8 steps)
    lam = torch.stack([v.flatten()[0] for v in seen[:8]]).double()
    assert len(seen) == 16 and (lam.diff() > 0).all()


def test_refusals(model, tmp_path):
    import sd_tiny
    from velodiff.pipelines import text2img

    with pytest.raises(VelodiffError, match="through=noisy needs a noise-aware classifier"):
        text2img(model, "two red circles", steps=2, plan="classifier:head=colors,through=noisy")
    other = velodiff.load(sd_tiny.save_sd(tmp_path / "tiny"))
    with pytest.raises(VelodiffError, match="reads the latents of VAE"):
        text2img(other, "two red circles", steps=2, height=64, width=64,
                 plan="classifier:head=pair_counts,through=noisy")
