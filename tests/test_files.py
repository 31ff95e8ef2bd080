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
