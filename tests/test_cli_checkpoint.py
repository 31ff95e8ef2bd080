"""The command line of a user with their own checkpoint (issue 16): image size, device and precision
options, `velodiff img2img` and `velodiff inpaint`, shipped models by name, one-line errors, help that
fits an 80-column terminal.

The single-file bar runs on a tiny SD 1.x checkpoint written in the original (LDM) layout with an
8x latent factor, as the real one has. The same run on a full-size SD 1.5 file (4.3 GB of random
weights, ``ldm_layout.save_sd15_full_size``: ~30 s to write, ~30 s to run on 2 cores, 6.7 GB of
memory) is too slow and too big for the suite; ``VELODIFF_FULL_SIZE=1`` runs it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_layout
import sd_tiny
from velodiff.cli import main
from velodiff.default_model import default_model_path

FAST = ["--steps", "2"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # typer's standalone mode exits after a successful command
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(capsys, *args: str) -> str:
    code, out, err = run_cli(capsys, *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_single_file(tmp_path_factory):
    """(file, config folder): a tiny SD 1.x pipeline whose VAE has four levels (latent factor 8, as SD's),
    saved as a diffusers folder (the configs) and as one original-layout .safetensors file."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("tiny-sd8")
    folder = sd_tiny.save_sd(root / "folder")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=[32] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        sample_size=64,
    ).save_pretrained(folder / "vae")
    return ldm_layout.save_sd1_single_file(folder, root / "tiny-sd15.safetensors"), folder


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 64x64 input image (the default model's size) made by the default model, and its path."""
    root = tmp_path_factory.mktemp("inputs")
    path = root / "in.png"
    try:
        main(["generate", "a red circle above a blue square", "--out", str(path), *FAST])
    except SystemExit as e:
        assert not e.code
    return path


# --- a single-file checkpoint from the command line ---------------------------------------------


def test_single_file_size_dtype_from_cli(tiny_single_file, tmp_path, capsys):
    f, config = tiny_single_file
    out = tmp_path / "out.png"
    code, o, err = run_cli(
        capsys, "generate", "a photo of a red cube", "--model", f, "--config", config,
        "--width", "256", "--height", "384", "--dtype", "bfloat16", *FAST, "--out", out,
    )
    assert code == 0, err
    assert Image.open(out).size == (256, 384)
    assert "256x384" in o and "bfloat16 on cpu" in o  # the device it ran on is said
    # --family and --prediction-type reach the loader (a single file's config cannot say v-prediction)
    v_out = tmp_path / "v.png"
    code, o, err = run_cli(
        capsys, "generate", "a photo of a red cube", "--model", f, "--config", config, "--family", "sd1",
        "--prediction-type", "v_prediction", "--width", "256", "--height", "384", "--dtype", "bfloat16",
        *FAST, "--out", v_out,
    )
    assert code == 0, err
    assert v_out.read_bytes() != out.read_bytes()
    eta_out = tmp_path / "eta.png"  # DDIM's eta (diffusers' pipeline argument) reaches the solver
    for eta, target in (("0", v_out), ("1", eta_out)):
        code, o, err = run_cli(capsys, "generate", "a photo of a red cube", "--model", f, "--config", config,
                               "--solver", "ddim", "--eta", eta, *FAST, "--out", target)
        assert code == 0, err
    assert eta_out.read_bytes() != v_out.read_bytes()


@pytest.mark.skipif(not os.environ.get("VELODIFF_FULL_SIZE"), reason="a 4.3 GB file: VELODIFF_FULL_SIZE=1")
def test_full_size_sd15_single_file(tmp_path, capsys):
    f = ldm_layout.save_sd15_full_size(tmp_path / "sd15.safetensors")
    out = tmp_path / "out.png"
    code, o, err = run_cli(
        capsys, "generate", "a lighthouse at dusk", "--model", f, "--width", "256", "--height", "384",
        "--dtype", "bfloat16", *FAST, "--out", out,
    )
    assert code == 0, err
    assert Image.open(out).size == (256, 384)
    msg = one_error_line(capsys, "generate", "a lighthouse", "--model", f, "--width", "100", "--out", out)
    assert "not a multiple of 8" in msg


def test_sdxl_single_file_from_cli(tmp_path, capsys):
    folder = sd_tiny.save_sd(tmp_path / "sdxl", "sdxl")
    f = ldm_layout.save_sdxl_single_file(folder, tmp_path / "sdxl.safetensors")
    out = tmp_path / "out.png"
    code, o, err = run_cli(capsys, "generate", "a photo of a red cube", "--model", f, "--config", folder,
                           "--width", "32", "--height", "48", "--dtype", "bfloat16", *FAST, "--out", out)
    assert code == 0, err
    assert Image.open(out).size == (32, 48) and "sdxl bfloat16 on cpu" in o


def test_device_and_dtype_rules(monkeypatch):
    """Defaults as diffusers users expect (float16 on a GPU, float32 on the CPU); devices this machine
    lacks are one line. CUDA is faked for the checks a GPU machine would make."""
    from velodiff.errors import VelodiffError
    from velodiff.models.base import best_device, default_dtype, resolve_device

    assert default_dtype(torch.device("cpu")) == "float32"
    assert default_dtype(torch.device("cuda")) == default_dtype(torch.device("mps")) == "float16"
    if not torch.cuda.is_available():
        assert best_device() in ("cpu", "mps")
        with pytest.raises(VelodiffError, match="no CUDA GPU"):
            resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert best_device() == "cuda" and resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(VelodiffError, match=r"1 CUDA GPU\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")


def test_light_name_lists_match_the_library():
    from velodiff.commands.names import DTYPE_NAMES, NOISE_MODES, PREDICTION_TYPES
    from velodiff.denoisers import PREDICTION_TYPES as DENOISER_PREDICTION_TYPES
    from velodiff.models.base import DTYPES
    from velodiff.pipelines.common import NOISE_MODES as PIPELINE_NOISE_MODES

    assert NOISE_MODES == PIPELINE_NOISE_MODES
    assert PREDICTION_TYPES == DENOISER_PREDICTION_TYPES
    assert set(DTYPE_NAMES) <= set(DTYPES)


def test_batch_clip_skip_noise_rescale(tiny_single_file, tmp_path, capsys):
    """--batch splits the images over network calls without changing them (per-image noise); the other
    text2img options reach the pipeline."""
    f, config = tiny_single_file
    common = ["a photo of a red cube", "--model", f, "--config", config, "--width", "32", "--height", "32",
              "--n", "3", *FAST]
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert run_cli(capsys, "generate", *common, "--out", one)[0] == 0
    code, o, err = run_cli(capsys, "generate", *common, "--batch", "2", "--out", two)
    assert code == 0 and "in 2 batches" in o, err
    assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(two)))
    opts = ["--clip-skip", "1", "--noise", "torch", "--guidance-rescale", "0.7", "--negative", "blurry"]
    code, o, err = run_cli(capsys, "generate", *common, *opts, "--out", two)
    assert code == 0, err
    assert "rescale" in o  # the plan that ran: cfg + rescale
    import hashlib
    from pathlib import Path

    from velodiff.infotext import image_infotext, parse_infotext

    said = parse_infotext(image_infotext(Image.open(two)))  # inside the file, A1111's hash of the checkpoint
    assert said["Model hash"] == hashlib.sha256(Path(f).read_bytes()).hexdigest()[:10]
    # --clip-skip 1 (diffusers' count: the penultimate layer) is A1111's "Clip skip: 2"
    assert (said["Clip skip"], said["Noise"], said["Negative prompt"]) == ("2", "torch", "blurry")
    assert said["Plan"] == "cfg+rescale:phi=0.7" and said["Batch size"] == "3"
    assert not np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(two)))


