"""Reflow: the pair cache resumes and is deterministic, straightness is 0 for a straight flow and
positive for a curved one, a killed run resumes bit-exactly, bad input is one line."""

from __future__ import annotations

import csv

import pytest
import torch

from velodiff.cli import main
from velodiff.distill.progressive import student_grid
from velodiff.distill.reflow import CHUNK, PairCache, pair_noise, sample_steps, straightness
from velodiff.errors import VelodiffError
from velodiff.schedules import DiscreteVP

torch.set_num_threads(1)


def _sched() -> DiscreteVP:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteVP(betas=betas)


def _gen(calls: list[int]):
    def gen(a: int, b: int) -> dict[str, torch.Tensor]:
        calls.append(a)
        z = torch.stack([pair_noise(0, i, (4, 2, 2)) for i in range(a, b)])
        return {"z": z, "x": 2 * z, "index": torch.arange(a, b)}

    return gen


def test_pair_cache_resumes_and_is_deterministic(tmp_path) -> None:
    total = 2 * CHUNK + 5
    calls: list[int] = []
    cache = PairCache(tmp_path / "a", {"teacher": "t"}, total)
    assert cache.fill(_gen(calls)) == 3
    first = {k: v.clone() for k, v in cache.load().items()}
    assert first["z"].shape[0] == total and torch.equal(first["index"], torch.arange(total))
    cache.chunk_path(1).unlink()  # "killed" while writing chunk 1
    calls.clear()
    assert PairCache(tmp_path / "a", {"teacher": "t"}, total).fill(_gen(calls)) == 1
    assert calls == [CHUNK]  # only the missing chunk is generated again
    again = cache.load()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = PairCache(tmp_path / "b", {"teacher": "t"}, total)
    other.fill(_gen([]))
    for k in range(3):  # the same files from scratch
        assert cache.chunk_path(k).read_bytes() == other.chunk_path(k).read_bytes()
    with pytest.raises(VelodiffError, match="other settings"):
        PairCache(tmp_path / "a", {"teacher": "u"}, total)


def test_straightness_is_zero_for_a_straight_flow_and_positive_for_a_curved_one() -> None:
    sched = _sched()
    grid = student_grid(sched, 8).float()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    straight = straightness(lambda x, t: target, x, grid, sched)  # x0 never changes: a straight path
    assert straight["S"] < 1e-8 and straight["x0_dev"] < 1e-10 and straight["one_step_err"] < 1e-10
    torch.testing.assert_close(straight["out"], target)

    curved = straightness(lambda x, t: torch.tanh(x) * (1 + t.view(-1, 1, 1, 1)), x, grid, sched)
    assert curved["S"] > 1e-2 and curved["x0_dev"] > 1e-3 and curved["one_step_err"] > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_distilled_sampler_is_the_ddim_sampler_it_trains(steps: int) -> None:
    """The few-step distillation back-propagates through ``sample_steps``: it must be the sampler the
    student runs with (the ``ddim`` solver on the trailing grid), or it would train the wrong thing."""
    from velodiff.sampling import sample

    sched = _sched()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    class Curved:  # a nonlinear x0(x, t), so every step matters
        schedule = sched

        def __call__(self, x, t, cond=None):
            return torch.tanh(x) * (1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1))

    grid = student_grid(sched, steps)
    ours = sample_steps(lambda x, t: Curved()(x, t), z, grid.float(), sched)
    ref = sample(Curved(), z, grid.double(), "ddim").x
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    if steps > 1:  # and not a one-step shortcut
        assert (ours - Curved()(z, grid[:1])).abs().max() > 1e-2


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _reflow(tmp_path, run: str, reflow_steps: int, distill_steps: int, *extra: str) -> int:
    return _main(
        [
            "distill", "reflow", "--out", str(tmp_path / f"{run}-student"), "--run", str(tmp_path / run),
            "--pairs", "2", "--eval-pairs", "1", "--teacher-steps", "2", "--ode-steps", "2",
            "--reflow-steps", str(reflow_steps), "--distill-steps", str(distill_steps), "--batch", "2",
            "--checkpoint-every", "1", "--device", "cpu", "--quiet", *extra,
        ]
    )


def _unet_state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _losses(run, phase: str) -> list[str]:
    return [r[1] for r in csv.reader((run / phase / "loss.csv").open())][1:]


