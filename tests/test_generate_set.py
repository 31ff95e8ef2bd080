"""`velodiff generate-set`: prompt files (errors name the line), a set killed with SIGKILL twice (at a
third and two thirds of its manifest) and resumed ends byte-identical to an uninterrupted run, corrupt
or missing images are made again, a different model or config is refused, and `velodiff eval
--manifest` reads a partial set."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from velodiff.cli import main
from velodiff.errors import VelodiffError
from velodiff.files import lock_folder
from velodiff.sets.prompts import load_prompt_file
from velodiff.sets.run import generate_set
from velodiff.sets.store import LINES, read_records, read_set

N = 16
CONFIG = dict(seed=7, images_per_prompt=1, steps=2, solver=None, grid=None, guidance=None, negative=None,
              height=None, width=None, batch=2, threads=1, noise="velodiff", plan="none")
FAST = ["--steps", "2", "--batch", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import sd_tiny

    return sd_tiny.save_sd(tmp_path_factory.mktemp("gs") / "tiny", "sd1")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    words = ["red", "blue", "green"], ["cube", "sphere", "cat", "dog"]
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(f"a {words[0][i % 3]} {words[1][i % 4]} on the table" for i in range(N)) + "\n")
    return p


@pytest.fixture(scope="module")
def reference(tiny, prompt_file, tmp_path_factory):
    """An uninterrupted run (in process)."""
    out = tmp_path_factory.mktemp("ref") / "set"
    generate_set(load_prompt_file(prompt_file), out, model_path=tiny, config=CONFIG)
    return out


def cli(*args: str) -> int:
    """Run the CLI in process; its exit status (typer exits with SystemExit on success)."""
    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def one_error_line(capsys, *args: str) -> str:
    code = cli(*args)
    _, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- prompt files -------------------------------------------------------------------------------


def test_text_json_and_coco_prompts(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("a red cube\n\n  a blue cat  \r\n")
    ps = load_prompt_file(t)
    assert [p.text for p in ps] == ["a red cube", "a blue cat"] and ps[1].source == {"line": 3}
    j = tmp_path / "p.json"
    j.write_text('[\n "a red cube",\n {"prompt": "a dog"}\n]')
    assert [(p.text, p.source["line"]) for p in load_prompt_file(j)] == [("a red cube", 2), ("a dog", 3)]
    coco = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": 10, "caption": "A cat  on a mat. "},
                                                   {"image_id": 1, "id": 11, "caption": "a sleeping cat"}]}
    c = tmp_path / "captions_val.json"
    c.write_text(json.dumps(coco, indent=1))
    ps = load_prompt_file(c, limit=1)
    assert len(ps) == 1 and ps[0].text == "A cat on a mat." and ps[0].source["id"] == 10
    from importlib import resources

    shapes = load_prompt_file(str(resources.files("velodiff") / "assets" / "prompts" / "shapes_v1.json"))
    assert len(shapes) == 100 and shapes[0].text == "a blue cross"


@pytest.mark.parametrize(
    "name,data,expect",
    [
        ("empty.txt", b"\n \n", "has no prompts"),
        ("bad.txt", b"a red cube\na \xff cat\n", "line 2 is not UTF-8"),
        ("bad.json", b'[\n "a",\n "b"\n "c"\n]', "invalid JSON at line 4"),
        ("ctl.json", b'["a\nb"]', "invalid JSON at line 1 column 4 (invalid control character)"),
        ("cut.json", b'{"bad json', "invalid JSON at line 1 column 2 (unterminated string starting)"),
        ("num.json", b'[\n "a",\n\n 3\n]', "line 4 (item 1): expected a prompt string, got a number"),
        ("empty.json", b"[]", "has no prompts"),
        ("obj.json", b'{"a": 1}', "expected a JSON list of prompts"),
        ("coco.json", b'{"annotations": [\n {"caption": "x"},\n {"id": 3}\n]}', "line 3 (annotation 1)"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, capsys, name, data, expect):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(VelodiffError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        load_prompt_file(p)
    line = one_error_line(capsys, "generate-set", str(p), "--out", str(tmp_path / "o"), "--model", str(p))
    assert expect.split(" (")[0] in line
    assert not (tmp_path / "o").exists()


# --- kill, resume, refuse to mix -----------------------------------------------------------------


def _lines(folder: Path) -> int:
    try:
        return (folder / LINES).read_bytes().count(b"\n")
    except OSError:
        return 0


def _kill_when(cmd: list[str], folder: Path, at_lines: int) -> bool:
    """Start the CLI and SIGKILL it as soon as its manifest has ``at_lines`` lines (polled every 5 ms);
    True if it was killed before it finished."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and _lines(folder) < at_lines and time.monotonic() < deadline:
            time.sleep(0.005)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return killed