# --- img2img and inpaint on the shipped model ---------------------------------------------------


def test_img2img_sizes_and_strength_zero(picture, tmp_path, capsys):
    from velodiff import load
    from velodiff.pipelines.images import image_tensor, to_pil

    out = tmp_path / "out.png"
    code, o, err = run_cli(capsys, "img2img", "a blue circle", "--image", picture, "--strength", "0.5",
                           *FAST, "--out", out)
    assert code == 0, err
    assert Image.open(out).size == (64, 64)
    from velodiff.infotext import image_infotext, parse_infotext

    said = parse_infotext(image_infotext(Image.open(out)))  # A1111's field for img2img's strength
    assert (said["Prompt"], said["Denoising strength"], said["Steps"]) == ("a blue circle", "0.5", "2")
    code, o, err = run_cli(capsys, "img2img", "a blue circle", "--image", picture, "--width", "96",
                           "--height", "64", *FAST, "--out", out)
    assert code == 0, err
    assert Image.open(out).size == (96, 64)  # the input resized to the asked size
    # strength 0: the input through the autoencoder, no network call
    code, o, err = run_cli(capsys, "img2img", "a blue circle", "--image", picture, "--strength", "0",
                           "--out", out)
    assert code == 0 and "0 NFE" in o, err
    model = load("default")
    with torch.inference_mode():
        trip = to_pil(model.decode(model.encode(image_tensor(Image.open(picture).convert("RGB")))))[0]
    diff = np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(trip, dtype=int))
    assert diff.max() <= 1


