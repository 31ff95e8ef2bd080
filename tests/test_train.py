"""velodiff's trainer: bit-exact resume, safetensors-only checkpoints, objectives that match the sampler."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from velodiff.errors import VelodiffError
from velodiff.train.checkpoint import latest_checkpoint, load_checkpoint
from velodiff.train.loop import LoopConfig


def _vae_run(path: Path, steps: int) -> None:
    from velodiff.train.autoencoder import train_autoencoder

    cfg = LoopConfig(steps=steps, lr=1e-3, warmup=1, weight_decay=0.0, ema_decay=0.9, checkpoint_every=100)
    train_autoencoder(path, cfg, batch=2, size="micro", quiet=True)


def _ldm_run(path: Path, vae: Path, steps: int, **kw) -> dict:
    from velodiff.train.trainer import LDMConfig, train_ldm

    cfg = LoopConfig(steps=steps, lr=1e-3, warmup=2, ema_decay=0.9, checkpoint_every=100)
    return train_ldm(path, vae, cfg, LDMConfig(batch=3, size="micro", cache_size=5, **kw), quiet=True)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("vae")
    _vae_run(p, 2)
    return p


def _state(run: Path) -> dict[str, torch.Tensor]:
    ck = latest_checkpoint(run)
    assert ck is not None
    return load_file(str(ck / "state.safetensors"))


def test_autoencoder_resume_is_bit_exact(tmp_path, vae_run):
    _vae_run(tmp_path / "a", 1)
    _vae_run(tmp_path / "a", 2)  # resumes at step 1
    a, b = _state(tmp_path / "a"), _state(vae_run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_ldm_resume_is_bit_exact(tmp_path, vae_run, prediction):
    full = tmp_path / "full"
    part = tmp_path / "part"
    s = _ldm_run(full, vae_run, 4, prediction_type=prediction)
    assert s["steps"] == 4 and s["completed"]
    _ldm_run(part, vae_run, 2, prediction_type=prediction)
    _ldm_run(part, vae_run, 4, prediction_type=prediction)
    a, b = _state(full), _state(part)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    # model, EMA and optimizer moments are all in the checkpoint
    assert any(k.startswith("ema.unet.") for k in a) and any(k.startswith("opt.") for k in a)
    # the loss log has one row per logged step, none duplicated by the resume
    rows = (part / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step") and len(rows) == 1 + len({r.split(",")[0] for r in rows[1:]})


def test_runs_hold_no_pickles(tmp_path, vae_run):
    _ldm_run(tmp_path / "r", vae_run, 1)
    suffixes = {p.suffix for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".csv", ".txt", ""}, suffixes


def test_corrupt_checkpoint_is_refused(tmp_path, vae_run):
    _ldm_run(tmp_path / "r", vae_run, 1)
    ck = latest_checkpoint(tmp_path / "r")
    data = (ck / "state.safetensors").read_bytes()
    (ck / "state.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(VelodiffError, match="cannot read checkpoint"):
        load_checkpoint(ck)
    (ck / "state.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle header
    with pytest.raises(VelodiffError, match="cannot read checkpoint"):
        _ldm_run(tmp_path / "r", vae_run, 2)


def test_changed_hyperparameters_are_refused_on_resume(tmp_path, vae_run):
    from velodiff.train.trainer import LDMConfig, train_ldm

    _ldm_run(tmp_path / "r", vae_run, 1)
    cfg = LoopConfig(steps=2, lr=5e-3, warmup=2, ema_decay=0.9)
    with pytest.raises(VelodiffError, match="lr="):
        train_ldm(tmp_path / "r", vae_run, cfg, LDMConfig(batch=3, size="micro", cache_size=5), quiet=True)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_target_matches_the_samplers_conversion(prediction):
    """The trainer's target, converted by the core's x0_from_prediction, gives back the clean latent."""
    from velodiff.default_model import scheduler_config
    from velodiff.denoisers import x0_from_prediction
    from velodiff.schedules import DiscreteVP
    from velodiff.train.objectives import alphas_cumprod, noisy_and_target

    sched_cfg = scheduler_config(prediction)
    abar = alphas_cumprod(sched_cfg).double()
    sched = DiscreteVP.from_diffusers_config(sched_cfg)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(4, 4, 2, 2, generator=g).double(), torch.randn(4, 4, 2, 2, generator=g).double()
    k = torch.tensor([0, 10, 500, 999])
    x, target = noisy_and_target(z0, k, eps, abar, prediction)
    t = sched.t_from_timestep(k.double())
    back = x0_from_prediction(prediction, sched, x, t, target)
    assert torch.allclose(back, z0, atol=1e-6)


def test_min_snr_weights():
    from velodiff.train.objectives import loss_weights

    abar = torch.tensor([0.99, 0.5, 0.01])
    k = torch.arange(3)
    snr = abar / (1 - abar)
    assert torch.allclose(loss_weights(k, abar, "epsilon", 5.0), snr.clamp(max=5) / snr)
    assert torch.allclose(loss_weights(k, abar, "v_prediction", 5.0), snr.clamp(max=5) / (snr + 1))
    assert torch.equal(loss_weights(k, abar, "epsilon", None), torch.ones(3))


def test_clip_tokenizer_matches_clip():
    from velodiff.default_model import default_model_path, load_tokenizer

    tok = load_tokenizer(str(default_model_path() / "tokenizer"))
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's README
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407 and len(tok) == 49408


def test_ldm_init_starts_from_an_exported_model(tmp_path, vae_run):
    """--init: a fine-tune starts from a diffusers folder's UNet and text encoder (float16 or not)."""
    from velodiff.train.export import export_model
    from velodiff.train.trainer import build_models, load_init_weights

    _ldm_run(tmp_path / "r", vae_run, 2)
    with pytest.raises(VelodiffError, match="--vae .* is a run of `velodiff train ldm`"):
        export_model(tmp_path / "r", vae_run, tmp_path / "m", half=False)  # the two runs swapped
    # from the command line, in a fresh process (the libraries' import chatter included): one line
    import subprocess
    import sys

    argv = ["train", "export", "--vae", str(vae_run), "--ldm", str(vae_run), "--out", str(tmp_path / "m")]
    code = "import sys; from velodiff.cli import main; sys.argv = ['velodiff', *sys.argv[1:]]; main()"
    cli = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert cli.returncode != 0 and cli.stderr.strip().splitlines() == [
        f"error: --ldm {str(vae_run)!r} is a run of `velodiff train autoencoder`, not of `velodiff train ldm`"
    ], cli.stderr
    assert not (tmp_path / "m").exists()
    argv[5] = str(tmp_path / "r")  # the right way round: the model, and nothing on stderr
    cli = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and cli.stderr == "", cli.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
    shutil.rmtree(tmp_path / "m")
    export_model(vae_run, tmp_path / "r", tmp_path / "m", half=False)
    unet, text = build_models("micro")
    load_init_weights(unet, text, tmp_path / "m")
    ema = load_file(str(latest_checkpoint(tmp_path / "r") / "state.safetensors"))
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ema[f"ema.unet.{k}"]), k
    # `velodiff train export` writes the same folder (the EMA weights), which velodiff.load runs
    from velodiff.cli import main

    try:
        main(["train", "export", "--vae", str(vae_run), "--ldm", str(tmp_path / "r"),
              "--out", str(tmp_path / "m2"), "--no-half"])
    except SystemExit as e:
        assert not e.code
    unet2, text2 = build_models("micro")
    load_init_weights(unet2, text2, tmp_path / "m2")
    assert all(torch.equal(v, unet2.state_dict()[k]) for k, v in unet.state_dict().items())
    import velodiff

    assert velodiff.load(tmp_path / "m2").family == "sd1"
    # a fine-tune run logs its first loss from those weights, and a wrong folder is one clear error
    _ldm_run(tmp_path / "ft", vae_run, 1, init=str(tmp_path / "m"))
    with pytest.raises(VelodiffError, match="--init: .* is not a diffusers model folder"):
        _ldm_run(tmp_path / "bad", vae_run, 1, init=str(tmp_path))


