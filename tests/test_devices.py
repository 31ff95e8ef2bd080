"""Code that meets a model's tensors computes on the model's device: PyTorch's ``meta`` device plays a
GPU here (it refuses a CPU tensor of one or more dimensions in the same operation, as CUDA does), so
these run on a CPU-only machine. A GPU run found such mixes in `distill reflow`; tests/test_distill_cuda.py
covers the distill methods on a real GPU."""

from __future__ import annotations

import types

import torch

from velodiff.schedules import DiscreteVP

META = torch.device("meta")


def test_prune_ld_ranking_samples_on_the_unets_device() -> None:
    from velodiff.distill.prune import output_latents

    unet = lambda x, k, ctx: types.SimpleNamespace(sample=torch.zeros_like(x))  # noqa: E731
    ctx, noise = torch.zeros(2, 77, 8, device=META), torch.zeros(2, 4, 8, 8, device=META)
    out = output_latents(unet, DiscreteVP.scaled_linear(), ctx, ctx, noise, 2.5, 3)
    assert out.device == META and out.shape == (2, 4, 8, 8)


def test_reward_of_a_batch_with_and_without_targets_stays_on_the_images_device() -> None:
    """The shipped scoring network reads on the CPU; an image whose prompt names no target adds a zero on
    the images' device: the stack of the two must not mix them."""
    import velodiff.guidance.reward as reward

    cls = next(c for c in vars(reward).values() if isinstance(c, type) and getattr(c, "name", "") == "reward")
    rule = cls()
    rule.target, rule.temperature, rule.goals = "colors", 1.0, [None, [0]]
    rule.read = lambda images: {"colors": torch.zeros(len(images), 8)}
    out = rule.rewards(torch.zeros(2, 3, 64, 64, device=META))
    assert out.device == META and out.shape == (2,)


def test_model_denoiser_keeps_its_output_on_the_networks_device() -> None:
    """For a shared time (its coefficients CPU scalars) and for per-sample times (interpolated on the
    device)."""
    from velodiff.denoisers import ModelDenoiser

    den = ModelDenoiser(lambda x, ts, cond: torch.zeros_like(x), DiscreteVP.scaled_linear(), "epsilon")
    x = torch.zeros(2, 4, 8, 8, device=META)
    for t in (0.5, torch.tensor(0.5), torch.tensor([0.3, 0.7])):
        assert den(x, t).device == META