def test_inpaint_keeps_outside_of_mask(picture, tmp_path, capsys):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    code, o, err = run_cli(capsys, "inpaint", "a green triangle", "--image", picture, "--mask",
                           tmp_path / "mask.png", *FAST, "--out", out)
    assert code == 0, err
    before = np.asarray(Image.open(picture).convert("RGB"), dtype=int)
    after = np.asarray(Image.open(out), dtype=int)
    assert after.shape == before.shape
    keep = np.asarray(mask) < 128
    assert np.abs(after - before)[keep].max() <= 1
    assert np.abs(after - before)[~keep].mean() > 5  # the white part was repainted
    # --no-keep: the pipeline's own output, outside the mask the autoencoder's round trip
    code, o, err = run_cli(capsys, "inpaint", "a green triangle", "--image", picture, "--mask",
                           tmp_path / "mask.png", *FAST, "--no-keep", "--out", out)
    assert code == 0, err
    raw = np.asarray(Image.open(out), dtype=int)
    assert np.abs(raw - before)[keep].mean() < 12


# --- shipped models by name ---------------------------------------------------------------------


def test_default_by_name(tmp_path, capsys):
    import velodiff

    out = tmp_path / "out.png"
    code, o, err = run_cli(capsys, "generate", "a red circle", "--model", "default", *FAST, "--out", out)
    assert code == 0 and "float32 on cpu" in o, err
    m = velodiff.load("default")
    assert m.family == "sd1" and os.path.samefile(m.path, default_model_path())
    msg = one_error_line(capsys, "generate", "a red circle", "--model", "defualt", "--out", out)
    assert "neither a path nor a shipped model (default, default-4step" in msg
    with pytest.raises(velodiff.VelodiffError, match=r"shipped model \(default, "):
        velodiff.load("defualt")


def test_bench_by_name(tmp_path, capsys):
    code, o, err = run_cli(capsys, "bench", "pipeline", "--model", "default", "--nfe", "2", "--runs", "1",
                           "--no-progress", "--json", tmp_path / "b.json")
    assert code == 0, err
    assert "| default" in o
    import json

    records = json.loads((tmp_path / "b.json").read_text())
    runs = {r["impl"]: r for r in records if r["model"] == "default"}
    assert set(runs) == {"velodiff", "diffusers"} and runs["velodiff"]["nfe"] == runs["diffusers"]["nfe"] == 2
    assert runs["velodiff"]["max_abs_diff"] <= runs["velodiff"]["tolerance"]  # the same image as diffusers'
    # the quality-vs-speed sweep (`velodiff bench`), by name too
    code, o, err = run_cli(capsys, "bench", "--model", "default", "--solvers", "ddim", "--nfe", "2",
                           "--limit", "1", "--images-per-prompt", "1", "--metrics", "shapes", "--no-progress",
                           "--out", tmp_path / "sweep")
    assert code == 0, err
    assert (tmp_path / "sweep" / "results.json").is_file()