def test_killed_run_resumes_bit_exactly(tmp_path) -> None:
    assert _reflow(tmp_path, "full", 2, 1) == 0
    assert _reflow(tmp_path, "split", 1, 0) == 0  # stopped after the first reflow step
    assert _reflow(tmp_path, "split", 2, 1) == 0
    a, b = _unet_state(tmp_path / "full-student"), _unet_state(tmp_path / "split-student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for phase in ("reflow", "distill"):
        assert _losses(tmp_path / "full", phase) == _losses(tmp_path / "split", phase)
    # lengthening the reflow phase of a finished run: its distillation, trained from the shorter
    # phase's student, is not resumed from the longer one's
    assert _reflow(tmp_path, "longer", 1, 1) == 0 and _reflow(tmp_path, "longer", 2, 1) == 2
    import json

    # the straightness report of the extended run is measured again, not the one after its first step
    full, split = (json.loads((tmp_path / r / "straightness.json").read_text()) for r in ("full", "split"))
    assert split["after_reflow"] == full["after_reflow"] and full["after_reflow"]["trained_steps"] == 2
    # without --init the start is the teacher's own UNet at guidance 1, measured as such (not the CFG row)
    assert full["init"] != full["teacher"] and full["init"] == split["init"]
    for k in range(1):  # the teacher pairs, made twice from scratch, are the same bytes
        name = f"pairs/chunk-{k:05d}.safetensors"
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()
    import velodiff

    model = velodiff.load(tmp_path / "full-student")
    assert (model.default_solver, model.default_steps, model.default_guidance) == ("ddim", 1, 1.0)
    reflowed = velodiff.load(tmp_path / "full-student-2steps")
    assert reflowed.default_steps == 2
    assert getattr(reflowed, "trained_steps", None) is None  # trained on every t: more steps are no misuse
    assert velodiff.load(tmp_path / "full-student").trained_steps == 1  # the distilled one is a 1-step map
    assert _reflow(tmp_path, "two", 0, 1, "--student-steps", "2") == 0  # distilled to its 2-step sampler
    assert velodiff.load(tmp_path / "two-student").default_steps == 2
    assert _reflow(tmp_path, "no-distill", 1, 0) == 0  # no distillation phase: the reflow student, 2 steps
    assert velodiff.load(tmp_path / "no-distill-student").default_steps == 2
    assert (tmp_path / "no-distill-student" / "MODEL_CARD.md").read_text().startswith("# 2-rectified flow")


def test_bad_input_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "notamodel").mkdir()
    code = _reflow(tmp_path, "bad", 1, 1, "--teacher", str(tmp_path / "notamodel"))
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "not a diffusers model folder" in err
    import shutil

    from velodiff.default_model import default_model_path

    shutil.copytree(default_model_path(), tmp_path / "rf-student-2steps")  # an earlier run's 2-step student
    code = _reflow(tmp_path, "rf", 1, 1, "--init", str(tmp_path / "rf-student-2steps"))
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "writes" in err and "which the student is made" in err
    code = _reflow(tmp_path, "bad2", 1, 1, "--pairs", "0")
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "--pairs" in err


# --- review22: the straightness value, the pair cache's key, one reflow step --------------------------


def test_straightness_of_a_path_that_turns_once_is_its_closed_form() -> None:
    """x0 = A at the first grid time and B after it: in DDIM's coordinates the path runs straight toward A
    for the first step, then straight to B, so with u1 = sbar(t1) / sbar(T) Liu et al.'s S is
    (1 / u1 - 1) |A - B|^2 / d, x0_dev |A - B|^2 / (N d) and one_step_err |A - B|^2 / d."""
    sched = _sched()
    g = torch.Generator().manual_seed(0)
    x, A, B = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    for n in (2, 5):
        grid = student_grid(sched, n).float()
        t_first = float(grid[0])
        r = straightness(lambda x_, t, t_first=t_first: A if float(t[0]) == t_first else B, x, grid, sched)
        sbar = [float(sched.sigma(grid[i]) / sched.alpha(grid[i])) for i in (0, 1)]
        u1 = sbar[1] / sbar[0]
        dist = float((A - B).pow(2).flatten(1).mean(1).mean())
        assert r["S"] == pytest.approx((1 / u1 - 1) * dist, rel=1e-4)
        assert r["x0_dev"] == pytest.approx(dist / n, rel=1e-4)
        assert r["one_step_err"] == pytest.approx(dist, rel=1e-4)
        torch.testing.assert_close(r["out"], B)


def test_pairs_of_another_seed_or_teacher_plan_are_another_cache(tmp_path) -> None:
    """What a chunk holds depends on the teacher, its plan and the noise seed, not on how many pairs the
    cache has: another seed is refused, more pairs extend it."""
    from velodiff.distill.reflow import PairConfig, _pair_meta

    base = _pair_meta(tmp_path, PairConfig())
    assert _pair_meta(tmp_path, PairConfig(pairs=9, eval_pairs=3)) == base
    for changed in (dict(seed=1), dict(data_seed=1), dict(solver="ddim"), dict(steps=3), dict(guidance=1.0),
                    dict(plan="cfg:scale=2")):
        assert _pair_meta(tmp_path, PairConfig(**changed)) != base, changed
    PairCache(tmp_path / "p", base, 1)
    with pytest.raises(VelodiffError, match=r"other settings \(seed\)"):
        PairCache(tmp_path / "p", _pair_meta(tmp_path, PairConfig(seed=1)), 1)


