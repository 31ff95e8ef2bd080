"""A model's fingerprint: sha256 over a model folder's (or file's) relative file names and contents,
recorded in a set's header so that a resume, a Ray worker or ``velodiff eval --manifest`` can tell
the model is the one the set was made with. Huge weight files are hashed by size plus their first
and last 16 MiB (a different checkpoint differs there).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import VelodiffError
from ..files import files_under

#: files hashed whole up to this size; larger ones by size plus their first and last 16 MiB
FULL_HASH_LIMIT = 256 * 2**20
SAMPLE_BYTES = 16 * 2**20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:  # huge weights: size + head + tail (a different checkpoint differs there)
            h.update(str(size).encode())
            h.update(f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over a model folder's (or file's) relative file names and contents."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VelodiffError(f"model path {str(p)!r} does not exist")
    files = [f for f in files_under(p) if not f.name.startswith(".")]
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == p else f.relative_to(p).as_posix()
        h.update(f"{rel}\0{file_digest(f)}\n".encode())
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