# --- bad input: one line each -------------------------------------------------------------------


def test_bad_input_one_line_each(picture, tiny_single_file, tmp_path, capsys):
    f, config = tiny_single_file
    out = tmp_path / "out.png"
    sd = ["--model", f, "--config", config]
    assert "not a multiple of 8" in one_error_line(capsys, "generate", "a cube", *sd, "--width", "100",
                                                  "--out", out)
    assert "not a multiple of 4" in one_error_line(capsys, "generate", "a cube", "--height", "30",
                                                  "--out", out)
    import velodiff.commands.generate as gen

    def no_load(*args, **kwargs):
        raise AssertionError("a folder's size is checked before the model loads")

    real, gen.load_model = gen.load_model, no_load
    try:
        assert "not a multiple of 4" in one_error_line(capsys, "generate", "a cube", "--width", "30",
                                                      "--out", out)
    finally:
        gen.load_model = real
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in one_error_line(capsys, "generate", "a cube", "--device", "cuda",
                                              "--out", out)
    assert "unknown device" in one_error_line(capsys, "generate", "a cube", "--device", "gpu", "--out", out)
    assert "float16" in one_error_line(capsys, "generate", "a cube", "--device", "cpu", "--dtype", "float16",
                                       "--out", out)
    assert "unknown dtype" in one_error_line(capsys, "generate", "a cube", "--dtype", "half", "--out", out)
    # the short names velodiff.load takes are the CLI's too: fp16 is float16 (refused on the CPU as such)
    assert "--dtype float16 is slow" in one_error_line(capsys, "generate", "a cube", "--device", "cpu",
                                                       "--dtype", "fp16", "--out", out)
    assert "--strength must be in [0, 1]" in one_error_line(
        capsys, "img2img", "a cube", "--image", picture, "--strength", "1.5", "--out", out
    )
    Image.new("L", (32, 64)).save(tmp_path / "small.png")
    assert "give a mask of the image's size" in one_error_line(
        capsys, "inpaint", "a cube", "--image", picture, "--mask", tmp_path / "small.png", "--out", out
    )
    assert "does not exist" in one_error_line(capsys, "img2img", "a cube", "--image", tmp_path / "no.png",
                                              "--out", out)
    (tmp_path / "folder.png").mkdir()
    assert "is a folder; give an image file" in one_error_line(capsys, "img2img", "a cube", "--image",
                                                               tmp_path / "folder.png", "--out", out)
    Image.new("RGB", (30, 30)).save(tmp_path / "odd.png")
    assert "--width 28 --height 28" in one_error_line(capsys, "img2img", "a cube", "--image",
                                                      tmp_path / "odd.png", "--out", out)
    assert "--guidance-rescale" in one_error_line(capsys, "generate", "a cube", "--guidance-rescale", "2",
                                                  "--out", out)
    assert "noise mode" in one_error_line(capsys, "generate", "a cube", "--noise", "numpy", "--out", out)
    assert "unknown prediction type 'eps'" in one_error_line(
        capsys, "generate", "a cube", "--prediction-type", "eps", "--out", out)
    assert "solver 'heun' has no option 'eta'" in one_error_line(
        capsys, "generate", "a cube", "--solver", "heun", "--eta", "1", "--out", out)
    assert "unknown model family 'sd9'" in one_error_line(capsys, "generate", "a cube", "--family", "sd9",
                                                          "--out", out)


# --- help ---------------------------------------------------------------------------------------


