"""Sharded, resumable generation of image sets: prompts in, PNG files plus a manifest out.

A set folder holds

* ``manifest.json``  - the header: format, model (path and fingerprint), prompts (count, hash) and
  the sampling config; written once, checked on every resume (a different model or config is refused);
* ``manifest.jsonl`` - one JSON line per finished image (index, prompt, seed, file, sha256, source),
  appended and fsync'ed after the image file is in place;
* ``images/NNNNNN.png`` - written to a temporary file and renamed (``os.replace``), never half-written.

Determinism contract. Image ``i`` uses prompt ``i // images_per_prompt`` and seed ``seed + i`` (the same
per-image seed as ``velodiff generate``; velodiff draws each image's noise from its own seed). Images are
rendered in chunks aligned on multiples of ``batch`` (``[c*batch, (c+1)*batch)``), so an image is
always computed in the same batch, by any process, in any order, with ``threads`` CPU threads and
deterministic algorithms: a killed run that is resumed, a run split over Ray workers and an
uninterrupted run give byte-identical PNG files.

Killed at any moment (SIGKILL), the folder stays consistent: a torn last manifest line is dropped, an
image without a line (or whose hash does not match its line) is rendered again, stale temporary
files are removed, and the manifest is rewritten (atomically) sorted with each index once.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..files import write_atomic

FORMAT = "velodiff-image-set/1"
HEADER = "manifest.json"
LINES = "manifest.jsonl"
IMAGES = "images"
LOCK = ".lock"

#: config keys that decide the pixels; a resume that asks for another value is refused
CONFIG_KEYS = (
    "seed",
    "images_per_prompt",
    "steps",
    "solver",
    "grid",
    "guidance",
    "negative",
    "height",
    "width",
    "batch",
    "threads",
    "noise",
)

#: files hashed whole up to this size; larger ones by size plus their first and last 16 MiB
FULL_HASH_LIMIT = 256 * 2**20
SAMPLE_BYTES = 16 * 2**20


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt and where it came from (``{"line": n}``, or COCO's ``image_id`` and ``id``)."""

    text: str
    source: dict[str, Any] = field(default_factory=dict)


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _array_items(text: str, pos: int) -> list[tuple[Any, int]]:
    """The items of the (already validated) JSON array starting at ``text[pos] == '['``, each with
    its character offset."""
    dec = json.JSONDecoder()
    items: list[tuple[Any, int]] = []
    pos = _skip_ws(text, pos + 1)
    if text[pos] == "]":
        return items
    while True:
        obj, end = dec.raw_decode(text, pos)
        items.append((obj, pos))
        pos = _skip_ws(text, end)
        if text[pos] == "]":
            return items
        pos = _skip_ws(text, pos + 1)  # the comma


def _object_value_offset(text: str, pos: int, key: str) -> int | None:
    """The offset of ``key``'s value in the (validated) JSON object starting at ``text[pos] == '{'``."""
    dec = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    while text[pos] != "}":
        k, end = dec.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, end) + 1)  # past the colon
        if k == key:
            return pos
        _, end = dec.raw_decode(text, pos)
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return None


def _text_prompts(path: Path, data: bytes) -> list[Prompt]:
    out = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise VelodiffError(f"{path}: line {n} is not UTF-8 text") from None
        if "\x00" in line or any(ord(c) < 32 and c != "\t" for c in line):
            raise VelodiffError(f"{path}: line {n} has control characters; is this a text file of prompts?")
        if line.strip():
            out.append(Prompt(line.strip(), {"line": n}))
    return out


