"""The synthetic captioned shapes world: a deterministic procedural generator of captioned RGB images.

Each scene holds 1-3 solid shapes on a plain near-black background, with a caption in a small closed
vocabulary and per-object ground truth (shape, colour, size, box, mask). Scene ``i`` of a world is a pure
function of ``(seed, i)``, so the world streams any number of samples and any sample can be regenerated
alone.

Resolution: 64x64 by default. That is the smallest size at which all four shapes stay unmistakable at the
small object size (16 px: a triangle's apex, a cross's arms and a circle's curvature survive a 4x or 8x
latent downsampling with a few latent pixels per object), while three large objects still fit without
overlap; and it keeps a tiny text-to-image model trainable on a CPU. Other sizes scale every length.

Design choices that keep the world learnable and scoreable:

- plain background, seven saturated colours far apart in hue (and white), so colour reads off one pixel;
- two object sizes (16 and 26 px at 64x64), objects never overlap and keep a margin between them;
- shapes are drawn 4x supersampled and box-filtered (antialiased edges); the ground-truth mask is the set
  of pixels at least half covered;
- a spatial relation is only ever captioned when it is geometrically unambiguous (centre offset of at
  least 12 px on the named axis, well inside the GenEval angular rule used by the evaluator);
- the colour-shape pair ``HOLDOUT_PAIRS`` (purple triangle) is never drawn by a ``holdout=True`` world,
  which is the training default; ``render`` draws any spec, so held-out prompts can still be rendered.

A *spec* is the structured content of a caption, plain JSON data::

    {"objects": [{"shape": "circle", "color": "red", "count": 1, "size": "small"}, ...],
     "relation": {"type": "left_of", "a": 0, "b": 1} | None}

``size`` is optional (absent: any size); a relation relates object groups ``a`` and ``b`` (count 1 each).
``caption_from_spec`` and ``parse_caption`` convert between specs and captions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import VelodiffError, unknown_name

__all__ = [
    "BACKGROUND", "COLORS", "HOLDOUT_PAIRS", "PALETTE", "RELATIONS", "SHAPES", "SIZES", "SIZE_PX",
    "ObjectSpec", "Scene", "ShapesSpecError", "ShapesWorld", "caption_from_spec", "category_of",
    "normalize_spec", "parse_caption", "relation_components",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (235, 215, 40),
    "green": (40, 190, 60),
    "cyan": (40, 210, 220),
    "blue": (50, 90, 235),
    "purple": (165, 60, 220),
    "white": (235, 235, 235),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
SIZE_PX: dict[str, float] = {"small": 16.0, "large": 26.0}   # side of the object's box at 64x64
BACKGROUND: tuple[int, int, int] = (20, 20, 20)
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
RELATION_WORDS: dict[str, str] = {
    "left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below",
}
HOLDOUT_PAIRS: tuple[tuple[str, str], ...] = (("purple", "triangle"),)   # (colour, shape)


def color_shape_pairs(exclude_holdout: bool = False) -> list[tuple[str, str]]:
    """Every (colour, shape) of the world, colour-major (the classifiers' head order); without the
    held-out pairs if ``exclude_holdout``."""
    return [(c, s) for c in COLORS for s in SHAPES if not (exclude_holdout and (c, s) in HOLDOUT_PAIRS)]


NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

REF = 64.0            # lengths below are in pixels at 64x64 and scale with the world's size
BORDER_PX = 2.0       # minimum distance of an object's box from the image edge
MARGIN_PX = 4.0       # minimum gap between two objects' boxes
REL_MIN_PX = 12.0     # minimum centre offset on the named axis for a captioned relation
REL_MIN_COMPONENT = 0.7   # generator: GenEval-normalised offset on the named axis (evaluator accepts 0.5)
REL_MAX_OTHER = 0.35      # generator: and every other relation's component at most this (evaluator: 0.5)
POSITION_THRESHOLD = 0.1  # GenEval's box-size discount on centre offsets
SUPERSAMPLE = 4
CROSS_BAR = 0.36      # width of a cross's bars as a fraction of its side


class ShapesSpecError(VelodiffError, ValueError):
    """A spec, caption or prompt the shapes world cannot read: one clear line (also a ValueError)."""


def _unknown(kind: str, name: Any, valid) -> ShapesSpecError:
    return ShapesSpecError(str(unknown_name(kind, str(name), valid)))


@dataclass(frozen=True, eq=False)
class ObjectSpec:
    """One drawn object's ground truth. ``box`` = (x0, y0, x1, y1) in pixels, end-exclusive (slice-style),
    the tight box of ``mask``; ``center`` is the exact geometric centre (x, y) the shape was drawn at."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    mask: np.ndarray
    center: tuple[float, float] = (0.0, 0.0)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True, eq=False)