def test_help_fits_80_columns_with_an_example(monkeypatch, capsys):
    """Every command's help, at 80 columns: no line longer, no option name cut, one example."""
    import typer

    from velodiff import cli

    monkeypatch.setenv("COLUMNS", "80")
    cli._register()

    def walk(cmd, path):
        yield path, cmd
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    root = typer.main.get_command(cli.app)  # built once: ~0.5 s per build
    for path, cmd in walk(root, []):
        try:
            root.main([*path, "--help"], prog_name="velodiff")
        except SystemExit as e:
            assert not e.code
        text = capsys.readouterr().out
        assert "Usage: velodiff" in text, path
        where = "velodiff " + " ".join(path)
        assert max(len(line) for line in text.splitlines()) <= 80, where
        assert "…" not in text, where
        listing = text.partition("\nCommands:\n")[2].partition("\n\n")[0]
        assert "..." not in listing, (where, listing)  # click cuts a long first sentence of a command
        assert text.count("Example:") == 1, where
        for param in cmd.params:
            for name in param.opts:
                assert name in text, (where, name)


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("command", [["plans"], ["solvers"], ["solvers", "--aliases"], ["models"]])
def test_tables_fit_the_terminal(monkeypatch, capsys, columns, command):
    """`velodiff plans`, `solvers` and `models` lay their tables out at the terminal's width, not a fixed
    one, and fold long cells rather than cutting option names with '…'; at 80 columns, where a table's
    columns would be a few characters wide, each row is a block of ``header: value`` lines wrapped at
    spaces, so no word is broken."""
    from velodiff import cli
    from velodiff.solvers import SOLVERS

    monkeypatch.setenv("COLUMNS", str(columns))
    cli._register()
    with pytest.raises(SystemExit) as done:
        cli.main(command)
    assert not done.value.code
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= columns and "…" not in text
    table = [line for line in lines if line[:1] in "┃│┏┡└┗┣├"]
    if columns == 80:
        assert not table
        if command == ["solvers"]:  # each description whole, its words unbroken
            flat = " ".join(text.split())
            for s in SOLVERS.values():
                assert f"{s.name} order: {s.order}, NFE/step: {s.nfe_per_step}" in flat, s.name
                assert f"description: {' '.join(s.description.split())}" in flat, s.name
    else:
        assert table and (command == ["models"] or max(len(line) for line in table) > 160)


def test_new_early_errors_import_no_torch(tmp_path):
    """The checks made before any model work stay light (tests/test_cli_startup.py's probe)."""
    from test_cli_startup import HEAVY, probe

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    out, image = str(tmp_path / "out.png"), str(tmp_path / "in.png")
    cases = [
        ["img2img", "a cube", "--image", image, "--strength", "1.5", "--out", out],
        ["inpaint", "a cube", "--image", image, "--mask", image, "--strength", "-1", "--out", out],
        ["generate", "a cube", "--device", "cpu", "--dtype", "float16", "--out", out],
        ["generate", "a cube", "--dtype", "half", "--out", out],
        ["generate", "a cube", "--model", "defualt", "--out", out],
        ["generate", "a cube", "--noise", "numpy", "--out", out],
        ["generate", "a cube", "--guidance-rescale", "2", "--out", out],
        ["generate", "a cube", "--width", "-8", "--out", out],
        ["img2img", "a cube", "--image", str(tmp_path / "missing.png"), "--out", out],
    ]
    rows = [r for r in probe(cases) if r["argv"][-1] != "--help"]
    assert len(rows) == len(cases)
    for r in rows:
        assert r["code"] == 2, r
        assert r["heavy"] == [], f"`velodiff {' '.join(r['argv'])}` imported {r['heavy']} (of {HEAVY})"


