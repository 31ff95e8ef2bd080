"""Models shipped inside the package, by name: ``--model default`` on the command line and
``velodiff.load("default")`` in Python resolve here.

Light on purpose (no torch): the CLI resolves and refuses names before any model work. A plain
string that is a shipped name means the shipped model, even where a folder of that name exists in
the working directory; write ``./default`` (or pass a ``Path``) for such a folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import VelodiffError

#: name -> folder inside the package (``velodiff/assets``)
SHIPPED = {"default": "default-model"}


def shipped_path(name: str) -> Path:
    """The folder of the shipped model ``name`` (refused in one line if the package lacks it)."""
    from importlib import resources

    path = Path(str(resources.files("velodiff") / "assets" / SHIPPED[name]))
    if not (path / "model_index.json").is_file():
        raise VelodiffError(f"the shipped model {name!r} is missing from the package ({path}); reinstall")
    return path


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
    for name, folder in SHIPPED.items():
        if Path(path).name == folder and Path(path).parent.name == "assets":
            return name
    return str(path)


def no_such_model(model: str | os.PathLike[str]) -> VelodiffError:
    """The one line for a model that is neither an existing path nor a shipped name."""
    return VelodiffError(
        f"model {str(model)!r} does not exist: it is neither a path nor a shipped model "
        f"({', '.join(SHIPPED)}); give a shipped name, a diffusers folder or a .safetensors file"
    )
