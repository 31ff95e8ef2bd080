"""Layout by collage (after Sarukkai et al. 2024, 'Collage Diffusion', in its simplest form): each boxed
object is generated alone, cut out, scaled into its box on a plain canvas, and the collage is
harmonised by SDEdit (Meng et al. 2022) under the whole prompt, which keeps the layout it is started from.

    result = collage(model, "a red circle", {"red circle": (0.05, 0.05, 0.5, 0.5)}, seeds=[0])

1. Object k of the layout is drawn from its own phrase of the prompt ("a red circle above a blue square",
   box "blue square" -> "a blue square") with seed :func:`object_seed` (``seed + k * 2**32``: the objects
   of images with consecutive seeds never share a draw), capturing the cross-attention maps. A
   counted group has a list of boxes, one object each, drawn singular ("two red circles", "red circles"
   -> "a red circle" twice): the count is fixed by the collage, where the model alone merges or drops
   objects.
2. Cut-out (:func:`cut_out`): the background is the median colour of the image's border; the foreground,
   the pixels farther than ``threshold`` from it (RGB distance in [0, 1] units); the object, the
   connected foreground region holding the most cross-attention of the phrase's tokens and the end
   token (mean over the steps). An object drawn on a textured background has no such region: one
   clear line.
3. Paste (:func:`paste`): the object's bounding box is scaled to its layout box (its aspect follows the
   box, as GLIGEN's boxes fix both sides) and only its mask's pixels are pasted, in layout order, on a
   canvas of the first object's background colour.
4. Harmonise: ``img2img`` of the collage under the whole prompt at ``strength`` (the share of the steps
   re-run; SDEdit's t0): the seams and scaling blur go, the layout stays.

Without boxes, :func:`boxes_from_prompt` lays the prompt's objects out: a relation's two sides in their
halves, a counted group's objects and a list's phrases in a row or grid.

Cost: one generation per object plus ``strength`` of one (``bench/edit/README.md`` measures it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import VelodiffError
from ..limits import check_strength, is_number
from .layout import (
    Box,
    Boxes,
    add_regions,
    box_list,
    check_boxes,
    check_region_box,
    count_of,
    is_mask,
    named_regions,
    object_words,
    region_mask,
    spatial_parts,
)

RELATIONS = r"\s+(?:above|below|to the left of|to the right of)\s+"
#: the harmonising pass's SDEdit strength (chosen on seeds 1000 / 2000, bench/edit/README.md)
DEFAULT_STRENGTH = 0.5


def object_seed(seed: int, k: int) -> int:
    """The seed object k of an image with seed ``seed`` is drawn with: ``seed + k * 2**32`` (mod 2**63),
    so image seeds s, s + 1, ... (a batch, an eval set) never draw one object twice."""
    return (int(seed) + k * 2**32) % 2**63


def object_prompt(prompt: str, words: str) -> str:
    """The phrase of ``prompt`` that names ``words`` ("a red circle above two blue squares", "blue
    squares" -> "two blue squares"); ``words`` itself if no one phrase holds them all."""
    text = prompt.lower().strip().rstrip(".")
    parts = [p for p, _ in spatial_parts(text)] or [text]
    phrases = [q.strip() for p in parts for q in re.split(r"\s*,\s*|\s+and\s+|" + RELATIONS, p)]
    wanted = words.lower().split()
    for phrase in phrases:
        if all(w in object_words(phrase).split() for w in wanted):
            return phrase
    return words


def singular(phrase: str) -> str:
    """One object of a counted phrase ("three blue crosses" -> "a blue cross", "2 puppies" -> "a puppy"),
    by English's regular plurals; a phrase without a count as it is."""
    words = phrase.split()
    if count_of(phrase) < 2:
        return phrase
    noun = words[-1]
    if noun.endswith("ies") and len(noun) > 4:
        noun = noun[:-3] + "y"
    elif noun.endswith(("ches", "shes", "sses", "xes", "zes")):
        noun = noun[:-2]
    elif noun.endswith("s") and not noun.endswith("ss"):
        noun = noun[:-1]
    return " ".join(["a", *words[1:-1], noun])


def grid_boxes(region: Box, n: int, side: float = 0.4) -> list[Box]:
    """``n`` squares in rows over ``region`` (fractions of the image), row-major, each centred in its
    cell (a short last row centred), of side ``side`` or 0.8 of the cell where that is smaller."""
    import math

    x0, y0, x1, y1 = region
    w, h = x1 - x0, y1 - y0
    cols = min(n, max(1, math.ceil(math.sqrt(n * w / h))))
    rows = math.ceil(n / cols)
    cw, ch = w / cols, h / rows
    r = min(side, 0.8 * min(cw, ch)) / 2
    boxes = []
    for k in range(n):
        row, col = divmod(k, cols)
        shift = (cols - min(cols, n - row * cols)) * cw / 2  # centre a short last row
        cx, cy = x0 + shift + (col + 0.5) * cw, y0 + (row + 0.5) * ch
        boxes.append((cx - r, cy - r, cx + r, cy + r))
    return boxes


def boxes_from_prompt(prompt: str, side: float = 0.4, group_side: float = 0.3) -> Boxes:
    """Object boxes from the prompt's spatial relation, counts and lists: each side of a relation in its
    half of the image ("a red circle above a blue square": the circle a square of ``side`` centred in the
    top half); the objects of a counted group, or of a list of phrases ("a red circle and two blue
    squares"), in a row or grid of squares of ``group_side`` (:func:`grid_boxes`), a counted group's
    boxes a list; empty for a prompt naming one object with no relation. The sides were chosen on
    ShapesEval seeds the benches do not report (``bench/edit/README.md``)."""
    text = prompt.lower().strip().rstrip(".")
    boxes: Boxes = {}
    parts = spatial_parts(text)
    if parts:
        for part, region in parts:
            n = count_of(part)
            add_regions(boxes, object_words(part), grid_boxes(region, n, group_side if n > 1 else side))
        return boxes
    phrases = [q for q in (q.strip() for q in re.split(r"\s*,\s*|\s+and\s+", text)) if object_words(q)]
    counts = [count_of(q) for q in phrases]
    if sum(counts) < 2:
        return {}
    grid = iter(grid_boxes((0.0, 0.0, 1.0, 1.0), sum(counts), group_side))
    for phrase, n in zip(phrases, counts, strict=True):
        add_regions(boxes, object_words(phrase), [next(grid) for _ in range(n)])
    return boxes


def collage_boxes(prompt: str, boxes: Boxes | None = None) -> Boxes:
    """``boxes``, or else :func:`boxes_from_prompt`'s; one line when there are none."""
    named = boxes_from_prompt(prompt)
    if boxes is not None:  # the collage draws only boxed objects: one the prompt names must have a box
        boxes = named_regions(boxes, "collage boxes")
        for name, value in boxes.items():  # a bad box named as itself, not as another object's missing one
            for box in box_list(value):
                check_region_box(name, box)
        given = [set(k.split()) for k in boxes]
        missing = [k for k in named if not any(g <= set(k.split()) or set(k.split()) <= g for g in given)]
        if missing:
            raise VelodiffError(
                f"the layout has no box for {', '.join(repr(k) for k in missing)}, which the prompt names; "
                "the collage draws only the boxed objects: add a box for each"
            )
    boxes = named if boxes is None else boxes
    if not boxes:
        raise VelodiffError(
            "the collage needs layout boxes or a prompt naming several objects "
            "(A above / below / to the left of / to the right of B; two red circles; A and B)"
        )
    return boxes


def background_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's one-pixel border, (3,) in the image's units."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def cut_out(image: np.ndarray, attention: np.ndarray | None = None, threshold: float = 0.25) -> np.ndarray:
    """The object's mask (H, W) bool in ``image`` (H, W, 3) in [0, 1]: of the connected regions farther
    than ``threshold`` from the background colour, the one with the most ``attention`` mass ((H, W), any
    scale), or the largest without it."""
    from scipy import ndimage

    distance = np.linalg.norm(image - background_colour(image), axis=-1)
    regions, n = ndimage.label(distance > threshold)
    if n == 0:
        raise VelodiffError(
            "collage: an object's image has no region that stands out from its background; "
            "use the layout guidance instead (--layout-mode guidance)"
        )
    weight = np.ones(image.shape[:2]) if attention is None else np.clip(attention, 0, None)
    mass = ndimage.sum(weight, regions, index=np.arange(1, n + 1))
    return regions == 1 + int(np.argmax(mass))


def paste(canvas: np.ndarray, image: np.ndarray, mask: np.ndarray, box: Any) -> np.ndarray:
    """``canvas`` (H, W, 3) with the masked object of ``image`` scaled from its bounding box into ``box``
    (fractions x0, y0, x1, y1 of the canvas, y down; or a layout mask, a 2-D array: the object fills
    the region's bounding box and shows only inside the region); a new array."""
    from PIL import Image

    h, w = canvas.shape[:2]
    region = None
    if is_mask(box):
        region = region_mask(box, h, w).numpy()
        rows, cols = np.nonzero(region)
        if not len(rows):
            raise VelodiffError(f"collage: a layout mask covers no pixel of the {w}x{h} image; enlarge it")
        box = (cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h)
    ys, xs = np.nonzero(mask)
    crop = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    x0, y0 = round(box[0] * w), round(box[1] * h)
    x1, y1 = max(x0 + 1, round(box[2] * w)), max(y0 + 1, round(box[3] * h))
    size = (x1 - x0, y1 - y0)
    obj = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize(size, Image.BICUBIC))
                    for c in np.moveaxis(image[crop], -1, 0)], axis=-1)
    alpha = np.asarray(Image.fromarray(mask[crop].astype(np.float32)).resize(size, Image.BILINEAR))
    out = canvas.copy()
    under = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = under + alpha[..., None].clip(0, 1) * (obj.clip(0, 1) - under)
    return out if region is None else canvas + region[..., None] * (out - canvas)


