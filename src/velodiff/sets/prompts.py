"""Prompt files for an image set: a text file (one prompt a line), a JSON list (strings, or objects
with 'prompt' / 'text' / 'caption'; also under an object's 'prompts' key, as ShapesEval's sets), or COCO
captions (an object with 'annotations'). Each prompt keeps where it came from (its line, the JSON
item, COCO's ``image_id`` and ``id``), and every error names the line it is about.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VelodiffError


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
        why = e.msg.removesuffix(" at").lower()  # json's own words end with 'at', meant before the position
        raise VelodiffError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({why})") from None
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
