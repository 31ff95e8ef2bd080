"""Progressive distillation: the target is two teacher DDIM steps in one, runs resume bit-exactly, the
student is a loadable folder with its own sampling defaults, bad input is one line."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from velodiff.cli import main
from velodiff.distill.progressive import ddim_step, student_grid, student_target, teacher_two_steps
from velodiff.schedules import DiscreteVP

torch.set_num_threads(1)


def _sched() -> DiscreteVP:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteVP(betas=betas)


@pytest.mark.parametrize("last", [False, True])
def test_one_student_step_with_the_target_equals_two_teacher_steps(last: bool) -> None:
    sched = _sched()
    grid = student_grid(sched, 5).float()
    i = 4 if last else 1  # the last step lands on clean data (sigma = 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g)

    def teacher_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a nonlinear toy teacher
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, weight)) * (1 + 10 * t.view(-1, 1, 1, 1))

    t, t2 = grid[i].expand(3), grid[i + 1].expand(3)
    x2 = teacher_two_steps(teacher_x0, x, t, 0.5 * (t + t2), t2, sched)

    def coef(tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if float(tt[0]) == 0:
            return torch.ones(3, 1, 1, 1), torch.zeros(3, 1, 1, 1)
        return sched.alpha(tt).float().view(-1, 1, 1, 1), sched.sigma(tt).float().view(-1, 1, 1, 1)

    a, s = coef(t)
    a2, s2 = coef(t2)
    target = student_target(x, x2, a, s, a2, s2)
    one = ddim_step(x, target, a, s, a2, s2)
    torch.testing.assert_close(one, x2, rtol=1e-4, atol=1e-4)
    # and a single teacher step does not reach the same point (the test can fail)
    single = ddim_step(x, teacher_x0(x, t), a, s, a2, s2)
    assert (single - x2).abs().max() > 1e-2


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # typer's standalone mode exits after a successful command
        return int(e.code or 0)


def _distill(tmp_path, run: str, steps: int, *extra: str) -> int:
    return _main(
        [
            "distill",
            "progressive",
            "--out",
            str(tmp_path / f"{run}-student"),
            "--run",
            str(tmp_path / run),
            "--teacher-steps",
            "4",
            "--rounds",
            "1",
            "--steps",
            str(steps),
            "--batch",
            "2",
            "--cache-size",
            "4",
            "--checkpoint-every",
            "1",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ]
    )


def _unet_state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _losses(run) -> list[str]:
    return [r[1] for r in csv.reader((run / "round-0" / "loss.csv").open())][1:]


def test_resumed_run_is_bit_identical_and_student_carries_its_defaults(tmp_path, capsys) -> None:
    assert _distill(tmp_path, "full", 3) == 0
    assert _distill(tmp_path, "split", 1) == 0  # "killed" after one step, then rerun
    assert _distill(tmp_path, "split", 3) == 0
    a, b = _unet_state(tmp_path / "full-student"), _unet_state(tmp_path / "split-student")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    assert len(_losses(tmp_path / "full")) == 3
    # resumed with settings that change what it learns: refused (it went on with the loss x 2000)
    for changed, line in ((["--guidance", "4"], "guidance=2.5, not 4.0"),
                          (["--batch", "3"], "batch=2, not 3"),
                          (["--teacher", "default-4step"], "teacher='default', not 'default-4step'")):
        capsys.readouterr()
        assert _distill(tmp_path, "split", 4, *changed) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and line in err and "use a new --run folder" in err, err
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")  # nothing trained, nothing lost
    src = tmp_path / "teacher-copy"
    import shutil

    from velodiff.default_model import default_model_path

    shutil.copytree(default_model_path(), src)
    capsys.readouterr()
    assert _main(["distill", "progressive", "--teacher", str(src), "--out", str(src), "--run",
                  str(tmp_path / "r2"), "--steps", "1", "--rounds", "1", "--teacher-steps", "4"]) == 2
    assert "which the student is made from" in capsys.readouterr().err

    import velodiff
    from velodiff.shipped import shipped_path

    teacher = _unet_state(shipped_path("default"))
    assert any(not torch.equal(a[k], teacher[k].float()) for k in a)  # trained away from the teacher
    model = velodiff.load(tmp_path / "full-student")
    assert (model.default_solver, model.default_steps, model.default_guidance) == ("ddim", 2, 1.0)
    assert json.loads((tmp_path / "full-student" / "sampling.json").read_text())["steps"] == 2

    # the guidance is folded in: sampling with the student's own defaults is one pass per step
    from velodiff.pipelines import text2img

    rows: list[int] = []
    hook = model.components["unet"].register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*distilled for")  # its own steps: no warning
        res = text2img(model, "a red circle", seeds=[0])
    hook.remove()
    assert res.steps == 2 and res.evals == 2 and sum(rows) == 2
    with pytest.warns(UserWarning, match="distilled for 2 steps"):
        text2img(model, "a red circle", seeds=[0], steps=4)  # more steps than it supports: warn, run
    with pytest.warns(UserWarning, match="has guidance distilled in .* guidance 5 adds classifier-free"):
        assert text2img(model, "a red circle", seeds=[0], guidance=5).evals == 4  # CFG on top: said


def test_a_round_resumes_only_from_the_student_it_was_trained_from(tmp_path, capsys) -> None:
    """Lengthening a finished two-round run trains round 0 further; round 1, trained from the old round-0
    student, is then refused in one line (not resumed against a teacher it never saw), and runs again
    once its folder is deleted. A rerun of the same length resumes."""
    import shutil

    assert _distill(tmp_path, "two", 1, "--rounds", "2") == 0
    assert _distill(tmp_path, "two", 1, "--rounds", "2") == 0  # the same run again: resumed, nothing new
    capsys.readouterr()
    assert _distill(tmp_path, "two", 2, "--rounds", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "round-1 was trained from other weights" in err, err
    shutil.rmtree(tmp_path / "two" / "round-1")
    assert _distill(tmp_path, "two", 2, "--rounds", "2") == 0
    assert _distill(tmp_path, "fresh", 2, "--rounds", "2") == 0
    a, b = _unet_state(tmp_path / "two-student"), _unet_state(tmp_path / "fresh-student")
    assert all(torch.equal(a[k], b[k]) for k in a)  # as a run of that length from the start


def test_a_spent_time_budget_says_how_to_go_on(tmp_path, capsys) -> None:
    """--max-minutes counts the training time over every resume: the same command would stop again at
    once, so the line says to raise it."""
    capsys.readouterr()
    assert _distill(tmp_path, "mm", 50, "--max-minutes", "0.0001") == 0
    assert "rerun with a larger --max-minutes" in capsys.readouterr().out


def test_bad_teacher_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "notamodel").mkdir()
    code = _distill(tmp_path, "bad", 1, "--teacher", str(tmp_path / "notamodel"))
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "not a diffusers model folder" in err
    # a teacher the trainers would misread (they take the UNet's output for a velocity): refused
    import shutil

    from velodiff.default_model import default_model_path

    eps = tmp_path / "eps-teacher"
    shutil.copytree(default_model_path(), eps)
    config = eps / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"v_prediction"', '"epsilon"'))
    assert _distill(tmp_path, "eps", 1, "--teacher", str(eps)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a sd1 model predicting epsilon" in err
    import sd_tiny

    xl = sd_tiny.save_sd(tmp_path / "xl", "sdxl")
    assert _distill(tmp_path, "xl", 1, "--teacher", str(xl)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a sdxl model" in err, err
    assert _distill(tmp_path, "guided", 1, "--teacher", "default-guided") != 0  # its w input: not given
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is guidance-distilled" in err, err


def test_steps_that_cannot_be_halved_are_refused(tmp_path, capsys) -> None:
    code = _main(
        [
            "distill",
            "progressive",
            "--out",
            str(tmp_path / "s"),
            "--run",
            str(tmp_path / "r"),
            "--teacher-steps",
            "6",
            "--rounds",
            "2",
            "--quiet",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "--teacher-steps 6 must be a multiple of 4 (2**rounds: each of the 2 rounds" in err
    assert err.rstrip().endswith("try 4 or 8")


@pytest.mark.parametrize("method", ["progressive", "guided", "lcm", "reflow", "dmd", "prune"])
def test_a_run_folder_that_is_a_file_or_the_out_folder_is_refused(tmp_path, capsys, method) -> None:
    """Every distillation checks --run before any work: a file, or the --out folder (writing the student
    would replace the run's checkpoints), gets one line and nothing is written."""
    (tmp_path / "in.png").write_bytes(b"not a folder")
    for run, out, says in ((tmp_path / "in.png", tmp_path / "s", "is a file"),
                           (tmp_path / "same", tmp_path / "same", "one folder")):
        code = _main(["distill", method, "--out", str(out), "--run", str(run), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1 and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


# --- review22: what one training step of each round computes -----------------------------------------


def test_each_round_learns_two_steps_of_its_own_teacher_in_one(tmp_path, monkeypatch) -> None:
    """Per step of round r (student of n steps): t, the midpoint and t'' are consecutive points of the
    teacher's 2n-step trailing grid, t on the student's grid; the first round's teacher is guided at
    --guidance, the second is the first round's student at guidance 1; one student DDIM step with the
    target lands on the teacher's two-step result (at t'' = 0: on it exactly); the loss is the
    max(snr, 1)-weighted MSE."""
    import velodiff
    import velodiff.distill.run as pd
    from velodiff.train.checkpoint import weights_digest
    from velodiff.train.loop import LoopConfig

    calls: list[dict] = []
    real_two, real_target, real_x0 = pd.teacher_two_steps, pd.student_target, pd.make_x0_fn
    real_loop = pd.run_loop

    def two_spied(teacher_x0, x, t, tm, t2, sched):
        x2 = real_two(teacher_x0, x, t, tm, t2, sched)
        calls.append({"x": x, "t": t, "tm": tm, "t2": t2, "x2": x2})
        return x2

    def target_spied(x, x2, a, s, a2, s2):
        calls[-1]["target"] = real_target(x, x2, a, s, a2, s2)
        return calls[-1]["target"]

    def x0_spied(unet, sched, ctx, uctx, w):
        if uctx is not None:
            calls.append({"teacher": unet, "w": w})
        return real_x0(unet, sched, ctx, uctx, w)

    def loop_spied(run, cfg, modules, step_fn, **kw):
        def wrapped(step, gen):
            loss, logs = step_fn(step, gen)
            calls.append({"loss": float(loss.detach()), "mse": float(logs["mse"]),
                          "student": modules["unet"]})
            return loss, logs

        return real_loop(run, cfg, modules, wrapped, **kw)

    monkeypatch.setattr(pd, "teacher_two_steps", two_spied)
    monkeypatch.setattr(pd, "student_target", target_spied)
    monkeypatch.setattr(pd, "make_x0_fn", x0_spied)
    monkeypatch.setattr(pd, "run_loop", loop_spied)
    cfg = LoopConfig(steps=1, lr=1e-5, warmup=1, checkpoint_every=1)
    pcfg = pd.ProgressiveConfig(teacher_steps=4, rounds=2, guidance=2.5, batch=1, cache_size=2)
    pd.distill_progressive("default", tmp_path / "s", tmp_path / "run", cfg, pcfg, quiet=True)
    guided, steps, losses = calls[0::3], calls[1::3], calls[2::3]
    assert len(guided) == len(steps) == len(losses) == 2
    sched = velodiff.load("default").schedule

    def coef(tt):
        if float(tt) == 0:
            return torch.ones(()), torch.zeros(())
        return sched.alpha(tt).float(), sched.sigma(tt).float()

    for r, (g, st, lo) in enumerate(zip(guided, steps, losses, strict=True)):
        n = 2 // 2**r
        fine = student_grid(sched, 2 * n).float()
        i = int(torch.nonzero(torch.isclose(fine, st["t"][0])).flatten()[0])
        assert i % 2 == 0 and i + 2 < len(fine) + 1
        torch.testing.assert_close(torch.stack([st["t"][0], st["tm"][0], st["t2"][0]]), fine[i : i + 3])
        (a, s), (a2, s2) = coef(st["t"][0]), coef(st["t2"][0])
        landed = ddim_step(st["x"], st["target"], a, s, a2, s2)
        torch.testing.assert_close(landed, st["x2"], rtol=1e-4, atol=1e-4)
        assert lo["loss"] == pytest.approx(max(float(a / s) ** 2, 1.0) * lo["mse"], rel=1e-4)
        assert g["w"] == (2.5 if r == 0 else 1.0)
    assert float(steps[1]["t2"][0]) == 0.0  # the second round's one step ends on clean data
    assert guided[1]["teacher"] is losses[0]["student"]  # round 1 is taught by round 0's student
    assert weights_digest(guided[1]["teacher"]) != weights_digest(guided[0]["teacher"])


def test_the_students_written_beside_out_are_checked_before_any_work(tmp_path, capsys) -> None:
    """--teacher-steps 20 --rounds 3 writes the 10- and 5-step students beside --out (OUT-10steps,
    OUT-5steps): a folder of the user's own files under one of those names is refused in one line before
    any work, and nothing is written."""
    mine = tmp_path / "s-5steps"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code = _main(["distill", "progressive", "--out", str(tmp_path / "s"), "--run", str(tmp_path / "r"),
                  "--teacher-steps", "20", "--rounds", "3", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "s-5steps" in err and "not a model" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-5steps"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_out_named_another_way_than_the_teacher_is_the_teacher(tmp_path, capsys, monkeypatch) -> None:
    """--out spelled relative to the current folder, --teacher the same folder spelled absolute: the student
    would replace the teacher it is made from, refused in one line before any work, the teacher untouched."""
    from velodiff.shipped import shipped_path

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for p in shipped_path("default").iterdir():
        (teacher / p.name).symlink_to(p.resolve(), target_is_directory=p.is_dir())
    before = sorted(p.name for p in teacher.iterdir())
    monkeypatch.chdir(tmp_path)
    code = _main(["distill", "progressive", "--teacher", str(teacher), "--out", "teacher", "--run", "r",
                  "--teacher-steps", "4", "--rounds", "1", "--steps", "1", "--batch", "1",
                  "--cache-size", "1", "--quiet"])  # a run that would be short, were it not refused
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "which the student is made from" in err, err
    assert sorted(p.name for p in teacher.iterdir()) == before and not (tmp_path / "r").exists()
