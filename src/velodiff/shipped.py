"""Models shipped inside the package, by name: ``--model default`` on the command line and
``velodiff.load("default")`` in Python resolve here; ``velodiff models`` lists them.

Light on purpose (no torch): the CLI resolves and refuses names before any model work. A plain
string that is a shipped name means the shipped model, even where a folder of that name exists in
the working directory; write ``./default`` (or pass a ``Path``) for such a folder.

A student (a model trained from another shipped model: distilled, pruned, a LoRA) ships only what
differs from its base: ``unet/`` or ``lora/``, its ``sampling.json`` and its ``MODEL_CARD.md``. Its
full diffusers folder is assembled once in ``$VELODIFF_CACHE/shipped/`` (links to the base's and the
student's files, copies where the file system has no links), so every loader sees a whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VelodiffError


@dataclass(frozen=True)
class Shipped:
    #: the folder inside the package (``velodiff/assets``)
    folder: str
    #: one line for ``velodiff models``
    summary: str
    #: the shipped model a student completes (its text encoder, VAE, tokenizer, scheduler)
    base: str | None = None


#: name -> what ships under it
SHIPPED: dict[str, Shipped] = {
    "default": Shipped(
        "default-model", "the teacher: SD1-family latent UNet on ShapesWorld, 64x64 (20 steps, CFG 2.5)"
    ),
    "default-4step": Shipped(
        "default-4step", "progressive + DMD student of default: 4 steps, guidance folded in", "default"
    ),
    "default-lcm": Shipped(
        "default-lcm", "latent consistency LoRA of default (peft): 4 steps of the lcm solver", "default"
    ),
    "default-2step": Shipped(
        "default-2step", "reflow + DMD student of default: 2 steps, guidance folded in", "default"
    ),
    "default-guided": Shipped(
        "default-guided",
        "guidance-distilled student of default: CFG 2.5 embedded (w input), one pass per step",
        "default",
    ),
    "default-pruned": Shipped(
        "default-pruned",
        "pruned student of default: 0.70x FLOPs (magnitude-ranked blocks removed), distillation repair",
        "default",
    ),
    "default-6step": Shipped(
        "default-6step", "DMD of default-4step's 6-step sampler: 6 steps, guidance folded in", "default"
    ),
    "default-1step": Shipped(
        "default-1step",
        "reflow + DMD student of default: 1 step, guidance folded in; 0.69x the teacher (bar 0.80x)",
        "default",
    ),
}


#: a model folder's own sampling defaults (solver, steps, guidance, grid, trained_steps)
SAMPLING_FILE = "sampling.json"


def sampling_defaults(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``sampling.json`` of a model folder ({} for a file or a folder without one)."""
    f = Path(path) / SAMPLING_FILE
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except ValueError as e:
        raise VelodiffError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise VelodiffError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def asset_path(folder: str) -> Path:
    """A folder inside the package's assets (``velodiff/assets/<folder>``)."""
    from importlib import resources

    return Path(str(resources.files("velodiff") / "assets" / folder))


def shipped_path(name: str) -> Path:
    """The folder of the shipped model ``name`` (refused in one line if the package lacks it)."""
    entry = SHIPPED[name]
    path = asset_path(entry.folder)
    if entry.base is not None:
        if not path.is_dir():
            raise VelodiffError(f"the shipped model {name!r} is missing from the package ({path}); reinstall")
        return _assemble(name, path, shipped_path(entry.base))
    if not (path / "model_index.json").is_file():
        raise VelodiffError(f"the shipped model {name!r} is missing from the package ({path}); reinstall")
    return path


def _assemble(name: str, own: Path, base: Path) -> Path:
    """``own``'s entries over ``base``'s as one folder in the cache, keyed by both folders' files. The
    base's calibrations (its ``velodiff`` folder) stay the base's: they were made for its network."""
    from .eval.reference import ARTEFACTS
    from .files import cache_root

    entries = {p.name: p for p in base.iterdir() if p.name != ARTEFACTS}
    entries.update({p.name: p for p in own.iterdir()})
    digest = hashlib.sha256()
    for key in sorted(entries):
        for f in sorted(q for q in [entries[key], *entries[key].rglob("*")] if q.is_file()):
            st = f.stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    out = cache_root() / "shipped" / f"{name}-{digest.hexdigest()[:12]}"
    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key, src in entries.items():
        try:
            (tmp / key).symlink_to(src.resolve(), target_is_directory=src.is_dir())
        except OSError:  # no symbolic links here (e.g. Windows without the privilege): copy
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / key)
    try:
        tmp.rename(out)
    except OSError:  # another process assembled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_shipped(model: str | os.PathLike[str] | None) -> bool:
    """Whether ``model`` names a shipped model (None: the default one)."""
    return model is None or (isinstance(model, str) and model in SHIPPED)


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """A shipped name (None: ``default``) -> its folder; an existing path -> that path; anything
    else -> one line that lists the shipped names."""
    if model is None:
        return shipped_path("default")
    if isinstance(model, str) and model in SHIPPED:
        return shipped_path(model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise no_such_model(model)


def model_name(path: str | os.PathLike[str]) -> str:
    """How a user names the model at ``path``: its shipped name, else the path."""
    p = Path(path)
    for name, entry in SHIPPED.items():
        if p.name == entry.folder and p.parent.name == "assets":
            return name
        if p.parent.name == "shipped" and p.name.rsplit("-", 1)[0] == name:
            return name
    return str(path)


def no_such_model(model: str | os.PathLike[str]) -> VelodiffError:
    """The one line for a model that is neither an existing path nor a shipped name."""
    return VelodiffError(
        f"model {str(model)!r} does not exist: it is neither a path nor a shipped model "
        f"({', '.join(SHIPPED)}); give a shipped name, a diffusers folder or a .safetensors file"
    )
