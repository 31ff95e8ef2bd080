"""The one door every weight file velodiff reads goes through: safetensors only, never unpickle.

Every call that reads weights or configs from disk lives here (diffusers and transformers
``from_pretrained``, diffusers ``from_single_file``, safetensors ``load_file`` / ``safe_open``,
the TorchScript Inception of FID); ``tests/test_no_pickle.py`` fails if one appears anywhere else
in ``src/``. Before anything is read, the file (or each weight file of a component folder) is
checked: a pickle suffix (.ckpt, .bin, .pt, .pth, .pkl, .pickle) or pickle bytes under any name
(a pickle stream, or torch.save's zip of pickles renamed ``.safetensors``) is refused in one
``VelodiffError`` line, and a component folder whose weights are only pickles is refused before
diffusers or transformers look at it. Nothing here calls ``torch.load`` or ``pickle.load``.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import VelodiffError, first_line

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

CONVERT_HINT = (
    "convert it to .safetensors first, in a trusted environment: "
    'python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('IN', map_location='cpu', weights_only=True); "
    "st.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items() "
    "if isinstance(v, torch.Tensor)}, 'OUT.safetensors')\""
)

ZIP_MAGIC = b"PK\x03\x04"


def _pickle_refusal(p: Path, why: str) -> VelodiffError:
    return VelodiffError(f"{p} {why}, which velodiff never loads (unpickling can run code); {CONVERT_HINT}")


def looks_like_pickle(head: bytes) -> bool:
    """Whether a file's first bytes are a pickle stream (protocol 2+: 0x80 then the protocol) or a zip
    archive (torch.save's format since 1.6, which holds a pickle)."""
    return head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def check_safetensors(path: str | os.PathLike[str]) -> Path:
    """``path`` if it may be handed to a safetensors reader; a pickle by name or by bytes is refused.

    A safetensors file starts with its header's length (8 bytes, little-endian) and then ``{``; a file
    that does not is refused here too, in one line, before any library parses it."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(p, "is a pickle checkpoint")
    try:
        with open(p, "rb") as f:
            head = f.read(9)
        size = p.stat().st_size
    except OSError as e:
        raise VelodiffError(f"cannot read {p}: {e.strerror or e}") from None
    if looks_like_pickle(head):
        raise _pickle_refusal(p, "holds pickle bytes (a torch.save / pickle file named like safetensors)")
    if len(head) < 9 or head[8:9] != b"{" or struct.unpack("<Q", head[:8])[0] + 8 > size:
        raise VelodiffError(f"{p} is not a safetensors file (no safetensors header)")
    return p


def check_component(folder: str | os.PathLike[str]) -> None:
    """A diffusers / transformers component folder (``unet/``, ``text_encoder/``): every
    ``*.safetensors`` in it must be one, and weights that exist only as pickles are refused."""
    d = Path(folder)
    if not d.is_dir():
        return  # the library says what is missing
    safetensors = sorted(d.glob("*.safetensors"))
    for f in safetensors:
        check_safetensors(f)
    if not safetensors:
        pickles = sorted(f.name for f in d.iterdir() if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(d, f"holds its weights only as pickles ({', '.join(pickles)})")


def from_pretrained(cls: Any, path: str | os.PathLike[str], subfolder: str | None = None,
                    *, weights: bool = True, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on a local folder: offline, ``use_safetensors=True`` for a class with
    weights (``weights=False``: tokenizers, which read JSON / vocab files), the folder checked first;
    errors as one line."""
    where = Path(path) / subfolder if subfolder else Path(path)
    if weights:
        check_component(where)
        kwargs["use_safetensors"] = True
    if subfolder:
        kwargs["subfolder"] = subfolder
    what = f"{subfolder}/" if subfolder else "the model"
    try:
        loaded = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a damaged folder fails in the libraries in many ways
        # (a config's bad value: IndexError, a dataclass validation error; a broken vocab: Exception)
        raise VelodiffError(f"cannot load {what} from {path}: {first_line(e)}") from None
    # a weights file without one of the module's tensors leaves it on the meta device (no data): said
    # here, not as torch's "Cannot copy out of meta tensor" when the model moves
    named = getattr(loaded, "named_parameters", None)
    missing = [n for n, t in (named() if callable(named) else ()) if t.is_meta]
    if missing:
        raise VelodiffError(f"cannot load {what} from {path}: its weights lack {missing[0]}"
                            f"{f' and {len(missing) - 1} more tensors' if len(missing) > 1 else ''}")
    return loaded


def from_single_file(pipeline_cls: Any, path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """diffusers ``from_single_file`` on a checked local ``.safetensors`` file. diffusers reads what the
    checkpoint lacks (e.g. a text encoder) from the ``config`` folder with its own ``from_pretrained``,
    which would take pickle weights there: each of that folder's components is checked first."""
    p = check_safetensors(path)
    config = kwargs.get("config")
    if config is not None and Path(config).is_dir():
        for sub in sorted(Path(config).iterdir()):
            if sub.is_dir():
                check_component(sub)
    return pipeline_cls.from_single_file(str(p), local_files_only=True, **kwargs)


def load_file(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """safetensors' ``load_file`` on a checked file; a damaged file is one ``VelodiffError`` line."""
    from safetensors.torch import load_file as _load_file

    p = check_safetensors(path)
    try:
        return _load_file(str(p), device=device)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise VelodiffError(f"{p} is not a readable safetensors file: {e}") from None


@contextlib.contextmanager
def safe_open(path: str | os.PathLike[str]) -> Iterator[Any]:
    """safetensors' ``safe_open`` (torch tensors) on a checked file."""
    from safetensors import safe_open as _safe_open

    p = check_safetensors(path)
    try:
        handle = _safe_open(str(p), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise VelodiffError(f"{p} is not a readable safetensors file: {e}") from None
    with handle as f:
        yield f


def load_torchscript(path: str | os.PathLike[str]) -> Any:
    """The FID Inception-v3 as a TorchScript archive (the standard ``pt_inception-2015-12-05`` file).

    The one non-safetensors format velodiff reads, and only for this opt-in metric: ``torch.jit.load``
    reads a TorchScript zip with torch's own restricted unpickler (tensors and containers only, no
    Python globals), never Python's ``pickle``; a plain pickle or a ``torch.save`` zip is refused first."""
    import torch

    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise VelodiffError(f"cannot read {p}: {e.strerror or e}") from None
    export = "give the Inception as TorchScript (torch.jit.save of the scripted network), or fd-shapes"
    never = "which velodiff never loads (unpickling can run code)"
    if not head.startswith(ZIP_MAGIC):
        what = f"is a pickle, not TorchScript, {never}" if looks_like_pickle(head) else "is not TorchScript"
        raise VelodiffError(f"{p} {what}; {export}")
    if _is_torch_save_zip(p):
        raise VelodiffError(f"{p} is a torch.save pickle archive, not TorchScript, {never}; {export}")
    return torch.jit.load(str(p), map_location="cpu")


def _is_torch_save_zip(p: Path) -> bool:
    """torch.save zips hold ``<name>/data.pkl`` and no TorchScript ``code/``."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return not any("/code/" in n for n in names)
