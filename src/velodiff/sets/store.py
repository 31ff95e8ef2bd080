"""The set folder: what is on disk, how it is read, checked, resumed and written.

A set folder holds

* ``manifest.json``  - the header: format, model (path and fingerprint), prompts (count, hash) and
  the sampling config; written once, checked on every resume (a different model or config is refused);
* ``manifest.jsonl`` - one JSON line per finished image (index, prompt, seed, file, sha256, source),
  appended and fsync'ed after the image file is in place;
* ``images/NNNNNN.png`` - written to a temporary file and renamed (``velodiff.files``), never
  half-written.

Killed at any moment (SIGKILL), the folder stays consistent: a torn last manifest line is dropped, an
image without a line (or whose hash does not match its line) is rendered again, stale temporary
files are removed, and the manifest is rewritten (atomically) sorted with each index once.
:class:`SetWriter` is a set's only writer; ``files.lock_folder`` keeps a second process out.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..files import write_atomic
from .items import IMAGES, Item

FORMAT = "velodiff-image-set/1"
HEADER = "manifest.json"
LINES = "manifest.jsonl"

#: how the model is loaded (``velodiff.load``'s options; a single file's config folder and the LoRA
#: files as absolute paths, their contents in the header's fingerprint). None: the loader's default (the
#: CPU and float32 for device and dtype); a header from before these keys reads them as None
LOAD_KEYS = ("config", "family", "prediction_type", "lora", "lora_scale", "device", "dtype")
#: sampling options newer than the first sets (None in an older set's header: off, as it was drawn)
SAMPLING_KEYS = ("eta", "guidance_rescale", "clip_skip", "nfe")

#: config keys that decide the pixels; a resume that asks for another value is refused
CONFIG_KEYS = (
    "seed",
    "images_per_prompt",
    "steps",
    "solver",
    "grid",
    "guidance",
    "plan",
    "negative",
    *SAMPLING_KEYS,
    "height",
    "width",
    "batch",
    "threads",
    "noise",
    *LOAD_KEYS,
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_header(folder: Path) -> dict[str, Any] | None:
    p = folder / HEADER
    if not p.is_file():
        return None
    try:
        h = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise VelodiffError(f"{p}: not a readable manifest header ({e})") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise VelodiffError(f"{p}: not a velodiff image-set manifest (format {FORMAT!r})")
    damaged = _header_damage(h)
    if damaged:
        raise VelodiffError(f"{p}: damaged manifest header ({damaged}); use another --out")
    for k in (*LOAD_KEYS, *SAMPLING_KEYS):  # a set made before these options: their defaults
        h["config"].setdefault(k, None)
    return h


def _header_damage(h: dict[str, Any]) -> str | None:
    """What is wrong with a header's structure (None when nothing): a hand-edited or damaged file
    must give one line, not a traceback deep in a resume."""
    model, prompts, config = h.get("model"), h.get("prompts"), h.get("config")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("path", "fingerprint")):
        return "'model' must be an object with 'path' and 'fingerprint' strings"
    if not isinstance(prompts, dict) or not isinstance(prompts.get("sha256"), str):
        return "'prompts' must be an object with a 'sha256' string"
    if not isinstance(config, dict):
        return "'config' must be an object"
    seed = config.get("seed")
    if "seed" in config and (not isinstance(seed, int) or isinstance(seed, bool)):
        return f"config seed={seed!r} is not an integer"
    for k in ("images_per_prompt", "batch", "threads", "steps", "height", "width"):
        v = config.get(k)
        if k in config and not (v is None and k in ("steps", "height", "width")) and (
            not isinstance(v, int) or isinstance(v, bool) or v < 1
        ):
            return f"config {k}={v!r} is not a positive integer"
    if "batch" not in config:
        return "config lacks 'batch'"
    for k in ("solver", "grid", "plan", "negative", "noise", "config", "family", "prediction_type", "device",
              "dtype"):
        if config.get(k) is not None and not isinstance(config[k], str):
            return f"config {k}={config[k]!r} is not a string"
    lora, scales = config.get("lora"), config.get("lora_scale")
    if lora is not None and not (isinstance(lora, list) and all(isinstance(x, str) for x in lora)):
        return f"config lora={lora!r} is not a list of paths"
    numbers = isinstance(scales, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in scales
    )
    if scales is not None and not numbers:
        return f"config lora_scale={scales!r} is not a list of numbers"
    g = config.get("guidance")
    if g is not None and (not isinstance(g, (int, float)) or isinstance(g, bool) or not g >= 0):
        return f"config guidance={g!r} is not a number >= 0"
    return None


def read_records(folder: Path) -> tuple[dict[int, dict[str, Any]], int]:
    """The manifest lines by index (the last one of an index wins) and how many lines were unreadable
    (a torn last line after a kill)."""
    p = folder / LINES
    if not p.is_file():
        return {}, 0
    records: dict[int, dict[str, Any]] = {}
    bad = 0
    for line in p.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            records[int(r["index"])] = r
        except (ValueError, KeyError, TypeError):
            bad += 1
    return records, bad


def verified_records(
    folder: Path, records: dict[int, dict[str, Any]], items: Sequence[Item]
) -> dict[int, dict[str, Any]]:
    """The records whose file is present with the recorded hash and that match the plan."""
    ok: dict[int, dict[str, Any]] = {}
    for it in items:
        r = records.get(it.index)
        if r is None or r.get("file") != it.file or r.get("seed") != it.seed or r.get("prompt") != it.prompt:
            continue
        try:
            data = (folder / it.file).read_bytes()
        except OSError:
            continue
        if sha256_bytes(data) == r.get("sha256"):
            ok[it.index] = r
    return ok


def record_line(r: dict[str, Any]) -> bytes:
    return (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode()


def compact(folder: Path, records: dict[int, dict[str, Any]]) -> None:
    """Rewrite manifest.jsonl atomically: each index once, sorted."""
    write_atomic(folder / LINES, b"".join(record_line(records[i]) for i in sorted(records)))


class SetWriter:
    """The only writer of a set folder: puts an image in place, then appends and fsyncs its line."""

    def __init__(self, folder: Path, items: Sequence[Item], done: dict[int, dict[str, Any]]) -> None:
        self.folder, self.by_index, self.done = folder, {it.index: it for it in items}, done
        self.fh = open(folder / LINES, "ab")

    def write(self, index: int, data: bytes) -> bool:
        """Write image ``index`` unless it is already there (a retried shard); True if written."""
        if index in self.done:
            return False
        it = self.by_index[index]
        write_atomic(self.folder / it.file, data)
        r = {"index": it.index, "prompt": it.prompt, "seed": it.seed, "file": it.file,
             "sha256": sha256_bytes(data), "source": it.source}
        self.fh.write(record_line(r))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.done[index] = r
        return True

    def close(self) -> None:
        self.fh.close()


def check_compatible(header: dict[str, Any], want: dict[str, Any], folder: Path) -> None:
    """Refuse to mix: the same model, prompts and config as the set already in ``folder``."""
    if header["model"]["fingerprint"] != want["model"]["fingerprint"]:
        raise VelodiffError(
            f"{folder} was generated with another model ({header['model']['path']}, fingerprint "
            f"{header['model']['fingerprint'][:12]}); refusing to mix; use another --out"
        )
    hp, wp = header["prompts"], want["prompts"]
    if hp["sha256"] != wp["sha256"] and hp.get("file") == wp.get("file") and hp["count"] != wp["count"]:
        raise VelodiffError(
            f"{folder} was generated from {hp['count']} prompts of {hp['file']}, this run reads "
            f"{wp['count']} (another --limit, or the file changed); refusing to mix; use another --out"
        )
    if hp["sha256"] != wp["sha256"]:
        raise VelodiffError(
            f"{folder} was generated from other prompts ({hp['count']} prompts from {hp['file']}); "
            "refusing to mix; use another --out"
        )
    for k in CONFIG_KEYS:
        if header["config"].get(k) != want["config"].get(k):
            raise VelodiffError(
                f"{folder} was generated with {k}={header['config'].get(k)!r}, this run asks "
                f"{k}={want['config'].get(k)!r}; refusing to mix; use another --out"
            )
    if header.get("calibration") != want.get("calibration"):
        raise VelodiffError(
            f"{folder} was generated with other calibrations of the model (velodiff calibrate was run again "
            "since, or the set did not use them); refusing to mix; use another --out"
        )


def open_set(folder: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Create the folder and header, or check an existing one; returns the header in force."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IMAGES).mkdir(exist_ok=True)
    old = read_header(folder)
    if old is None:
        write_atomic(folder / HEADER, (json.dumps(header, indent=1, ensure_ascii=False) + "\n").encode())
        return header
    check_compatible(old, header, folder)
    return old


def remove_stale_temporaries(folder: Path) -> None:
    for d in (folder, folder / IMAGES):
        for p in d.glob(".*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass


def resolve_config(requested: dict[str, Any], previous: dict[str, Any] | None,
                   defaults: dict[str, Any]) -> dict[str, Any]:
    """The config of this run: the folder's (on resume) or the defaults, with what was asked for on top;
    asking for a value other than the folder's is refused."""
    base = {k: defaults.get(k) for k in CONFIG_KEYS}
    if previous is not None:  # a key newer than the set's header keeps its default (plan: none)
        base.update(previous)
    for k, v in requested.items():
        if v is None:
            continue
        if previous is not None and base.get(k) != v:
            raise VelodiffError(
                f"the set was generated with {k}={base.get(k)!r}, this run asks {k}={v!r}; "
                "refusing to mix; use another --out"
            )
        base[k] = v
    return base


