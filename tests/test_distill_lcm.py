"""Consistency distillation (LCM / LCM-LoRA): the lcm solver agrees with diffusers' LCMScheduler, a LoRA
round-trips through a model folder, a LoRA for another architecture is one line, runs resume
bit-exactly and the student carries its sampling defaults."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from diffusers import LCMScheduler, UNet2DConditionModel

import velodiff
from velodiff import DiscreteVP, VelodiffError, make_grid, sample
from velodiff.aliases import resolve_solver
from velodiff.cli import main
from velodiff.denoisers import eps_from_x0
from velodiff.distill.lcm import add_lora
from velodiff.models.lora import save_lora
from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise
from velodiff.shipped import shipped_path
from velodiff.solvers.lcm import boundary_scalings

torch.set_num_threads(1)
F64 = torch.float64
SCHED = DiscreteVP.scaled_linear()
DEN = MixtureDenoiser(GaussianMixture.random((2,), components=3, seed=1, min_var=0.05, max_var=0.3), SCHED)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize(("steps", "original"), [(4, 50), (1, 50), (3, 20), (8, 50)])
def test_lcm_solver_matches_diffusers_lcm_scheduler(steps: int, original: int) -> None:
    x = starting_noise((2,), 16, seed=3)
    sch = LCMScheduler(**SD, original_inference_steps=original)
    sch.set_timesteps(steps)
    ts = make_grid("lcm", SCHED, steps, original_steps=original)
    assert torch.equal(SCHED.timestep(ts[:-1]).round(), sch.timesteps.to(F64))  # the same timesteps
    assert float(ts[-1]) == 0.0
    # diffusers' LCMScheduler by its name: the same solver and grid
    r = resolve_solver("LCMScheduler")
    assert (r.solver, r.grid) == ("lcm", "lcm")
    assert torch.equal(make_grid(r.grid, SCHED, steps, **{**r.grid_options, "original_steps": original}), ts)

    gd = torch.Generator().manual_seed(7)
    xd, traj_d = x.clone(), []
    for i, k in enumerate(sch.timesteps):
        t = float(ts[i])
        eps = eps_from_x0(SCHED, xd, t, DEN(xd, t))
        xd = sch.step(eps, k, xd, generator=gd).prev_sample
        traj_d.append(xd)
    gv = torch.Generator().manual_seed(7)
    traj_v: list[torch.Tensor] = []
    res = sample(
        DEN,
        x,
        ts,
        "lcm",
        noise=lambda i: torch.randn(x.shape, generator=gv, dtype=x.dtype),
        callback=lambda info: traj_v.append(info.x),
    )
    assert res.nfe == steps
    for a, b in zip(traj_v, traj_d, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)
    # the boundary condition is in it: without it the final sample differs (slightly)
    gv = torch.Generator().manual_seed(7)
    raw = sample(
        DEN, x, ts, "lcm", noise=lambda i: torch.randn(x.shape, generator=gv, dtype=x.dtype), boundary=False
    )
    assert not torch.equal(raw.x, traj_v[-1])


def test_boundary_scalings_are_diffusers() -> None:
    sch = LCMScheduler(**SD)
    for k in (0, 1, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor(float(k), dtype=F64))
        ds, do = sch.get_scalings_for_boundary_condition_discrete(k)
        assert abs(float(c_skip) - ds) < 1e-12 and abs(float(c_out) - do) < 1e-12
    assert boundary_scalings(torch.tensor(0.0))[0] == 1.0  # f(x, 0) = x


def _folder_with_lora(tmp_path, seed: int = 0, name: str = "with-lora"):
    """A copy (links) of the default model with a random peft LoRA in lora/, and that UNet in memory."""
    base = shipped_path("default")
    folder = tmp_path / name
    folder.mkdir()
    for p in base.iterdir():
        if p.name not in ("lora", "MODEL_CARD.md"):
            (folder / p.name).symlink_to(p.resolve(), target_is_directory=p.is_dir())
    unet = velodiff.load(base).components["unet"]
    add_lora(unet, 4, 4.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:  # peft starts B at zero (an identity adapter): make it do something
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_lora(unet, folder / "lora")
    return folder, unet.eval()


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999.0, 259.0]), ctx).sample


def test_the_consistency_target_is_a_teacher_ddim_step_then_the_target_network() -> None:
    """LCM's target (Alg. 1): from x = a z0 + s eps at t, one DDIM step of the teacher's x0 to the
    earlier time t' (exact when the teacher knows z0: a' z0 + s' eps), then the target network's
    consistency function at (x', t', k'); at k' = 0 the boundary condition leaves x' itself."""
    from velodiff.distill.lcm import consistency_target

    sched = DiscreteVP.scaled_linear()
    g = torch.Generator().manual_seed(0)
    z0, eps = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(2))
    k, kp = torch.tensor([499.0, 499.0]), torch.tensor([449.0, 449.0])
    t, tp = sched.t_from_timestep(k), sched.t_from_timestep(kp)
    a, s, ap, sp = (v.float().view(-1, 1, 1, 1) for v in (sched.alpha(t), sched.sigma(t), sched.alpha(tp),
                                                          sched.sigma(tp)))
    seen = []

    def target_f(x, t_, k_):
        seen.append((t_, k_))
        return x

    got = consistency_target(lambda x, t_: z0, target_f, a * z0 + s * eps, (t, a, s), (tp, kp, ap, sp))
    assert torch.allclose(got, ap * z0 + sp * eps, atol=1e-5)
    assert torch.equal(seen[0][0], tp) and torch.equal(seen[0][1], kp)
    c_skip, c_out = boundary_scalings(torch.zeros(1))  # at k' = 0 the consistency function is x'
    assert float(c_skip) == pytest.approx(1.0) and float(c_out) == 0.0