class Scene:
    image: np.ndarray            # uint8 (H, W, 3)
    caption: str
    objects: list[ObjectSpec]
    spec: dict[str, Any] = field(default_factory=dict)   # what the caption says, as a spec
    index: int = -1

    @property
    def category(self) -> str:
        return category_of(self.spec)


# ---------------------------------------------------------------------------------------------- geometry

def relation_components(box_a: Sequence[float], box_b: Sequence[float]) -> dict[str, float]:
    """GenEval's relative-position rule (Ghosh et al. 2023, ``evaluation/evaluate_images.py``): the centre
    offset of ``a`` from ``b``, each axis shrunk by 0.1 x (sum of the two boxes' extents on it), divided by
    the length of the raw offset. Returns the signed-positive component per relation: ``a`` is "left of"
    ``b`` when ``out["left_of"] > 0.5`` (direction within 60 degrees of the axis and clear of the boxes)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a)
    bx0, by0, bx1, by1 = (float(v) for v in box_b)
    off = np.array([(ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2])
    dims = np.array([(ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0)])
    norm = float(np.linalg.norm(off))
    if norm < 1e-9:
        return dict.fromkeys(RELATIONS, 0.0)
    rev = np.maximum(np.abs(off) - POSITION_THRESHOLD * dims, 0.0) * np.sign(off) / norm
    dx, dy = float(rev[0]), float(rev[1])
    return {"left_of": -dx, "right_of": dx, "above": -dy, "below": dy}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float) -> None:
    k = SUPERSAMPLE
    h = side / 2
    x0, y0, x1, y1 = (cx - h) * k, (cy - h) * k, (cx + h) * k, (cy + h) * k
    # PIL includes the end pixel of ellipses/rectangles: pull the far edge in by one supersampled pixel
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx * k, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "cross":
        t = CROSS_BAR * side / 2 * k
        draw.rectangle([x0, cy * k - t, x1 - 1, cy * k + t - 1], fill=255)
        draw.rectangle([cx * k - t, y0, cx * k + t - 1, y1 - 1], fill=255)
    else:
        raise _unknown("shape", shape, SHAPES)


def _coverage(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (4x4 supersampled box filter)."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, side)
    a = np.asarray(canvas, dtype=np.float32) / 255.0
    return a.reshape(size, k, size, k).mean(axis=(1, 3))


def _box_of(cx: float, cy: float, side: float) -> tuple[float, float, float, float]:
    h = side / 2
    return (cx - h, cy - h, cx + h, cy + h)


def _separated(a: Sequence[float], b: Sequence[float], margin: float) -> bool:
    gap_x = max(a[0], b[0]) - min(a[2], b[2])
    gap_y = max(a[1], b[1]) - min(a[3], b[3])
    return gap_x >= margin or gap_y >= margin


def _relation_holds_strongly(box_a, box_b, rel: str, scale: float) -> bool:
    """Generator-side test: unambiguous by a wide margin (offset >= 12 px, GenEval component >= 0.7 on the
    named relation and <= 0.35 on every other one)."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    axis = 0 if rel in ("left_of", "right_of") else 1
    sign = -1 if rel in ("left_of", "above") else 1
    d = sign * (ca[axis] - cb[axis])
    comp = relation_components(box_a, box_b)
    others = max(v for r, v in comp.items() if r != rel)
    return d >= REL_MIN_PX * scale and comp[rel] >= REL_MIN_COMPONENT and others <= REL_MAX_OTHER


# ------------------------------------------------------------------------------------------------- specs