def test_a_single_file_runs_every_model_command_with_its_config(tiny_single_file, tmp_path, capsys,
                                                                monkeypatch):
    """bench (sweeps, quantize, roofline), tune, calibrate, eval take --config / --family /
    --prediction-type as generate does (a file outside the bundled configs could only be generated from);
    the model's identity, which calibrations and cached references are keyed by, includes the config and
    a forced prediction type; --config on a folder and erase of a single file are one line each, before
    any work."""
    import velodiff
    from velodiff.eval.reference import model_identity

    f, folder = tiny_single_file
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    how = ["--model", f, "--config", folder, "--family", "sd1"]
    code, _, err = run_cli(capsys, "bench", *how, "--solvers", "ddim", "--nfe", "1", "--limit", "2",
                           "--metrics", "reference", "--reference-steps", "2", "--no-progress",
                           "--out", tmp_path / "bench")
    assert code == 0, err
    code, _, err = run_cli(capsys, "calibrate", "cache", *how, "--steps", "3", "--limit", "1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "bench", "quantize", *how, "--plans", "int8", "--prompts", "1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "bench", "roofline", *how, "--plans", "none", "--batch", "1",
                           "--steps", "1", "--rounds", "1", "--json", tmp_path / "roofline.json")
    assert code == 0, err
    eps = velodiff.load(f, config=folder, family="sd1")
    v = velodiff.load(f, config=folder, family="sd1", prediction_type="v_prediction")
    assert model_identity(eps) == model_identity(velodiff.load(f, config=folder, family="sd1"))
    assert len({model_identity(eps), model_identity(v), model_identity(velodiff.load(folder))}) == 3
    # the cache calibration made with --config is found by that identity, not by the file's hash alone
    from velodiff.accel.calibration import load_cache_calibration
    from velodiff.errors import VelodiffError

    assert load_cache_calibration(eps)["model_hash"] == model_identity(eps)
    with pytest.raises(VelodiffError, match="no cache calibration for this model"):
        load_cache_calibration(v)
    line = one_error_line(capsys, "generate", "x", "--model", folder, "--config", folder, "--out",
                          tmp_path / "x.png")
    assert "is for single-file checkpoints" in line
    line = one_error_line(capsys, "erase", "--concept", "triangle", *how, "--out", tmp_path / "erased")
    assert "single file" in line and not (tmp_path / "erased").exists()


