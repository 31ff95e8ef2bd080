"""Generation parameters inside the image files velodiff writes (A1111's infotext): they read back as
written, in A1111's own examples too, and they are enough to make the same image again."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from velodiff.cli import main
from velodiff.commands.parameters import generate_command
from velodiff.default_model import default_model_path
from velodiff.files import save_image_atomic
from velodiff.infotext import (
    format_infotext,
    generation_request,
    image_infotext,
    model_short_hash,
    parse_infotext,
    save_options,
)


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
                           "--guidance-rescale", "0.5", "--eta", "0.5", "--clip-skip", "1", "--threads", "2",
                           "--out", first)
    assert code == 0, err
    got = parse_infotext(image_infotext(Image.open(first)))
    assert got["Prompt"] == "two red circles, a blue square" and got["Negative prompt"] == "a green cross"
    assert (got["Eta"], got["Clip skip"]) == ("0.5", "2")  # A1111's count: 2 is the penultimate layer
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


# review26: quoting as A1111 writes it, multi-line negatives, bad numbers, EXIF comments, the command's notes


def test_quoted_values_multiline_negatives_and_an_empty_negative_read_back():
    """A value with quotes, commas, colons, a newline or non-ASCII text is a JSON string readable as written
    (A1111's quote: ensure_ascii=False) and reads back exactly; a negative keeps its lines; an empty negative
    writes no ``Negative prompt:`` line (as A1111)."""
    fields = {"Steps": 2, "Model": 'my "best", model\\v2', "Layout": "ein Würfel: 0,0,1,1\nzwei", "Seed": 3}
    text = format_infotext("a cat", "blurry\nlow quality", fields)
    assert '"ein Würfel: 0,0,1,1\\nzwei"' in text and len(text.splitlines()) == 4
    assert parse_infotext(text) == {"Prompt": "a cat", "Negative prompt": "blurry\nlow quality", "Steps": "2",
                                    "Model": 'my "best", model\\v2', "Layout": "ein Würfel: 0,0,1,1\nzwei",
                                    "Seed": "3"}
    assert "Negative prompt" not in format_infotext("a cat", "", fields)


def test_an_images_bad_numbers_are_one_line_and_empty_texts_are_no_request_fields():
    """A number or size that does not read as one is a VelodiffError naming the field; an empty prompt or
    negative is left out of the request (no ``velodiff generate ''``)."""
    from velodiff.errors import VelodiffError
    from velodiff.infotext import generation_request

    for fields, needle in [({"Steps": "many"}, "Steps"), ({"Seed": "1.5"}, "Seed"),
                           ({"CFG scale": "high"}, "CFG scale"), ({"Size": "512 x 768"}, "WIDTHxHEIGHT"),
                           ({"Size": "512x"}, "WIDTHxHEIGHT"), ({"Size": "512"}, "WIDTHxHEIGHT")]:
        with pytest.raises(VelodiffError, match=needle):
            generation_request(fields)
    got = generation_request(parse_infotext("Negative prompt: \nSteps: 1, Seed: 2, Size: 8x16"))
    assert got == {"steps": 1, "seed": 2, "width": 8, "height": 16}


def test_an_exif_comment_in_ascii_or_cut_short_still_reads(tmp_path):
    """EXIF UserComment with the ASCII character code (other tools) reads as text; a UNICODE one with an
    odd byte count (a cut file) reads what is there instead of raising."""
    said = "a dog\nSteps: 3, Seed: 4, Size: 8x8"
    for name, raw in [("ascii.jpg", b"ASCII\0\0\0" + said.encode()),
                      ("odd.jpg", b"UNICODE\0" + said.encode("utf-16-be") + b"\0")]:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = raw
        Image.new("RGB", (8, 8)).save(tmp_path / name, exif=exif.tobytes())
        with Image.open(tmp_path / name) as im:
            assert image_infotext(im).startswith(said)


def test_a_runs_text_holds_torchs_seed_and_a_batch_size_only_for_several():
    """run_infotext: seed -1 is written as torch takes it (2**64 - 1, not A1111's "random"); one image has
    no Batch size field, n images have it."""
    from types import SimpleNamespace

    from velodiff.infotext import run_infotext

    res = SimpleNamespace(images=[Image.new("RGB", (16, 8))], info={}, steps=2, solver="euler", grid="karras",
                          guidance=2.0, nfe=4, plan="cfg")
    one = parse_infotext(run_infotext("a cat", None, res, -1, default_model_path()))
    assert (one["Seed"], one["Size"], one["Steps"]) == (str(2**64 - 1), "16x8", "2")
    assert "Batch size" not in one
    several = parse_infotext(run_infotext("a cat", None, res, 5, default_model_path(), n=3))
    assert (several["Seed"], several["Batch size"]) == ("5", "3")


def test_parameters_says_an_img2img_file_needs_its_input_and_a_text_without_prompt_is_shown(tmp_path, capsys):
    """`velodiff parameters`: an img2img / inpaint file (Denoising strength) gets a note, not a generate
    command that would make another picture; a text without a prompt is shown with no command."""
    from velodiff.infotext import save_options

    made = tmp_path / "img2img.png"
    text = format_infotext("a cat", None, {"Steps": 4, "Seed": 1, "Size": "8x8", "Denoising strength": "0.6"})
    Image.new("RGB", (8, 8)).save(made, **save_options("PNG", text))
    code, out, err = run_cli(capsys, "parameters", made)
    assert code == 0, err
    assert "img2img or inpaint at strength 0.6" in out and "velodiff generate" not in out
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare, **save_options("PNG", "Steps: 4, Seed: 1, Size: 8x8"))
    code, out, err = run_cli(capsys, "parameters", bare)
    assert code == 0 and out.strip() == "Steps: 4, Seed: 1, Size: 8x8", err


def test_a_torch_noise_generation_says_so_and_its_command_asks_for_it(tmp_path, capsys):
    """--noise torch (one tensor for the batch: other pixels than velodiff's per-image noise) is inside the
    file, and the command `velodiff parameters` gives asks for it again."""
    import shlex

    first = tmp_path / "torch.png"
    code, _, err = run_cli(capsys, "generate", "a red circle", "--noise", "torch", "--steps", "1", "--n", "2",
                           "--threads", "2", "--out", first)
    assert code == 0, err
    assert parse_infotext(image_infotext(Image.open(first)))["Noise"] == "torch"
    code, out, err = run_cli(capsys, "parameters", first)
    command = shlex.split(out.strip().splitlines()[-1])
    assert code == 0 and command[command.index("--noise") + 1] == "torch", err


def test_foreign_or_broken_texts_read_as_far_as_they_go():
    """A1111's rules where a text is not velodiff's: a quoted value that is not JSON is kept as written (one
    bad pair does not lose the others); a Size that is not ASCII digits is one line; a hires-fix txt2img's
    Denoising strength (its second pass) is no img2img strength."""
    from velodiff.errors import VelodiffError
    from velodiff.infotext import generation_request

    got = parse_infotext('a cat\nSteps: 4, Sampler: "\\q", Seed: 2, Note: "a" b"')
    assert (got["Steps"], got["Sampler"], got["Seed"], got["Note"]) == ("4", '"\\q"', "2", '"a" b"')
    for size in ("²x3", "1" * 5000 + "x2", "64 x 64"):
        with pytest.raises(VelodiffError, match="is not WIDTHxHEIGHT"):
            generation_request({"Size": size})
    hires = {"Size": "512x512", "Denoising strength": "0.7", "Hires upscale": "1.5", "Steps": "20"}
    assert generation_request(hires) == {"steps": 20, "width": 768, "height": 768}  # the image's size
    assert generation_request({**hires, "Hires resize": "1024x640"})["width"] == 1024
    assert generation_request({"Denoising strength": "0.7"}) == {"strength": 0.7}
    one_of_four = {"Seed": "1237", "Batch size": "4", "Batch pos": "2"}  # an older A1111's single image
    assert generation_request(one_of_four) == {"seed": 1237}


def test_the_written_seed_is_one_the_command_takes_back():
    """The first seed of n as the file says it: unsigned (-1 is 2**64 - 1, which A1111 would not read as
    "random"), unless its n-th image would pass 2**64; always a seed velodiff takes with that n, of the
    same images (seeds are taken modulo 2**64)."""
    from velodiff.infotext import written_seed
    from velodiff.limits import SEED_END, SEED_MIN

    assert written_seed(-1, 1) == 2**64 - 1 and written_seed(7, 4) == 7
    for seed, n in ((-1, 2), (-5, 8), (2**64 - 2, 2), (-(2**63), 3), (0, 1)):
        w = written_seed(seed, n)
        assert SEED_MIN <= w and w + n - 1 < SEED_END and w % 2**64 == seed % 2**64


def test_settings_too_long_for_a_jpeg_leave_the_image_written(tmp_path):
    """A JPEG's EXIF is one 64 KiB segment: settings longer than that are left out with a warning, the image
    is still written (PNG and WebP hold any length)."""
    text = format_infotext("x" * 40_000, None, {"Steps": 1, "Seed": 1, "Size": "8x8"})
    with pytest.warns(UserWarning, match="do not fit a JPEG's EXIF"):
        save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "long.jpg", parameters=text)
    assert image_infotext(Image.open(tmp_path / "long.jpg")) is None
    save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "long.webp", parameters=text)
    assert image_infotext(Image.open(tmp_path / "long.webp")) == text


def test_an_exif_comment_little_endian_or_empty(tmp_path):
    """A UTF-16 comment in little-endian order (exiftool writes the TIFF header's) reads as text; a comment
    that is only its character code holds no settings."""
    text = "a cat\nSteps: 4, Seed: 1, Size: 8x8"
    for body, want in ((text.encode("utf-16-le"), text), (b"", None)):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + body
        path = tmp_path / "c.jpg"
        Image.new("RGB", (8, 8)).save(path, exif=exif.tobytes())
        assert image_infotext(Image.open(path)) == want


def test_a1111_noise_is_written_as_a1111s_rng_and_read_back(tmp_path, capsys):
    """--noise a1111-cpu / a1111-nv (a generator per image: no --batch rule) write A1111's own field "RNG:
    CPU" / "RNG: NV", which A1111's paste applies; read back, an A1111 or Forge text's noise source is
    asked for: its RNG field, else its default GPU source (as an NVIDIA card draws it: a1111-nv), while a
    text of no known maker says nothing of its noise and velodiff's own Noise field wins."""
    import shlex

    from velodiff.infotext import generation_request

    for mode, rng in (("a1111-cpu", "CPU"), ("a1111-nv", "NV")):
        out = tmp_path / f"{mode}.png"
        code, _, err = run_cli(capsys, "generate", "a red circle", "--noise", mode, "--solver", "Euler a",
                               "--steps", "2", "--n", "2", "--batch", "1", "--threads", "2", "--out", out)
        assert code == 0, err
        fields = parse_infotext(image_infotext(Image.open(out)))
        assert (fields["Noise"], fields["RNG"]) == (mode, rng)
        code, said, err = run_cli(capsys, "parameters", out)
        command = shlex.split(said.strip().splitlines()[-1])
        assert code == 0 and command[command.index("--noise") + 1] == mode, err
    text = "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3, Size: 64x64"
    def noise(extra: str) -> str | None:
        return generation_request(parse_infotext(text + extra)).get("noise")

    assert noise(", RNG: CPU") == noise(", RNG: CPU, Version: v1.10.1") == "a1111-cpu"
    assert noise(", Version: v1.10.1") == noise(", Version: f2.0.1v1.10.1") == "a1111-nv"
    assert noise(", RNG: NV") == noise(", RNG: GPU") == "a1111-nv"
    assert noise("") is None and noise(", Version: velodiff 0.1.0") is None
    assert noise(", RNG: CPU, Noise: torch") == "torch"


def test_a1111_noise_settings_velodiff_does_not_draw_are_said(tmp_path, capsys):
    """An A1111 image whose noise also depends on ENSD, a variation seed or a seed resize: `velodiff
    parameters` says so beside the command (which still runs: another picture), and they are among the
    fields a server job cannot take; zero ENSD and a variation seed at strength 0 change nothing."""
    from velodiff.infotext import not_drawn

    base = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 5, "Size": "64x64"}
    assert not_drawn(base | {"ENSD": "0", "Variation seed": "9", "Variation seed strength": "0"}) == {}
    assert not_drawn(base | {"ENSD": "31337", "Seed resize from": "512x512"}) == {
        "ENSD": "31337", "Seed resize from": "512x512"}
    assert not_drawn(base | {"Variation seed": "9", "Variation seed strength": "0.3"}) == {
        "Variation seed": "9", "Variation seed strength": "0.3"}
    out = tmp_path / "a1111.png"
    text = format_infotext("a red circle", None, {**base, "ENSD": 31337, "Version": "v1.10.1"})
    Image.new("RGB", (8, 8)).save(out, **save_options("PNG", text))
    code, said, err = run_cli(capsys, "parameters", out)
    assert code == 0 and "ENSD: 31337, which velodiff does not draw" in said, err
    assert said.strip().splitlines()[-1].startswith("velodiff generate")


def test_a1111s_clip_skip_eta_and_loras_come_back_as_velodiffs():
    """A1111 counts ``Clip skip`` from 1 (no skip) where diffusers' clip_skip counts the layers skipped;
    Eta and Embedded guidance are the run's; LoRAs are named (a text holds no paths)."""
    base = "a cube\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"
    assert "clip_skip" not in generation_request(parse_infotext(base + ", Clip skip: 1"))
    req = generation_request(parse_infotext(
        base + ', Clip skip: 2, Eta: 0.7, Embedded guidance: 3.5, Lora hashes: "pixel: 1a2b3c4d5e", '
        'Lora scales: "pixel: 0.8"'))
    assert (req["clip_skip"], req["eta"], req["embedded_guidance"]) == (1, 0.7, 3.5)
    assert req["loras"] == "pixel: 1a2b3c4d5e (scales pixel: 0.8)"
    command = generate_command(req)
    assert "--clip-skip 1" in command and "--eta 0.7" in command and "--embedded-guidance 3.5" in command
    assert "pixel" not in command  # named beside the command by `velodiff parameters`, not a path



def test_review32_parameters_names_a_files_loras_and_no_skip_writes_no_clip_skip(tmp_path, capsys):
    """review32: `velodiff parameters` on a file made with LoRAs names them (hashes and scales) beside the
    command, which cannot load them; A1111's Clip skip is written only for a skip (1 -> 2, none -> none)."""
    from velodiff.infotext import a1111_clip_skip

    made = tmp_path / "lora.png"
    text = format_infotext("a cat", None, {"Steps": 4, "Seed": 1, "Size": "8x8",
                                           "Lora hashes": "pixel: 1a2b3c4d5e", "Lora scales": "pixel: 0.8"})
    Image.new("RGB", (8, 8)).save(made, **save_options("PNG", text))
    code, out, err = run_cli(capsys, "parameters", made)
    assert code == 0, err
    assert ("(made with the LoRAs pixel: 1a2b3c4d5e (scales pixel: 0.8): add --lora FILE --lora-scale S for "
            "each)") in out
    assert out.strip().splitlines()[-1].startswith("velodiff generate 'a cat'")
    assert (a1111_clip_skip(None), a1111_clip_skip(0), a1111_clip_skip(1), a1111_clip_skip(2)) == (
        None, None, 2, 3)