def test_ldm_init_refuses_another_architecture(tmp_path):
    from velodiff.default_model import default_model_path
    from velodiff.train.trainer import build_models, load_init_weights

    unet, text = build_models("micro")
    with pytest.raises(VelodiffError, match="do not fit this architecture"):
        load_init_weights(unet, text, default_model_path())


def test_latent_cache_is_the_same_from_worker_processes(vae_run):
    """Scenes rendered by a process pool give the very latents the in-process path gives (resume relies on
    rebuilding the cache bit-identically)."""
    from velodiff.data.shapes import ShapesWorld
    from velodiff.default_model import default_model_path, load_tokenizer
    from velodiff.train.trainer import LatentCache, load_vae

    vae, scaling = load_vae(vae_run, "micro")
    tok = load_tokenizer(str(default_model_path() / "tokenizer"))
    world = ShapesWorld(seed=0)
    one = LatentCache(world, vae, tok, 300, scaling, workers=1)
    two = LatentCache(world, vae, tok, 300, scaling, workers=2)
    assert torch.equal(one.latents, two.latents) and torch.equal(one.ids, two.ids)
    assert one.latents.shape == (300, 4, 16, 16)


def test_default_unet_attends_with_32_channels_per_head():
    """diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads: the config sets it
    per block so every attention layer has 32-channel heads (not 32 heads of 2 channels)."""
    from diffusers import UNet2DConditionModel

    from velodiff.default_model import unet_config

    unet = UNet2DConditionModel(**unet_config("default"))
    attns = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert attns and all(a.inner_dim // a.heads == 32 for a in attns)


def test_nan_loss_stops_before_any_checkpoint_holds_it(tmp_path):
    """The loss is read back only on log and checkpoint steps, so a NaN is caught before it is saved."""
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step, gen):
        loss = lin(torch.randn(4, 2, generator=gen)).pow(2).mean()
        return (loss * float("nan") if step >= 2 else loss), {"loss": loss.detach()}

    cfg = LoopConfig(steps=10, lr=1e-2, warmup=1, checkpoint_every=1, log_every=5)
    with pytest.raises(VelodiffError, match="loss became nan by step 3"):
        run_loop(tmp_path / "r", cfg, {"lin": lin}, step_fn, quiet=True)
    state = _state(tmp_path / "r")
    assert latest_checkpoint(tmp_path / "r").name == "step-0000002"
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