def normalize_spec(spec: Any) -> dict[str, Any]:
    """Validate a spec (dict, or anything with a ``.spec`` dict, or a caption string) and return a clean
    copy with defaults filled (``count`` 1, ``relation`` None)."""
    if isinstance(spec, str):
        return parse_caption(spec)
    if hasattr(spec, "spec") and not isinstance(spec, dict):
        spec = spec.spec
    if not isinstance(spec, dict) or "objects" not in spec:
        raise ShapesSpecError(f"a spec is a dict with an 'objects' list; got {spec!r}")
    objs = []
    for o in spec["objects"]:
        shape, color = o.get("shape"), o.get("color")
        if shape not in SHAPES:
            raise _unknown("shape", shape, SHAPES)
        if color not in PALETTE:
            raise _unknown("colour", color, COLORS)
        count = int(o.get("count", 1))
        if not 1 <= count <= 3:
            raise ShapesSpecError(f"count must be 1..3, got {count}")
        size = o.get("size")
        if size is not None and size not in SIZES:
            raise _unknown("size", size, SIZES)
        item = {"shape": shape, "color": color, "count": count}
        if size is not None:
            item["size"] = size
        objs.append(item)
    if not objs:
        raise ShapesSpecError("a spec needs at least one object")
    if sum(o["count"] for o in objs) > 3:
        raise ShapesSpecError("a scene holds at most 3 objects")
    rel = spec.get("relation")
    if rel is not None:
        if rel.get("type") not in RELATIONS:
            raise _unknown("relation", rel.get("type"), RELATIONS)
        a, b = int(rel.get("a", 0)), int(rel.get("b", 1))
        if not (0 <= a < len(objs) and 0 <= b < len(objs) and a != b):
            raise ShapesSpecError(f"relation indices {a}, {b} do not name two object groups")
        if objs[a]["count"] != 1 or objs[b]["count"] != 1:
            raise ShapesSpecError("a relation relates two single objects (count 1)")
        rel = {"type": rel["type"], "a": a, "b": b}
    return {"objects": objs, "relation": rel}


def category_of(spec: dict[str, Any]) -> str:
    """single | counting | binding | position | multi (anything else, e.g. three groups)."""
    objs, rel = spec["objects"], spec.get("relation")
    if rel is not None:
        return "position" if len(objs) == 2 else "multi"
    if len(objs) == 1:
        return "single" if objs[0]["count"] == 1 else "counting"
    if len(objs) == 2 and all(o["count"] == 1 for o in objs):
        return "binding"
    return "multi"


def _phrase(o: dict[str, Any]) -> str:
    size = f"{o['size']} " if o.get("size") else ""
    n = o.get("count", 1)
    if n == 1:
        return f"a {size}{o['color']} {o['shape']}"
    return f"{NUMBER_WORDS[n]} {size}{o['color']} {PLURALS[o['shape']]}"


PREFIXES: tuple[str, ...] = ("", "an image of ", "a picture of ")


def caption_from_spec(spec: dict[str, Any], prefix: str = "") -> str:
    """The canonical caption of a spec: '<prefix><phrase>[, <phrase>] and <phrase>' or
    '<phrase a> <relation> <phrase b>'."""
    spec = normalize_spec(spec)
    objs, rel = spec["objects"], spec["relation"]
    if rel is not None:
        rest = [o for j, o in enumerate(objs) if j not in (rel["a"], rel["b"])]
        text = f"{_phrase(objs[rel['a']])} {RELATION_WORDS[rel['type']]} {_phrase(objs[rel['b']])}"
        if rest:
            text += " and " + " and ".join(_phrase(o) for o in rest)
        return prefix + text
    phrases = [_phrase(o) for o in objs]
    if len(phrases) == 1:
        return prefix + phrases[0]
    return prefix + ", ".join(phrases[:-1]) + " and " + phrases[-1]


_SINGULAR = {v: k for k, v in PLURALS.items()}
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def _parse_phrase(words: list[str], text: str) -> dict[str, Any]:
    if len(words) not in (3, 4) or words[0] not in _COUNTS:
        raise ShapesSpecError(f"cannot parse object phrase {' '.join(words)!r} in caption {text!r}")
    count = _COUNTS[words[0]]
    size = words[1] if len(words) == 4 else None
    color, noun = words[-2], words[-1]
    shape = noun if noun in SHAPES else _SINGULAR.get(noun)
    if shape is None or color not in PALETTE or (size is not None and size not in SIZES):
        raise ShapesSpecError(f"cannot parse object phrase {' '.join(words)!r} in caption {text!r}")
    o: dict[str, Any] = {"shape": shape, "color": color, "count": count}
    if size is not None:
        o["size"] = size
    return o


