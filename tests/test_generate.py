"""`velodiff generate` and the shipped default model: loads offline (velodiff and diffusers), writes
images atomically, and turns bad input into one clear error line."""

from __future__ import annotations

import os
import shutil
import stat

import torch
from PIL import Image

from velodiff.cli import main
from velodiff.default_model import default_model_path

MODEL = default_model_path()
FAST = ["--steps", "2", "--threads", "2"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # typer's standalone mode exits after a successful command
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_shipped_model_is_small_safetensors_only():
    assert (MODEL / "model_index.json").is_file() and (MODEL / "MODEL_CARD.md").is_file()
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".txt", ".md"}
    assert sum(p.stat().st_size for p in files) < 32e6


def test_generate_writes_png_and_grid(tmp_path, capsys):
    out = tmp_path / "out" / "out.png"  # `-o out/x.png` in a fresh clone: the one missing folder is made
    code, o, err = run_cli(capsys, "generate", "a red circle above a blue square", "--out", str(out), *FAST)
    assert code == 0, err
    assert Image.open(out).size == (64, 64) and "wrote" in o
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # as open(path, "w"): not owner-only
    code, o, err = run_cli(
        capsys,
        "generate",
        "a red circle",
        "--out",
        str(out),
        "--n",
        "4",
        "--seed",
        "3",
        "--solver",
        "ddim",
        "--guidance",
        "2",
        "--negative",
        "a blue square",
        *FAST,
    )
    assert code == 0, err
    assert Image.open(out).size == (130, 130)  # 2x2 grid with 2 px gaps
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]  # no temporary left behind


