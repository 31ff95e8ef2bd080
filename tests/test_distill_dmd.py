"""DMD: the distribution-matching gradient moves a generator's distribution onto the real one (exact
Gaussian scores), a killed run resumes bit-exactly, the student samples with its trained steps, bad
input is one line."""

from __future__ import annotations

import csv

import torch

from velodiff.cli import main
from velodiff.distill.dmd import dm_gradient, dm_loss
from velodiff.schedules import DiscreteVP

torch.set_num_threads(1)


def _sched() -> DiscreteVP:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteVP(betas=betas)


def test_dm_gradient_pulls_the_generator_onto_the_real_distribution() -> None:
    """Data N(m, v) per coordinate has the exact denoiser E[x0 | x_t] = m + a v (x_t - a m) / (a^2 v + s^2).
    A generator x = mu + z (unit variance) whose fake score is its own exact denoiser, trained only by the
    DMD gradient against a real N(2, 1), must end at mu = 2 from either side; with fake = real it stays."""
    sched = _sched()
    gen = torch.Generator().manual_seed(0)

    def denoiser(m: torch.Tensor, xt: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return m + a * (xt - a * m) / (a * a + s * s)

    real_m = torch.tensor(2.0)
    for start in (-1.0, 4.0):
        mu = torch.tensor(start, requires_grad=True)
        opt = torch.optim.SGD([mu], lr=0.2)
        for _ in range(400):
            x = mu + torch.randn(256, 1, 1, 1, generator=gen)
            t = 0.02 + 0.96 * torch.rand(256, generator=gen)
            a = sched.alpha(t).float().view(-1, 1, 1, 1)
            s = sched.sigma(t).float().view(-1, 1, 1, 1)
            xt = a * x.detach() + s * torch.randn(x.shape, generator=gen)
            grad = dm_gradient(x.detach(), denoiser(real_m, xt, a, s), denoiser(mu.detach(), xt, a, s))
            opt.zero_grad()
            dm_loss(x, grad).backward()
            opt.step()
        assert abs(float(mu) - 2.0) < 0.15, (start, float(mu))
    x = torch.randn(4, 2, 3, 3, generator=gen)
    same = torch.randn(4, 2, 3, 3, generator=gen)
    assert float(dm_gradient(x, same, same).abs().max()) == 0.0  # matched distributions: no push


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _dmd(tmp_path, run: str, steps: int, *extra: str) -> int:
    return _main(
        [
            "distill", "dmd", "--out", str(tmp_path / f"{run}-student"), "--run", str(tmp_path / run),
            "--pairs", "2", "--eval-pairs", "1", "--teacher-steps", "2", "--steps", str(steps),
            "--batch", "2", "--checkpoint-every", "1", "--device", "cpu", "--quiet", *extra,
        ]
    )


def _unet_state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_killed_run_resumes_bit_exactly_and_the_student_keeps_its_steps(tmp_path) -> None:
    assert _dmd(tmp_path, "full", 2, "--student-steps", "2") == 0
    assert _dmd(tmp_path, "split", 1, "--student-steps", "2") == 0  # "killed" after one step
    assert _dmd(tmp_path, "split", 2, "--student-steps", "2") == 0
    a, b = _unet_state(tmp_path / "full-student"), _unet_state(tmp_path / "split-student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [list(csv.reader((tmp_path / r / "dmd" / "loss.csv").open()))[1:] for r in ("full", "split")]
    assert [r[1] for r in rows[0]] == [r[1] for r in rows[1]]
    import velodiff

    model = velodiff.load(tmp_path / "full-student")
    assert (model.default_solver, model.default_steps, model.default_guidance) == ("ddim", 2, 1.0)


def test_bad_input_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "notamodel").mkdir()
    code = _dmd(tmp_path, "bad", 1, "--init", str(tmp_path / "notamodel"))
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "not a diffusers model folder" in err
    code = _dmd(tmp_path, "guided", 1, "--init", "default-guided")  # refused before any pair is made
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("error: --init ")
    assert "guidance-distilled" in err
    assert not (tmp_path / "guided" / "pairs").exists()
    code = _dmd(tmp_path, "bad2", 1, "--pairs", "0")
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "--pairs" in err
    code = _dmd(tmp_path, "bad3", 1, "--eval-pairs", "-1")  # named as itself, not as --pairs
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "--eval-pairs" in err


def test_two_time_scale_rule_updates_the_generator_every_nth_step(tmp_path) -> None:
    """--fake-updates 3: step 0 updates G (and the fake score), steps 1-2 the fake score alone, so G
    after 3 steps is G after 1; with the plain rule it moves on."""
    assert _dmd(tmp_path, "one", 1, "--fake-updates", "3") == 0
    assert _dmd(tmp_path, "ttur", 3, "--fake-updates", "3") == 0
    assert _dmd(tmp_path, "plain", 3) == 0
    one, ttur, plain = (_unet_state(tmp_path / f"{r}-student") for r in ("one", "ttur", "plain"))
    assert all(torch.equal(one[k], ttur[k]) for k in one)
    assert any(not torch.equal(one[k], plain[k]) for k in one)
    logs = [row[-1] for row in list(csv.reader((tmp_path / "ttur" / "dmd" / "loss.csv").open()))[1:]]
    assert '"dm": 0.0' in logs[1] and '"dm": 0.0' not in logs[0]


class _ToyUNet(torch.nn.Module):
    """A UNet-shaped toy: down conv, mid block, up conv; ``forward(x, k, ctx).sample``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.mid_block = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up = torch.nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, k, ctx):
        from types import SimpleNamespace

        h = self.mid_block(torch.tanh(self.down(x) + ctx.mean() + k.view(-1, 1, 1, 1) / 1000))
        return SimpleNamespace(sample=self.up(h))


def test_gan_terms_train_the_generator_through_its_sample_and_the_discriminator_apart() -> None:
    """DMD2's GAN: the generator's term moves only the sample x, by exactly the gradient of
    softplus(-D(alpha x + sigma eps)); the discriminator's term trains the network and its head, never x;
    the up blocks are not run."""
    from velodiff.distill.dmd import DiscriminatorHead, bottleneck_logits, gan_losses

    sched, gen = _sched(), torch.Generator().manual_seed(0)
    unet, head = _ToyUNet(), DiscriminatorHead(8)
    b = 3
    x = torch.randn(b, 2, 4, 4, generator=gen, requires_grad=True)
    real = torch.randn(b, 2, 4, 4, generator=gen)
    ctx, real_ctx = torch.randn(b, 5, 6, generator=gen), torch.randn(b, 5, 6, generator=gen)
    t = 0.1 + 0.8 * torch.rand(2 * b, generator=gen)
    eps = torch.randn(2 * b, 2, 4, 4, generator=gen)
    g_gan, d_loss = gan_losses(unet, head, sched, x, ctx, real, real_ctx, t, eps, True)
    g_gan.backward()
    assert all(p.grad is None for p in [*unet.parameters(), *head.parameters()])
    a = sched.alpha(t[b:]).float().view(-1, 1, 1, 1)
    s = sched.sigma(t[b:]).float().view(-1, 1, 1, 1)
    x2 = x.detach().clone().requires_grad_(True)
    logits = bottleneck_logits(unet, head, a * x2 + s * eps[b:], t[b:], ctx, sched)
    direct = torch.nn.functional.softplus(-logits)
    direct.mean().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and float(x.grad.abs().max()) > 0
    assert abs(float(g_gan.detach()) - float(direct.mean().detach())) < 1e-6
    x.grad = None
    d_loss.backward()
    assert x.grad is None
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in head.parameters())
    assert unet.down.weight.grad is not None and unet.up.weight.grad is None  # the up blocks never ran
    g_off, _ = gan_losses(unet, head, sched, x.detach(), ctx, real, real_ctx, t, eps, False)
    assert torch.equal(g_off, torch.zeros(()))  # not a generator step: no generator term


def test_gan_run_resumes_bit_exactly(tmp_path) -> None:
    gan = ("--student-steps", "2", "--gan-weight", "0.01", "--real-images", "4")
    assert _dmd(tmp_path, "full", 2, *gan) == 0
    assert _dmd(tmp_path, "split", 1, *gan) == 0
    assert _dmd(tmp_path, "split", 2, *gan) == 0
    a, b = _unet_state(tmp_path / "full-student"), _unet_state(tmp_path / "split-student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [row[-1] for row in list(csv.reader((tmp_path / "full" / "dmd" / "loss.csv").open()))[1:]]
    assert all('"gan":' in r and '"disc":' in r for r in logs)


# --- review22: the gradient's normalisation, one DMD step's three losses -----------------------------


def test_dm_gradient_is_the_score_difference_normalised_per_sample() -> None:
    """(fake - real) / mean|x - real| with the mean over each sample's own elements (DMD Eq. 8)."""
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    x[1] = real[1] + 10 * (x[1] - real[1])  # one sample far from the real estimate
    norm = (x - real).abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    torch.testing.assert_close(dm_gradient(x, real, fake), (fake - real) / norm)
    x.requires_grad_(True)
    grad = dm_gradient(x.detach(), real, fake)
    dm_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())


