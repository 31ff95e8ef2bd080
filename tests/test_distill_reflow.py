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
