"""Guided distillation (Meng et al. 2023): the student takes the guidance scale as an input (diffusers'
``time_cond_proj_dim``, embedded as diffusers' LCM pipeline does), starts as the teacher's conditional
model, samples in one pass per step at its embedded scale, runs resume bit-exactly, bad input is one line."""

from __future__ import annotations

import csv

import pytest
import torch

import velodiff
from velodiff.cli import main
from velodiff.distill.guided import EMBEDDING_DIM, guided_student, student_cond
from velodiff.distill.teacher import save_student
from velodiff.models.base import guidance_embedding
from velodiff.pipelines import text2img
from velodiff.shipped import shipped_path

torch.set_num_threads(1)


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_guidance_embedding_is_diffusers_lcm_embedding() -> None:
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.5])
    for dim in (256, 33):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref, rtol=1e-6, atol=1e-5)


def test_the_student_starts_as_the_teachers_conditional_model_and_samples_in_one_pass(tmp_path) -> None:
    teacher = velodiff.load("default")
    unet = teacher.components["unet"]
    student = guided_student(unet).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
    )
    k = torch.tensor([500.0, 900.0])
    with torch.no_grad():
        ref = unet(x, k, ctx).sample
        for w in (1.0, 4.0):
            out = student(x, k, ctx, timestep_cond=student_cond(torch.full((2,), w))).sample
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.05)  # as if trained
    sampling = {"solver": "ddim", "steps": 3, "guidance": 1.0, "embedded_guidance": 2.5}
    folder = save_student(shipped_path("default"), student, tmp_path / "guided", sampling, "# test\n")
    model = velodiff.load(folder)
    assert model.takes_embedded_guidance and model.embedded_guidance == 2.5
    rows: list[int] = []
    hook = model.components["unet"].register_forward_hook(
        lambda m, a, kw, out: rows.append(len(a[0])), with_kwargs=True
    )
    a = text2img(model, "a red circle", seeds=[0], output="latent")
    hook.remove()
    assert a.evals == 3 and sum(rows) == 3  # one pass per step
    model.embedded_guidance = 4.0
    b = text2img(model, "a red circle", seeds=[0], output="latent")
    assert (a.latents - b.latents).abs().max() > 1e-3  # the scale is an input