def test_sigkill_twice_then_resume_is_byte_identical(tiny, prompt_file, reference, tmp_path, capsys):
    """Killed when a third and then two thirds of the manifest are written (progress, not a delay:
    batches of 2 images leave a third of the set to go), damaged, resumed: the same bytes."""
    out = tmp_path / "set"
    cmd = [sys.executable, "-m", "velodiff.cli", "generate-set", str(prompt_file), "--out", str(out),
           "--model", str(tiny), *FAST]
    for at in (N // 3, 2 * N // 3):
        assert _kill_when(cmd, out, at), f"the run finished before it was killed at {at} lines"
    done_after_kills = len(read_set(out).records)
    assert 0 < done_after_kills < N
    # damage: a torn manifest line, a corrupt image and a missing image
    recs = read_set(out).records
    (out / recs[0]["file"]).write_bytes(b"not a png")
    (out / recs[-1]["file"]).unlink()
    with open(out / LINES, "ab") as f:
        f.write(b'{"index": 3, "prompt": "a')
    code = cli("generate-set", str(prompt_file), "--out", str(out))  # config comes from the set
    o, err = capsys.readouterr()
    assert code == 0, err
    assert "dropped 1 unreadable manifest line" in err
    assert (out / LINES).read_bytes() == (reference / LINES).read_bytes()
    records, bad = read_records(out)
    assert sorted(records) == list(range(N)) and bad == 0
    for r in records.values():
        assert (out / r["file"]).read_bytes() == (reference / r["file"]).read_bytes()
    assert not list(out.rglob(".*.tmp"))
    # a finished set resumed again does nothing
    assert cli("generate-set", str(prompt_file), "--out", str(out)) == 0
    assert f"({N} already there, 0 generated now)" in capsys.readouterr().out


def test_refuses_to_mix_and_keeps_what_is_there(tiny, prompt_file, reference, tmp_path, capsys):
    out = tmp_path / "set"
    shutil.copytree(reference, out)
    before = (out / LINES).read_bytes()
    line = one_error_line(capsys, "generate-set", str(prompt_file), "--out", str(out), "--steps", "3")
    assert "steps=2" in line and "steps=3" in line and "refusing to mix" in line
    line = one_error_line(capsys, "generate-set", str(prompt_file), "--out", str(out), *FAST,
                          "--plan", "cfg:stop=0.5")
    assert "plan='none'" in line and "plan='cfg:stop=0.5'" in line and "refusing to mix" in line
    other = tmp_path / "other-model"
    shutil.copytree(tiny, other)
    idx = other / "model_index.json"
    idx.write_text(idx.read_text() + "\n")  # same network, different files: a different model
    line = one_error_line(capsys, "generate-set", str(prompt_file), "--out", str(out), "--model", str(other))
    assert "another model" in line
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join(prompt_file.read_text().splitlines()[:5]))
    assert "other prompts" in one_error_line(capsys, "generate-set", str(fewer), "--out", str(out))
    limited = tmp_path / "limited"
    assert cli("generate-set", str(prompt_file), "--out", str(limited), "--model", str(tiny), "--limit", "1",
               *FAST) == 0
    line = one_error_line(capsys, "generate-set", str(prompt_file), "--out", str(limited), "--limit", "3")
    assert "generated from 1 prompts of" in line and "this run reads 3 (another --limit, or the file" in line
    assert (out / LINES).read_bytes() == before
    lock = lock_folder(out)
    try:
        assert "another velodiff process" in one_error_line(
            capsys, "generate-set", str(prompt_file), "--out", str(out))
    finally:
        lock.close()
    header = json.loads((out / "manifest.json").read_text())
    for damage, expect in ((dict(config=[]), "'config' must be an object"),
                           (dict(config={**header["config"], "batch": "2"}), "batch='2'"),
                           (dict(model="m"), "'model' must be an object")):
        (out / "manifest.json").write_text(json.dumps({**header, **damage}))
        assert expect in one_error_line(capsys, "generate-set", str(prompt_file), "--out", str(out))
    assert (out / LINES).read_bytes() == before
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert "holds no image set" in one_error_line(
        capsys, "generate-set", str(prompt_file), "--out", str(junk), "--model", str(tiny))
    # killed while it wrote its header: the folder holds that header's temporary alone, and is its own
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".manifest.json.0a1b2c3d.tmp").write_text('{"format": "velodiff-ima')
    assert cli("generate-set", str(prompt_file), "--out", str(killed), "--model", str(tiny), "--limit", "1",
               *FAST) == 0
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith(".manifest")) == []


