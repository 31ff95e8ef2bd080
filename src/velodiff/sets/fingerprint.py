"""A model's fingerprint: sha256 over a model folder's (or file's) relative file names and contents,
recorded in a set's header so that a resume, a Ray worker or ``velodiff eval --manifest`` can tell
the model is the one the set was made with. Every file is hashed whole (``files.file_sha256``: a large
one once per version, remembered in the cache), so an edit of a few layers is another model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import VelodiffError
from ..files import file_sha256, files_under


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over a model folder's (or file's) relative file names and contents."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VelodiffError(f"model path {str(p)!r} does not exist")
    files = [f for f in files_under(p) if not f.name.startswith(".")]
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == p else f.relative_to(p).as_posix()
        h.update(f"{rel}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def load_fingerprint(
    path: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    lora: list[str] | None = None,
) -> str:
    """The fingerprint of what a set's images are drawn with: the model's own, or, with a single file's
    config folder or LoRA files on top, sha256 over each one's fingerprint (a set made before these
    options existed keeps its model's fingerprint)."""
    own = model_fingerprint(path)
    if config is None and not lora:
        return own
    h = hashlib.sha256(f"model\0{own}\n".encode())
    if config is not None:
        h.update(f"config\0{model_fingerprint(config)}\n".encode())
    for p in lora or []:
        h.update(f"lora\0{model_fingerprint(p)}\n".encode())
    return h.hexdigest()
