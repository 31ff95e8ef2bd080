"""Generation parameters inside the image file, as AUTOMATIC1111's web UI writes them ("infotext").

Every image ``velodiff generate`` / ``img2img`` / ``inpaint`` writes, and every text-to-image picture
the server returns, carries how it was made in the format A1111's "PNG Info" tab, ComfyUI's
and Civitai's readers and most image browsers understand::

    a red circle above a blue square
    Negative prompt: blurry
    Steps: 8, Sampler: dpmpp_2m, Schedule type: karras, CFG scale: 2.5, Seed: 0, Size: 64x64, ...

(the prompt, an optional ``Negative prompt:`` line, then ``Key: value`` pairs; a value holding a comma,
colon or newline is a JSON string). In a PNG it is the ``parameters`` text chunk; in a JPEG or WebP the
EXIF UserComment (UTF-16, "UNICODE" prefix), both as A1111 stores them. Sampler and schedule are
velodiff's solver and grid names, which velodiff reads back (``--solver``, ``--grid``, ComfyUI's
KSampler); ``Model hash`` is A1111's: the first 10 hex digits of the SHA-256 of a single-file
checkpoint (the same for a folder: of its files, ``eval.reference.model_hash``).

:func:`format_infotext` writes the text, :func:`parse_infotext` reads it back into a dict (the inverse),
:func:`generation_request` turns that into a request's keywords, :func:`image_infotext` finds the text in
an image file, :func:`save_options` gives ``PIL.Image.save`` the keywords that embed it. No torch here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the PNG text chunk's key (A1111's, read by its PNG Info tab and by Civitai)
PNG_KEY = "parameters"
#: EXIF UserComment (in the Exif IFD) and the 8-byte character code that starts it (EXIF 2.3, 4.6.5)
USER_COMMENT, EXIF_IFD, UNICODE = 0x9286, 0x8769, b"UNICODE\0"
#: the longest comment a JPEG's EXIF segment (64 KiB with its headers) holds here
JPEG_EXIF_MAX = 65_000

# one "Key: value" pair of the last line; the value is a JSON string or runs to the next comma
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_infotext(prompt: str, negative: str | None, fields: Mapping[str, Any]) -> str:
    """The text A1111 writes: the prompt, ``Negative prompt: ...`` when there is one, then the fields
    (``None`` values left out) as ``Key: value`` pairs joined by ", "."""
    pairs = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{pairs}".strip()


def parse_infotext(text: str) -> dict[str, Any]:
    """``format_infotext``'s inverse: ``{"Prompt": ..., "Negative prompt": ..., key: value, ...}`` with
    the values as strings (quoted ones decoded). Text without a parameters line is all prompt."""
    lines = text.strip().split("\n")
    pairs = _PAIR.findall(lines[-1])
    if len(pairs) < 3:  # A1111's rule: a last line with fewer pairs is part of the prompt
        pairs = []
    else:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt)}
    if in_negative:
        out["Negative prompt"] = "\n".join(negative)
    for key, value in pairs:
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            try:
                value = json.loads(value)
            except ValueError:  # a hand-edited or foreign value: kept as written, as A1111 keeps it
                pass
        out[key.strip()] = value
    return out


#: infotext fields that are a generation request's keywords as they are (text), and those that are numbers
_TEXT_KEYS = {"Prompt": "prompt", "Negative prompt": "negative", "Sampler": "solver", "Schedule type": "grid",
              "Plan": "plan", "Model": "model", "Noise": "noise", "Layout": "layout",
              "Layout mode": "layout_mode", "Regions": "regions"}
_NUMBER_KEYS = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
                "Batch size": ("n", int), "Denoising strength": ("strength", float),
                "Collage strength": ("collage_strength", float), "Eta": ("eta", float),
                "Embedded guidance": ("embedded_guidance", float)}


def a1111_clip_skip(clip_skip: int | None) -> int | None:
    """diffusers' ``clip_skip`` (layers skipped from the end: 1 = the penultimate layer; velodiff's
    ``--clip-skip``) as A1111's ``Clip skip`` field counts it (1 = the last layer, its default: 2 = the
    penultimate); None for no skip, which A1111 does not write."""
    return clip_skip + 1 if clip_skip else None


def generation_request(fields: Mapping[str, str]) -> dict[str, Any]:
    """What a generation request (``text2img``'s keywords, the server's job fields) takes from an image's
    parsed parameters: prompt, negative, steps, solver, grid, guidance, seed, n (``Batch size``: images
    seed, seed + 1, ... in one file), width and height (``Size``), plan, model, noise (an A1111 or
    Forge text's noise source: ``RNG: CPU`` is ``a1111-cpu``; ``NV``, ``GPU`` or none, ``a1111-nv``, the
    draws of an NVIDIA card), layout, layout_mode,
    regions, collage_strength, strength (img2img's), eta, embedded_guidance, clip_skip (diffusers' count,
    from A1111's ``Clip skip``: one less), loras (the ``Lora hashes`` text: names and hashes, no files);
    absent fields are absent here. A1111's sampler and
    schedule labels ("DPM++ 2M Karras", "Karras") are kept as written: velodiff reads them
    (``velodiff.aliases``). A number that does not read as one is one line."""
    from .errors import VelodiffError

    out: dict[str, Any] = {key: fields[name] for name, key in _TEXT_KEYS.items() if fields.get(name)}
    def number(name: str, kind: type) -> Any:
        try:
            return kind(fields[name])
        except ValueError:
            raise VelodiffError(f"the image's {name} {fields[name][:40]!r} is not a number") from None

    for name, (key, kind) in _NUMBER_KEYS.items():
        if name in fields:
            out[key] = number(name, kind)
    if "Clip skip" in fields and number("Clip skip", int) > 1:  # A1111's count: 1 is no skip
        out["clip_skip"] = number("Clip skip", int) - 1
    if fields.get("Lora hashes"):  # files the request cannot name by path: said, not loaded
        scales = f" (scales {fields['Lora scales']})" if fields.get("Lora scales") else ""
        out["loras"] = fields["Lora hashes"] + scales
    if "noise" not in out:  # A1111's noise source: its RNG field, else (an A1111 or Forge text, Version
        rng = fields.get("RNG") or ("NV" if re.match(r"[vf]\d", fields.get("Version", "")) else "")
        if rng in ("CPU", "NV", "GPU"):  # v... / f...) its default GPU source, an NVIDIA card's draws
            out["noise"] = "a1111-cpu" if rng == "CPU" else "a1111-nv"
    if "Batch pos" in fields:  # an older A1111's single image of a batch: its own seed, one image
        out.pop("n", None)
    if "Size" in fields:
        size = re.fullmatch(r"(\d{1,6})x(\d{1,6})", fields["Size"], re.ASCII)
        if size is None:
            raise VelodiffError(f"the image's Size {fields['Size'][:40]!r} is not WIDTHxHEIGHT")
        out["width"], out["height"] = int(size[1]), int(size[2])
    if any(name.startswith("Hires ") for name in fields):  # A1111's hires fix: a second pass velodiff lacks;
        out.pop("strength", None)  # its Denoising strength is that pass's, not an input image's, and its
        final = re.fullmatch(r"(\d{1,6})x(\d{1,6})", fields.get("Hires resize", ""), re.ASCII)  # Size the
        if final is not None:  # first pass's: the image is Hires resize, else Size x Hires upscale
            out["width"], out["height"] = int(final[1]), int(final[2])
        elif "width" in out and "Hires upscale" in fields:
            scale = number("Hires upscale", float)
            out["width"], out["height"] = int(out["width"] * scale), int(out["height"] * scale)
    return out


def not_drawn(fields: Mapping[str, str]) -> dict[str, str]:
    """A1111 settings an image was made with that change its noise and that velodiff does not apply, so
    the request from :func:`generation_request` makes another picture: a nonzero ``ENSD`` (its step
    noise re-seeded at seed + ENSD), a variation seed at a nonzero strength, ``Seed resize from``."""
    out = {k: fields[k] for k in ("ENSD", "Seed resize from") if fields.get(k, "0").strip() not in ("0", "")}
    if fields.get("Variation seed") and fields.get("Variation seed strength", "0").strip() not in ("0", ""):
        out |= {k: fields[k] for k in ("Variation seed", "Variation seed strength")}
    return out


def save_options(fmt: str, text: str | None) -> dict[str, Any]:
    """``PIL.Image.save`` keywords that embed ``text`` in an image of format ``fmt`` (PNG: the
    ``parameters`` chunk; JPEG / WebP: EXIF UserComment); ``{}`` for no text or another format."""
    if not text:
        return {}
    from PIL import Image, PngImagePlugin

    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_KEY, text)  # (PIL writes an iTXt chunk for text beyond Latin-1)
        return {"pnginfo": info}
    if fmt in ("JPEG", "WEBP"):
        comment = UNICODE + text.encode("utf-16-be")
        if fmt == "JPEG" and len(comment) > JPEG_EXIF_MAX:  # a JPEG's EXIF is one 64 KiB segment
            import warnings

            warnings.warn(f"the settings ({len(text)} characters) do not fit a JPEG's EXIF; the image is "
                          "saved without them (a PNG or WebP holds them)", stacklevel=2)
            return {}
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = comment
        return {"exif": exif.tobytes()}
    return {}


def run_infotext(
    prompt: str,
    negative: str | None,
    res: Any,
    seed: int,
    model_path: str | Path,
    loras: Any = (),
    n: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The infotext of a pipeline result ``res`` (``GenerationResult``): the solver, grid, scale and plan
    it ran, the first ``seed`` of ``n`` images, their size, the model's name and short hash, its LoRAs
    ``(file, scale)`` and ``extra`` fields (None ones left out)."""
    from . import __version__
    from .shipped import model_name

    w, h = res.images[0].size
    files = [(Path(f), float(scale)) for f, scale in loras]
    fields: dict[str, Any] = {
        "Steps": res.info.get("grid_steps", res.steps),  # img2img: the grid's, of which strength ran
        "Sampler": res.solver,
        "Schedule type": res.grid,
        "CFG scale": f"{res.guidance:g}",
        "Seed": written_seed(seed, n),
        "Size": f"{w}x{h}",
        "Batch size": n if n > 1 else None,
        "Model hash": model_short_hash(model_path),
        "Model": Path(model_name(model_path)).name,
        "Lora hashes": ", ".join(f"{f.stem}: {model_short_hash(f)}" for f, _ in files) or None,
        "Lora scales": ", ".join(f"{f.stem}: {scale:g}" for f, scale in files) or None,
        "NFE": res.nfe,
        "Plan": res.plan,
        **(extra or {}),
        "Version": f"velodiff {__version__}",
    }
    return format_infotext(prompt, negative, fields)


def noise_fields(noise: str) -> dict[str, str | None]:
    """A run's noise mode as fields: velodiff's ``Noise`` and, for A1111's modes, A1111's own ``RNG`` (its
    noise source, which A1111's paste applies: ``a1111-cpu`` is "CPU", ``a1111-nv`` "NV")."""
    return {"Noise": noise, "RNG": noise[6:].upper() if noise.startswith("a1111-") else None}


def written_seed(seed: int, n: int) -> int:
    """The first of ``n`` seeds as the file says it: torch's unsigned form (-1 is 2**64 - 1, where in A1111
    -1 would ask for a random seed), unless its last image would pass 2**64; then the signed one, which
    velodiff takes back (the same images: seeds are taken modulo 2**64)."""
    unsigned = seed % 2**64
    return unsigned if unsigned + n - 1 < 2**64 else unsigned - 2**64


def model_short_hash(path: str | Path) -> str:
    """A1111's model hash: the first 10 hex digits of a checkpoint file's SHA-256 (remembered per file
    version, as A1111 does); for a folder, of velodiff's hash of its files (``eval.reference.model_hash``)."""
    p = Path(path)
    if p.is_file():
        from .files import file_sha256

        return file_sha256(p)[:10]
    from .eval.reference import model_hash

    return model_hash(p)[:10]


def image_infotext(image: Any) -> str | None:
    """The parameters text of an opened PIL image (its PNG chunk, else its EXIF UserComment), or None."""
    text = getattr(image, "info", {}).get(PNG_KEY)
    if isinstance(text, str):
        return text
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(UNICODE):
        body = raw[len(UNICODE):]  # A1111 (piexif) writes big-endian; exiftool, the TIFF header's order
        little = len(body) > 1 and body[0] != 0 and body[1] == 0
        return body.decode("utf-16-le" if little else "utf-16-be", "replace") or None
    if isinstance(raw, bytes):  # "ASCII\0\0\0" or an undefined character code
        return raw[8:].decode("utf-8", "replace").strip("\0") or None
    return None