def test_one_reflow_step_regresses_on_the_coupled_interpolation(tmp_path, monkeypatch) -> None:
    """The reflow phase feeds the student x_t = alpha_t x + sigma_t z of its batch's pair (z noise, x the
    teacher's sample) and weighs the x0 error by max(snr, 1)."""
    import velodiff.distill.reflow as rf
    from velodiff.train.loop import LoopConfig, step_generator
    from velodiff.train.trainer import batch_indices

    seen: dict = {"fed": []}
    real_x0, real_loop, real_pairs = rf.make_x0_fn, rf.run_loop, rf.make_pairs

    def x0_spied(unet, sched, ctx, uctx, w):
        fn = real_x0(unet, sched, ctx, uctx, w)
        return lambda x, t: (seen["fed"].append((unet, x.detach().clone(), t.clone())), fn(x, t))[1]

    def loop_spied(run, cfg, modules, step_fn, **kw):
        def wrapped(step, gen):
            seen["fed"].clear()
            loss, logs = step_fn(step, gen)
            seen.update(loss=float(loss.detach()), mse=float(logs["mse"]), student=modules["unet"],
                        step_fed=list(seen["fed"]))
            return loss, logs

        return real_loop(run, cfg, modules, wrapped, **kw)

    def pairs_spied(*args, **kwargs):
        seen["pairs"] = real_pairs(*args, **kwargs)
        return seen["pairs"]

    monkeypatch.setattr(rf, "make_x0_fn", x0_spied)
    monkeypatch.setattr(rf, "run_loop", loop_spied)
    monkeypatch.setattr(rf, "make_pairs", pairs_spied)
    cfg = LoopConfig(steps=1, lr=1e-5, warmup=1, seed=3)
    pcfg = rf.PairConfig(pairs=3, eval_pairs=1, steps=2)
    rcfg = rf.ReflowConfig(reflow_steps=1, distill_steps=0, batch=1, ode_steps=2)
    import velodiff
    from velodiff.distill.teacher import teacher_folder
    from velodiff.train.trainer import tokenize

    tok = velodiff.load("default").components["tokenizer"]

    def fake_pairs(a: int, b: int) -> dict[str, torch.Tensor]:  # (the teacher's would take a minute)
        g = torch.Generator().manual_seed(a)
        z, x = torch.randn(b - a, 4, 16, 16, generator=g), 0.5 * torch.randn(b - a, 4, 16, 16, generator=g)
        return {"z": z, "x": x, "ids": tokenize(tok, ["a red circle"] * (b - a)), "index": torch.arange(a, b)}

    PairCache(tmp_path / "run" / "pairs", rf._pair_meta(teacher_folder("default"), pcfg), 4).fill(fake_pairs)
    rf.distill_reflow("default", None, tmp_path / "s", tmp_path / "run", cfg, pcfg, rcfg, quiet=True)
    ((unet, fed, t),) = [f for f in seen["step_fed"] if f[0] is seen["student"]]
    i = int(batch_indices(0, 1, 3, 3)[0])
    z, x = seen["pairs"]["z"][i : i + 1], seen["pairs"]["x"][i : i + 1]
    sched = velodiff_load_schedule()
    a, s = sched.alpha(t).float().view(-1, 1, 1, 1), sched.sigma(t).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(fed, a * x + s * z, rtol=1e-5, atol=1e-5)
    assert float(t[0]) == pytest.approx(sched.t_min + (1 - sched.t_min) * (1 - float(
        torch.rand(1, generator=step_generator(3, 0))[0])), rel=1e-6)
    snr = float(a.flatten()[0] / s.flatten()[0]) ** 2
    assert seen["loss"] == pytest.approx(max(snr, 1.0) * seen["mse"], rel=1e-4)


def velodiff_load_schedule():
    import velodiff

    return velodiff.load("default").schedule


def test_the_teachers_scale_is_the_one_the_pairs_are_sampled_with():
    """A plan's own scale (cfg:scale=4, guidance=5) is what text2img samples the pairs with, so it is also
    what reflow's straightness and DMD's real score guide with (they took --guidance or 2.5)."""
    from types import SimpleNamespace

    from velodiff.distill.reflow import PairConfig, pairs_guidance

    teacher = SimpleNamespace(default_guidance=2.5)
    assert pairs_guidance(PairConfig(), teacher) == 2.5
    assert pairs_guidance(PairConfig(guidance=3.0), teacher) == 3.0
    assert pairs_guidance(PairConfig(plan="cfg:scale=4"), teacher) == 4.0
    assert pairs_guidance(PairConfig(plan="guidance=5+ag", guidance=3.0), teacher) == 5.0