def test_existing_output_is_never_half_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")

    def boom(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    code, _, err = run_cli(capsys, "generate", "a red circle", "--out", str(out), *FAST)
    assert code == 2 and "disk full" in err
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_ctrl_c_says_interrupted_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """typer turns a KeyboardInterrupt inside a command into status 130 without a word: the user is
    told, and an interrupted set is told it resumes."""
    import velodiff.pipelines

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(velodiff.pipelines, "text2img", interrupt)
    code, _, err = run_cli(capsys, "generate", "a red circle", "--out", str(tmp_path / "o.png"), *FAST)
    assert (code, err.strip()) == (130, "interrupted") and not any(tmp_path.iterdir())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code, _, err = run_cli(capsys, "generate-set", str(prompts), "--out", str(tmp_path / "set"), *FAST)
    resumes = "interrupted (the set resumes: run the same command again)"
    assert code == 130 and err.strip().splitlines()[-1] == resumes


def test_bad_inputs_give_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o.png")
    not_utf8, bad_json = tmp_path / "latin1.txt", tmp_path / "bad.json"
    not_utf8.write_bytes(b"ag\n\xff\xfe cfg\n")
    bad_json.write_text("{bad")
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    kept = tmp_path / "kept"
    kept.mkdir()
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    (kept / "sentinel").write_text("mine")
    theirs = tmp_path / "theirs"  # a picture of the user's, named as a bench's plot
    theirs.mkdir()
    (theirs / "pareto.png").write_text("mine")
    cases = [
        (["generate", "", "--out", out], "prompt is empty"),
        (["generate", "   ", "--out", out], "prompt is empty"),
        # a missing folder is made only when its parent exists: a typo two folders deep is one line
        (["generate", "a red circle", "--out", str(tmp_path / "missing" / "a" / "o.png")], "does not exist"),
        (["generate", "a red circle", "--out", out, "--guidance", "-1"], "guidance"),
        # an output over an input (or over another output) is refused before the work: nothing lost
        (["generate", "a red circle", "--out", out, "--attention-maps", out], "are the same file"),
        (["img2img", "x", "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "x.png")],
         "--image and --out are the same file"),
        (["inpaint", "x", "--image", str(tmp_path / "x.png"), "--mask", str(tmp_path / "x.png"), "--out",
          str(tmp_path / "x.png")], "are the same file"),
        (["edit", "x", "--to", "y", "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "x.png")],
         "--image and --out are the same file"),
        # an infinite scale is the user's input, not "the model returned NaN" after loading it
        (["generate", "a red circle", "--out", out, "--guidance", "inf"], "--guidance must be a finite"),
        (["img2img", "x", "--image", out, "--out", out, "--embedded-guidance", "inf"], "finite number >= 0"),
        (["generate", "a red circle", "--out", out, "--model", str(tmp_path / "nowhere")], "does not exist"),
        (["generate", "a red circle", "--out", out, "--solver", "nope"], "unknown solver"),
        (["generate", "a red circle", "--out", str(tmp_path / "o.xyz")], "unknown image type"),
        (["generate", "a red circle", "--out", out, "--plan", f"@{not_utf8}"], "line 2 is not UTF-8 text"),
        (["classify", str(tmp_path / "x.png"), "--labels-file", str(not_utf8)], "line 2 is not UTF-8"),
        (["bench", "--out", str(tmp_path / "b"), "--prompts", str(not_utf8)], "line 2 is not UTF-8 text"),
        (["bench", "--out", str(tmp_path / "b"), "--sweep", str(not_utf8)], "line 2 is not UTF-8 text"),
        (["bench", "--out", str(tmp_path / "b"), "--prompts", str(bad_json)], "invalid JSON at line 1"),
        (["bench", "--out", str(tmp_path / "b"), "--guidance", "nan"], "finite numbers >= 0"),
        (["bench", "--out", str(tmp_path / "b"), "--solvers", ""], "solvers is empty"),
        (["bench", "--out", str(tmp_path / "b"), "--nfe", "1000000000"], "integers in [1, 1000]"),
        (["erase", "--concept", "triangle", "--out", str(tmp_path / "e"), "--lamb", "nan"], "--lamb must"),
        (["erase", "--concept", "triangle", "--out", str(tmp_path / "e"), "--lamb", "0"], "--lamb must"),
        (["erase", "--concept", "triangle", "--out", str(tmp_path / "e"), "--erase-scale", "inf"],
         "--erase-scale must be a finite number >= 0, got inf"),
        # nan or inf where a range is checked: said as such (it said "should be >= 0")
        (["generate", "a red circle", "--out", out, "--eta", "nan"], "--eta must be a finite number, got n"),
        (["generate", "a red circle", "--out", out, "--eta", "inf"], "--eta must be a finite number, got"),
        (["serve", "--batch-wait=nan"], "--batch-wait must be a finite number, got nan"),
        # edit's flags named as typed, before the model loads (it said "plan rule 'p2p' option ...")
        (["edit", "x", "--to", "y", "--out", out, "--cross-steps", "2"], "--cross-steps must be in [0, 1]"),
        (["edit", "x", "--to", "y", "--out", out, "--mode", "foo"], "unknown value of --mode 'foo'"),
        # refused before the model loads (each took 6-8 s): eta on a solver without it, a weighting
        (["generate", "x", "--out", out, "--solver", "dpmpp_2m", "--eta", "0.5"], "has no option 'eta'"),
        (["generate", "x", "--out", out, "--n", "4", "--batch", "2", "--noise", "torch"],
         "would draw images 3.. from other seeds"),
        (["classify", str(tmp_path / "x.png"), "--labels", "a,b", "--weighting", "foo"], "unknown weighting"),
        (["brush", "x", "--layer", "box=0,0,1,1;y;z;w", "--out", out], "SEED must be an integer"),
        (["inpaint", "x", "--image", str(tmp_path / "x.png"), "--mask", str(tmp_path / "x.png"), "--out",
          str(tmp_path / "i.png")], "the mask covers nothing"),
        # what is wrong, not what a right input looks like
        (["report", str(tmp_path / "nowhere")], "does not exist"),
        (["eval", "--manifest", str(tmp_path / "nowhere"), "--real", "shapes"], "does not exist"),
        (["classify", str(tmp_path / "x.png"), "--labels-file", str(kept)], "is a folder; give a text file"),
        (["generate", "a red circle", "--out", out, "--layout", "missing.png"], "name what the mask is for"),
        (["generate", "a red circle", "--out", out, "--clip-skip", "1000"], "has 4 layers; skip fewer"),
        (["generate", "a red circle", "--out", out, "--width", "1000000000"], "in [1, 8192]"),
        (["generate", "a red circle", "--out", out, "--steps", "1000000000"], "is more than 1000"),
        (["generate", "a red circle", "--out", out, "--seed", str(2**64 - 1), "--n", "2"], "seed range"),
        (["serve", "--db", str(kept), "--port", "0"], "is a folder"),
        (["serve", "--host", "nosuch.invalid", "--port", "0"], "not an address here"),
        (["distill", "lcm", "--out", str(tmp_path / "l"), "--run", str(tmp_path / "lr"),
          "--lora-alpha", "nan"], "--lora-alpha must be a finite number > 0"),  # was: "lower --lr"
        (["calibrate", "solver", "--guidance", "2.5", "--out", str(tmp_path / "c.json"), "--beside-model"],
         "give --out or --beside-model, not both"),
        (["calibrate", "solver", "--guidance", "2.5", "--objective", "median"], "unknown objective 'median'"),
        (["calibrate", "solver", "--guidance", "2.5", "--methods", "grid,gits"],
         "unknown calibration method 'gits'"),
        # a wait the worker's condition cannot take (it died on the first job and requests hung)
        (["serve", "--batch-wait", "inf", "--port", "0"], "--batch-wait takes seconds from 0 to 60"),
        (["serve", "--timeout", "inf", "--port", "0"], "--timeout takes seconds from 0 to 604800"),
        # a model that does not load: one line before anything binds (was uvicorn's 60-line traceback)
        (["serve", "--model", str(broken), "--port", "0", "--db", str(tmp_path / "j.sqlite")],
         "no known family"),
        (["distill", "progressive", "--out", str(tmp_path / "x.png"), "--run", str(tmp_path / "r")],
         "is a file; give a folder"),
        (["distill", "progressive", "--out", str(tmp_path / "s"), "--run", str(tmp_path / "r"),
          "--max-minutes", "nan"], "--max-minutes must be a finite number > 0"),
        (["distill", "dmd", "--out", str(tmp_path / "s"), "--run", str(tmp_path / "r"), "--guidance", "inf"],
         "--guidance must be a finite number >= 0"),
        (["distill", "dmd", "--out", str(tmp_path / "s"), "--run", str(tmp_path / "r"), "--device", "gpu"],
         "unknown device 'gpu'; use cpu, cuda, cuda:N"),
        # every output checked before the work: nothing written, nothing replaced
        (["erase", "--concept", "triangle", "--out", str(tmp_path / "e"), "--json", str(tmp_path / "no/a/j")],
         "'" + str(tmp_path / "no") + "' does not exist"),
        (["eval", "shapes", "--json", str(tmp_path / "r.json"), "--markdown", str(kept)], "is a folder"),
        (["generate", "a red circle", "--out", out, "--plan", "nfe=999999999"], "must be in [1, 1000]"),
        (["generate", "a red circle", "--out", out, "--plan", "@/dev/zero"], "is not a regular file"),
        (["generate", "a \udcff red circle", "--out", out], "is not UTF-8 text"),  # argv's bad bytes
        (["generate", "a red circle", "--out", out, "--noise", "torch", "--seed", str(10**23)],
         "outside torch's seed range"),
        (["train", "autoencoder", "--run", str(tmp_path / "t"), "--lr", "inf"], "--lr must be a finite"),
        (["train", "ldm", "--run", str(tmp_path / "t"), "--vae", "v", "--size", "big"], "unknown size 'big'"),
        (["train", "ldm", "--run", str(tmp_path / "x.png"), "--vae", "v"], "is a file; give a folder"),
        (["eval", "shapes", "--json", str(tmp_path / "r.json"), "--guidance", "1,1"], "lists a scale twice"),
        # a plan fixing its scale under a guidance sweep ran once per scale, at its own, named as the others
        (["eval", "shapes", "--json", str(tmp_path / "r.json"), "--guidance", "1.5,3", "--plan",
          "cfg:scale=2"], "fixes the guidance scale at 2"),
        (["bench", "--out", str(tmp_path / "b"), "--guidance", "1.5,3", "--plans", "none;guidance=2"],
         "fixes the guidance scale at 2"),
        # a student run at the reference's 100 steps is no reference for it
        (["bench", "--out", str(tmp_path / "b"), "--model", "default-4step", "--metrics", "reference",
          "--limit", "1", "--solvers", "ddim", "--nfe", "2"], "distilled for 4, so that is no reference"),
        (["eval", "shapes", "--json", str(tmp_path / "r.json"), "--guidance", "1,,2"], "comma list of num"),
        # outputs checked before the work, not after it (classify, calibrate: minutes)
        (["classify", str(tmp_path / "x.png"), "--labels", "a,b", "--json", str(tmp_path / "no/a/c.json")],
         "does not exist"),
        (["calibrate", "solver", "--guidance", "2.5", "--out", str(kept)], "is a folder; give a file name"),
        # two of a command's files that are one: the last write replaced the other
        (["bench", "solvers", "--json", str(tmp_path / "b.md")], "--json and --markdown are the same file"),
        (["eval", "shapes", "--json", str(tmp_path / "e.md")], "--json and --markdown are the same file"),
        (["invert", str(tmp_path / "x.png"), "--prompt", "red", "--json", out, "--out", out], "same file"),
        # a model is written by replacing its folder: never a folder of the user's own files
        (["erase", "--concept", "triangle", "--out", str(kept)], "holds files that are not a model"),
        (["distill", "guided", "--out", str(kept), "--run", str(tmp_path / "r")], "not a model"),
        (["train", "export", "--vae", "v", "--ldm", "l", "--out", str(kept)], "not a model"),
        # results are written beside the user's files in no folder (a tune replaced a bench's pareto.png)
        (["bench", "--out", str(theirs)], "holds a 'pareto.png' this command did not write"),
        (["tune", "--budget", "0.02", "--out", str(theirs)], "holds a 'pareto.png' this command did not"),
        (["erase", "--concept", "triangle", "--out", ".."], "the current folder or one above it"),
        (["distill", "lcm", "--out", ".", "--run", str(tmp_path / "r")], "the current folder or one above"),
    ]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # '..' is tmp_path, which holds everything above
    import velodiff.commands.generate as generate_cmd
    import velodiff.commands.image_run as image_run

    early = ("has no option 'eta'", "unknown weighting", "SEED must be", "covers nothing", "--cross-steps",
             "unknown objective", "unknown calibration method")

    def no_load(*args, **kwargs):  # what is refused before the model loads must not need it
        raise AssertionError("the model was loaded")

    for args, needle in cases:
        with monkeypatch.context() as mp:
            if any(e in needle for e in early):
                mp.setattr(image_run.ImageRun, "load", no_load)
                mp.setattr(generate_cmd, "load_model", no_load)
            code, _, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert needle in one_error_line(err), (args, err)
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "r.json").exists()
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()
    assert not (tmp_path / "b").exists()  # a refused bench made its --out folder
    assert not (tmp_path / "missing").exists() and not (tmp_path / "no").exists()
    assert [p.name for p in kept.iterdir()] == ["sentinel"]
    assert [p.name for p in theirs.iterdir()] == ["pareto.png"]


def test_bad_weights_are_refused_without_unpickling(tmp_path, capsys):
    out = str(tmp_path / "o.png")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04\x95 not really")
    code, _, err = run_cli(capsys, "generate", "a red circle", "--out", out, "--model", str(pickle))
    assert code == 2 and "pickle" in one_error_line(err)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "generate", "a red circle", "--out", out, "--model", str(bad))
    assert code == 2 and "safetensors" in one_error_line(err)
    # a model folder whose UNet weights are truncated
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    w = folder / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "generate", "a red circle", "--out", out, "--model", str(folder), *FAST)
    assert code == 2
    one_error_line(err)
    # a model folder that holds a pickle instead of safetensors
    w.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04\x95 not really")
    code, _, err = run_cli(capsys, "generate", "a red circle", "--out", out, "--model", str(folder), *FAST)
    assert code == 2
    one_error_line(err)
    assert not (tmp_path / "o.png").exists()