def _dmd_step(tmp_path, monkeypatch, name: str, **dmd) -> dict:
    """One distill_dmd step (fake pairs, batch 2, one student step): every x0 call, the loss, its logs."""
    import velodiff
    import velodiff.distill.dmd as dm
    from velodiff.distill.reflow import PairCache, PairConfig, _pair_meta
    from velodiff.distill.teacher import teacher_folder
    from velodiff.train.loop import LoopConfig
    from velodiff.train.trainer import tokenize

    seen: dict = {"x0": []}
    real_x0, real_loop = dm.make_x0_fn, dm.run_loop

    def x0_spied(unet, sched, ctx, uctx, w):
        fn = real_x0(unet, sched, ctx, uctx, w)

        def f(x, t):
            out = fn(x, t)
            seen["x0"].append({"unet": unet, "guided": uctx is not None, "w": w, "t": t, "out": out.detach()})
            return out

        return f

    def loop_spied(run, cfg, modules, step_fn, **kw):
        seen["cfg"], seen["modules"] = cfg, modules

        def wrapped(step, gen):
            loss, logs = step_fn(step, gen)
            seen.update(loss=float(loss.detach()), logs={k: float(v) for k, v in logs.items()})
            return loss, logs

        return real_loop(run, cfg, modules, wrapped, **kw)

    monkeypatch.setattr(dm, "make_x0_fn", x0_spied)
    monkeypatch.setattr(dm, "run_loop", loop_spied)
    tok = velodiff.load("default").components["tokenizer"]

    def fake_pairs(a: int, b: int) -> dict[str, torch.Tensor]:  # (the teacher's would take a minute)
        g = torch.Generator().manual_seed(a)
        z, x = torch.randn(b - a, 4, 16, 16, generator=g), 0.5 * torch.randn(b - a, 4, 16, 16, generator=g)
        return {"z": z, "x": x, "ids": tokenize(tok, ["a red circle"] * (b - a)), "index": torch.arange(a, b)}

    pcfg = PairConfig(pairs=2, eval_pairs=1, steps=2)
    run = tmp_path / name
    PairCache(run / "pairs", _pair_meta(teacher_folder("default"), pcfg), 3).fill(fake_pairs)
    dcfg = dm.DMDConfig(steps=1, batch=2, **dmd)
    dm.distill_dmd("default", None, tmp_path / f"{name}-s", run, LoopConfig(steps=1, lr=1e-5, warmup=1), pcfg,
                   dcfg, quiet=True)
    return seen


