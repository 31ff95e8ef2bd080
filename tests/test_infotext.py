"""Generation parameters inside the image files velodiff writes (A1111's infotext): they read back as
written, in A1111's own examples too, and they are enough to make the same image again."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from velodiff.cli import main
from velodiff.default_model import default_model_path
from velodiff.files import save_image_atomic
from velodiff.infotext import format_infotext, image_infotext, model_short_hash, parse_infotext, save_options


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_the_text_reads_back_as_written():
    """Values with commas, colons, quotes or newlines are JSON strings; prompts keep their lines."""
    prompt, negative = "a red circle,\nabove: a blue square — über", 'blurry, "low" quality'
    fields = {"Steps": 8, "Sampler": "dpmpp_2m", "CFG scale": "2.5", "Seed": 12,
              "Plan": "cfg:scale=4+rescale:phi=0.7", "Layout": "red circle: 0.1,0.1,0.5,0.5", "Eta": None}
    text = format_infotext(prompt, negative, fields)
    assert "Eta" not in text and 'Plan: "cfg:scale=4+rescale:phi=0.7"' in text
    back = parse_infotext(text)
    assert back == {"Prompt": prompt, "Negative prompt": negative,
                    **{k: str(v) for k, v in fields.items() if v is not None}}
    assert parse_infotext(format_infotext("a cat", None, {"Steps": 4, "Seed": 1, "Size": "64x64"})) == {
        "Prompt": "a cat", "Steps": "4", "Seed": "1", "Size": "64x64"}
    assert parse_infotext("just a prompt: with a colon") == {"Prompt": "just a prompt: with a colon"}


def test_a1111s_own_text_parses():
    """An infotext as AUTOMATIC1111 v1.6 writes it (a quoted Lora hashes list among plain values)."""
    text = (
        "masterpiece, a lighthouse at dusk <lora:film:0.8>\n"
        "Negative prompt: lowres, bad anatomy\n"
        'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, '
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "film: 1b2c3d4e5f6a", '
        'Version: v1.6.0'
    )
    got = parse_infotext(text)
    assert got["Prompt"] == "masterpiece, a lighthouse at dusk <lora:film:0.8>"
    assert got["Negative prompt"] == "lowres, bad anatomy"
    assert got["Sampler"] == "DPM++ 2M Karras" and got["Size"] == "512x768"
    assert got["Lora hashes"] == "film: 1b2c3d4e5f6a" and got["Version"] == "v1.6.0"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_the_text_rides_in_png_jpeg_and_webp(tmp_path, suffix):
    """PNG: the parameters text chunk; JPEG / WebP: EXIF UserComment as A1111 writes it (UNICODE, UTF-16
    big-endian)."""
    text = format_infotext("ein Würfel, rot", "blurry", {"Steps": 4, "Seed": 7, "Plan": "cfg:scale=3"})
    path = tmp_path / f"x{suffix}"
    save_image_atomic(Image.new("RGB", (16, 16), "red"), path, parameters=text)
    with Image.open(path) as im:
        assert image_infotext(im) == text
    if suffix == ".jpg":
        raw = Image.open(path).getexif().get_ifd(0x8769)[0x9286]
        assert raw == b"UNICODE\0" + text.encode("utf-16-be")
    assert save_options("GIF", text) == {} and save_options("PNG", None) == {}
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert image_infotext(Image.open(buf)) is None


def test_generate_writes_what_makes_the_same_image_again(tmp_path, capsys):
    """`velodiff generate` writes its parameters into the PNG; `velodiff parameters` shows them and the
    command that makes the file again, which gives the same pixels. The model hash is A1111's short hash
    of the model."""
    import shlex

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    code, _, err = run_cli(capsys, "generate", "two red circles, a blue square",
                           "--negative", "a green cross", "--steps", "3", "--solver", "euler_ancestral",
                           "--grid", "trailing", "--guidance", "3.5", "--seed", "41", "--n", "2",
                           "--guidance-rescale", "0.5", "--threads", "2", "--out", first)
    assert code == 0, err
    got = parse_infotext(image_infotext(Image.open(first)))
    assert got["Prompt"] == "two red circles, a blue square" and got["Negative prompt"] == "a green cross"
    assert (got["Steps"], got["Sampler"], got["Schedule type"], got["CFG scale"]) == (
        "3", "euler_ancestral", "trailing", "3.5")
    assert (got["Seed"], got["Batch size"], got["Size"], got["Model"]) == ("41", "2", "64x64", "default")
    assert got["Model hash"] == model_short_hash(default_model_path()) and len(got["Model hash"]) == 10
    code, out, err = run_cli(capsys, "parameters", first)
    assert code == 0, err
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:3] == ["velodiff", "generate", got["Prompt"]] and command[-2:] == ["--out", "again.png"]
    code, _, err = run_cli(capsys, *command[1:-1], str(again), "--threads", "2")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    code, out, err = run_cli(capsys, "parameters", first, "--json")
    assert code == 0 and json.loads(out)["request"]["n"] == 2, err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, err = run_cli(capsys, "parameters", plain)
    assert code == 2 and err.strip().startswith("error: ") and "holds no generation settings" in err


def test_a_layout_generation_comes_back_with_its_boxes(tmp_path, capsys):
    """--layout's boxes are inside the file, and the command `velodiff parameters` gives makes it again."""
    import shlex

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    layout = "red circle: 0.1,0.05,0.6,0.45; blue square: 0.3,0.55,0.9,0.95"
    code, _, err = run_cli(capsys, "generate", "a red circle above a blue square", "--layout", layout,
                           "--steps", "2", "--threads", "2", "--out", first)
    assert code == 0, err
    code, out, err = run_cli(capsys, "parameters", first)
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[command.index("--layout") + 1] == layout
    code, _, err = run_cli(capsys, *command[1:-1], str(again), "--threads", "2")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