def test_long_prompt_is_truncated_with_a_warning(tmp_path, capsys):
    prompt = " ".join(["a red circle"] * 30) + " zebra"
    code, _, err = run_cli(capsys, "generate", prompt, "--out", str(tmp_path / "o.png"), *FAST)
    assert code == 0
    assert "warning:" in err and "dropped" in err and "zebra" in err
    code, _, err = run_cli(capsys, "generate", "a red circle " * 500, "--out", str(tmp_path / "o.png"), *FAST)
    warning = next(ln for ln in err.splitlines() if "dropped" in ln)
    assert code == 0 and len(warning) < 300 and "more characters)" in warning  # was 7 KB of words


def test_shipped_model_loads_in_diffusers():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None)
    assert pipe.unet.dtype == torch.float32
    img = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_a_plan_file_sets_the_run(tmp_path, capsys):
    """`--plan @FILE` with settings: the plan's solver, steps and guidance win over the command's."""
    plan = tmp_path / "plan.txt"
    plan.write_text("solver=ddim\nsteps=3\nguidance=1.5\nag:threshold=0.999\n")
    out = tmp_path / "out.png"
    code, o, err = run_cli(capsys, "generate", "a red circle", "--out", str(out), "--steps", "7",
                           "--solver", "unipc", "--plan", f"@{plan}")
    assert code == 0, err
    assert "ddim on karras, 3 steps, 3 NFE" in o and "guidance 1.5" in o  # the model's grid
    assert "plan solver=ddim+steps=3+guidance=1.5+ag" in o
    # the line reports the scale the run guides with (the plan's cfg scale) and the grid it ran on
    code, o, err = run_cli(capsys, "generate", "a red circle", "--out", str(out), "--steps", "2",
                           "--grid", "trailing", "--plan", "cfg:scale=4,t_lo=0.2")
    assert code == 0 and "on trailing, 2 steps" in o and "guidance 4," in o, (o, err)
    code, o, err = run_cli(capsys, "generate", "a red circle", "--out", str(out), "--plan", "@missing.txt")
    assert code == 2 and one_error_line(err).startswith("error: cannot read the plan file")