def _phrase_token_indices(model: Any, phrase: str) -> list[int]:
    """Map indices of the phrase's tokens and its end token (after CLIP's start token; T5 has none)."""
    tokens = model.context_tokens(phrase)
    if not tokens:
        return list(range(1, len(phrase.split()) + 2))
    return [q for q, _ in tokens] + [tokens[-1][0] + 1]


def collage(
    model: Any,
    prompt: str,
    boxes: Boxes | None = None,
    *,
    strength: float = DEFAULT_STRENGTH,
    seeds: Sequence[int] = (0,),
    threshold: float = 0.25,
    **options: Any,
) -> Any:
    """Images of ``prompt`` with each ``boxes`` object (words of the prompt -> a box (x0, y0, x1, y1) in
    [0, 1], a list of boxes, one object each, or a mask; default :func:`boxes_from_prompt`) in its box
    (module docstring). ``options`` as
    :func:`velodiff.pipelines.text2img` (steps, solver, guidance, plan, ...), used for the objects and
    the harmonising pass. Returns img2img's result with ``steps`` the objects' steps, ``nfe`` and
    ``evals`` counting the whole pipeline, ``info["collages"]`` (the pasted canvases, PIL) and
    ``info["objects"]`` (each object's own images) added."""
    import dataclasses

    import torch

    from ..accel.attention import AttentionMaps, attention_modules
    from ..pipelines import img2img, text2img
    from ..pipelines.common import check_model

    check_model(model)
    if not isinstance(prompt, str):
        raise VelodiffError(f"collage draws one prompt (a string), got {type(prompt).__name__}")
    if isinstance(seeds, str) or not isinstance(seeds, Sequence):
        raise VelodiffError(f"seeds is a list of integers, got {seeds!r}")
    boxes = collage_boxes(prompt, boxes)
    check_boxes(boxes, prompt)
    # (words, region, whether it holds one object of a counted group: drawn as "a <object>")
    items = [(words, box, isinstance(value, list | tuple) and not isinstance(value[0], int | float))
             for words, value in boxes.items() for box in box_list(value)]
    check_strength(strength, "collage: strength", zero=False)
    if not is_number(threshold) or not 0 < threshold < 1:
        raise VelodiffError(f"collage: threshold is an RGB distance in (0, 1) from the background, "
                            f"got {threshold!r}")
    if "latents" in options:
        raise VelodiffError("collage: latents apply to one generation; give seeds instead")
    plan = options.pop("plan", None)
    rules = [] if plan is None else list(plan) if isinstance(plan, list | tuple) else [plan]
    seeds = list(seeds)
    canvases: list[np.ndarray | None] = [None] * len(seeds)
    objects, nfe, evals = [], 0, 0
    # DiTs (SD3, Flux) have no plain cross-attention to read: their cut-out is the largest region
    readable = any(m.norm_q is None for _, m in attention_modules(model.network, True))
    for k, (words, box, one_of_group) in enumerate(items):
        phrase = object_prompt(prompt, words)
        phrase = singular(phrase) if one_of_group else phrase
        maps = AttentionMaps() if readable else None
        drawn = {**options, "output": "pil"}  # the cut-out reads pictures; ``output`` is for the result
        own = [object_seed(s, k) for s in seeds]
        res = text2img(model, phrase, seeds=own, plan=[*rules, *filter(None, [maps])], **drawn)
        objects.append(res.images)
        nfe, evals = nfe + res.nfe, evals + res.evals
        if maps is not None:
            ids = _phrase_token_indices(model, phrase)
            mean = torch.stack([m[:, ids].sum(1) for m in maps.maps.values()]).mean(0)  # (B, h, w)
        for i, img in enumerate(res.images):
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            h, w = pixels.shape[:2]
            att = None
            if maps is not None:
                up = torch.nn.functional.interpolate(mean[i][None, None], size=(h, w), mode="bilinear")
                att = up[0, 0].numpy()
            mask = cut_out(pixels, att, threshold)
            if canvases[i] is None:
                canvases[i] = np.broadcast_to(background_colour(pixels), pixels.shape).copy()
            canvases[i] = paste(canvases[i], pixels, mask, box)
    from PIL import Image

    pictures = [Image.fromarray((c * 255).round().astype(np.uint8)) for c in canvases]  # type: ignore[operator]
    result = img2img(model, prompt, pictures, strength, seeds=seeds, plan=rules, **options)
    info = {**result.info, "collages": pictures, "objects": objects}
    # steps: the objects' (the requested ones; the harmonising pass runs ``strength`` of them)
    return dataclasses.replace(result, steps=res.steps, nfe=nfe + result.nfe, evals=evals + result.evals,
                               info=info)