def test_inpaint_keeps_what_the_pipeline_kept_and_resizes_the_mask(picture, tmp_path, capsys):
    """--keep pastes the input back exactly where the pipeline keeps it: a mask of gray 128 (>= 0.5, the
    pipeline's binarization) is repainted there as with --no-keep; with --width / --height the mask is
    resized with the image (nearest), and the input's pixels outside it are the resized input's."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(128, (16, 16, 48, 40))
    mask.save(tmp_path / "mask.png")
    common = ["inpaint", "a green triangle", "--image", picture, "--mask", tmp_path / "mask.png", *FAST]
    got = {}
    for keep in ("--keep", "--no-keep"):
        code, o, err = run_cli(capsys, *common, keep, "--out", tmp_path / f"{keep}.png")
        assert code == 0, err
        got[keep] = np.asarray(Image.open(tmp_path / f"{keep}.png").convert("RGB"), dtype=int)
    before = np.asarray(Image.open(picture).convert("RGB"), dtype=int)
    gray = np.asarray(mask) == 128
    assert np.array_equal(got["--keep"][gray], got["--no-keep"][gray])
    assert np.array_equal(got["--keep"][~gray], before[~gray])
    code, o, err = run_cli(capsys, *common, "--width", "96", "--height", "64", "--out", tmp_path / "wide.png")
    assert code == 0, err
    wide = np.asarray(Image.open(tmp_path / "wide.png").convert("RGB"), dtype=int)
    resized = Image.open(picture).convert("RGB").resize((96, 64), Image.Resampling.LANCZOS)
    outside = np.asarray(mask.resize((96, 64), Image.Resampling.NEAREST)) < 128
    assert wide.shape == (64, 96, 3)
    assert np.array_equal(wide[outside], np.asarray(resized, dtype=int)[outside])


def test_img2img_resizes_an_input_whose_sides_are_no_multiple_of_the_factor(picture, tmp_path, capsys):
    """An input of 66x62 (no multiple of the latent factor) runs when --width / --height give the size
    it is resized to (the API's image from the resized input), and alone is refused naming that fix; an
    input with transparent pixels is refused in one line."""
    from velodiff import load
    from velodiff.pipelines import img2img

    odd = Image.open(picture).convert("RGB").resize((66, 62))
    odd.save(tmp_path / "odd.png")
    out = tmp_path / "out.png"
    code, o, err = run_cli(capsys, "img2img", "a blue circle", "--image", tmp_path / "odd.png", "--width",
                           "64", "--height", "64", "--strength", "0.5", *FAST, "--threads", "1", "--out", out)
    assert code == 0, err
    torch.set_num_threads(1)
    resized = odd.resize((64, 64), Image.Resampling.LANCZOS)
    want = img2img(load("default"), "a blue circle", resized, 0.5, steps=2, seeds=[0]).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    msg = one_error_line(capsys, "img2img", "a blue circle", "--image", tmp_path / "odd.png", "--out", out)
    assert "pass --width 64 --height 60" in msg
    clear = Image.open(picture).convert("RGBA")
    clear.putpixel((0, 0), (0, 0, 0, 128))  # what is behind a transparent pixel is not in the file
    clear.save(tmp_path / "clear.png")
    msg = one_error_line(capsys, "img2img", "a blue circle", "--image", tmp_path / "clear.png", "--out", out)
    assert "has transparent pixels" in msg


def test_roofline_refuses_a_markdown_json_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """bench roofline writes its table beside --json as .md: a --json ending in .md (the table would
    replace the records) is refused in one line before the model loads, and nothing is written."""
    import velodiff.commands.generate as generate

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate, "load_model", no_load)
    msg = one_error_line(capsys, "bench", "roofline", "--json", tmp_path / "r.md", "--plans", "none",
                         "--batch", "1")
    assert "the markdown table goes beside it as .md; use .json" in msg
    assert not any(tmp_path.iterdir())


def test_review32_a_narrow_terminal_prints_a_table_that_fits_as_a_table_and_keeps_a_cells_lines(monkeypatch,
                                                                                                 capsys):
    """review32: at 80 columns a table that fits is still a table; one that does not is a block per row in
    which a cell of several lines keeps them (each option of a plan rule on its own line, a short one
    too) and an empty cell is left out."""
    from rich.table import Table

    from velodiff.commands.options import print_table

    monkeypatch.setenv("COLUMNS", "80")
    small = Table("name", "order")
    small.add_row("ddim", "1")
    print_table(small)
    assert "┃ name ┃ order ┃" in capsys.readouterr().out
    wide = Table("name", "order", "options", "description")
    words = "a description long enough that the table cannot fit in eighty columns " * 2
    wide.add_row("ddim", "1", "eta=0\nx=1", words)
    wide.add_row("heun", "2", "", "short")
    wide.add_row("unipc", "3", "order=3: the order, up to 3\nlower_order_final=true: the last steps", "x")
    print_table(wide)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["ddim", "  order: 1", "  options: eta=0"] and lines[3] == "    x=1"
    assert lines[lines.index("heun"):lines.index("unipc")] == ["heun", "  order: 2, description: short"]
    assert lines[lines.index("unipc") + 2:] == ["  options: order=3: the order, up to 3",
                                                "    lower_order_final=true: the last steps"]


def test_review32_the_clis_short_dtype_names_are_velodiff_loads():
    """review32: --dtype's fp32 / fp16 / bf16 name the dtypes velodiff.load reads them as."""
    from velodiff.commands.options import DTYPE_ALIASES, dtype_name
    from velodiff.models.base import DTYPES

    assert sorted(DTYPE_ALIASES) == ["bf16", "fp16", "fp32"]
    for short in DTYPE_ALIASES:
        assert getattr(torch, dtype_name(short)) == DTYPES[short] == DTYPES[dtype_name(short)], short
    assert (dtype_name(None), dtype_name("float16")) == (None, "float16")
