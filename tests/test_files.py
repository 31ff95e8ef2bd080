"""velodiff.files: the one atomic writer. The file appears whole or not at all, no temporary file is
left behind on failure, errors are one VelodiffError line, and the mode is what a plain
``open(path, "w")`` gives under the current umask (mkstemp's 0o600 made images owner-only)."""

from __future__ import annotations

import os
import stat

import pytest
from PIL import Image

from velodiff.errors import VelodiffError
from velodiff.files import save_image_atomic, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_mode_is_a_plain_writes(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    assert _mode(plain) == 0o666 & ~umask

    write_atomic(tmp_path / "a.json", '{"a": 1}\n')
    assert _mode(tmp_path / "a.json") == _mode(plain)

    save_image_atomic(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "a.png")
    assert _mode(tmp_path / "a.png") == _mode(plain)
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.getpixel((0, 0)) == (1, 2, 3)


def test_writes_whole_and_replaces(tmp_path):
    p = tmp_path / "out.md"
    write_atomic(p, "héllo\n")
    assert p.read_bytes() == "héllo\n".encode()
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert [q.name for q in tmp_path.iterdir()] == ["out.md"]


def test_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "out.png"
    p.write_bytes(b"old")

    class Boom:
        def save(self, fp, format=None):
            fp.write(b"partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(VelodiffError, match=r"cannot write .*out\.png: No space left on device"):
        save_image_atomic(Boom(), p, "PNG")
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["out.png"]

    class Interrupted:
        def save(self, fp, format=None):
            fp.write(b"partial")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not an OSError: raised as it is, still cleaned up
        save_image_atomic(Interrupted(), p, "PNG")
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["out.png"]


def test_missing_folder_and_unknown_suffix_are_one_line(tmp_path):
    with pytest.raises(VelodiffError, match="cannot write") as e:
        write_atomic(tmp_path / "missing" / "a.json", "{}")
    assert "\n" not in str(e.value)
    with pytest.raises(VelodiffError, match="unknown image type"):
        save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "a.xyz")
    assert list(tmp_path.iterdir()) == []


def test_a_results_folder_replaces_only_its_own_commands_files(tmp_path):
    """bench and tune write into a folder that is new or holds none of their file names, or is their
    own earlier run (resumed); a folder where they would replace another command's or the user's file
    is refused before any work, naming it (a tune overwrote a bench's pareto.png). Other files stay."""
    import json

    from velodiff.eval.sweep import BENCH_FILES, is_bench_folder
    from velodiff.eval.tune import TUNE_FILES, is_tune_folder
    from velodiff.files import check_results_folder

    bench, tune = tmp_path / "bench", tmp_path / "tune"
    assert check_results_folder(bench, "--out", BENCH_FILES, is_bench_folder) == bench  # new
    bench.mkdir()
    (bench / "README.md").write_text("notes beside the results")
    check_results_folder(bench, "--out", BENCH_FILES, is_bench_folder)  # none of its names there
    (bench / "pareto.png").write_text("the user's")
    with pytest.raises(VelodiffError, match="holds a 'pareto.png' this command did not write"):
        check_results_folder(bench, "--out", BENCH_FILES, is_bench_folder)
    (bench / "results.json").write_text(json.dumps({"kind": "bench"}))
    check_results_folder(bench, "--out", BENCH_FILES, is_bench_folder)  # its own earlier run
    with pytest.raises(VelodiffError, match="holds a 'report.md'|holds a 'pareto.png'"):
        check_results_folder(bench, "--out", TUNE_FILES, is_tune_folder)  # a bench's folder is no tune's
    (bench / "results.json").write_text(json.dumps({"kind": "eval"}))
    with pytest.raises(VelodiffError, match="holds a 'results.json'"):
        check_results_folder(bench, "--out", BENCH_FILES, is_bench_folder)
    tune.mkdir()
    (tune / "tune.json").write_text("{}")
    (tune / "pareto.png").write_text("x")
    check_results_folder(tune, "--out", TUNE_FILES, is_tune_folder)
    with pytest.raises(VelodiffError, match="holds a 'pareto.png'"):
        check_results_folder(tune, "--out", BENCH_FILES, is_bench_folder)  # a tune's folder is no bench's
    with pytest.raises(VelodiffError, match="is a file; give a folder"):
        check_results_folder(tune / "tune.json", "--out", TUNE_FILES, is_tune_folder)
    assert (bench / "README.md").read_text() == "notes beside the results"


def test_a_model_folder_is_replaced_only_when_it_holds_nothing_but_a_model(tmp_path):
    """A command writing a model (train, distill, erase) replaces its --out folder whole: an earlier
    run's model folder may go, but not a note or a folder of LoRAs the user put into it (erase deleted
    both without a word), and never a folder that holds no model."""
    import json

    from velodiff.files import check_model_out

    out = tmp_path / "erased"
    assert check_model_out(out) == out  # new
    out.mkdir()
    check_model_out(out)  # empty
    index = {"_class_name": "X", "unet": ["d", "U"], "vae": ["d", "V"]}
    (out / "model_index.json").write_text(json.dumps(index))
    for name in ("unet", "vae", "velodiff", "lora"):
        (out / name).mkdir()
    (out / "MODEL_CARD.md").write_text("card")
    (out / "sampling.json").write_text("{}")
    check_model_out(out)  # an earlier run's model
    (out / "my-loras").mkdir()
    with pytest.raises(VelodiffError, match="holds 'my-loras', which is not part of the model"):
        check_model_out(out)
    (out / "my-loras").rmdir()
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(VelodiffError, match="holds 'NOTES.md', which is not part of the model"):
        check_model_out(out)
    (out / "model_index.json").unlink()
    with pytest.raises(VelodiffError, match="holds files that are not a model"):
        check_model_out(out)


def test_an_output_in_a_read_only_folder_is_refused_before_the_work(tmp_path, monkeypatch):
    """A command's output file in a folder it may not write is one line when the command starts, not a
    traceback after minutes of work (as root the mode bits do not bind: the OS's answer is simulated
    only where the process could not write)."""
    import velodiff.files as files

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root: ask as a process that may not write there would be answered
            real = os.access
            monkeypatch.setattr(files.os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
        with pytest.raises(VelodiffError, match=f"--json: the folder '{ro}' is not writable"):
            files.output_file(ro / "x.json", "--json")
        assert files.output_file(tmp_path / "x.json", "--json") == tmp_path / "x.json"
    finally:
        ro.chmod(0o755)


def test_a_calibration_into_a_read_only_cache_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """`velodiff calibrate cache|solver` with a cache (or --beside-model folder) it may not write is one
    line before the minutes of calibration, not after them (mode bits simulated as in the test above)."""
    from pathlib import Path

    import velodiff.files as files
    from velodiff.cli import main
    from velodiff.default_model import default_model_path

    if not (Path(default_model_path()) / "model_index.json").is_file():
        pytest.skip("no shipped default model")
    ro = tmp_path / "cache"
    monkeypatch.setenv("VELODIFF_CACHE", str(ro))
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, m: False if str(p).startswith(str(ro)) else real(p, m))
    for args in (["cache"], ["solver", "--guidance", "2.5"]):
        try:
            code = main(["calibrate", *args, "--limit", "2"])
        except SystemExit as e:
            code = int(e.code or 0)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"the calibration cache: the folder '{ro / 'calibration'}' is not writable" in err
        assert not list((ro / "calibration").iterdir())
