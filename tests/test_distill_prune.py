"""Pruning with repair: a pruned UNet is a plain diffusers model with the teacher's kept weights,
rankings are deterministic, the FLOPs target is met, removing nothing is the teacher bit for bit, bad
input is one line, a repair run resumes bit-exactly."""

from __future__ import annotations

import csv

import pytest
import torch

from velodiff.cli import main
from velodiff.distill.prune import (
    flops_per_eval,
    ld_scores,
    magnitude_scores,
    pruned_unet,
    select,
    usable_units,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher():
    from diffusers import UNet2DConditionModel

    from velodiff.shipped import shipped_path

    unet = UNet2DConditionModel.from_pretrained(shipped_path("default") / "unet", use_safetensors=True)
    return unet.eval().requires_grad_(False)


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 16, 16, generator=g)
    return x, torch.linspace(900.0, 100.0, b), torch.randn(b, 77, 64, generator=g)


def test_removing_nothing_is_the_teacher_bit_for_bit(teacher) -> None:
    x, k, ctx = _inputs()
    same = pruned_unet(teacher, []).eval()
    assert torch.equal(same(x, k, ctx).sample, teacher(x, k, ctx).sample)
    scores = magnitude_scores(teacher, usable_units(teacher))
    assert select(teacher, scores, 1.0)[0] == []


def test_pruned_unet_is_a_plain_diffusers_model(teacher, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    removed = ["mid", "up0.attn", "block0.resnet"]
    pruned = pruned_unet(teacher, removed).eval()
    assert pruned.config.mid_block_type is None and pruned.mid_block is None
    assert list(pruned.config.layers_per_block) == [0, 1, 1]
    pruned.save_pretrained(tmp_path / "unet", safe_serialization=True)
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet", use_safetensors=True).eval()
    x, k, ctx = _inputs()
    out = back(x, k, ctx).sample
    assert out.shape == x.shape
    assert torch.equal(out, pruned(x, k, ctx).sample)
    # kept weights are the teacher's, and the output really changed
    t = teacher.state_dict()
    assert all(torch.equal(v, t[n]) for n, v in back.state_dict().items())
    assert (out - teacher(x, k, ctx).sample).abs().max() > 1e-3
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_rankings_are_deterministic_and_the_flops_target_is_met(teacher) -> None:
    from velodiff.schedules import DiscreteVP

    units = usable_units(teacher)
    assert {"mid", "up0.attn", "down1.attn"} <= set(units)
    assert magnitude_scores(teacher, units) == magnitude_scores(teacher, units)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    sched = DiscreteVP(betas=betas)
    _, _, ctx = _inputs(3)
    uctx = torch.zeros_like(ctx)
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    a = ld_scores(teacher, units[:3], sched, ctx, uctx, noise, 2.5, 2)
    assert a == ld_scores(teacher, units[:3], sched, ctx, uctx, noise, 2.5, 2)
    assert all(v > 0 for v in a.values())
    full = flops_per_eval(teacher)
    for target in (0.9, 0.75):
        removed, flops, f0 = select(teacher, magnitude_scores(teacher, units), target)
        assert f0 == full and removed
        assert flops == flops_per_eval(pruned_unet(teacher, removed)) <= target * full


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _prune(tmp_path, run: str, steps: int, *extra: str) -> int:
    return _main(
        [
            "distill", "prune", "--method", "magnitude", "--target-flops", "0.8",
            "--out", str(tmp_path / f"{run}-student"), "--run", str(tmp_path / run),
            "--steps", str(steps), "--batch", "2", "--cache-size", "4", "--checkpoint-every", "1",
            "--device", "cpu", "--quiet", *extra,
        ]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target-flops", "0"], "must be in (0, 1]"),
        (["--target-flops", "1.5"], "must be in (0, 1]"),
        (["--target-flops", "0.01"], "removing every unit leaves"),
        (["--method", "random"], "unknown pruning method"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, capsys, extra, message) -> None:
    code = _prune(tmp_path, "bad", 0, *extra)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err, err


def test_a_teacher_that_is_not_a_model_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = _prune(tmp_path, "bad", 0, "--teacher", str(tmp_path / "empty"))
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "not a diffusers model folder" in err


def test_a_ranking_is_not_reused_for_another_teacher(tmp_path, capsys) -> None:
    """The removed units are the teacher's ranking (kept in the run's plan.json): the same run folder
    with another teacher of the same architecture is refused, not pruned by the first one's scores."""
    assert _prune(tmp_path, "r", 0) == 0
    code = _prune(tmp_path, "r", 0, "--teacher", "default-4step")
    err = capsys.readouterr().err.strip()
    assert code != 0 and "ranked the units of another teacher" in err and len(err.splitlines()) == 1, err


def _unet(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resumed_repair_is_bit_identical_and_loads(teacher, tmp_path) -> None:
    assert _prune(tmp_path, "full", 3) == 0
    assert _prune(tmp_path, "split", 1) == 0  # "killed" after one step, then rerun
    assert _prune(tmp_path, "split", 3) == 0
    a, b = _unet(tmp_path / "full-student"), _unet(tmp_path / "split-student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r[1] for r in csv.reader((tmp_path / r / "loss.csv").open())][1:] for r in ("full", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 3

    import velodiff

    model = velodiff.load(tmp_path / "full-student")
    assert (model.default_solver, model.default_steps, model.default_guidance) == ("dpmpp_2m", 20, 2.5)
    assert flops_per_eval(model.components["unet"]) <= 0.8 * flops_per_eval(teacher)


def test_rules_the_shipped_pruned_unet_cannot_run_say_why() -> None:
    """default-pruned lost its first down block's resnets and its mid block: deepcache names the block,
    pag names where the self-attention layers are (and that setting runs)."""
    import velodiff
    from velodiff.errors import VelodiffError
    from velodiff.pipelines import text2img

    m = velodiff.load("default-pruned")
    with pytest.raises(VelodiffError, match=r"its down_blocks.0 \(DownBlock2D\) has no resnets"):
        text2img(m, "a red circle", steps=2, plan="deepcache", output="latent")
    with pytest.raises(VelodiffError, match=r"are in down_blocks, up_blocks \(e.g. applied_layers=up\)"):
        text2img(m, "a red circle", steps=2, plan="pag", output="latent")
    assert "pag" in text2img(m, "a red circle", steps=2, plan="pag:applied_layers=up", output="latent").plan