def test_one_dmd_step_sums_its_three_losses_as_documented(tmp_path, monkeypatch) -> None:
    """The fake score starts as the teacher: with the real score unguided (--real-guidance 1) the first
    distribution-matching loss is 0, with CFG (the pairs' 2.5) it is not. The loss is dm + regression_weight
    reg + fake, the fake score's term max(snr, 1) |mu_fake(x_t') - x|^2 on G's sample; each network's
    gradient is clipped on its own; with --ema the student written is the EMA."""
    import pytest
    from safetensors.torch import load_file

    same = _dmd_step(tmp_path, monkeypatch, "same", real_guidance=1.0)
    assert same["logs"]["dm"] == 0.0
    seen = _dmd_step(tmp_path, monkeypatch, "cfg", regression_weight=0.25, ema=0.5)
    logs = seen["logs"]
    assert logs["dm"] > 0 and logs["reg"] > 0 and logs["fake"] > 0
    assert seen["loss"] == pytest.approx(logs["dm"] + 0.25 * logs["reg"] + logs["fake"], rel=1e-5)
    student, fake = seen["modules"]["unet"], seen["modules"]["fake"]
    calls = seen["x0"][:4]
    assert [c["unet"] is student for c in calls] == [True, False, False, False]
    assert calls[1]["guided"] and calls[1]["w"] == 2.5 and calls[1]["unet"] is not fake
    assert [c["unet"] is fake and not c["guided"] for c in calls[2:]] == [True, True]
    x, last = calls[0]["out"], calls[3]
    sched = _sched()
    t2 = last["t"].double()
    snr = (sched.alpha(t2) / sched.sigma(t2)).pow(2).clamp_min(1.0).float()
    want = (snr * (last["out"] - x).pow(2).mean(dim=(1, 2, 3))).mean()
    assert logs["fake"] == pytest.approx(float(want), rel=1e-4)
    assert seen["cfg"].clip_per_module
    ema = load_file(str(tmp_path / "cfg" / "dmd" / "step-0000001" / "state.safetensors"))
    written = _unet_state(tmp_path / "cfg-s")
    assert all(torch.equal(v, ema[f"ema.unet.{k}"]) for k, v in written.items())
    assert any(not torch.equal(v, ema[f"model.unet.{k}"]) for k, v in written.items())