def test_generate_options_reach_the_pipeline(tmp_path, capsys):
    """--negative, --clip-skip, --guidance-rescale, --noise and the solver settings make the image the
    Python API makes with them (the same pixels)."""
    import numpy as np

    import velodiff
    from velodiff.pipelines import text2img

    out = tmp_path / "x.png"
    args = ["generate", "a red circle", "--out", str(out), "--seed", "3", "--steps", "4", "--solver", "ddim",
            "--guidance", "4", "--negative", "a blue square", "--clip-skip", "1", "--guidance-rescale", "0.5",
            "--noise", "torch", "--threads", "1"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    m = velodiff.load("default")
    m.clip_skip = 1
    kw = dict(seeds=[3], steps=4, solver="ddim", guidance=4.0, negative="a blue square", guidance_rescale=0.5,
              noise="torch")
    want = text2img(m, "a red circle", **kw).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    m.clip_skip = 0
    other = text2img(m, "a red circle", **kw).images[0]
    assert not np.array_equal(np.asarray(other), np.asarray(want))  # clip skip changes the image


def test_a_labels_grid_end_yields_to_the_calls():
    """A1111's "DPM fast" fixes its grid's end (t_min, k-diffusion's); a call's own final= wins."""
    import velodiff
    from velodiff.pipelines import text2img

    m = velodiff.load("default")
    kw = dict(solver="DPM fast", nfe=6, output="latent")
    assert float(text2img(m, "a red circle", **kw).ts[-1]) == m.schedule.t_min
    assert float(text2img(m, "a red circle", final="zero", **kw).ts[-1]) == 0.0


def test_seeds_and_per_image_negatives_stay_per_image():
    """An int seed s gives images s, s + 1, ...; one prompt repeated with a negative prompt per image
    keeps each image's own negative (the prompt is encoded once, its negatives are not merged)."""
    import velodiff
    from velodiff.pipelines import text2img

    m = velodiff.load("default")
    kw = dict(steps=3, guidance=4.0, output="latent")
    r = text2img(m, ["a red circle", "two green crosses"], seeds=7, **kw)
    assert r.seeds == [7, 8]
    pair = text2img(m, ["a red circle"] * 2, seeds=[0, 0], negative=["a blue square", "a green cross"], **kw)
    one = text2img(m, "a red circle", seeds=[0], negative="a green cross", **kw)
    assert not torch.equal(pair.latents[0], pair.latents[1])
    torch.testing.assert_close(pair.latents[1:], one.latents, rtol=0, atol=1e-5)


def test_a_seed_sweep_of_one_prompt_keeps_its_negative():
    """One prompt for several seeds is encoded once, with its negative prompt (not without it)."""
    import velodiff
    from velodiff.pipelines import text2img

    m = velodiff.load("default")
    kw = dict(steps=3, guidance=4.0, output="latent", negative="a green cross")
    sweep = text2img(m, ["a red circle"] * 2, seeds=[0, 1], **kw)
    one = text2img(m, "a red circle", seeds=[1], **kw)
    torch.testing.assert_close(sweep.latents[1:], one.latents, rtol=0, atol=1e-5)


def test_step_noise_is_drawn_per_image_from_its_seed():
    """A stochastic solver's step noise (fresh Gaussian, or a Brownian tree) comes from each image's own
    seed: an image is the same alone as second in a batch."""
    import velodiff
    from velodiff.pipelines import text2img

    m = velodiff.load("default")
    for solver in ("euler_ancestral", "dpmpp_sde"):
        kw = dict(steps=3, guidance=2.0, output="latent", solver=solver)
        both = text2img(m, ["a red circle", "a blue square"], seeds=[0, 1], **kw)
        alone = text2img(m, "a blue square", seeds=[1], **kw)
        torch.testing.assert_close(both.latents[1:], alone.latents, rtol=0, atol=1e-5, msg=solver)


def test_the_reported_guidance_is_the_plans_scale():
    """A plan that fixes its own scale (cfg:scale=5) guides with it, and the result says so."""
    import velodiff
    from velodiff.pipelines import text2img

    m = velodiff.load("default")
    kw = dict(steps=2, output="latent", seeds=[0])
    r = text2img(m, "a red circle", guidance=2.0, plan="cfg:scale=5", **kw)
    assert r.guidance == 5.0
    torch.testing.assert_close(r.latents, text2img(m, "a red circle", guidance=5.0, **kw).latents)


def test_shared_options_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Before the model loads: --steps with --nfe (a run would drop one of them), a side that is no multiple
    of the model's latent factor (named: 4 for the shipped model), a zero side, --n images whose last
    seed is past torch's range, and --strength without the collage (it would be ignored)."""
    import velodiff.commands.image_run as image_run

    def no_load(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(image_run.ImageRun, "load", no_load)
    out = str(tmp_path / "o.png")
    for args, said in (
        (["--steps", "3", "--nfe", "5"], "give --steps or --nfe, not both"),
        (["--width", "30"], "--width 30 is not a multiple of 4,"),
        (["--height", "66"], "--height 66 is not a multiple of 4,"),
        (["--width", "0"], "--width must be a number of pixels in [1, 8192], got 0"),
        (["--seed", str(2**64 - 1), "--n", "2"], "outside torch's seed range"),
        (["--strength", "0.5"], "--strength applies to --layout-mode collage"),
    ):
        code, _, err = run_cli(capsys, "generate", "a red circle", "--out", out, *args)
        assert code == 2 and said in one_error_line(err), (args, err)
    assert not (tmp_path / "o.png").exists()


def test_generate_seeds_guidance_zero_size_and_format_are_the_apis(tmp_path, capsys):
    """--n 2 --seed 5 is the API's images of seeds 5 and 6 as one grid (--clip-skip 0, the default, is
    allowed); --guidance 0 guides at 0 (not at the model's default); a width that is a multiple of the
    latent factor 4 but not of 8 runs; .jpg, .JPG and .webp files are written in their formats."""
    import numpy as np

    import velodiff
    from velodiff.images import image_grid
    from velodiff.pipelines import text2img

    out = tmp_path / "grid.png"
    one = ["--steps", "2", "--threads", "1"]
    code, o, err = run_cli(capsys, "generate", "a red circle", "--out", str(out), "--n", "2", "--seed", "5",
                           "--guidance", "0", "--width", "36", "--clip-skip", "0", *one)
    assert code == 0, err
    assert "36x64" in o and "guidance 0," in o, o
    torch.set_num_threads(1)
    want = text2img(velodiff.load("default"), "a red circle", seeds=[5, 6], steps=2, guidance=0.0, width=36)
    grid = image_grid(list(want.images))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(grid))
    for name, fmt in (("x.jpg", "JPEG"), ("x.JPG", "JPEG"), ("x.webp", "WEBP")):
        code, _, err = run_cli(capsys, "generate", "a red circle", "--out", str(tmp_path / name), *one)
        assert code == 0, err
        assert Image.open(tmp_path / name).format == fmt, name


def test_generate_eta_nfe_and_embedded_guidance_reach_the_pipeline(tmp_path, capsys):
    """--eta is the solver's eta (DDIM at eta 1: the API's image with that option); --nfe 3 runs 3 network
    calls, not the model's 20 steps (--noise torch with --batch equal to --n is allowed: one call);
    --embedded-guidance is a guidance-distilled model's input (its image at that scale, not at its
    default), and on a model without that input, even at 0, one line."""
    import numpy as np

    import velodiff
    from velodiff.pipelines import text2img

    out = tmp_path / "x.png"
    torch.set_num_threads(1)

    def image():
        return np.asarray(Image.open(out).convert("RGB"))

    one = ["--threads", "1", "--out", str(out)]
    code, _, err = run_cli(capsys, "generate", "a red circle", "--solver", "ddim", "--eta", "1", "--steps",
                           "2", *one)
    assert code == 0, err
    m = velodiff.load("default")
    want = text2img(m, "a red circle", seeds=[0], steps=2, solver="ddim", solver_options={"eta": 1.0})
    assert np.array_equal(image(), np.asarray(want.images[0]))
    code, o, err = run_cli(capsys, "generate", "a red circle", "--nfe", "3", "--n", "2", "--batch", "2",
                           "--noise", "torch", *one)  # --batch equal to --n: one call, one generator
    assert code == 0 and ", 3 NFE," in o, (o, err)
    code, o, err = run_cli(capsys, "generate", "a red circle", "--model", "default-guided", "--steps", "2",
                           "--embedded-guidance", "4", *one)
    assert code == 0 and "guidance 1, embedded guidance 4, plan" in o, (o, err)  # the scale that acted
    guided = velodiff.load("default-guided")
    guided.embedded_guidance = 4.0
    assert np.array_equal(image(), np.asarray(text2img(guided, "a red circle", seeds=[0], steps=2).images[0]))
    code, _, err = run_cli(capsys, "generate", "a red circle", "--embedded-guidance", "0", *one)
    assert code == 2 and "has no guidance input" in one_error_line(err)


def test_threads_up_to_the_machines_cpus_are_taken(tmp_path, capsys, monkeypatch):
    """--threads equal to the machine's CPU count is allowed (it gets to the model load), one more is
    refused in one line: the limit is the CPUs, on any machine."""
    import pytest

    import velodiff.commands.image_run as image_run

    def no_load(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(image_run.ImageRun, "load", no_load)
    cpus = os.cpu_count() or 1
    out = str(tmp_path / "o.png")
    with pytest.raises(AssertionError, match="the model was loaded"):
        run_cli(capsys, "generate", "a red circle", "--out", out, "--threads", str(cpus))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "generate", "a red circle", "--out", out, "--threads", str(cpus + 1))
    assert code == 2 and f"is more than this machine's {cpus} CPUs" in one_error_line(err)


def test_review32_the_summary_gives_evals_per_image_to_4_digits(tmp_path):
    """review32: an adaptive plan's fractional evals per image is said to 4 significant digits."""
    from types import SimpleNamespace

    from velodiff.commands.image_run import ImageRun

    run = ImageRun(n=2, loaded=SimpleNamespace(family="sd1", dtype=torch.float32, device="cpu"))
    res = SimpleNamespace(solver="ddim", grid="trailing", steps=6, nfe=6, evals=11.0 / 3.0, guidance=2.0,
                          plan="ag")
    line = run.summary(tmp_path / "x.png", res, size=(64, 64))
    assert ", 6 NFE, 3.667 evals/image, guidance 2, plan ag) in " in line, line


def test_review36_a_solvers_option_in_its_name_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    """review36: --solver unipc:bogus=1 (an option the solver lacks, written in its name) is one line before
    any model work, as --eta on a solver without eta is."""
    import velodiff.commands.generate as generate_cmd
    import velodiff.commands.image_run as image_run

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(image_run.ImageRun, "load", no_load)
    monkeypatch.setattr(generate_cmd, "load_model", no_load)
    out = str(tmp_path / "o.png")
    for solver, needle in (("unipc:bogus=1", "solver 'unipc' has no option 'bogus'"),
                           ("unipc:order=0", "option order must be an integer in [1, 10], got 0")):
        code, _, err = run_cli(capsys, "generate", "x", "--out", out, "--solver", solver)
        assert code == 2 and needle in one_error_line(err), (solver, err)
    assert not (tmp_path / "o.png").exists()
    monkeypatch.undo()  # a name with options the solver has: drawn as given
    code, _, err = run_cli(capsys, "generate", "x", "--out", out, "--solver", "unipc:order=1", "--steps", "2")
    assert code == 0 and (tmp_path / "o.png").is_file(), err