def parse_caption(text: str) -> dict[str, Any]:
    """Parse a caption of this world's closed grammar back into a spec (raises ShapesSpecError otherwise)."""
    t = " ".join(text.lower().strip().rstrip(".!;").replace(",", " , ").split())  # "a red circle." too
    for p in ("a photo of ", *PREFIXES[1:]):
        if t.startswith(p):
            t = t[len(p):]
            break
    rel_type, rel_pos = None, None
    words = t.split(" ")
    rel_patterns = [("to the left of", "left_of"), ("to the right of", "right_of"), ("left of", "left_of"),
                    ("right of", "right_of"), ("above", "above"), ("below", "below")]
    for pat, name in rel_patterns:
        pw = pat.split(" ")
        for j in range(len(words) - len(pw) + 1):
            if words[j:j + len(pw)] == pw:
                rel_type, rel_pos = name, (j, j + len(pw))
                break
        if rel_type:
            break
    # split the word list into phrases at ',', 'and' and the relation
    phrases: list[list[str]] = [[]]
    rel_after = None
    j = 0
    while j < len(words):
        if rel_pos and j == rel_pos[0]:
            rel_after = len(phrases) - 1
            phrases.append([])
            j = rel_pos[1]
            continue
        w = words[j]
        if w in (",", "and"):
            if phrases[-1]:
                phrases.append([])
        else:
            phrases[-1].append(w)
        j += 1
    phrases = [p for p in phrases if p]
    objs = [_parse_phrase(p, text) for p in phrases]
    rel = None
    if rel_type is not None:
        if rel_after is None or rel_after + 1 >= len(objs):
            raise ShapesSpecError(f"cannot parse the relation in caption {text!r}")
        rel = {"type": rel_type, "a": rel_after, "b": rel_after + 1}
    return normalize_spec({"objects": objs, "relation": rel})


# ------------------------------------------------------------------------------------------------- world