def _json_prompts(path: Path, data: bytes) -> list[Prompt]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VelodiffError(f"{path}: line {line} is not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise VelodiffError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    starts = _line_starts(text)

    def line_of(offset: int) -> int:
        return bisect.bisect_right(starts, offset)

    start = _skip_ws(text, 0)
    if isinstance(doc, dict) and isinstance(doc.get("prompts"), list):  # {"prompts": [...]} (ShapesEval sets)
        pos = _object_value_offset(text, start, "prompts")
        assert pos is not None
        doc, start = doc["prompts"], pos
    if isinstance(doc, list):
        out = []
        for (item, off), i in zip(_array_items(text, start), range(len(doc)), strict=True):
            where = f"{path}: line {line_of(off)} (item {i})"
            if isinstance(item, dict):
                keys = [k for k in ("prompt", "text", "caption") if k in item]
                if not keys:
                    raise VelodiffError(f"{where}: an object needs a 'prompt' (or 'text' / 'caption') key")
                item = item[keys[0]]
            if not isinstance(item, str):
                raise VelodiffError(f"{where}: expected a prompt string, got {_json_type(item)}")
            if not item.strip():
                raise VelodiffError(f"{where}: the prompt is empty")
            out.append(Prompt(item.strip(), {"line": line_of(off), "item": i}))
        return out
    if isinstance(doc, dict) and "annotations" in doc:  # COCO captions: {"images", "annotations": [...]}
        anns = doc["annotations"]
        vpos = _object_value_offset(text, start, "annotations")
        if not isinstance(anns, list) or vpos is None:
            raise VelodiffError(f"{path}: COCO 'annotations' must be a list of {{'image_id', 'caption'}}")
        out = []
        for (ann, off), i in zip(_array_items(text, vpos), range(len(anns)), strict=True):
            where = f"{path}: line {line_of(off)} (annotation {i})"
            cap = ann.get("caption") if isinstance(ann, dict) else None
            if not isinstance(cap, str):
                raise VelodiffError(f"{where}: expected an object with a 'caption' string")
            if not cap.strip():
                raise VelodiffError(f"{where}: the caption is empty")
            src = {k: ann[k] for k in ("image_id", "id") if k in ann}
            out.append(Prompt(" ".join(cap.split()), {"line": line_of(off), **src}))
        return out
    raise VelodiffError(
        f"{path}: expected a JSON list of prompts, an object with 'prompts', or COCO captions "
        "(an object with 'annotations'), "
        f"got {_json_type(doc)}"
    )


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def load_prompt_file(path: str | os.PathLike[str], limit: int | None = None) -> list[Prompt]:
    """Prompts from a text file (one a line; blank lines skipped), a JSON list (strings, or objects
    with 'prompt' / 'text'; also under an object's 'prompts' key, as ShapesEval's sets), or a COCO
    captions JSON (every annotation's caption, in file order). Errors name the line."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise VelodiffError(f"prompt file {str(p)!r} is a folder; give a .txt or .json file")
    if not p.is_file():
        raise VelodiffError(f"prompt file {str(p)!r} does not exist")
    data = p.read_bytes()
    is_json = p.suffix.lower() == ".json" or (
        p.suffix.lower() != ".txt" and data.lstrip()[:1] in (b"[", b"{")
    )
    prompts = _json_prompts(p, data) if is_json else _text_prompts(p, data)
    if not prompts:
        raise VelodiffError(f"prompt file {str(p)!r} has no prompts")
    return prompts[:limit] if limit is not None else prompts


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256(json.dumps([p.text for p in prompts], ensure_ascii=False).encode()).hexdigest()


# --- the plan: which image is which ------------------------------------------------------------


def sample_seed(base: int, index: int) -> int:
    """Image ``index``'s seed: ``base + index`` (as ``velodiff generate`` numbers a batch's seeds)."""
    return int(base) + int(index)


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    seed: int
    file: str
    source: dict[str, Any]


def file_name(index: int, total: int) -> str:
    return f"{IMAGES}/{index:0{max(6, len(str(total - 1)))}d}.png"


def plan_items(prompts: Sequence[Prompt], config: dict[str, Any]) -> list[Item]:
    k = int(config["images_per_prompt"])
    total = len(prompts) * k
    return [
        Item(i, p.text, sample_seed(config["seed"], i), file_name(i, total), p.source)
        for i, p in ((i, prompts[i // k]) for i in range(total))
    ]


def chunks(items: Sequence[Item], batch: int) -> list[list[Item]]:
    """Items grouped by ``index // batch``: the unit of work (and of batching) everywhere."""
    out: dict[int, list[Item]] = {}
    for it in items:
        out.setdefault(it.index // batch, []).append(it)
    return [out[c] for c in sorted(out)]


# --- the model's fingerprint -------------------------------------------------------------------


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
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
    )
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == p else f.relative_to(p).as_posix()
        h.update(f"{rel}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


# --- rendering (the same function in process and on Ray workers) ------------------------------


def set_determinism(threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True, warn_only=True)


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def render_chunk(model: Any, chunk: Sequence[Item], config: dict[str, Any]) -> list[tuple[int, bytes]]:
    """PNG bytes of one chunk's images, rendered as one batch."""
    from ..pipelines import text2img

    res = text2img(
        model,
        [it.prompt for it in chunk],
        seeds=[it.seed for it in chunk],
        negative=config.get("negative"),
        steps=config.get("steps"),
        solver=config.get("solver"),
        grid=config.get("grid"),
        guidance=config.get("guidance"),
        height=config.get("height"),
        width=config.get("width"),
        noise=config.get("noise", "velodiff"),
    )
    return [(it.index, png_bytes(im)) for it, im in zip(chunk, res.images, strict=True)]


# --- the set folder ----------------------------------------------------------------------------


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
    return h


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


def lock_folder(folder: Path) -> Any:
    """An exclusive lock on the folder (released by the OS if the process is killed)."""
    import fcntl

    fh = open(folder / LOCK, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise VelodiffError(
            f"another velodiff process is writing {folder}; wait for it or use another --out"
        ) from None
    return fh


def check_compatible(header: dict[str, Any], want: dict[str, Any], folder: Path) -> None:
    """Refuse to mix: the same model, prompts and config as the set already in ``folder``."""
    if header["model"]["fingerprint"] != want["model"]["fingerprint"]:
        raise VelodiffError(
            f"{folder} was generated with another model ({header['model']['path']}, fingerprint "
            f"{header['model']['fingerprint'][:12]}); refusing to mix; use another --out"
        )
    hp, wp = header["prompts"], want["prompts"]
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
    base = dict(previous) if previous is not None else {k: defaults.get(k) for k in CONFIG_KEYS}
    for k, v in requested.items():
        if v is None:
            continue
        if previous is not None and previous.get(k) != v:
            raise VelodiffError(
                f"the set was generated with {k}={previous.get(k)!r}, this run asks {k}={v!r}; "
                "refusing to mix; use another --out"
            )
        base[k] = v
    return base


@dataclass
class SetSummary:
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
    **ray_options: Any,
) -> SetSummary:
    """Generate every missing image of the set in ``folder`` (resuming a partial one), in this process
    or over Ray (``ray="local"`` or an address). ``config`` has every key of CONFIG_KEYS."""
    import time

    t0 = time.perf_counter()
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise VelodiffError(f"--out {str(folder)!r} is a file; give a folder")
    if folder.is_dir() and read_header(folder) is None and any(
        p.name not in (IMAGES, LOCK) for p in folder.iterdir()
    ):
        raise VelodiffError(f"{folder} is not empty and holds no image set ({HEADER}); use a new folder")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise VelodiffError(f"config lacks {', '.join(missing)}")
    if ray is not None:
        from .distributed import check_address

        check_address(ray)
    fingerprint = fingerprint or model_fingerprint(model_path)
    header = {
        "format": FORMAT,
        "model": {"path": str(Path(model_path).expanduser().resolve()), "fingerprint": fingerprint},
        "prompts": {"file": str(prompt_file), "count": len(prompts), "sha256": prompts_digest(prompts)},
        "config": {k: config[k] for k in CONFIG_KEYS},
        "total": len(prompts) * int(config["images_per_prompt"]),
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
                from .distributed import run_on_ray

                run_on_ray(todo, writer, model_path, fingerprint, header["config"], address=ray,
                           workers=workers, progress=progress, total=len(items), **ray_options)
        finally:
            writer.close()
        compact(folder, writer.done)
        made = len(writer.done) - already
        return SetSummary(folder, len(items), already, made, bad, time.perf_counter() - t0)
    finally:
        lock.close()


def load_model_checked(model_path: str | os.PathLike[str], fingerprint: str, threads: int) -> Any:
    """The model, after checking it is the one the set was made with; threads and determinism set."""
    from ..models import load

    set_determinism(threads)
    if model_fingerprint(model_path) != fingerprint:
        raise VelodiffError(f"model at {model_path} is not the one this set was made with")
    try:
        return load(model_path)
    except VelodiffError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VelodiffError(f"cannot load model {str(model_path)!r}: {msg}") from None


def _run_local(
    todo: Iterable[list[Item]],
    writer: SetWriter,
    model_path: str | os.PathLike[str],
    fingerprint: str,
    config: dict[str, Any],
    progress: Callable[[int, int], None] | None,
    total: int,
) -> None:
    todo = list(todo)
    if not todo:
        return
    model = load_model_checked(model_path, fingerprint, int(config["threads"]))
    for chunk in todo:
        for index, data in render_chunk(model, chunk, config):
            writer.write(index, data)
        if progress:
            progress(len(writer.done), total)


# --- reading a set (for eval) -----------------------------------------------------------------


@dataclass
class ImageSet:
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


# --- metrics of a set (velodiff eval --manifest) ---------------------------------------------

IMAGE_GLOBS = ("*.png", "*.jpg", "*.jpeg", "*.webp")


def _batches(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _open_rgb(paths: Sequence[Path]) -> list[Any]:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def real_image_batches(real: str | os.PathLike[str], prompts: Sequence[str], seeds: Sequence[int],
                       batch: int) -> Iterable[list[Any]]:
    """Real images for FD/KID: 'shapes' (the shapes world drawn for the set's own prompts), another
    set's folder, or a folder of image files."""
    if str(real) == "shapes" and not Path(real).exists():
        from ..data.shapes import ShapesWorld

        world = ShapesWorld()
        for ps, ss in zip(_batches(prompts, batch), _batches(seeds, batch), strict=True):
            try:
                yield [world.render(p, seed=s).image for p, s in zip(ps, ss, strict=True)]
            except ValueError as e:
                raise VelodiffError(f"--real shapes: a prompt is not a shapes-world caption ({e})") from None
        return
    p = Path(real).expanduser()
    if (p / HEADER).is_file():
        paths = read_set(p).paths()
    elif p.is_dir():
        paths = sorted(f for g in IMAGE_GLOBS for f in p.glob(g))
    else:
        raise VelodiffError(f"--real {str(p)!r} is not a folder of images, a set, or 'shapes'")
    if not paths:
        raise VelodiffError(f"--real {str(p)!r} holds no images ({', '.join(IMAGE_GLOBS)})")
    for part in _batches(paths, batch):
        yield _open_rgb(part)


def evaluate_set(
    folder: str | os.PathLike[str],
    *,
    real: str | os.PathLike[str] | None = None,
    features: str = "fd-shapes",
    clip: str | os.PathLike[str] | None = None,
    reference: str | os.PathLike[str] | None = None,
    batch: int = 64,
) -> dict[str, Any]:
    """Metrics of the finished images of a set (complete or partial): FD and KID against ``real``
    (with ``features``), CLIP score with a local CLIP folder, PSNR / SSIM against a ``reference`` set
    of the same prompts and seeds. Metric weights are loaded before any image is read."""
    try:
        from . import metrics as M
    except ImportError as e:
        raise VelodiffError(f"velodiff's metrics are not available ({e})") from None
    s = read_set(folder)
    if not s.records:
        raise VelodiffError(f"{s.folder} has no finished images yet; run velodiff generate-set first")
    out: dict[str, Any] = {
        "set": str(s.folder),
        "images": len(s.records),
        "total": s.total,
        "complete": s.complete,
        "model": s.header["model"],
        "config": s.header["config"],
    }
    dist = M.DistributionMetrics(features, kid=True) if real is not None else None
    scorer = M.ClipScore(str(clip)) if clip is not None else None
    ref = None
    if reference is not None:
        ref = {r["index"]: r for r in read_set(reference).records}
        ref_folder = Path(reference).expanduser()
    prompts = [r["prompt"] for r in s.records]
    if dist is not None:
        for imgs in real_image_batches(real, prompts, [r["seed"] for r in s.records], batch):
            dist.add_real(imgs)
    psnrs: list[float] = []
    ssims: list[float] = []
    mismatched = 0
    for part in _batches(s.records, batch):
        imgs = _open_rgb([s.folder / r["file"] for r in part])
        if dist is not None:
            dist.add_fake(imgs)
        if scorer is not None:
            scorer.update(imgs, [r["prompt"] for r in part])
        if ref is not None:
            pairs = [(im, ref.get(r["index"])) for im, r in zip(imgs, part, strict=True)]
            ok = [(im, q) for (im, q), r in zip(pairs, part, strict=True)
                  if q is not None and q["prompt"] == r["prompt"] and q["seed"] == r["seed"]]
            mismatched += len(part) - len(ok)
            if ok:
                mine = [im for im, _ in ok]
                theirs = _open_rgb([ref_folder / q["file"] for _, q in ok])
                p = M.psnr(mine, theirs)
                psnrs += [float(v) for v in p[p.isfinite()]]
                ssims += [float(v) for v in M.ssim(mine, theirs)]
    if dist is not None:
        out["distribution"] = dist.compute()
        out["distribution"]["real"] = str(real)
    if scorer is not None:
        out["clip"] = scorer.compute()
    if ref is not None:
        if not ssims:
            raise VelodiffError(f"reference set {reference} has no image of this set's index, prompt, seed")
        out["reference"] = {
            "set": str(reference),
            "n": len(ssims),
            "unmatched": mismatched,
            "psnr": sum(psnrs) / len(psnrs) if psnrs else float("inf"),
            "ssim": sum(ssims) / len(ssims),
        }
    return out