def test_a_run_resumed_already_complete_reports_its_last_loss(tmp_path):
    """Extending --steps to the step a stopped run reached exports it at once: its summary's final loss
    is the logged loss of that step, not nan."""
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step, gen):
        return lin(torch.randn(4, 2, generator=gen)).pow(2).mean(), {}

    cfg = LoopConfig(steps=3, lr=1e-2, warmup=1, checkpoint_every=1, log_every=1)
    first = run_loop(tmp_path / "r", cfg, {"lin": lin}, step_fn, quiet=True)
    again = run_loop(tmp_path / "r", cfg, {"lin": lin}, step_fn, quiet=True)
    assert again["completed"] and again["steps"] == 3
    assert again["final_loss"] == pytest.approx(first["final_loss"], abs=1e-6)


def test_a_run_folder_has_one_trainer_at_a_time(tmp_path):
    """A second process training the same --run folder (it would delete the first's checkpoints) is one
    line while the first holds it; the lock goes with the first (here: released, then the run trains)."""
    from velodiff.files import lock_folder
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step, gen):
        return lin(torch.randn(4, 2, generator=gen)).pow(2).mean(), {}

    cfg = LoopConfig(steps=2, lr=1e-2, warmup=1, checkpoint_every=1, log_every=1)
    run = tmp_path / "r"
    run.mkdir()
    held = lock_folder(run, "--run")  # another trainer's (an flock is per open file, so per process too)
    with pytest.raises(VelodiffError, match=f"another velodiff process is writing {run}; .* another --run$"):
        run_loop(run, cfg, {"lin": lin}, step_fn, quiet=True)
    assert not (run / "loss.csv").exists()
    held.close()
    assert run_loop(run, cfg, {"lin": lin}, step_fn, quiet=True)["completed"]


def test_a_spent_time_budget_trains_no_more_steps(tmp_path):
    """--max-minutes counts the run's training time over its resumes: a rerun past it stops before a
    step (each rerun trained, and checkpointed, one more)."""
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step, gen):
        return lin(torch.randn(4, 2, generator=gen)).pow(2).mean(), {}

    cfg = LoopConfig(steps=10, lr=1e-2, warmup=1, checkpoint_every=5, log_every=1, max_minutes=1e-9)
    first = run_loop(tmp_path / "r", cfg, {"lin": lin}, step_fn, quiet=True)
    again = run_loop(tmp_path / "r", cfg, {"lin": lin}, step_fn, quiet=True)
    assert first["steps"] == again["steps"] == 1 and not again["completed"]