class ShapesWorld:
    """A seeded, stateless generator of captioned scenes.

    ``world.scene(i)`` is a pure function of ``(seed, i, size, holdout)``. ``holdout=True`` (default, the
    training setting) never draws the colour-shape pairs in ``HOLDOUT_PAIRS``.
    """

    def __init__(self, seed: int = 0, size: int = 64, holdout: bool = True,
                 holdout_pairs: Sequence[tuple[str, str]] = HOLDOUT_PAIRS):
        if size < 32:
            raise ShapesSpecError(f"size must be at least 32 pixels, got {size}")
        self.seed = int(seed)
        self.size = int(size)
        self.holdout = bool(holdout)
        self.holdout_pairs = tuple((c, s) for c, s in holdout_pairs)
        self.scale = self.size / REF
        self._allowed = [(c, s) for c in COLORS for s in SHAPES
                         if not (self.holdout and (c, s) in self.holdout_pairs)]

    def __repr__(self) -> str:
        return f"ShapesWorld(seed={self.seed}, size={self.size}, holdout={self.holdout})"

    # -- public API -------------------------------------------------------------------------------------
    def scene(self, i: int) -> Scene:
        """The i-th scene of this world."""
        rng = np.random.default_rng([self.seed, int(i), 0x5A4E])
        for _ in range(100):
            spec, prefix, sizes = self._sample_spec(rng)
            placed = self._place(spec, sizes, rng)
            if placed is not None:
                return self._compose(spec, placed, prefix, index=int(i))
        raise RuntimeError(f"could not place scene {i}")  # pragma: no cover - placement always succeeds

    def render(self, spec: Any, seed: int = 0, prefix: str = "") -> Scene:
        """A scene drawn from a spec (dict, Prompt or caption string), ignoring the holdout: the image
        shows exactly the spec's objects, sizes drawn at random where the spec names none."""
        spec = normalize_spec(spec)
        rng = np.random.default_rng([int(seed), 0x0E7D, self.seed])
        for _ in range(200):
            sizes = [[o.get("size") or SIZES[int(rng.integers(2))] for _ in range(o["count"])]
                     for o in spec["objects"]]
            placed = self._place(spec, sizes, rng)
            if placed is not None:
                return self._compose(spec, placed, prefix)
        raise ShapesSpecError(
            f"cannot place the objects of {caption_from_spec(spec)!r} in a {self.size}px image")

    def batch(self, start: int, n: int):
        """Scenes start..start+n-1 as (float32 tensor (n, 3, H, W) in [-1, 1], list of captions)."""
        import torch

        scenes = [self.scene(start + j) for j in range(n)]
        imgs = np.stack([s.image for s in scenes]).astype(np.float32)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
        return x, [s.caption for s in scenes]

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[Scene]:
        """Scenes start, start+1, ... (forever when ``stop`` is None)."""
        i = start
        while stop is None or i < stop:
            yield self.scene(i)
            i += 1

    def __getitem__(self, i: int) -> Scene:
        return self.scene(i)

    # -- sampling -------------------------------------------------------------------------------------
    def _pair(self, rng: np.random.Generator, exclude: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
        pool = [p for p in self._allowed if p not in exclude]
        c, s = pool[int(rng.integers(len(pool)))]
        return c, s

    def _sample_spec(self, rng: np.random.Generator):
        """Draw what the scene shows and how its caption reads: (spec, prefix, sizes per group)."""
        n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
        groups: list[tuple[tuple[str, str], int]] = []
        if n == 1:
            groups = [(self._pair(rng), 1)]
        elif n == 2:
            if rng.random() < 0.3:
                groups = [(self._pair(rng), 2)]
            else:
                p = self._pair(rng)
                groups = [(p, 1), (self._pair(rng, exclude=[p]), 1)]
        else:
            u = rng.random()
            if u < 0.25:
                groups = [(self._pair(rng), 3)]
            elif u < 0.55:
                p = self._pair(rng)
                groups = [(p, 2), (self._pair(rng, exclude=[p]), 1)]
            else:
                p = self._pair(rng)
                q = self._pair(rng, exclude=[p])
                groups = [(p, 1), (q, 1), (self._pair(rng, exclude=[p, q]), 1)]
        sizes = [[SIZES[int(rng.integers(2))] for _ in range(k)] for _, k in groups]
        objs = []
        for ((c, s), k), sz in zip(groups, sizes, strict=True):
            o: dict[str, Any] = {"shape": s, "color": c, "count": k}
            if len(set(sz)) == 1 and rng.random() < 0.35:   # name the size sometimes, when it is shared
                o["size"] = sz[0]
            objs.append(o)
        relation = None
        if len(objs) == 2 and all(o["count"] == 1 for o in objs) and rng.random() < 0.6:
            relation = {"type": RELATIONS[int(rng.integers(4))], "a": 0, "b": 1}
        prefix = PREFIXES[int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
        return {"objects": objs, "relation": relation}, prefix, sizes

    def _place(self, spec, sizes, rng: np.random.Generator):
        """Positions for every object (non-overlapping, inside the border, relation satisfied), or None."""
        items = [(g, sz) for g, szs in enumerate(sizes) for sz in szs]
        order = rng.permutation(len(items))   # place in random order so no object is favoured
        border, margin = BORDER_PX * self.scale, MARGIN_PX * self.scale
        rel = spec.get("relation")
        for _ in range(50):
            boxes: list[tuple[float, float, float, float] | None] = [None] * len(items)
            ok = True
            for j in order:
                side = SIZE_PX[items[j][1]] * self.scale
                lo, hi = border + side / 2, self.size - border - side / 2
                for _ in range(50):
                    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
                    box = _box_of(cx, cy, side)
                    if all(b is None or _separated(box, b, margin) for b in boxes):
                        boxes[j] = box
                        break
                else:
                    ok = False
                    break
            if not ok:
                continue
            if rel is not None:
                ia = next(j for j, it in enumerate(items) if it[0] == rel["a"])
                ib = next(j for j, it in enumerate(items) if it[0] == rel["b"])
                if not _relation_holds_strongly(boxes[ia], boxes[ib], rel["type"], self.scale):
                    continue
            return [(items[j][0], items[j][1], boxes[j]) for j in range(len(items))]
        return None

    def _compose(self, spec, placed, prefix: str, index: int = -1) -> Scene:
        H = self.size
        img = np.empty((H, H, 3), dtype=np.float32)
        img[:] = BACKGROUND
        bg = np.asarray(BACKGROUND, dtype=np.float32)
        objects = []
        for g, sz, box in placed:
            o = spec["objects"][g]
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            cov = _coverage(o["shape"], cx, cy, box[2] - box[0], H)
            col = np.asarray(PALETTE[o["color"]], dtype=np.float32)
            img += cov[..., None] * (col - bg)
            mask = cov >= 0.5
            ys, xs = np.nonzero(mask)
            tight = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            objects.append(ObjectSpec(o["shape"], o["color"], sz, tight, mask, (float(cx), float(cy))))
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return Scene(image=image, caption=caption_from_spec(spec, prefix), objects=objects,
                     spec=normalize_spec(spec), index=index)