def test_lora_round_trip_through_the_folder_and_the_lora_option(tmp_path) -> None:
    folder, mem = _folder_with_lora(tmp_path)
    expected = _unet_out(mem)
    plain = _unet_out(velodiff.load("default").components["unet"])
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the output
    got = _unet_out(velodiff.load(folder, fuse_lora=False).components["unet"])
    assert torch.equal(got, expected)
    got2 = _unet_out(velodiff.load("default", lora=folder / "lora", fuse_lora=False).components["unet"])
    assert torch.equal(got2, expected)
    weights = folder / "lora" / "adapter_model.safetensors"
    unfused = velodiff.load("default", lora=weights, fuse_lora=False).components["unet"]
    assert torch.equal(_unet_out(unfused), expected)
    # fused by default: merged into the weights (a plain UNet), the same function to round-off
    fused = velodiff.load(folder).components["unet"]
    assert not getattr(fused, "peft_config", None)
    assert not any("lora_" in k for k in fused.state_dict())
    torch.testing.assert_close(_unet_out(fused), expected, rtol=1e-4, atol=1e-4)
    # an adapter without its lora_B halves loaded and changed nothing; a bad target pattern raised re.error
    import json

    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(folder / "lora", half)
    state = load_file(half / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "lora_B" not in k}, half / "adapter_model.safetensors")
    with pytest.raises(VelodiffError, match="is incomplete: it has no .*lora_B"):
        velodiff.load("default", lora=half)
    bad = tmp_path / "bad-pattern"
    shutil.copytree(folder / "lora", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": "("}))
    with pytest.raises(VelodiffError, match="does not fit"):
        velodiff.load("default", lora=bad)


def test_a_lora_student_is_written_whole_before_it_replaces_the_folder(tmp_path, monkeypatch) -> None:
    """The adapter is written into the new folder before the swap: a failure while writing it leaves the
    previous student (the teacher's UNet under LCM defaults, with no adapter, was left in its place)."""
    import velodiff.models.lora as lora_module
    from velodiff.distill.teacher import save_student

    _, unet = _folder_with_lora(tmp_path)
    out = tmp_path / "student"
    save_student(shipped_path("default"), None, out, {"solver": "lcm", "steps": 4}, "first", lora=unet)
    assert (out / "lora" / "adapter_model.safetensors").is_file()

    def disk_full(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(lora_module, "save_lora", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_student(shipped_path("default"), None, out, {"solver": "lcm", "steps": 4}, "second", lora=unet)
    assert (out / "MODEL_CARD.md").read_text() == "first" and (out / "lora").is_dir()


def test_lora_scale_scales_each_adapters_change_and_several_loras_add(tmp_path, capsys) -> None:
    """lora_scale multiplies a LoRA's weight change (diffusers' set_adapters weights, then fuse_lora), 0
    turns it off, several LoRAs add at their own scales; unfused peft layers compute the same function."""
    a, _ = _folder_with_lora(tmp_path, seed=0, name="a")
    b, _ = _folder_with_lora(tmp_path, seed=1, name="b")
    base = velodiff.load("default").components["unet"].state_dict()

    def change(**kw) -> dict[str, torch.Tensor]:
        sd = velodiff.load("default", **kw).components["unet"].state_dict()
        return {k: sd[k] - base[k] for k in base}

    da, db = change(lora=a / "lora"), change(lora=b / "lora")
    assert max(float(v.abs().max()) for v in da.values()) > 1e-3
    assert all(not v.any() for v in change(lora=a / "lora", lora_scale=0).values())
    half = change(lora=a / "lora", lora_scale=0.5)
    both = change(lora=[a / "lora", b / "lora"], lora_scale=[0.5, -1])
    for k in base:
        torch.testing.assert_close(half[k], 0.5 * da[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(both[k], 0.5 * da[k] - db[k], rtol=0, atol=1e-6)
    unfused = velodiff.load("default", lora=[a / "lora", b / "lora"], lora_scale=[0.5, -1], fuse_lora=False)
    fused = velodiff.load("default", lora=[a / "lora", b / "lora"], lora_scale=[0.5, -1])
    torch.testing.assert_close(_unet_out(unfused.components["unet"]), _unet_out(fused.components["unet"]),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(VelodiffError, match="2 LoRA scales for 1 LoRAs"):
        velodiff.load("default", lora=a / "lora", lora_scale=[1.0, 2.0])
    with pytest.raises(VelodiffError, match="without a LoRA"):
        velodiff.load("default", lora_scale=0.5)
    out = str(tmp_path / "x.png")
    capsys.readouterr()
    for args, said in (
        (["--lora-scale", "0.5"], "--lora-scale needs a --lora"),
        (["--lora", str(a / "lora"), "--lora-scale", "0.5", "--lora-scale", "1"], "2 --lora-scale values"),
        (["--lora", str(a / "lora"), "--lora-scale", "nan"], "finite"),
    ):
        code = _main(["generate", "a red circle", "--out", out, *args])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code != 0 and len(err) == 1 and said in err[0], err
    # on the command line, two LoRAs at their scales: the image the API gives
    assert _main(["generate", "a red circle", "--out", out, "--steps", "2", "--lora", str(a / "lora"),
                  "--lora", str(b / "lora"), "--lora-scale", "0.5", "--lora-scale", "-1"]) == 0
    from velodiff.pipelines import text2img

    want = text2img(fused, "a red circle", steps=2, seeds=[0]).images[0]
    from PIL import Image

    assert list(Image.open(out).convert("RGB").getdata()) == list(want.convert("RGB").getdata())


def test_lora_files_of_diffusers_and_kohya_load_as_the_same_adapter(tmp_path) -> None:
    """The LoRA files users have: diffusers' save_lora_weights layout and kohya / A1111's (converted by
    diffusers' own loaders) give the peft adapter's function; a text-encoder part is applied and fused."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    folder, mem = _folder_with_lora(tmp_path)
    expected = _unet_out(mem)
    unet_layers = get_peft_model_state_dict(mem)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "diffusers", unet_lora_layers=unet_layers)
    diffusers_file = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    kohya_file = tmp_path / "kohya.safetensors"
    kohya = convert_state_dict_to_kohya(load_file(str(diffusers_file)))
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(kohya_file))
    for lora in (diffusers_file, tmp_path / "diffusers", kohya_file):
        got = _unet_out(velodiff.load("default", lora=lora, fuse_lora=False).components["unet"])
        assert torch.equal(got, expected), lora
    te_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    te = inject_adapter_in_model(te_config, velodiff.load("default").components["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(tmp_path / "with-te", unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=get_peft_model_state_dict(te))
    ids = torch.tensor([[49406, 320, 736, 2445, 49407]])
    plain_te = velodiff.load("default").components["text_encoder"]
    loaded = velodiff.load("default", lora=tmp_path / "with-te").components["text_encoder"]
    assert not any("lora" in name for name, _ in loaded.named_modules())  # fused: a plain encoder again
    with torch.no_grad():
        assert (loaded(ids).last_hidden_state - plain_te(ids).last_hidden_state).abs().max() > 1e-3


def test_lora_for_another_architecture_is_one_line(tmp_path, capsys) -> None:
    other = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,
        norm_num_groups=8,
    )
    add_lora(other, 4, 4.0)
    save_lora(other, tmp_path / "other")
    with pytest.raises(VelodiffError) as e:
        velodiff.load("default", lora=tmp_path / "other")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "does not fit" in msg and "architecture" in msg
    # and on the command line: one line, no traceback
    code = _main(
        ["generate", "a red circle", "--out", str(tmp_path / "x.png"), "--lora", str(tmp_path / "other")]
    )
    err = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and "Loading weights" not in line
    ]
    assert code != 0 and len(err) == 1 and "does not fit" in err[0], err
    # a pickle under the adapter's name is never unpickled
    (tmp_path / "pk").mkdir()
    shutil.copy(tmp_path / "other" / "adapter_config.json", tmp_path / "pk")
    (tmp_path / "pk" / "adapter_model.safetensors").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(VelodiffError):
        velodiff.load("default", lora=tmp_path / "pk")


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _distill(tmp_path, run: str, steps: int, *extra: str) -> int:
    return _main(
        [
            "distill", "lcm", "--out", str(tmp_path / f"{run}-student"), "--run", str(tmp_path / run),
            "--steps", str(steps), "--batch", "2", "--cache-size", "4", "--checkpoint-every", "1",
            "--origin-steps", "10", "--device", "cpu", "--quiet", *extra,
        ]
    )  # fmt: skip


def _losses(run) -> list[str]:
    return [r[1] for r in csv.reader((run / "loss.csv").open())][1:]


@pytest.mark.parametrize("rank", ["2", "0"])
def test_resumed_run_is_bit_identical_and_student_carries_its_defaults(tmp_path, rank: str) -> None:
    from safetensors.torch import load_file

    assert _distill(tmp_path, "full", 2, "--lora-rank", rank) == 0
    assert _distill(tmp_path, "split", 1, "--lora-rank", rank) == 0  # "killed" after one step, then rerun
    assert _distill(tmp_path, "split", 2, "--lora-rank", rank) == 0
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    assert len(_losses(tmp_path / "full")) == 2
    name = "lora/adapter_model.safetensors" if rank != "0" else "unet/diffusion_pytorch_model.safetensors"
    a, b = (load_file(str(tmp_path / f"{r}-student" / name)) for r in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if rank == "0":  # the full fine-tune (EMA target) writes a whole UNet; the rest is the same
        return
    model = velodiff.load(tmp_path / "full-student")
    assert (model.default_solver, model.default_steps, model.default_guidance, model.default_grid) == (
        "lcm",
        4,
        1.0,
        "lcm",
    )
    assert model.default_grid_options == {"original_steps": 10}
    from velodiff.pipelines import text2img

    res = text2img(model, "a red circle", seeds=[0])
    assert res.steps == 4 and res.evals == 4


def test_a_lora_student_of_a_lora_teacher_keeps_the_teachers_adapter(tmp_path) -> None:
    """The new adapter is trained on the teacher with its adapter fused: the student folder carries that
    fused UNet (not the base one under the teacher's lora/), so after one step it samples as the teacher."""
    from velodiff.pipelines import text2img

    assert _distill(tmp_path, "on-lcm", 1, "--teacher", "default-lcm", "--lora-rank", "2") == 0
    kw = dict(seeds=[0], steps=4, output="latent", solver="lcm", grid="lcm", guidance=1.0)
    teacher, base = (text2img(velodiff.load(m), "a red circle", **kw).latents
                     for m in ("default-lcm", "default"))
    student = text2img(velodiff.load(tmp_path / "on-lcm-student"), "a red circle", **kw).latents
    assert float((student - teacher).abs().max()) < 0.1 < float((base - teacher).abs().max())


def test_sampling_steps_past_the_teachers_grid_are_refused_before_training(tmp_path, capsys) -> None:
    assert _distill(tmp_path, "too-many", 1, "--origin-steps", "4", "--sample-steps", "8") == 2
    assert "--sample-steps 8 exceeds --origin-steps 4" in capsys.readouterr().err
    assert not (tmp_path / "too-many").exists()


def test_lcm_boundary_scalings_use_the_integer_timestep_on_any_grid():
    from velodiff import DiscreteVP, sample
    from velodiff.oracle import GaussianMixture, MixtureDenoiser, starting_noise

    sched = DiscreteVP.scaled_linear()
    mix = GaussianMixture.random((2,), components=3, seed=1, min_var=0.05, max_var=0.3)
    den = MixtureDenoiser(mix, sched)
    t0 = float(sched.t_from_timestep(torch.tensor(2.4, dtype=torch.float64)))
    ts = torch.tensor([t0, 0.0], dtype=torch.float64)  # one step from a fractional timestep to 0
    x = starting_noise((2,), 4, seed=0)
    got = sample(den, x, ts, "lcm").x
    sk = 2 * 10.0
    c_skip, c_out = 0.25 / (sk**2 + 0.25), sk / (sk**2 + 0.25) ** 0.5
    torch.testing.assert_close(got, c_skip * x + c_out * den(x, t0), rtol=1e-5, atol=1e-6)


def test_a_peft_lora_without_its_config_loads_onto_exactly_its_modules(tmp_path) -> None:
    """No adapter_config.json: the targets and rank come from the tensors, each module by its whole
    name (cut short, 'attentions.0...to_q' matched other blocks too and the LoRA was refused); the result
    is the configured adapter's. Modules of different ranks need the config (refused in one line)."""
    from peft import LoraConfig

    unet = velodiff.load("default").components["unet"]
    targets = ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    with torch.inference_mode(False):
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    save_lora(unet, tmp_path / "lora")
    expected = _unet_out(velodiff.load("default", lora=tmp_path / "lora", fuse_lora=False).components["unet"])
    (tmp_path / "lora" / "adapter_config.json").unlink()
    got = velodiff.load("default", lora=tmp_path / "lora", fuse_lora=False).components["unet"]
    assert torch.equal(_unet_out(got), expected)
    assert (expected - _unet_out(velodiff.load("default").components["unet"])).abs().max() > 1e-4
    mixed = velodiff.load("default").components["unet"]
    with torch.inference_mode(False):
        mixed.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                     rank_pattern={"attn2.to_k": 2}))
    save_lora(mixed, tmp_path / "mixed")
    (tmp_path / "mixed" / "adapter_config.json").unlink()
    with pytest.raises(VelodiffError, match=r"its modules have ranks \[2, 4\] and no adapter_config.json"):
        velodiff.load("default", lora=tmp_path / "mixed")


def test_lcm_timestep_scaling_is_diffusers_timestep_scaling() -> None:
    """The ``timestep_scaling`` option is LCMScheduler's: at 0.01 its boundary condition weighs x_i
    (c_skip 0.0025 to 0.9 over the grid), and the steps are still diffusers' with the same setting."""
    x = starting_noise((2,), 16, seed=3)
    sch = LCMScheduler(**SD, original_inference_steps=50, timestep_scaling=0.01)
    sch.set_timesteps(4)
    ts = make_grid("lcm", SCHED, 4, original_steps=50)
    gd = torch.Generator().manual_seed(7)
    xd, traj_d = x.clone(), []
    for i, k in enumerate(sch.timesteps):
        t = float(ts[i])
        xd = sch.step(eps_from_x0(SCHED, xd, t, DEN(xd, t)), k, xd, generator=gd).prev_sample
        traj_d.append(xd)

    def run(**options):
        gv, traj = torch.Generator().manual_seed(7), []
        sample(DEN, x, ts, "lcm", noise=lambda i: torch.randn(x.shape, generator=gv, dtype=x.dtype),
               callback=lambda info: traj.append(info.x), **options)  # fmt: skip
        return traj

    for a, b in zip(run(timestep_scaling=0.01), traj_d, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)
    assert float((run()[-1] - traj_d[-1]).abs().max()) > 1e-2  # the default scaling is another run


# --- review22: the skipping-step teacher, the target network, the loss -------------------------------


def test_the_teachers_skipping_steps_are_diffusers_and_hold_the_students_sampling_grid() -> None:
    """origin_timesteps is diffusers' skipping-step grid ((n + 1) c - 1, c = N // origin_steps, the
    DDIMSolver of train_lcm_distill_sd_wds.py), and the ``lcm`` grid the student samples with at any step
    count runs on those timesteps only (what it was trained on)."""
    from velodiff.distill.lcm import origin_timesteps

    for origin in (50, 20, 10, 3):
        c = 1000 // origin
        ks = origin_timesteps(1000, origin)
        assert torch.equal(ks, torch.arange(1, origin + 1, dtype=F64) * c - 1)
        for steps in (1, 2, 4):
            if steps <= origin:
                grid = make_grid("lcm", SCHED, steps, original_steps=origin)
                used = SCHED.timestep(grid[:-1]).round()
                assert set(used.tolist()) <= set(ks.tolist()), (origin, steps)


def test_pseudo_huber_is_lcms_distance() -> None:
    """d(p, q) = mean(sqrt((p - q)^2 + c^2) - c) per sample (diffusers' LCM training script)."""
    from velodiff.distill.lcm import pseudo_huber

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    for c in (0.001, 0.5, 2.0):
        want = (torch.sqrt((p - q) ** 2 + c**2) - c).mean(dim=(1, 2, 3))
        torch.testing.assert_close(pseudo_huber(p, q, c), want)


def test_one_consistency_step_is_lcms_algorithm(tmp_path, monkeypatch) -> None:
    """Per step (Luo et al. 2023, Alg. 1): k on the teacher's skipping-step grid, k' = max(k - c, 0); the
    teacher (CFG at --guidance) steps x from k to k'; the target network's f at (x', t', k') is the target
    and the online student's f at (x, t, k) the prediction. With --ema the target network follows the
    student: target <- ema target + (1 - ema) student before each step after the first."""
    from safetensors.torch import load_file

    import velodiff.distill.lcm as lcm
    from velodiff.train.loop import LoopConfig

    seen: dict[str, list] = {"x0": [], "f": [], "target": []}
    real_x0, real_f, real_target = lcm.make_x0_fn, lcm.consistency_fn, lcm.consistency_target
    real_loop = lcm.run_loop

    def x0_spied(unet, sched, ctx, uctx, w):
        seen["x0"].append((unet, uctx is not None, w))
        return real_x0(unet, sched, ctx, uctx, w)

    def f_spied(unet, sched, ctx):
        f = real_f(unet, sched, ctx)

        def g(x, t, k):
            seen["f"].append((unet, t.clone(), k.clone()))
            return f(x, t, k)

        return g

    def target_spied(teacher_x0, target_f, x, at, to):
        seen["target"].append((at, to))
        return real_target(teacher_x0, target_f, x, at, to)

    def loop_spied(run, cfg, modules, step_fn, **kw):
        seen["modules"] = modules
        return real_loop(run, cfg, modules, step_fn, **kw)

    for name, fn in (("make_x0_fn", x0_spied), ("consistency_fn", f_spied),
                     ("consistency_target", target_spied), ("run_loop", loop_spied)):
        monkeypatch.setattr(lcm, name, fn)
    cfg = LoopConfig(steps=2, lr=1e-3, warmup=1, checkpoint_every=1)
    lcfg = lcm.LCMConfig(origin_steps=10, guidance=3.0, r=2, lora_alpha=2.0, ema=0.9, batch=2, cache_size=4)
    lcm.distill_lcm("default", tmp_path / "s", tmp_path / "run", cfg, lcfg, quiet=True)
    student, target = seen["modules"]["unet"], seen["modules"]["target"]
    ks = lcm.origin_timesteps(1000, 10)
    teacher_calls = [c for c in seen["x0"] if c[1]]
    assert len(teacher_calls) == 2 and all(w == 3.0 for _, _, w in teacher_calls)
    assert all(u is not student and u is not target for u, _, _ in teacher_calls)
    for step in range(2):
        (t, a, s), (tp, kp, ap, sp) = seen["target"][step]
        (u_tgt, t_tgt, k_tgt), (u_pred, t_pred, k_pred) = seen["f"][2 * step : 2 * step + 2]
        assert u_tgt is target and u_pred is student
        k = SCHED.timestep(t.double()).round()
        assert set(k.tolist()) <= set(ks.tolist())
        assert torch.equal(kp.double(), (k - 100).clamp_min(0))
        assert torch.equal(t_pred, t) and torch.equal(k_pred.double(), k)
        assert torch.equal(t_tgt, tp) and torch.equal(k_tgt, kp)
        torch.testing.assert_close(SCHED.timestep(tp.double()).round(), kp.double())
    one, two = (load_file(str(tmp_path / "run" / f"step-000000{i}" / "state.safetensors")) for i in (1, 2))
    lora = [k for k in one if k.startswith("model.target.") and "lora" in k]
    assert lora
    for key in lora:
        want = 0.9 * one[key] + 0.1 * one[key.replace("model.target.", "model.unet.")]
        torch.testing.assert_close(two[key], want, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(two[k], one[k]) for k in lora)


def test_a_full_student_of_a_lora_teacher_does_not_carry_the_teachers_adapter(tmp_path) -> None:
    """A student whose whole UNet is written (trained from the teacher with its adapter fused) replaces
    the teacher's lora/: loaded, it is its UNet alone, not that UNet with the adapter applied again."""
    from velodiff.distill.teacher import save_student

    folder, _ = _folder_with_lora(tmp_path)
    fused = velodiff.load(folder).components["unet"]  # the teacher's UNet with its adapter fused
    sampling = {"solver": "ddim", "steps": 2, "guidance": 1.0}
    out = save_student(folder, fused, tmp_path / "student", sampling, "# test\n")
    assert not (out / "lora").exists()
    torch.testing.assert_close(_unet_out(velodiff.load(out).components["unet"]), _unet_out(fused))


def test_one_lora_scale_on_the_command_line_applies_to_every_lora(tmp_path) -> None:
    """One --lora-scale for several --lora is every LoRA's scale (the option's help: 'one for every
    --lora'): the image the API makes with that scale for both."""
    from PIL import Image

    from velodiff.pipelines import text2img

    a, _ = _folder_with_lora(tmp_path, seed=0, name="a")
    b, _ = _folder_with_lora(tmp_path, seed=1, name="b")
    out = tmp_path / "x.png"
    assert _main(["generate", "a red circle", "--out", str(out), "--steps", "2", "--threads", "1",
                  "--lora", str(a / "lora"), "--lora", str(b / "lora"), "--lora-scale", "0.5"]) == 0
    torch.set_num_threads(1)
    m = velodiff.load("default", lora=[a / "lora", b / "lora"], lora_scale=0.5)
    want = text2img(m, "a red circle", steps=2, seeds=[0]).images[0]
    assert list(Image.open(out).convert("RGB").getdata()) == list(want.convert("RGB").getdata())


def test_the_command_defaults_lr_and_lora_alpha_by_rank(tmp_path, monkeypatch) -> None:
    """distill lcm without --lr: 1e-4 for a LoRA student, 2e-5 for a full fine-tune (the option's help);
    without --lora-alpha: the rank (scale 1), 1 for a full student; --sample-steps equal to --origin-steps
    is the whole teacher grid, allowed."""
    import velodiff.distill.lcm as lcm_module

    seen = []

    def spy(teacher, out, run, cfg, lcfg, **kw):
        seen.append((cfg.lr, lcfg.r, lcfg.lora_alpha, lcfg.sample_steps, lcfg.origin_steps))
        return {"out": None}

    monkeypatch.setattr(lcm_module, "distill_lcm", spy)
    for i, extra in enumerate((["--lora-rank", "8"], ["--lora-rank", "0", "--origin-steps", "4",
                                                      "--sample-steps", "4"])):
        assert _main(["distill", "lcm", "--out", str(tmp_path / f"s{i}"), "--run", str(tmp_path / f"r{i}"),
                      "--quiet", *extra]) == 0
    assert seen == [(1e-4, 8, 8.0, 4, 50), (2e-5, 0, 1.0, 4, 4)]