def test_an_unfinished_or_other_size_autoencoder_is_refused_in_one_line(tmp_path, vae_run, capsys):
    """train ldm / export on an autoencoder run of another --size (was a 180-line state-dict error) or
    one stopped early (its partly trained latents were used); train ldm --out after a stop exports
    nothing (a half-trained model replaced the one there)."""
    from velodiff.cli import main
    from velodiff.train.autoencoder import train_autoencoder
    from velodiff.train.trainer import load_vae

    with pytest.raises(VelodiffError, match="is not of size 'default'; give the --size it was trained"):
        load_vae(vae_run, "default")
    stopped = tmp_path / "stopped"
    cfg = LoopConfig(steps=5, lr=1e-3, warmup=1, ema_decay=0.9, checkpoint_every=100, max_minutes=1e-9)
    train_autoencoder(stopped, cfg, batch=2, size="micro", quiet=True)
    with pytest.raises(VelodiffError, match="the autoencoder run stopped at step 1; rerun"):
        load_vae(stopped, "micro")
    out = tmp_path / "model"
    args = ["train", "ldm", "--vae", str(vae_run), "--run", str(tmp_path / "ldm"), "--size", "micro",
            "--steps", "5", "--batch", "2", "--cache-size", "4", "--max-minutes", "0.0000001", "--out",
            str(out), "--quiet", "--threads", "1"]
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code or 0
    assert code == 0 and not out.exists()
    assert "nothing exported" in capsys.readouterr().out


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    """Killed before any checkpoint, a rerun starts again at step 0: the rows it had logged go (they
    were written twice), and a half-written last row is dropped."""
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step, gen):
        return lin(torch.randn(4, 2, generator=gen)).pow(2).mean(), {}

    run = tmp_path / "r"
    run.mkdir()
    (run / "loss.csv").write_text("step,loss,lr,grad_norm,wall_s,extra\n1,0.5,0.01,1.0,0.1,{}\n2,0.4")
    cfg = LoopConfig(steps=3, lr=1e-2, warmup=1, checkpoint_every=100, log_every=1)
    run_loop(run, cfg, {"lin": lin}, step_fn, quiet=True)
    steps = [line.split(",")[0] for line in (run / "loss.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3"]
    # stopped off the log grid (a shorter --steps) and resumed: the log of one run of the full length
    for folder, parts in (("whole", (6,)), ("split", (3, 6))):
        for steps_i in parts:
            torch.manual_seed(0)  # the same starting weights (a resume loads its own over them)
            lin = torch.nn.Linear(2, 1)
            cfg = LoopConfig(steps=steps_i, lr=1e-2, warmup=1, checkpoint_every=100, log_every=2)
            run_loop(tmp_path / folder, cfg, {"lin": lin}, step_fn, quiet=True)
    rows = [(tmp_path / f / "loss.csv").read_text().splitlines()[1:] for f in ("whole", "split")]
    assert [r.split(",")[:2] for r in rows[0]] == [r.split(",")[:2] for r in rows[1]]


def test_bad_training_inputs_are_refused_before_the_work(tmp_path, vae_run, capsys):
    """An LDM run given as --vae (it has a summary.json too), an overlapping --out and --run, a mistyped
    --prediction (it was found after the scenes were rendered), --decoder-only without --init."""
    from velodiff.cli import main
    from velodiff.train.autoencoder import train_autoencoder
    from velodiff.train.trainer import load_vae

    ldm = tmp_path / "ldm"
    _ldm_run(ldm, vae_run, 1)
    with pytest.raises(VelodiffError, match="is a run of `velodiff train ldm`, not of `velodiff train auto"):
        load_vae(ldm, "micro")
    base = ["train", "ldm", "--vae", str(vae_run), "--size", "micro", "--steps", "1", "--quiet",
            "--threads", "1", "--cache-size", "2", "--batch", "2"]
    same, p = str(tmp_path / "same"), str(tmp_path / "p")
    for extra, line in ((["--run", same, "--out", same], "overlap"),
                        (["--run", p, "--prediction", "v-prediction"], "unknown --prediction")):
        try:
            code = main([*base, *extra])
        except SystemExit as e:
            code = e.code or 0
        err = capsys.readouterr().err
        assert code == 2 and line in err and err.count("\n") == 1, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "same").exists()
    cfg = LoopConfig(steps=1, lr=1e-3, warmup=1, checkpoint_every=100)
    with pytest.raises(VelodiffError, match="give its run as --init"):
        train_autoencoder(tmp_path / "dec", cfg, batch=2, size="micro", decoder_only=True, quiet=True)


def test_a_resume_with_other_cpu_threads_is_said(tmp_path):
    """CPU sums depend on the thread count: a resume with another one goes on, with a word that it is
    not bit-exact (the CLI's default threads differ from the model card's --threads 1)."""
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step, gen):
        return lin(torch.randn(4, 2, generator=gen)).pow(2).mean(), {}

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run_loop(tmp_path / "r", LoopConfig(steps=1, lr=1e-2, warmup=1, checkpoint_every=1), {"lin": lin},
                 step_fn, quiet=True)
        torch.set_num_threads(2)
        with pytest.warns(UserWarning, match="trained with 1 CPU threads, this resume with 2: .*--threads 1"):
            run_loop(tmp_path / "r", LoopConfig(steps=2, lr=1e-2, warmup=1, checkpoint_every=1), {"lin": lin},
                     step_fn, quiet=True)
    finally:
        torch.set_num_threads(before)