def test_the_fingerprint_covers_the_lora_files_by_content(tiny, tmp_path):
    """A LoRA retrained in place is another set's adapter: the fingerprint follows its bytes."""
    from velodiff.sets.fingerprint import load_fingerprint

    lora = tmp_path / "adapter.safetensors"
    lora.write_bytes(b"first weights")
    plain, with_lora = load_fingerprint(tiny), load_fingerprint(tiny, lora=[str(lora)])
    assert plain != with_lora == load_fingerprint(tiny, lora=[str(lora)])
    lora.write_bytes(b"other weights")
    assert load_fingerprint(tiny, lora=[str(lora)]) not in (plain, with_lora)


def test_load_options_and_size_are_the_sets_and_resume_from_it(tiny, prompt_file, tmp_path, capsys):
    """A single file with its --config folder, at another size: the options are recorded (paths absolute),
    a resume without them takes the set's, another value or changed config files are refused, and the
    images are the folder's own (the same weights)."""
    import ldm_layout

    file = ldm_layout.save_sd1_single_file(tiny, tmp_path / "tiny.safetensors")
    base = ["generate-set", str(prompt_file), "--limit", "2", "--width", "32", "--height", "48", *FAST]
    out, ref = tmp_path / "set", tmp_path / "from-folder"
    assert cli(*base, "--out", str(out), "--model", str(file), "--config", str(tiny)) == 0
    assert cli(*base, "--out", str(ref), "--model", str(tiny)) == 0
    capsys.readouterr()
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["config"] == str(tiny.resolve()) and (config["width"], config["height"]) == (32, 48)
    assert (config["device"], config["dtype"], config["lora"]) == ("cpu", "float32", None)
    assert cli("generate-set", str(prompt_file), "--limit", "2", "--out", str(out)) == 0
    assert "(2 already there, 0 generated now)" in capsys.readouterr().out
    for r in read_set(out).records:
        from PIL import Image

        assert Image.open(out / r["file"]).size == (32, 48)
        assert (out / r["file"]).read_bytes() == (ref / r["file"]).read_bytes()
    other = tmp_path / "other-config"
    shutil.copytree(tiny, other)
    line = one_error_line(capsys, *base, "--out", str(out), "--model", str(file), "--config", str(other))
    assert "config=" in line and "refusing to mix" in line
    (tiny / "unet" / "config.json").write_text((tiny / "unet" / "config.json").read_text() + "\n")
    try:
        line = one_error_line(capsys, "generate-set", str(prompt_file), "--limit", "2", "--out", str(out))
        assert "another model" in line
    finally:
        (tiny / "unet" / "config.json").write_text((tiny / "unet" / "config.json").read_text()[:-1])
    assert "--width 33 is not a multiple" in one_error_line(
        capsys, *base[:4], "--width", "33", "--out", str(tmp_path / "w"), "--model", str(tiny))
    assert "seed range" in one_error_line(
        capsys, *base[:4], "--seed", str(2**64 - 1), "--out", str(tmp_path / "s"), "--model", str(tiny))
    assert not (tmp_path / "w").exists() and not (tmp_path / "s").exists()


