"""Shipped models by name: a student ships only what differs from its base and is assembled into a
whole diffusers folder in the cache (links, or copies where links fail), keyed by its files; it loads
with its own sampling defaults; ``velodiff models`` lists every shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import velodiff
from velodiff import shipped
from velodiff.cli import main
from velodiff.eval.reference import model_hash
from velodiff.shipped import SHIPPED, model_name, shipped_path

torch.set_num_threads(1)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VELODIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _students() -> list[str]:
    return [name for name, entry in SHIPPED.items() if entry.base is not None]


def test_every_student_assembles_into_a_whole_folder_with_its_own_weights(cache) -> None:
    base = shipped_path("default")
    assert _students(), "no shipped student"
    for name in _students():
        folder = shipped_path(name)
        assert folder.parent == cache / "shipped" and model_name(folder) == name
        assert (folder / "model_index.json").is_file() and (folder / "vae").is_dir()
        own = shipped.asset_path(SHIPPED[name].folder)
        assert (folder / "sampling.json").read_text() == (own / "sampling.json").read_text()
        assert shipped_path(name) == folder  # assembled once
        assert model_hash(folder) != model_hash(base)  # the hash reads through the links
        # the base's solver calibration was made for the base's network, not the student's
        assert (base / "velodiff").is_dir() and not (folder / "velodiff").exists()
    unet = shipped_path("default-4step") / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.resolve() != (base / "unet" / "diffusion_pytorch_model.safetensors").resolve()


def test_a_student_without_its_own_calibration_is_told_to_make_one(cache) -> None:
    """Not "made for another model" (the base's file, which the user never made): the plain line."""
    from velodiff.pipelines import text2img

    with pytest.raises(velodiff.VelodiffError) as e:
        text2img(velodiff.load("default-lcm"), "a red circle", solver="unipc", grid="calibrated", steps=6,
                 guidance=2.5)
    assert "another model" not in str(e.value)
    assert "velodiff calibrate solver --model default-lcm --guidance 2.5" in str(e.value), e.value


@pytest.mark.parametrize("name", ["default-1step", "default-2step", "default-4step", "default-6step"])
def test_a_student_loads_with_its_own_defaults_and_runs_one_pass_per_step(cache, name) -> None:
    model = velodiff.load(name)
    sampling = json.loads((shipped.asset_path(SHIPPED[name].folder) / "sampling.json").read_text())
    assert (model.default_solver, model.default_steps, model.default_guidance) == (
        sampling["solver"],
        sampling["steps"],
        sampling["guidance"],
    )
    assert model.trained_steps == sampling["trained_steps"]
    from velodiff.pipelines import text2img

    res = text2img(model, "a red circle", seeds=[0])
    assert res.evals == sampling["steps"] and res.images[0].size == (64, 64)


def test_copies_where_the_file_system_has_no_links(cache, monkeypatch) -> None:
    def no_links(*args, **kwargs):
        raise OSError("symbolic links are not permitted here")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    folder = shipped_path("default-4step")
    assert not (folder / "unet").is_symlink() and (folder / "unet" / "config.json").is_file()
    assert velodiff.load(folder).default_steps == velodiff.load("default-4step").default_steps


def test_a_student_missing_from_the_package_is_one_line(cache, monkeypatch) -> None:
    monkeypatch.setitem(SHIPPED, "default-gone", shipped.Shipped("no-such-asset", "gone", "default"))
    with pytest.raises(velodiff.VelodiffError, match="missing from the package"):
        shipped_path("default-gone")


def test_models_lists_every_shipped_model(capsys) -> None:
    try:
        code = main(["models"])
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr().out
    assert code == 0
    for name, entry in SHIPPED.items():
        assert name in out and (entry.base is None or entry.base in out)


@pytest.mark.parametrize("name", ["default", "default-lcm", "default-guided", "default-pruned"])
def test_every_key_of_a_shipped_models_sampling_file_is_its_default(cache, name) -> None:
    """sampling.json's solver, steps, guidance, grid, grid_options, embedded_guidance, trained_steps and
    trained_guidance are the loaded model's (the LCM student's lcm grid over 20 original steps, the
    guidance-distilled student's embedded scale and its trained range)."""
    model = velodiff.load(name)
    sampling = json.loads((shipped_path(name) / "sampling.json").read_text())
    got = {
        "solver": model.default_solver,
        "steps": model.default_steps,
        "guidance": model.default_guidance,
        "grid": model.default_grid,
        "grid_options": model.default_grid_options,
        "embedded_guidance": model.embedded_guidance,
        "trained_steps": getattr(model, "trained_steps", None),
        "trained_guidance": getattr(model, "trained_guidance", None),
    }
    for key, value in sampling.items():
        assert got[key] == (tuple(value) if key == "trained_guidance" else value), key


# --- review27: names and paths, a user's sampling file, an assembled copy, the default's architecture ---


def test_names_paths_and_sampling_files(cache, tmp_path, monkeypatch) -> None:
    """None is the default model; only the package's asset folder is named by its shipped name (a user's
    folder of the same name is its path); a path may start with ~; a sampling.json that is no JSON object
    is one line naming the file."""
    assert shipped.is_shipped(None) and shipped.is_shipped("default") and not shipped.is_shipped("./default")
    assert shipped.resolve_model(None) == shipped_path("default")
    assert model_name(shipped_path("default")) == "default"
    mine = tmp_path / "default-model"
    mine.mkdir()
    assert model_name(mine) == str(mine)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert shipped.resolve_model("~/default-model") == mine
    assert shipped.sampling_defaults(mine) == {}
    for text, message in (("[1, 2]", "expected a JSON object, got list"), ("{", "not valid JSON")):
        (mine / "sampling.json").write_text(text)
        with pytest.raises(velodiff.VelodiffError, match=message):
            shipped.sampling_defaults(mine)


def test_an_assembled_copy_follows_a_changed_file(cache, tmp_path, monkeypatch) -> None:
    """Where links fail, a student is assembled from copies, keyed by its files' versions: the student's
    own entries over its base's, and a student file changed in place (same size) gives a new assembly."""
    import os

    def no_links(*args, **kwargs):
        raise OSError("symbolic links are not permitted here")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    base, own = tmp_path / "base", tmp_path / "own"
    files = ((base / "unet", "base-unet"), (base / "vae", "base-vae"), (own / "unet", "own-unet-1"))
    for folder, text in files:
        folder.mkdir(parents=True)
        (folder / "w.bin").write_text(text)
    (base / "model_index.json").write_text("{}")
    out = shipped._assemble("student", own, base)
    assert (out / "unet" / "w.bin").read_text() == "own-unet-1"
    assert (out / "vae" / "w.bin").read_text() == "base-vae"
    f = own / "unet" / "w.bin"
    f.write_text("own-unet-2")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert (shipped._assemble("student", own, base) / "unet" / "w.bin").read_text() == "own-unet-2"


def test_the_shipped_default_model_has_the_architecture_of_its_configs() -> None:
    """default_model's configs are the ones the shipped model was written with (the VAE's scaling factor
    is measured after training): a model trained from them is the default's architecture."""
    from velodiff import default_model as dm

    root = shipped_path("default")
    for sub, cfg in (("unet/config.json", dm.unet_config()), ("vae/config.json", dm.vae_config()),
                     ("text_encoder/config.json", dm.text_encoder_config()),
                     ("scheduler/scheduler_config.json", dm.scheduler_config())):
        written = json.loads((root / sub).read_text())
        for key, value in cfg.items():
            if key != "scaling_factor":
                assert written[key] == (list(value) if isinstance(value, tuple) else value), (sub, key)