def test_a_latest_checkpoint_damaged_since_is_refused_not_restarted(tmp_path):
    """`latest` names a checkpoint whose state.json was lost since: one line naming the intact older one
    to resume from, not a fresh start from step 0 (which would prune that one and the loss log)."""
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step, gen):
        return lin(torch.randn(4, 2, generator=gen)).pow(2).mean(), {}

    run = tmp_path / "r"
    run_loop(run, LoopConfig(steps=2, lr=1e-2, warmup=1, checkpoint_every=1, log_every=1), {"lin": lin},
             step_fn, quiet=True)
    (run / "step-0000002" / "state.json").unlink()
    log = (run / "loss.csv").read_text()
    with pytest.raises(VelodiffError, match=r"step-0000002 has no state\.json; write 'step-0000001' into"):
        run_loop(run, LoopConfig(steps=4, lr=1e-2, warmup=1, checkpoint_every=1, log_every=1),
                 {"lin": lin}, step_fn, quiet=True)
    assert (run / "step-0000001" / "state.json").is_file() and (run / "loss.csv").read_text() == log
    (run / "latest").write_text("step-0000001")
    assert run_loop(run, LoopConfig(steps=4, lr=1e-2, warmup=1, checkpoint_every=1, log_every=1),
                    {"lin": lin}, step_fn, quiet=True)["steps"] == 4
    # damaged rather than lost (cut short, as a full disk leaves it): the same way out, in one line
    for name, cut in (("state.json", b'{"step": 4,'), ("state.safetensors", b"\x00" * 100)):
        (run / "step-0000004" / name).write_bytes(cut)
        with pytest.raises(VelodiffError) as e:
            run_loop(run, LoopConfig(steps=6, lr=1e-2, warmup=1, checkpoint_every=1, log_every=1),
                     {"lin": lin}, step_fn, quiet=True)
        msg = str(e.value)
        assert msg.startswith(f"cannot read checkpoint {run / 'step-0000004'}") and "\n" not in msg
        latest = run / "latest"
        assert msg.endswith(f"write 'step-0000003' into {latest} to resume from it, or use a new --run")
        shutil.copy(run / "step-0000003" / name, run / "step-0000004" / name)