def test_eta_rescale_and_clip_skip_are_the_sets_as_generate_takes_them(tiny, prompt_file, tmp_path, capsys):
    """generate's --eta, --guidance-rescale and --clip-skip: recorded, taken on a resume, and each image
    is text2img's with them (as velodiff generate makes it)."""
    import velodiff
    from velodiff.pipelines import text2img

    out = tmp_path / "set"
    args = ["generate-set", str(prompt_file), "--limit", "2", "--out", str(out), "--model", str(tiny),
            "--steps", "2", "--solver", "ddim", "--guidance", "4", "--eta", "1", "--guidance-rescale", "0.5",
            "--clip-skip", "1"]
    assert cli(*args) == 0 and cli("generate-set", str(prompt_file), "--limit", "2", "--out", str(out)) == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["eta"], config["guidance_rescale"], config["clip_skip"]) == (1.0, 0.5, 1)
    model = velodiff.load(tiny)
    model.clip_skip = 1
    r = read_set(out).records[1]
    want = text2img(model, r["prompt"], seeds=[r["seed"]], steps=2, solver="ddim", guidance=4.0,
                    guidance_rescale=0.5, solver_options={"eta": 1.0})
    from velodiff.images import png_bytes

    assert (out / r["file"]).read_bytes() == png_bytes(want.images[0])
    assert "eta=1.0, this run asks eta=0.5" in one_error_line(
        capsys, "generate-set", str(prompt_file), "--limit", "2", "--out", str(out), "--eta", "0.5")


def test_a_plans_solver_and_nfe_are_what_the_set_records_and_resumes_with(tiny, prompt_file, tmp_path,
                                                                          capsys):
    """A plan that fixes the solver and the network calls (a tune's plan.txt) draws the images with them, as
    generate does: the set's config records them (not the command's defaults), a resume that asks for
    them is accepted, and each image is text2img's with --solver / --nfe."""
    import velodiff
    from velodiff.images import png_bytes
    from velodiff.pipelines import text2img

    out = tmp_path / "set"
    base = ["generate-set", str(prompt_file), "--limit", "2", "--out", str(out), "--model", str(tiny)]
    assert cli(*base, "--plan", "solver=ddim+nfe=3+cfg:t_lo=0.5") == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["solver"], config["steps"], config["nfe"]) == ("ddim", None, 3)
    assert cli(*base, "--plan", "solver=ddim+nfe=3+cfg:t_lo=0.5", "--solver", "ddim", "--nfe", "3") == 0
    r = read_set(out).records[1]
    want = text2img(velodiff.load(tiny), r["prompt"], seeds=[r["seed"]], solver="ddim", nfe=3,
                    plan="cfg:t_lo=0.5")
    assert want.steps == 3 and (out / r["file"]).read_bytes() == png_bytes(want.images[0])
    assert "steps=None, this run asks steps=3" in one_error_line(capsys, *base, "--steps", "3")


def test_a_set_on_the_calibrated_grid_is_not_finished_on_a_new_calibration(tmp_path, capsys, monkeypatch):
    """The calibrated grid comes from an artefact outside the set: one made (or made again) between a
    set's runs would finish it on another grid, so the calibrations it read are in its header."""
    from velodiff.calibrated import save_solver_calibration
    from velodiff.eval.reference import model_hash
    from velodiff.shipped import shipped_path

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "set"
    args = ["generate-set", str(prompts), "--out", str(out), "--limit", "1", "--grid", "calibrated",
            "--solver", "unipc", "--steps", "5", "--guidance", "2.5"]
    assert cli(*args) == 0
    assert json.loads((out / "manifest.json").read_text())["calibration"]
    assert cli(*args) == 0  # the same calibrations: resumed
    entry = {"solver": "unipc", "nfe": 5, "method": "grid", "ts": [1.0, 0.8, 0.6, 0.4, 0.2, 0.0],
             "options": {}}
    default = model_hash(shipped_path("default"))
    save_solver_calibration({"version": 1, "kind": "solver", "model_hash": default, "guidance": 2.5,
                             "entries": [entry]}, None)
    line = one_error_line(capsys, "generate-set", str(prompts), "--out", str(out), "--limit", "1")
    assert "other calibrations of the model" in line
    plain = tmp_path / "plain"  # a set that reads no calibration records none
    assert cli("generate-set", str(prompts), "--out", str(plain), "--limit", "1", "--steps", "2") == 0
    assert "calibration" not in json.loads((plain / "manifest.json").read_text())


def test_a_set_from_before_the_load_options_and_a_negative_seed_resume(
    tiny, reference, prompt_file, tmp_path, capsys
):
    out = tmp_path / "set"
    shutil.copytree(reference, out)
    header = json.loads((out / "manifest.json").read_text())
    for k in ("config", "family", "prediction_type", "lora", "lora_scale", "device", "dtype", "eta",
              "guidance_rescale", "clip_skip"):
        del header["config"][k]
    (out / "manifest.json").write_text(json.dumps(header))
    assert cli("generate-set", str(prompt_file), "--out", str(out)) == 0
    assert f"({N} already there, 0 generated now)" in capsys.readouterr().out
    neg = tmp_path / "negative"
    args = ["generate-set", str(prompt_file), "--limit", "2", "--out", str(neg), "--model", str(tiny),
            *FAST[:4], "--seed", "-3"]
    assert cli(*args) == 0 and cli("generate-set", str(prompt_file), "--limit", "2", "--out", str(neg)) == 0
    assert "(2 already there, 0 generated now)" in capsys.readouterr().out.splitlines()[-1]
    assert [r["seed"] for r in read_set(neg).records] == [-3, -2]


