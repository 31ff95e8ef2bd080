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


# --- review27: the digest memo, output checks, locks, modes, users' text files ------------------------


def test_a_large_files_digest_is_remembered_per_version(tmp_path, monkeypatch):
    """file_sha256 remembers a large file's digest per (path, size, mtime): a file rewritten in place
    with the same size gets its new digest, and a memo that is not a digest is not trusted."""
    import hashlib

    import velodiff.files as files

    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "MEMO_MIN_BYTES", 0)  # every file is "large"
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert files.file_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    (memo,) = (tmp_path / "cache" / "hashes").iterdir()
    f.write_bytes(b"b" * 1000)  # the same size, another version
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert files.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    for p in (tmp_path / "cache" / "hashes").iterdir():
        p.write_text("not a digest\n")
    assert files.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_the_cache_root_expands_the_home_folder(monkeypatch, tmp_path):
    from velodiff.files import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("VELODIFF_CACHE", "~/vc")
    assert cache_root() == tmp_path / "vc"
    monkeypatch.delenv("VELODIFF_CACHE")
    assert cache_root() == tmp_path / ".cache" / "velodiff"


def test_outputs_are_checked_before_the_work(tmp_path, monkeypatch):
    """An output two missing folders deep, an output that is a folder, a model --out above the current
    folder, and two options naming one file (written another way) are each one line."""
    from velodiff.files import check_model_out, distinct_files, output_file

    with pytest.raises(VelodiffError, match="does not exist; create it first"):
        output_file(tmp_path / "a" / "b" / "x.json", "--json")
    assert not (tmp_path / "a").exists()
    assert output_file(tmp_path / "a" / "x.json", "--json") == tmp_path / "a" / "x.json"  # one deep: made
    with pytest.raises(VelodiffError, match="is a folder; give a file name"):
        output_file(tmp_path / "a", "--json")
    (tmp_path / "w" / "run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "w" / "run")
    for above in (".", "..", str(tmp_path)):
        with pytest.raises(VelodiffError, match="is the current folder or one above it"):
            check_model_out(above)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VelodiffError, match="^json and md are the same file"):
        distinct_files(json=tmp_path / "r.md", md="r.md")
    with pytest.raises(VelodiffError, match="^json and md are the same file"):
        distinct_files(json=tmp_path / "a" / ".." / "r.md", md=tmp_path / "r.md")
    distinct_files(json=tmp_path / "r.json", md=tmp_path / "r.md", csv=None)


def test_plain_modes_leave_the_targets_of_links_alone(tmp_path):
    """A model folder assembled from links (a shipped student) has its own files' modes set; the files
    its links point to (the base model's, in the package) are not changed through them."""
    from velodiff.files import plain_modes

    outside = tmp_path / "base.bin"
    outside.write_bytes(b"w")
    outside.chmod(0o600)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "own.bin").write_bytes(b"o")
    (folder / "own.bin").chmod(0o600)
    (folder / "base.bin").symlink_to(outside)
    plain_modes(folder)
    assert _mode(outside) == 0o600
    (tmp_path / "plain").write_bytes(b"p")  # what a plain open() gives under this umask
    assert _mode(folder / "own.bin") == _mode(tmp_path / "plain")


def test_an_encoders_value_error_is_one_line(tmp_path):
    class TooWide:
        def save(self, fp, format=None, **kw):
            raise ValueError("encoder limit exceeded")

    with pytest.raises(VelodiffError, match=r"cannot write .*x\.webp: encoder limit exceeded"):
        save_image_atomic(TooWide(), tmp_path / "x.webp", "WEBP")
    assert list(tmp_path.iterdir()) == []


def test_a_locked_folder_refuses_a_second_writer(tmp_path):
    """lock_folder is exclusive (a second writer of the folder, here another open of the lock file, is
    refused in one line naming the option) until the first closes it."""
    from velodiff.files import lock_folder

    first = lock_folder(tmp_path, "--run")
    try:
        with pytest.raises(VelodiffError, match=f"another velodiff process is writing {tmp_path}.*--run"):
            lock_folder(tmp_path, "--run")
    finally:
        first.close()
    lock_folder(tmp_path, "--run").close()


def test_a_users_text_file_is_read_as_utf8_or_one_line(tmp_path):
    """read_text: a byte-order mark is not part of the text (Notepad writes one), a file that is not
    UTF-8 names the line, and what is not a regular file (a FIFO would wait for ever) is refused."""
    from velodiff.files import read_text

    f = tmp_path / "plan.txt"
    f.write_bytes(b"\xef\xbb\xbfag\n")
    assert read_text(f, "plan file") == "ag\n"
    f.write_bytes(b"ok\nok\n\xff\n")
    with pytest.raises(VelodiffError, match="line 3 is not UTF-8 text"):
        read_text(f, "plan file")
    with pytest.raises(VelodiffError, match="is not a regular file"):  # a device (or a FIFO: not read)
        read_text(os.devnull, "plan file")