def test_sigterm_checkpoints_ends_as_the_signal_would_and_resumes_bit_exactly(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler preempting the job) ends training after the current step and its
    checkpoint, raising Stopped; the CLI exits 128 + 15 (a Kubernetes Job or Slurm sees an interrupted
    run, not a finished one, whose exit 0 it would never restart); the rerun ends where an
    uninterrupted run does."""
    import os
    import signal
    import threading

    from velodiff.errors import Stopped
    from velodiff.train.loop import run_loop

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed in the main thread only")

    def trained(run, term_at=None):
        torch.manual_seed(0)
        lin = torch.nn.Linear(2, 1)

        def step_fn(step, gen):
            if step == term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return lin(torch.randn(4, 2, generator=gen)).pow(2).mean(), {}

        cfg = LoopConfig(steps=5, lr=1e-2, warmup=1, checkpoint_every=10, log_every=1)
        return run_loop(run, cfg, {"lin": lin}, step_fn, quiet=True), lin

    with pytest.raises(Stopped, match=r"^train: stopped by SIGTERM at step 2 of 5; rerun the same") as info:
        trained(tmp_path / "r", term_at=1)
    assert info.value.signum == signal.SIGTERM
    assert latest_checkpoint(tmp_path / "r").name == "step-0000002"  # saved though not a checkpoint step
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler before the run is back
    summary, lin = trained(tmp_path / "r")
    whole, lin_whole = trained(tmp_path / "whole")
    assert summary["completed"] and summary["steps"] == 5
    assert torch.equal(lin.weight, lin_whole.weight) and summary["final_loss"] == whole["final_loss"]

    from velodiff.cli import main

    def stopped(*args, **kwargs):
        raise Stopped("ldm: stopped by SIGTERM at step 2 of 5; rerun the same command to resume", 15)

    monkeypatch.setattr("velodiff.train.trainer.train_ldm", stopped)
    code = main(["train", "ldm", "--run", str(tmp_path / "ldm"), "--vae", str(tmp_path / "vae")])
    err = capsys.readouterr().err.strip()
    assert code == 143 and err == "ldm: stopped by SIGTERM at step 2 of 5; rerun the same command to resume"


# --- review22: the objectives' weights, EMA warm-up, LR warm-up, clipping, resume refusals, batches ----


def test_min_snr_gamma_zero_is_off():
    """gamma 0 is 'off' (the CLI's --min-snr-gamma 0, LDMConfig(min_snr_gamma=0) in Python): weights 1,
    not min(snr, 0) = 0, which would train nothing."""
    from velodiff.train.objectives import loss_weights

    abar = torch.tensor([0.99, 0.5, 0.01])
    for prediction in ("epsilon", "v_prediction"):
        assert torch.equal(loss_weights(torch.arange(3), abar, prediction, 0.0), torch.ones(3))


def test_ema_follows_its_documented_warmup_and_resumes_it():
    """shadow = d shadow + (1 - d) param with d = min(decay, (1 + n) / (10 + n)), n the updates so far;
    integer buffers are copied; a loaded EMA goes on from its update count."""
    from velodiff.train.ema import EMA

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("count", torch.tensor(0))

    g = torch.Generator().manual_seed(0)
    net = Net()
    ema = EMA(net, decay=0.2)
    want = {k: v.clone().double() for k, v in net.state_dict().items() if v.is_floating_point()}
    for n in range(4):
        assert ema.current_decay() == pytest.approx(min(0.2, (1 + n) / (10 + n)))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            net.count.fill_(n + 7)
        ema.update(net)
        d = min(0.2, (1 + n) / (10 + n))  # 0.1, 0.18, 0.2, 0.2
        for k, p in net.state_dict().items():
            if k in want:
                want[k] = d * want[k] + (1 - d) * p.double()
                torch.testing.assert_close(ema.shadow[k].double(), want[k], rtol=1e-6, atol=1e-6)
        assert int(ema.shadow["count"]) == n + 7
    assert ema.updates == 4
    again = EMA(Net(), decay=0.9)
    again.load_state_dict(ema.state_dict(), ema.updates)
    assert again.current_decay() == pytest.approx(min(0.9, 5 / 14))


def _lin_step(lin):
    def step_fn(step, gen):
        return lin(torch.randn(4, 2, generator=gen)).pow(2).mean() + lin.bias.sum(), {}

    return step_fn


def test_lr_warms_up_linearly_and_the_optimizer_uses_it(tmp_path):
    """lr_at(step) = lr min(1, (step + 1) / warmup): logged per step, and what AdamW steps with (its first
    step moves each weight by the step's lr, here lr / warmup)."""
    import csv

    from velodiff.train.loop import lr_at, run_loop

    cfg = LoopConfig(steps=5, lr=0.08, warmup=4, weight_decay=0.0, grad_clip=0.0, log_every=1)
    assert [lr_at(cfg, s) for s in range(6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.08, 0.08])
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 1)
    before = lin.weight.detach().clone()
    first = LoopConfig(**{**vars(cfg), "steps": 1})
    run_loop(tmp_path / "r", first, {"lin": lin}, _lin_step(lin), quiet=True)
    moved = (lin.weight.detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.02), rtol=1e-4, atol=1e-6)
    run_loop(tmp_path / "r", cfg, {"lin": lin}, _lin_step(lin), quiet=True)
    rows = list(csv.DictReader((tmp_path / "r" / "loss.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.08])
    assert [float(r["grad_norm"]) for r in rows] == [0.0] * 5  # grad_clip 0: not clipped, trained


def test_the_ema_averages_the_weights_after_each_optimizer_step(tmp_path):
    """After one step the checkpoint's EMA is 0.1 x the initial weights + 0.9 x the stepped ones (the first
    update's decay is 1/10)."""
    from velodiff.train.loop import run_loop

    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 1)
    before = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    cfg = LoopConfig(steps=1, lr=0.05, warmup=1, ema_decay=0.999)
    run_loop(tmp_path / "r", cfg, {"lin": lin}, _lin_step(lin), quiet=True)
    state = _state(tmp_path / "r")
    for k, v in lin.state_dict().items():
        assert not torch.equal(v, before[k])
        torch.testing.assert_close(state[f"ema.lin.{k}"], 0.1 * before[k] + 0.9 * v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key", ["lr", "seed", "warmup", "weight_decay", "grad_clip", "ema_decay"])
def test_every_changed_optimisation_setting_is_refused_on_resume(tmp_path, key):
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)
    cfg = LoopConfig(steps=1, lr=0.01, warmup=2, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9, seed=0)
    run_loop(tmp_path / "r", cfg, {"lin": lin}, _lin_step(lin), quiet=True)
    changed = LoopConfig(**{**vars(cfg), "steps": 2, key: getattr(cfg, key) + 1})
    with pytest.raises(VelodiffError, match=f"was started with {key}="):
        run_loop(tmp_path / "r", changed, {"lin": lin}, _lin_step(lin), quiet=True)


def test_a_resume_may_grow_the_run_but_not_change_what_it_learns(tmp_path):
    """The GROWS settings (steps, pairs, rounds, ...) may change between a run and its resume; any other
    ``extra`` setting (the batch, the teacher) is refused."""
    from velodiff.train.loop import GROWS, run_loop

    lin = torch.nn.Linear(2, 1)
    grows = {"steps", "reflow_steps", "distill_steps", "pairs", "eval_pairs", "sample_steps", "rounds"}
    assert grows <= GROWS
    run = tmp_path / "r"
    extra = {k: 1 for k in sorted(GROWS)} | {"batch": 2}
    run_loop(run, LoopConfig(steps=1, lr=0.01, extra=extra), {"lin": lin}, _lin_step(lin), quiet=True)
    grown = {k: 3 for k in sorted(GROWS)} | {"batch": 2}
    assert run_loop(run, LoopConfig(steps=2, lr=0.01, extra=grown), {"lin": lin}, _lin_step(lin),
                    quiet=True)["steps"] == 2
    with pytest.raises(VelodiffError, match="was started with batch=2, not 3"):
        run_loop(run, LoopConfig(steps=3, lr=0.01, extra={**grown, "batch": 3}), {"lin": lin},
                 _lin_step(lin), quiet=True)


def test_a_resume_may_change_what_only_decides_the_students_defaults(tmp_path):
    """A guided student's default scale and reflow's straightness ODE steps change nothing it learns: a
    resume may change them; the same key where it is learned from (reflow's pairs' guidance) is refused."""
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)
    for method, key, refused in (("guided", "guidance", False), ("reflow", "ode_steps", False),
                                 ("reflow", "guidance", True)):
        run = tmp_path / f"{method}-{key}"
        first = LoopConfig(steps=1, lr=0.01, extra={"method": method, key: 2})
        run_loop(run, first, {"lin": lin}, _lin_step(lin), quiet=True)
        again = LoopConfig(steps=2, lr=0.01, extra={"method": method, key: 3})
        if refused:
            with pytest.raises(VelodiffError, match=f"was started with {key}=2, not 3"):
                run_loop(run, again, {"lin": lin}, _lin_step(lin), quiet=True)
        else:
            assert run_loop(run, again, {"lin": lin}, _lin_step(lin), quiet=True)["steps"] == 2


@pytest.mark.parametrize("per_module", [False, True])
def test_the_logged_gradient_norm_is_the_clipped_groups(tmp_path, per_module):
    """clip_per_module: each module's gradient is clipped on its own and the logged norm is the first
    module's; otherwise the norm of all modules' gradients together."""
    import csv

    from velodiff.train.loop import run_loop, step_generator

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)

    def step_fn(step, gen):
        x = torch.randn(5, 3, generator=gen)
        return 3 * a(x).pow(2).mean() + 2 * b(x).pow(2).mean(), {}

    ref = (torch.nn.Linear(3, 1), torch.nn.Linear(3, 1))
    ref[0].load_state_dict(a.state_dict())
    ref[1].load_state_dict(b.state_dict())
    x = torch.randn(5, 3, generator=step_generator(0, 0))
    (3 * ref[0](x).pow(2).mean() + 2 * ref[1](x).pow(2).mean()).backward()
    norms = [torch.cat([p.grad.flatten() for p in m.parameters()]).norm() for m in ref]
    want = float(norms[0]) if per_module else float(torch.stack(norms).norm())
    cfg = LoopConfig(steps=1, lr=0.01, warmup=1, log_every=1, grad_clip=1.0, clip_per_module=per_module)
    run_loop(tmp_path / "r", cfg, {"a": a, "b": b}, step_fn, quiet=True)
    row = next(csv.DictReader((tmp_path / "r" / "loss.csv").open()))
    assert float(row["grad_norm"]) == pytest.approx(want, abs=2e-4) and want > 1.0
    assert abs(float(norms[0]) - float(norms[1])) > 1e-2  # the first module's norm is not the last's


