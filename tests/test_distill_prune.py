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


# --- review22: scores, the selection, the final DDIM step, the plan's key ------------------------------


def test_magnitude_score_is_the_mean_absolute_weight_of_the_unit(teacher) -> None:
    """The L1 criterion per unit: the mean |w| over the parameters the unit's removal drops (the mid block:
    every mid_block parameter)."""
    params = [p for n, p in teacher.named_parameters() if n.startswith("mid_block.")]
    want = float(sum(p.abs().double().sum() for p in params)) / sum(p.numel() for p in params)
    assert magnitude_scores(teacher, ["mid"])["mid"] == pytest.approx(want, rel=1e-9)


def test_ld_score_is_the_distance_of_means_plus_that_of_standard_deviations() -> None:
    from velodiff.distill.prune import ld_score

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 2, 3, 3, generator=g)
    shift = torch.randn(2, 3, 3, generator=g)
    assert ld_score(a, a + shift) == pytest.approx(float(shift.norm()), rel=1e-5)  # same spread
    m = a.mean(0)
    wider = m + 3 * (a - m)  # same means, three times the deviations
    assert ld_score(a, wider) == pytest.approx(float((2 * a.std(0)).norm()), rel=1e-5)


def test_select_takes_the_feasible_set_of_least_score(monkeypatch) -> None:
    """Up to 12 units: the set of least total score whose FLOPs meet the target (a budget met exactly
    counts); beyond: units in ascending score order until the target is met."""
    import itertools

    import velodiff.distill.prune as pr

    cost = {"a": 30, "b": 10, "c": 10, "d": 20, "e": 5}
    score = {"a": 1.0, "b": 0.8, "c": 0.9, "d": 0.6, "e": 0.01}
    monkeypatch.setattr(pr, "pruned_unet", lambda teacher, removed: list(removed))
    monkeypatch.setattr(pr, "flops_per_eval", lambda u: 100 - sum(cost[k] for k in u) if isinstance(u, list)
                        else 100)
    for target in (0.8, 0.75, 0.7, 0.6, 1.0):
        ok = [s for r in range(6) for s in itertools.combinations(sorted(cost), r)
              if 100 - sum(cost[k] for k in s) <= target * 100]
        best = min(ok, key=lambda s: sum(score[k] for k in s))
        removed, flops, full = pr.select(object(), score, target)
        assert sorted(removed) == sorted(best) and flops == 100 - sum(cost[k] for k in best) and full == 100
    many = {f"u{i:02d}": 0.1 * i for i in range(14)}
    cost = {u: 5 for u in many}
    removed, flops, _ = pr.select(object(), many, 0.8)  # greedy: the four lowest reach 80 exactly
    assert removed == ["u00", "u01", "u02", "u03"] and flops == 80


def test_calibration_latents_are_the_ddim_sampler_ending_on_its_clean_estimate() -> None:
    """output_latents is the deterministic DDIM sampler of the trailing grid (the sampler the
    distillations train, checked against the ddim solver in test_distill_reflow)."""
    from types import SimpleNamespace

    from velodiff.distill.progressive import student_grid
    from velodiff.distill.prune import output_latents
    from velodiff.distill.reflow import sample_steps
    from velodiff.distill.run import make_x0_fn
    from velodiff.schedules import DiscreteVP

    class Toy(torch.nn.Module):
        def forward(self, x, k, ctx):
            shift = ctx.mean((1, 2)).view(-1, 1, 1, 1)
            return SimpleNamespace(sample=torch.tanh(x + shift) * (1 + k.view(-1, 1, 1, 1) / 1000))

    sched = DiscreteVP.scaled_linear()
    g = torch.Generator().manual_seed(0)
    noise, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 3, generator=g)
    uctx = torch.zeros(2, 5, 3)
    for steps in (1, 3):
        grid = student_grid(sched, steps).float()
        want = sample_steps(make_x0_fn(Toy(), sched, ctx, uctx, 2.5), noise, grid, sched)
        torch.testing.assert_close(output_latents(Toy(), sched, ctx, uctx, noise, 2.5, steps), want,
                                   rtol=1e-5, atol=1e-5)


def test_every_resnet_pair_is_a_unit_and_a_plan_is_not_reused_for_another_target(teacher, tmp_path,
                                                                                 capsys) -> None:
    from velodiff.distill.prune import candidate_units

    n = len(teacher.config.down_block_types)
    assert {f"block{i}.resnet" for i in range(n)} <= set(candidate_units(teacher.config))  # one layer each
    assert "block0.resnet" in usable_units(teacher)  # (the shipped default-pruned dropped it)
    assert _prune(tmp_path, "r", 0) == 0
    capsys.readouterr()
    assert _prune(tmp_path, "r", 0, "--target-flops", "0.9") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was started with" in err and "new --run" in err, err


def test_flops_are_counted_at_a_non_square_sample_size() -> None:
    """diffusers' sample_size may be (h, w): the FLOPs of one evaluation are counted on that latent, not on
    a square of its first side."""
    from diffusers import UNet2DConditionModel

    from velodiff.distill.prune import flops_per_eval

    def unet(size):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=size, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        )

    small, wide, big = (flops_per_eval(unet(s)) for s in (8, [8, 16], 16))
    assert small < wide < big