# --- reading a set (for eval) -----------------------------------------------------------------


@dataclass
class ImageSet:
    """A set as read back: its header and the records whose image files are present and intact."""

    folder: Path
    header: dict[str, Any]
    records: list[dict[str, Any]]  # verified, sorted by index

    @property
    def total(self) -> int:
        return int(self.header.get("total", len(self.records)))

    @property
    def complete(self) -> bool:
        return len(self.records) == self.total

    def paths(self) -> list[Path]:
        return [self.folder / r["file"] for r in self.records]

    def images(self) -> list[Any]:
        from PIL import Image

        out = []
        for p in self.paths():
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        return out


def read_set(folder: str | os.PathLike[str]) -> ImageSet:
    """A finished or partial set: the header and the records whose files are present and intact."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise VelodiffError(f"the set folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise VelodiffError(f"{str(folder)!r} is not a folder made by velodiff generate-set")
    header = read_header(folder)
    if header is None:
        raise VelodiffError(f"{folder} has no {HEADER}; is it a folder made by velodiff generate-set?")
    records, _ = read_records(folder)
    ok = []
    for i in sorted(records):
        r = records[i]
        try:
            if sha256_bytes((folder / r["file"]).read_bytes()) == r.get("sha256"):
                ok.append(r)
        except (OSError, KeyError, TypeError):
            continue
    return ImageSet(folder, header, ok)