def test_two_seeds_draw_no_step_the_same():
    """step_generator(seed, step) seeds every draw of a step: the runs of seeds 0-3 share no step's noise
    (a seed is not the run of another one shifted by some steps)."""
    from velodiff.train.loop import step_generator

    seeds = {step_generator(seed, step).initial_seed() for seed in range(4) for step in range(200)}
    assert len(seeds) == 4 * 200


def test_a_run_keeps_its_two_newest_checkpoints(tmp_path):
    from velodiff.train.loop import run_loop

    lin = torch.nn.Linear(2, 1)
    run_loop(tmp_path / "r", LoopConfig(steps=5, lr=0.01, checkpoint_every=1), {"lin": lin}, _lin_step(lin),
             quiet=True)
    assert sorted(p.name for p in (tmp_path / "r").glob("step-*")) == ["step-0000004", "step-0000005"]


def test_batches_walk_each_epoch_once_in_a_fresh_order():
    """batch_indices: consecutive steps take consecutive positions of the epoch-wise shuffled scenes, so
    every epoch sees each scene once (batches crossing an epoch's end included), each epoch in its own
    order."""
    from velodiff.train.trainer import batch_indices

    n = 12
    for batch in (3, 5, 12, 13):
        seq = torch.cat([batch_indices(s, batch, n, seed=0) for s in range(12)])
        assert all(len(batch_indices(s, batch, n, 0)) == batch for s in range(12))
        epochs = [seq[e * n : (e + 1) * n] for e in range(len(seq) // n)]
        assert len(epochs) >= 2
        for e in epochs:
            assert sorted(e.tolist()) == list(range(n))
        assert not torch.equal(epochs[0], epochs[1])


def test_the_ldm_step_drops_the_condition_and_weighs_the_loss_as_configured(tmp_path, vae_run, monkeypatch):
    """One train_ldm step: cond_dropout 1 feeds the text encoder the empty prompt for every sample, 0
    never; the loss is the min-SNR-weighted mean of the per-sample MSE (the v-form weights)."""
    import velodiff.train.trainer as trainer
    from velodiff.default_model import load_tokenizer
    from velodiff.train.objectives import loss_weights

    seen: dict[str, list] = {"ids": [], "k": [], "target": [], "pred": [], "loss": []}
    build, real_loop, real_target = trainer.build_models, trainer.run_loop, trainer.noisy_and_target

    def build_spied(size):
        unet, text = build(size)
        text.register_forward_pre_hook(lambda m, args: seen["ids"].append(args[0].clone()))
        unet.register_forward_hook(lambda m, args, out: seen["pred"].append(out.sample.detach()))
        return unet, text

    def target_spied(z0, k, eps, abar, prediction):
        x, target = real_target(z0, k, eps, abar, prediction)
        seen["k"].append(k.clone())
        seen["target"].append(target)
        return x, target

    def loop_spied(run, cfg, modules, step_fn, **kw):
        def wrapped(step, gen):
            loss, logs = step_fn(step, gen)
            seen["loss"].append(float(loss))
            return loss, logs

        return real_loop(run, cfg, modules, wrapped, **kw)

    monkeypatch.setattr(trainer, "build_models", build_spied)
    monkeypatch.setattr(trainer, "noisy_and_target", target_spied)
    monkeypatch.setattr(trainer, "run_loop", loop_spied)
    _ldm_run(tmp_path / "drop", vae_run, 1, cond_dropout=1.0, min_snr_gamma=2.0)
    tok = trainer.tokenize(load_tokenizer(str(tmp_path / "drop" / "tokenizer")), [""])[0]
    assert all(torch.equal(row, tok) for row in seen["ids"][0])
    per = (seen["pred"][0] - seen["target"][0]).pow(2).mean(dim=(1, 2, 3))
    abar = trainer.alphas_cumprod(trainer.scheduler_config("v_prediction"))
    w = loss_weights(seen["k"][0], abar, "v_prediction", 2.0)
    assert float(w.max()) < 1.0
    assert seen["loss"][0] == pytest.approx(float((w * per).mean()), rel=1e-5)
    seen["ids"].clear()
    _ldm_run(tmp_path / "keep", vae_run, 1, cond_dropout=0.0)
    assert not any(torch.equal(row, tok) for row in seen["ids"][0])


def test_the_autoencoders_scaling_factor_is_that_of_the_weights_it_ships(vae_run):
    """summary.json's scaling_factor is measured on the EMA weights load_vae returns: their latent means,
    times it, have unit standard deviation over the held-aside scenes."""
    from velodiff.data.shapes import ShapesWorld
    from velodiff.train.trainer import load_vae

    vae, scaling = load_vae(vae_run, "micro")
    x, _ = ShapesWorld(seed=0, size=64, holdout=True).batch(10_000_000, 256)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    assert float((z * scaling).std()) == pytest.approx(1.0, rel=1e-5)


def test_an_exported_model_predicts_what_its_run_was_trained_to(tmp_path, vae_run):
    import velodiff
    from velodiff.train.export import export_model

    _ldm_run(tmp_path / "eps", vae_run, 1, prediction_type="epsilon")
    model = velodiff.load(export_model(vae_run, tmp_path / "eps", tmp_path / "m"))
    assert model.prediction_type == "epsilon"


def test_ldm_out_inside_or_around_the_run_is_refused_before_the_work(tmp_path, capsys):
    """--out inside --run, or --run inside --out: the export would be written into the run's checkpoints
    (or replace them); one line before any work."""
    from velodiff.cli import main

    for run, out in ((tmp_path / "a", tmp_path / "a" / "model"), (tmp_path / "b" / "run", tmp_path / "b")):
        try:
            code = main(["train", "ldm", "--vae", str(tmp_path / "no-vae"), "--run", str(run),
                         "--out", str(out), "--quiet"])
        except SystemExit as e:
            code = e.code or 0
        err = capsys.readouterr().err
        assert code == 2 and "overlap" in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()  # refused before --out's parent folder was made


def test_review32_a_damaged_latest_checkpoint_names_the_newest_intact_one(tmp_path):
    """review32: of several intact older checkpoints (a --keep above 2, a copy), the one to resume from is
    the newest, for a lost file and for a damaged one alike."""
    run = tmp_path / "r"
    for step in (1, 2, 3):
        (run / f"step-000000{step}").mkdir(parents=True)
        (run / f"step-000000{step}" / "state.json").write_text("{}")
        (run / f"step-000000{step}" / "state.safetensors").write_bytes(b"\x00" * 8)
    (run / "latest").write_text("step-0000003")
    (run / "step-0000003" / "state.json").unlink()
    with pytest.raises(VelodiffError, match=r"has no state\.json; write 'step-0000002' into .*latest"):
        latest_checkpoint(run)
    with pytest.raises(VelodiffError, match=r"cannot read checkpoint .*; write 'step-0000002' into"):
        load_checkpoint(run / "step-0000001")  # (cut short: its safetensors holds no header)
