"""Run checkpoints as safetensors + JSON only (never pickle): weights, EMA, optimizer moments, step.

A checkpoint is a folder ``step-NNNNNNN`` with ``state.safetensors`` (every tensor, by prefixed name)
and ``state.json`` (step, config, optimizer hyper-parameters, the loss log position). It is written to
a temporary folder and renamed, so a crash never leaves a half-written checkpoint; ``latest`` names
the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import VelodiffError
from ..files import write_atomic
from ..models.weights import load_file


def weights_digest(module: torch.nn.Module) -> str:
    """A short digest of a module's weights (names, dtypes, shapes and values): what a stage of a chain of
    runs starts from, so that a resumed stage can tell the stage before it trained further since."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW state as flat tensors plus JSON-able hyper-parameters."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{pid}.{name}"] = t.detach().clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    final = run / f"step-{step:07d}"
    tmp = run / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    for f in (tmp / "state.safetensors", tmp / "state.json"):  # on disk before `latest` names them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(run / "latest", final.name)
    old = sorted(p for p in run.glob("step-*") if p.is_dir())
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint ``run/latest`` names; None for a run that has none yet. One that is named but
    incomplete (its files deleted or damaged since) is one line, not a fresh start that would prune the
    intact older checkpoints and the loss log."""
    marker = run / "latest"
    if not marker.exists():
        return None
    p = run / marker.read_text().strip()
    missing = [f for f in ("state.safetensors", "state.json") if not (p / f).is_file()]
    if missing:
        raise VelodiffError(
            f"run {run}: its latest checkpoint {p.name} has no {' or '.join(missing)}; {_resume_hint(p)}"
        )
    return p


def _resume_hint(bad: Path) -> str:
    """What to do about a damaged checkpoint: resume from the newest other one, or start a new run."""
    run = bad.parent
    intact = sorted(q.name for q in run.glob("step-*") if (q / "state.json").is_file() and q != bad)
    # (names are zero-padded: the last sorted is the newest)
    hint = f"write {intact[-1]!r} into {run / 'latest'} to resume from it, " if intact else ""
    return f"{hint}or use a new --run"


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_file(path / "state.safetensors")
        meta = json.loads((path / "state.json").read_text())
    except (VelodiffError, SafetensorError, OSError, ValueError) as e:
        # a damaged file gets the same way out as a missing one (latest_checkpoint)
        raise VelodiffError(f"cannot read checkpoint {path}: {e}; {_resume_hint(path)}") from None
    return tensors, meta


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}
