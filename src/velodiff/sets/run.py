"""Generating a set: :func:`generate_set` opens (or resumes) the set folder, works out which chunks
are missing and renders them, in this process or over Ray (:mod:`velodiff.sets.ray_runner`); either
way the driver is the folder's only writer.

Determinism contract. Image ``i`` uses prompt ``i // images_per_prompt`` and seed ``seed + i``
(:mod:`velodiff.sets.items`), is rendered in its batch-aligned chunk with ``threads`` CPU threads and
deterministic algorithms (:mod:`velodiff.sets.render`): a killed run that is resumed, a run split over
Ray workers and an uninterrupted run give byte-identical PNG files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..files import LOCK, TEMP_SUFFIX, lock_folder
from .fingerprint import load_fingerprint
from .items import IMAGES, Item, chunks, plan_items
from .prompts import Prompt, prompts_digest
from .render import load_model_checked, render_chunk
from .store import (
    CONFIG_KEYS,
    FORMAT,
    HEADER,
    LINES,
    LOAD_KEYS,
    SAMPLING_KEYS,
    SetWriter,
    compact,
    open_set,
    read_header,
    read_records,
    remove_stale_temporaries,
    verified_records,
)


@dataclass
class SetSummary:
    """What a run did: images in the set, already there, generated now, manifest lines dropped."""

    folder: Path
    total: int
    already: int
    generated: int
    dropped_lines: int
    seconds: float

    def line(self) -> str:
        return (
            f"{self.folder}: {self.total} images ({self.already} already there, {self.generated} generated "
            f"now) in {self.seconds:.1f} s; manifest {self.folder / LINES}"
        )


def _before_header(name: str) -> bool:
    """What a set's folder may hold before its header: the images folder, the lock, and the temporary
    of a header a killed run was writing (``.manifest.json.*.tmp``)."""
    return name in (IMAGES, LOCK) or (name.startswith(f".{HEADER}.") and name.endswith(TEMP_SUFFIX))


def generate_set(
    prompts: Sequence[Prompt],
    folder: str | os.PathLike[str],
    *,
    model_path: str | os.PathLike[str],
    config: dict[str, Any],
    prompt_file: str = "",
    ray: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    fingerprint: str | None = None,
    calibration: str | None = None,
) -> SetSummary:
    """Generate every missing image of the set in ``folder`` (resuming a partial one), in this process
    or over Ray (``ray="local"`` or an address); ``calibration``: the fingerprint of the model's
    calibrations the images read (``fingerprint.calibration_fingerprint``), recorded and checked on a
    resume. ``config`` has every key of CONFIG_KEYS (those of
    LOAD_KEYS and SAMPLING_KEYS may be left out: their defaults)."""
    import time

    t0 = time.perf_counter()
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise VelodiffError(f"--out {str(folder)!r} is a file; give a folder")
    stray = folder.is_dir() and not all(_before_header(p.name) for p in folder.iterdir())
    if stray and read_header(folder) is None:
        raise VelodiffError(f"{folder} is not empty and holds no image set ({HEADER}); use a new folder")
    config = {**dict.fromkeys((*LOAD_KEYS, *SAMPLING_KEYS)), **config}  # not given: the defaults
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise VelodiffError(f"config lacks {', '.join(missing)}")
    if ray is not None:
        from .ray_runner import check_address

        check_address(ray)
    fingerprint = fingerprint or load_fingerprint(model_path, config["config"], config["lora"])
    header = {
        "format": FORMAT,
        "model": {"path": str(Path(model_path).expanduser().resolve()), "fingerprint": fingerprint},
        "prompts": {"file": str(prompt_file), "count": len(prompts), "sha256": prompts_digest(prompts)},
        "config": {k: config[k] for k in CONFIG_KEYS},
        "total": len(prompts) * int(config["images_per_prompt"]),
        **({"calibration": calibration} if calibration is not None else {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder)
    try:
        header = open_set(folder, header)
        remove_stale_temporaries(folder)
        items = plan_items(prompts, header["config"])
        records, bad = read_records(folder)
        done = verified_records(folder, records, items)
        compact(folder, done)
        already = len(done)
        shards = chunks(items, int(header["config"]["batch"]))
        todo = [c for c in shards if any(it.index not in done for it in c)]
        writer = SetWriter(folder, items, done)
        try:
            if ray is None:
                _run_local(todo, writer, model_path, fingerprint, header["config"], progress, len(items))
            else:
                from .ray_runner import run_on_ray

                run_on_ray(todo, writer, model_path, fingerprint, header["config"], address=ray,
                           workers=workers, progress=progress, total=len(items))
        finally:
            writer.close()
        compact(folder, writer.done)
        made = len(writer.done) - already
        return SetSummary(folder, len(items), already, made, bad, time.perf_counter() - t0)
    finally:
        lock.close()


def _run_local(
    todo: Iterable[list[Item]],
    writer: SetWriter,
    model_path: str | os.PathLike[str],
    fingerprint: str,
    config: dict[str, Any],
    progress: Callable[[int, int], None] | None,
    total: int,
) -> None:
    """Render the chunks ``todo`` in this process, with one model, and write them through ``writer``."""
    todo = list(todo)
    if not todo:
        return
    model = load_model_checked(model_path, fingerprint, config)
    for chunk in todo:
        for index, data in render_chunk(model, chunk, config):
            writer.write(index, data)
        if progress:
            progress(len(writer.done), total)