# --- eval --manifest -----------------------------------------------------------------------------


def test_eval_manifest_partial_set_and_missing_weights(reference, tmp_path, capsys):
    pytest.importorskip("velodiff.eval.metrics")
    part = tmp_path / "part"
    shutil.copytree(reference, part)
    recs = (part / LINES).read_bytes().splitlines(keepends=True)
    (part / LINES).write_bytes(b"".join(recs[:5]))  # a partial set: 5 of 16 finished
    out_json = tmp_path / "m.json"
    code = cli("eval", "--manifest", str(part), "--reference", str(reference), "--json", str(out_json))
    o, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out_json.read_text())
    assert res["images"] == 5 and res["total"] == N and not res["complete"]
    assert res["reference"]["n"] == 5 and res["reference"]["ssim"] == pytest.approx(1.0)
    before = sorted(p.name for p in part.rglob("*"))
    line = one_error_line(capsys, "eval", "--manifest", str(part), "--real", str(reference),
                          "--features", str(tmp_path / "inception-2015-12-05.pt"))
    assert "Inception" in line
    line = one_error_line(capsys, "eval", "--manifest", str(part), "--clip", str(tmp_path / "clip"))
    assert "CLIP" in line
    line = one_error_line(capsys, "eval", "--manifest", str(part), "--json", str(part / "manifest.json"))
    assert "is inside the set" in line  # it replaced the set's manifest, and the set was lost
    assert sorted(p.name for p in part.rglob("*")) == before
    assert "does not exist" in one_error_line(capsys, "eval", "--manifest", str(tmp_path / "nope"))
    assert cli("eval", "--manifest", str(part)) == 0  # the set's state, and how to measure it
    o, err = capsys.readouterr()
    assert json.loads(o)["images"] == 5 and err.startswith("no metric asked for: --real shapes")


def test_eval_manifest_real_and_reference_are_the_direct_computations(tiny, prompt_file, reference, tmp_path):
    """`eval --manifest`'s FD / KID (against another set, or the shapes world drawn for the set's own
    prompts and seeds) and PSNR / SSIM against a reference set are DistributionMetrics' and psnr / ssim's
    numbers on the same images."""
    from PIL import Image

    from velodiff.data.shapes import ShapesWorld
    from velodiff.eval.metrics import DistributionMetrics, psnr, ssim
    from velodiff.sets.store import read_set

    def images(folder):
        s = read_set(folder)
        return [Image.open(s.folder / r["file"]).convert("RGB") for r in s.records], s.records

    other = tmp_path / "other"  # the same prompts and seeds, 3 steps instead of 2
    assert cli("generate-set", str(prompt_file), "--out", str(other), "--model", str(tiny), "--steps", "3",
               "--batch", "2", "--seed", "7") == 0
    out = tmp_path / "m.json"
    assert cli("eval", "--manifest", str(reference), "--real", str(other), "--reference", str(other),
               "--json", str(out)) == 0
    res = json.loads(out.read_text())
    mine, _ = images(reference)
    theirs, _ = images(other)
    dist = DistributionMetrics("fd-shapes", kid=True)
    dist.add_real(theirs)
    dist.add_fake(mine)
    want = dist.compute()
    assert res["distribution"]["fd"] == pytest.approx(want["fd"]) and res["distribution"]["fd"] > 0
    assert res["distribution"]["kid"] == pytest.approx(want["kid"])
    p = psnr(mine, theirs)
    ref = res["reference"]
    assert ref["n"] == N and ref["psnr"] == pytest.approx(float(p[p.isfinite()].mean()))
    assert ref["identical"] == int((~p.isfinite()).sum())
    assert ref["ssim"] == pytest.approx(float(ssim(mine, theirs).mean())) and ref["ssim"] < 1
    # --real shapes: the world's renders of the set's own prompts and seeds
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("a red circle\ntwo blue squares\n")
    drawn = tmp_path / "drawn"
    assert cli("generate-set", str(shapes), "--out", str(drawn), "--steps", "2", "--seed", "3") == 0
    assert cli("eval", "--manifest", str(drawn), "--real", "shapes", "--json", str(out)) == 0
    res = json.loads(out.read_text())
    fake, records = images(drawn)
    world = ShapesWorld()
    dist = DistributionMetrics("fd-shapes", kid=True)
    dist.add_real([world.render(r["prompt"], seed=r["seed"]).image for r in records])
    dist.add_fake(fake)
    assert res["distribution"]["fd"] == pytest.approx(dist.compute()["fd"])
    # a folder of real images of several sizes (as COCO's are): each is resized by the extractor
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    reals = [world.render(r["prompt"], seed=r["seed"]).image for r in records]
    for i, (im, size) in enumerate(zip(reals, [(64, 64), (80, 60)], strict=True)):
        Image.fromarray(im).resize(size).save(mixed / f"{i}.png")
    assert cli("eval", "--manifest", str(drawn), "--real", str(mixed), "--json", str(out)) == 0
    assert json.loads(out.read_text())["distribution"]["fd"] > 0