def test_embedded_guidance_on_a_model_without_that_input_is_one_line(tmp_path, capsys) -> None:
    code = _main(["generate", "a red circle", "--out", str(tmp_path / "a.png"), "--embedded-guidance", "3"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "has no guidance input" in err
    assert not (tmp_path / "a.png").exists()


def _distill(tmp_path, run: str, steps: int, *extra: str) -> int:
    args = ["distill", "guided", "--out", str(tmp_path / f"{run}-student"), "--run", str(tmp_path / run)]
    args += ["--steps", str(steps), "--batch", "2", "--cache-size", "4", "--checkpoint-every", "1"]
    return _main([*args, "--device", "cpu", "--quiet", *extra])


def test_resumed_run_is_bit_identical(tmp_path) -> None:
    from safetensors.torch import load_file

    assert _distill(tmp_path, "full", 3) == 0
    assert _distill(tmp_path, "split", 1) == 0
    assert _distill(tmp_path, "split", 3) == 0
    a, b = (
        load_file(str(tmp_path / f"{r}-student/unet/diffusion_pytorch_model.safetensors"))
        for r in ("full", "split")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["time_embedding.cond_proj.weight"].shape == (
        a["time_embedding.linear_1.weight"].shape[1],
        EMBEDDING_DIM,
    )
    assert a["time_embedding.cond_proj.weight"].abs().max() > 0  # the guidance input learned
    losses = [[r[1] for r in csv.reader((tmp_path / r / "loss.csv").open())][1:] for r in ("full", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    student = velodiff.load(tmp_path / "full-student")
    assert student.embedded_guidance == 2.5 and student.trained_guidance == (1.0, 4.0)
    from velodiff.pipelines import text2img

    student.embedded_guidance = 12.0  # outside the scales it was trained for: warn, run
    with pytest.warns(UserWarning, match=r"embedded guidance in \[1, 4\]; 12 is outside"):
        text2img(student, "a red circle", steps=1, output="latent")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--w-min", "3", "--w-max", "2"), "--w-min <= --w-max"),
        (("--guidance", "7"), "outside the trained range"),
    ],
)
def test_impossible_settings_are_one_line(tmp_path, capsys, extra, message) -> None:
    code = _distill(tmp_path, "bad", 1, *extra)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err


def test_the_teachers_target_is_the_guided_prediction_the_sampler_uses():
    """What the distillers regress on (``make_x0_fn``: the teacher's classifier-free-guided x0, at one
    scale or one per sample) is the x0 that sampling with CFG at that scale computes."""
    from velodiff.distill.run import make_x0_fn
    from velodiff.pipelines.common import prepare_cond
    from velodiff.sampling import denoise_once

    torch.set_num_threads(1)
    model = velodiff.load("default")
    cond = prepare_cond(model, ["a red circle", "two green crosses"], None, True, 64, 64)
    ctx, uctx = cond.cond["encoder_hidden_states"], cond.uncond["encoder_hidden_states"]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.6, 0.6], dtype=torch.float64)
    unet = model.components["unet"]
    with torch.no_grad():
        for w in (1.0, 2.5, 4.0):
            want = denoise_once(model.denoiser, x, 0.6, cond, f"cfg:scale={w}").x0
            assert torch.allclose(make_x0_fn(unet, model.schedule, ctx, uctx, w)(x, t), want, atol=1e-4)
        per_sample = make_x0_fn(unet, model.schedule, ctx, uctx, torch.tensor([1.5, 4.0]))(x, t)
        for i, w in enumerate((1.5, 4.0)):
            want = denoise_once(model.denoiser, x, 0.6, cond, f"cfg:scale={w}").x0[i]
            assert torch.allclose(per_sample[i], want, atol=1e-4)


# --- review22: the w input the student learns is the one sampling feeds it; one training step ------


def test_the_students_guidance_input_is_the_one_sampling_feeds_it(tmp_path) -> None:
    """student_cond(w), what the student is trained with, is the timestep_cond a loaded guided model's
    UNet gets at embedded guidance w."""
    from velodiff.pipelines.common import prepare_cond

    student = guided_student(velodiff.load("default").components["unet"])
    sampling = {"solver": "ddim", "steps": 3, "guidance": 1.0, "embedded_guidance": 2.5}
    folder = save_student(shipped_path("default"), student, tmp_path / "g", sampling, "# test\n")
    model = velodiff.load(folder)
    for w in (1.5, 3.0):
        model.embedded_guidance = w
        cond = prepare_cond(model, ["a red circle", "a blue square"], None, False, 64, 64)
        torch.testing.assert_close(cond["timestep_cond"].float(), student_cond(torch.tensor([w, w])))


def _guided_step(tmp_path, monkeypatch, name: str, w: float) -> dict:
    """One distill_guided step at batch 1 with w_min = w_max = w: its teacher calls, t, loss and mse."""
    import velodiff.distill.guided as guided
    from velodiff.train.loop import LoopConfig

    seen: dict = {"w": [], "t": []}
    real_x0, real_loop = guided.make_x0_fn, guided.run_loop

    def x0_spied(unet, sched, ctx, uctx, w_):
        seen["w"].append(w_.clone())
        fn = real_x0(unet, sched, ctx, uctx, w_)
        return lambda x, t: (seen["t"].append(t.clone()), fn(x, t))[1]

    def loop_spied(run, cfg, modules, step_fn, **kw):
        def wrapped(step, gen):
            loss, logs = step_fn(step, gen)
            seen.update(loss=float(loss.detach()), mse=float(logs["mse"]))
            return loss, logs

        return real_loop(run, cfg, modules, wrapped, **kw)

    monkeypatch.setattr(guided, "make_x0_fn", x0_spied)
    monkeypatch.setattr(guided, "run_loop", loop_spied)
    gcfg = guided.GuidedConfig(w_min=w, w_max=w, guidance=w, batch=1, cache_size=2)
    guided.distill_guided("default", tmp_path / f"{name}-s", tmp_path / name,
                          LoopConfig(steps=1, lr=1e-5, warmup=1), gcfg, quiet=True)
    return seen


def test_one_guided_step_regresses_the_students_x0_on_the_teachers_guided_x0(tmp_path, monkeypatch) -> None:
    """The student starts as the teacher's conditional model: at w = 1 its first loss is 0; at w = 3 (w
    drawn from [w_min, w_max]) the loss is the max(snr, 1)-weighted MSE of its x0 against the teacher's
    guided x0 at that w."""
    one = _guided_step(tmp_path, monkeypatch, "w1", 1.0)
    assert one["loss"] < 1e-9 and one["mse"] < 1e-9
    three = _guided_step(tmp_path, monkeypatch, "w3", 3.0)
    assert [float(w) for w in three["w"][0]] == [3.0]
    sched = velodiff.load("default").schedule
    t = three["t"][0].double()
    snr = float(sched.alpha(t) / sched.sigma(t)) ** 2
    assert three["mse"] > 1e-6 and three["loss"] == pytest.approx(max(snr, 1.0) * three["mse"], rel=1e-4)