# --- review21: images per prompt, the negative prompt and noise mode of a set, the writer, the header --


def test_images_per_prompt_negative_and_noise_are_the_sets(tiny, tmp_path):
    """With k images per prompt, image i is prompt i // k's with seed seed + i; the set's total counts
    them all; each chunk is text2img's batch of its images with the set's negative prompt and noise."""
    import velodiff
    from velodiff.images import png_bytes
    from velodiff.pipelines import text2img
    from velodiff.sets.prompts import Prompt

    prompts = [Prompt(f"a {c} cube", {"line": i + 1}) for i, c in enumerate(("red", "blue", "green"))]
    config = {**CONFIG, "images_per_prompt": 2, "batch": 4, "negative": "a dog", "noise": "torch"}
    out = tmp_path / "set"
    summary = generate_set(prompts, out, model_path=tiny, config=config)
    assert (summary.total, summary.generated) == (6, 6)
    s = read_set(out)
    assert s.total == 6 and s.complete
    assert [(r["prompt"], r["seed"]) for r in s.records] == [
        (prompts[i // 2].text, 7 + i) for i in range(6)]
    model = velodiff.load(tiny)
    for chunk in ([0, 1, 2, 3], [4, 5]):
        want = text2img(model, [prompts[i // 2].text for i in chunk], seeds=[7 + i for i in chunk], steps=2,
                        negative="a dog", noise="torch")
        for i, im in zip(chunk, want.images, strict=True):
            assert (out / s.records[i]["file"]).read_bytes() == png_bytes(im), i


def test_the_writer_writes_an_index_once(tmp_path):
    """A retried shard's images are not written again: the first write stays, with one manifest line."""
    from velodiff.sets.items import IMAGES, plan_items
    from velodiff.sets.prompts import Prompt
    from velodiff.sets.store import SetWriter, sha256_bytes

    (tmp_path / IMAGES).mkdir()
    items = plan_items([Prompt("a red cube"), Prompt("a blue cube")], {"seed": 0, "images_per_prompt": 1})
    writer = SetWriter(tmp_path, items, {})
    try:
        assert writer.write(1, b"first") and not writer.write(1, b"second")
    finally:
        writer.close()
    records, bad = read_records(tmp_path)
    assert bad == 0 and list(records) == [1] and records[1]["sha256"] == sha256_bytes(b"first")
    assert len((tmp_path / LINES).read_bytes().splitlines()) == 1
    assert (tmp_path / items[1].file).read_bytes() == b"first"


@pytest.mark.parametrize("key", ["batch", "images_per_prompt", "threads"])
def test_a_header_with_a_zero_count_is_damaged(tmp_path, key):
    from velodiff.sets.store import FORMAT, HEADER, read_header

    header = {"format": FORMAT, "model": {"path": "m", "fingerprint": "f"}, "prompts": {"sha256": "p"},
              "config": {"seed": 0, "images_per_prompt": 1, "batch": 2, "threads": 1, key: 0}}
    (tmp_path / HEADER).write_text(json.dumps(header))
    with pytest.raises(VelodiffError, match=f"config {key}=0 is not a positive integer"):
        read_header(tmp_path)


def test_a_text_file_whose_first_prompt_starts_with_a_bracket_is_text(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("[red] a cube\n{blue} a sphere\n")
    assert [q.text for q in load_prompt_file(p)] == ["[red] a cube", "{blue} a sphere"]


def test_the_fingerprint_covers_file_names_and_ignores_hidden_files(tmp_path):
    """The same bytes under another name (a weight file of another component) are another model; a hidden
    file beside the weights (.DS_Store, a lock) is not part of it."""
    from velodiff.sets.fingerprint import model_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "unet").mkdir(parents=True)
    (b / "vae").mkdir(parents=True)
    (a / "unet" / "weights.bin").write_bytes(b"weights")
    (b / "vae" / "weights.bin").write_bytes(b"weights")
    before = model_fingerprint(a)
    assert before != model_fingerprint(b)
    (a / ".DS_Store").write_bytes(b"finder")
    (a / "unet" / ".lock").write_bytes(b"")
    assert model_fingerprint(a) == before


def test_a_set_read_back_holds_only_its_intact_images(reference, tmp_path):
    """read_set (what eval --manifest reads) keeps the records whose file is there with the recorded
    hash: an image damaged or removed after its line was written is not part of the set."""
    part = tmp_path / "part"
    shutil.copytree(reference, part)
    recs = read_set(part).records
    assert len(recs) == N
    (part / recs[0]["file"]).write_bytes(b"not a png")
    (part / recs[1]["file"]).unlink()
    s = read_set(part)
    assert [r["index"] for r in s.records] == list(range(2, N)) and s.total == N and not s.complete
    assert s.paths() == [part / r["file"] for r in recs[2:]]


# --- review24: eval --manifest pairs reference images by index, prompt and seed ------------------------


def test_eval_manifest_pairs_reference_images_by_prompt_and_seed(reference, tmp_path):
    """Against itself every image is identical (each counted as identical; no PSNR to average: None, the
    JSON's null, not the non-JSON Infinity); a reference of the
    same prompts drawn from other seeds holds no image of this set's (index, prompt, seed)."""
    from velodiff.eval.set_metrics import evaluate_set

    same = evaluate_set(reference, reference=reference)["reference"]
    assert (same["n"], same["identical"], same["unmatched"], same["psnr"]) == (N, N, 0, None)
    other = tmp_path / "reseeded"
    shutil.copytree(reference, other)
    recs = [json.loads(line) for line in (other / LINES).read_text().splitlines() if line.strip()]
    (other / LINES).write_text("".join(json.dumps({**r, "seed": r["seed"] + 1000}) + "\n" for r in recs))
    with pytest.raises(VelodiffError, match="no image of this set's index, prompt, seed"):
        evaluate_set(reference, reference=other)


def test_review36_a_plans_grid_and_guidance_are_what_the_set_records(tiny, prompt_file, tmp_path):
    """review36: a plan that fixes the grid and the guidance scale (grid=karras+guidance=1.5) draws the set's
    images with them, so its config records them, not the command's or the model's defaults."""
    out = tmp_path / "set"
    assert cli("generate-set", str(prompt_file), "--limit", "1", "--out", str(out), "--model", str(tiny),
               "--steps", "2", "--plan", "grid=karras+guidance=1.5") == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["grid"], config["guidance"]) == ("karras", 1.5)


def test_review36_nfe_on_a_model_with_its_own_steps_records_no_steps(tiny, prompt_file, tmp_path):
    """review36: --nfe on a model whose sampling.json has steps: the set's steps follow from the network
    calls (None in its config), not the model's own steps beside them, and its images are drawn so."""
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (model / "sampling.json").write_text(json.dumps({"steps": 4, "solver": "ddim"}))
    out = tmp_path / "set"
    assert cli("generate-set", str(prompt_file), "--limit", "1", "--out", str(out), "--model", str(model),
               "--nfe", "2") == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["solver"], config["steps"], config["nfe"]) == ("ddim", None, 2)
    import velodiff
    from velodiff.images import png_bytes
    from velodiff.pipelines import text2img

    r = read_set(out).records[0]  # drawn at 2 network calls, as generate --nfe 2 draws it
    want = text2img(velodiff.load(model), r["prompt"], seeds=[r["seed"]], solver="ddim", nfe=2)
    assert want.steps == 2 and (out / r["file"]).read_bytes() == png_bytes(want.images[0])
