"""ShapesEval: a GenEval-style compositional evaluator for the shapes world (``velodiff.data.shapes``).

GenEval (Ghosh et al., 2023) scores a text-to-image model by detecting the objects in each generated
image and checking the prompt against them: every named object present, its colour, the count, the
relative position. Here the world is synthetic, so the detector is classical image analysis tuned to the
world's closed vocabulary and robust to the blur and noise of generated images:

1. **pixels -> colour classes.** A pixel's candidate colour is *white* when its saturation is low,
   otherwise the palette colour nearest in hue (blending with the dark background keeps the hue, so
   antialiased and blurred edges keep their class). It is foreground when its value (brightest channel)
   is at least 45% of the way from the background to that colour's value. Pixels of intermediate
   saturation or far from every palette hue are left unassigned.
2. **colour masks -> objects.** Per colour: pixels whose 3x3 neighbourhood is mostly of other classes
   are dropped unless they touch a pixel that passes (removes speckle and noise texture, keeps corners
   and tips); fragments up to 2 px apart are grouped into one object (the world keeps objects >= 4 px
   apart); each group is closed (3x3) and hole-filled. Dropped: groups below a minimum area, groups
   whose surrounding ring (2-3 px out) is not mostly background (an object stands on the plain
   background; blobs in a noise field do not) or that cover half the image, and small groups glued to
   a much larger object of another colour (colour fringes).
3. **object -> shape.** From the object's mask: extent (area / box area), solidity (area / convex hull
   area), corner fill (the four quarter-side corner cells of the box), vertical centroid offset in the
   box, aspect; nearest of four shape prototypes, which are these features measured by this same
   pipeline on the world's own renders, clean and blurred + noised (a nearest-centroid classifier fitted
   to the generator's ground truth); too far from all four -> "unknown". Size: longest box side against
   the midpoint of the two sizes.

The detector assumes the world's plain dark background. Images are 64x64 by default; every length scales
with the image size.

Each prompt is then judged like GenEval: a named single object needs at least one matching detection
(shape *and* colour *and* size when named), a counted group exactly ``count`` matching detections, a
relation GenEval's centre-offset rule (``relation_components`` > 0.5) for some pair of matching
detections. ``strict=True`` also fails extra objects and counts every group exactly. Scores are the
fraction of correct prompts per category, and overall the mean over categories (as GenEval).

Prompt sets are fixed JSON files under ``velodiff/assets/prompts`` (``load_prompts``): ``v1``, 25 prompts
each of single / binding / counting / position, none using the held-out pair; ``v1-holdout``, 9 each, every
prompt using the held-out pair (purple triangle), a compositional-generalization measure.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from ..data.shapes import (
    BACKGROUND,
    COLORS,
    HOLDOUT_PAIRS,
    PALETTE,
    PREFIXES,
    RELATIONS,
    SHAPES,
    SIZE_PX,
    SIZES,
    ShapesSpecError,
    ShapesWorld,
    caption_from_spec,
    category_of,
    color_shape_pairs,
    normalize_spec,
    relation_components,
)
from ..errors import unknown_name

__all__ = [
    "CATEGORIES", "PROMPT_SETS", "Detection", "Prompt", "build_prompt_set", "calibration",
    "degrade", "detect", "evaluate", "load_prompts", "prompt_set_json", "score_prompt",
    "shape_features", "smooth_noise_image",
]

CATEGORIES: tuple[str, ...] = ("single", "binding", "counting", "position")
PROMPT_SETS: tuple[str, ...] = ("v1", "v1-holdout")
PROMPT_SET_VERSION = 1

# detector settings, in pixels at 64x64 (scaled by image size)
FG_LEVEL = 0.45          # foreground: value above bg + FG_LEVEL * (candidate colour's value - bg)
WHITE_MAX_SAT = 0.22     # saturation below this: white (when bright enough)
COLOR_MIN_SAT = 0.32     # saturation above this: a hue colour; in between: unassigned
HUE_TOLERANCE = 40.0     # degrees from the nearest palette hue
MIN_AREA = 30            # smallest object kept (a small triangle covers ~120 px)
FRINGE_RATIO = 0.35      # a component touching a >= 1/FRINGE_RATIO larger one of another colour is a fringe
RING_MIN_BACKGROUND = 0.4  # an object's 2-3 px surrounding ring must be at least this much background
MAX_AREA_FRACTION = 0.5  # larger than this fraction of the image: not an object (a background)
SHAPE_MAX_DIST = 0.40    # beyond this feature distance from every prototype: "unknown"
RELATION_MIN = 0.5       # GenEval's threshold on relation_components


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    spec: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Detection:
    shape: str                       # one of SHAPES, or "unknown"
    color: str
    size: str
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 (end-exclusive)
    area: int
    features: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = None

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


# ------------------------------------------------------------------------------------------ detection

def _hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = img.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    v = mx
    chroma = mx - mn
    s = np.where(mx > 1e-6, chroma / np.maximum(mx, 1e-6), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    c = np.maximum(chroma, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6.0, np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return (h * 60.0) % 360.0, s, v


_HUES = {c: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360.0
         for c, rgb in PALETTE.items() if c != "white"}
_HUE_NAMES = list(_HUES)
_HUE_VALUES = np.array([_HUES[c] for c in _HUE_NAMES], dtype=np.float32)


_LEVELS = np.array([max(PALETTE[c]) for c in COLORS], dtype=np.float32) / 255.0   # each colour's V


def _classify(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colour class per pixel, foreground mask). A pixel is foreground when its value (brightest
    channel) is FG_LEVEL of the way from the background to the value of its candidate colour, so each
    colour's objects keep their half-covered edge pixels whatever the colour's own brightness."""
    h, s, v = _hsv(image)
    bg = max(BACKGROUND) / 255.0
    d = np.abs(h[..., None] - _HUE_VALUES)
    d = np.minimum(d, 360.0 - d)
    hue_idx = np.array([COLORS.index(c) for c in _HUE_NAMES], dtype=np.int16)[d.argmin(-1)]
    white = COLORS.index("white")
    cand = np.where(s < WHITE_MAX_SAT, white, hue_idx)
    fg = v >= bg + FG_LEVEL * (_LEVELS[cand] - bg)
    out = np.full(image.shape[:2], -1, dtype=np.int16)
    ok = fg & ((s < WHITE_MAX_SAT) | ((s >= COLOR_MIN_SAT) & (d.min(-1) <= HUE_TOLERANCE)))
    out[ok] = cand[ok]
    return out, fg


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (corners of its boundary pixels)."""
    edge = mask & ~ndimage.binary_erosion(mask)
    ys, xs = np.nonzero(edge)
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return float(ConvexHull(pts).volume)
    except (QhullError, ValueError):
        return float(mask.sum())


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """extent (area / box area), solidity (area / convex hull area), corners (mean fill of the four
    quarter-side corner cells of the box: ~0.9 square, ~0.3 circle, ~0.4 triangle, 0 cross), centroid
    offset (downwards, in box heights) and aspect (width / height) of a component mask."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    area = float(len(xs))
    box = mask[y0:y1, x0:x1]
    padded = np.pad(box, 1)
    cw, ch = max(1, int(round(0.25 * w))), max(1, int(round(0.25 * h)))
    cells = (box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:])
    corners = np.mean([c.mean() for c in cells])
    return {
        "corners": float(corners),
        "extent": area / float(w * h),
        "solidity": area / _hull_area(padded),
        "ycent": float((ys.mean() + 0.5 - (y0 + y1) / 2) / h),
        "aspect": float(w / h),
    }


_FEATURE_WEIGHTS = {"extent": 1.0, "solidity": 1.5, "corners": 1.0, "ycent": 2.0, "aspect": 0.5}


@lru_cache(maxsize=1)
def _prototypes() -> dict[str, dict[str, float]]:
    """Mean features of each shape, measured by this detector's own pipeline on the world's renders (both
    sizes, sub-pixel positions, clean and blurred + noised): a nearest-centroid classifier fitted to the
    generator's ground truth."""
    world = ShapesWorld(seed=0, size=64, holdout=False)
    rng = np.random.default_rng(0)
    feats: dict[str, list[dict[str, float]]] = {s: [] for s in SHAPES}
    for shape in SHAPES:
        for size in SIZES:
            for k in range(8):
                spec = {"objects": [{"shape": shape, "color": "red", "size": size}]}
                img = world.render(spec, seed=k).image
                if k % 2:
                    img = degrade(img, rng)
                comps = _components(img)
                if len(comps) == 1:
                    feats[shape].append(shape_features(comps[0][1]))
    return {s: {f: float(np.mean([d[f] for d in v])) for f in _FEATURE_WEIGHTS} for s, v in feats.items()}


def classify_shape(features: dict[str, float]) -> tuple[str, float]:
    """(nearest prototype shape or "unknown", its weighted feature distance)."""
    best, best_d = "unknown", math.inf
    for shape, proto in _prototypes().items():
        d = math.sqrt(sum(w * (features[f] - proto[f]) ** 2 for f, w in _FEATURE_WEIGHTS.items()))
        if d < best_d:
            best, best_d = shape, d
    return (best if best_d <= SHAPE_MAX_DIST else "unknown"), best_d


def _to_uint8_images(images: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> list[np.ndarray]:
    """Accept a list of uint8 HxWx3 arrays (or PIL images), or a float tensor/array (N, 3, H, W) with
    values in ``value_range`` ([-1, 1] as ``ShapesWorld.batch`` makes them; a pipeline's
    ``output="tensor"`` is in [0, 1]), or a uint8 (N, H, W, 3) array."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ShapesSpecError(f"value_range must be (low, high) with low < high, got {value_range}")
    if hasattr(images, "detach"):   # torch tensor
        images = images.detach().cpu().float().numpy() if images.is_floating_point() else images.cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ShapesSpecError(
                f"expected images of shape (N, 3, H, W) or (N, H, W, 3), got {images.shape}")
        if images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)
        images = list(images)
    out = []
    for im in images:
        a = np.asarray(im)
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
            a = a.transpose(1, 2, 0)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ShapesSpecError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(np.rint((a.astype(np.float32) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        out.append(a)
    return out


def _components(image: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(colour index, mask) per object-like component of a uint8 RGB image."""
    H, W = image.shape[:2]
    scale = min(H, W) / 64.0
    min_area = max(4, int(round(MIN_AREA * scale * scale)))
    box3 = np.ones((3, 3), bool)
    classes, fg = _classify(image)
    comps: list[tuple[int, np.ndarray]] = []
    for ci in range(len(COLORS)):
        m = classes == ci
        if m.sum() < min_area:
            continue
        # keep pixels whose 3x3 neighbourhood is mostly of their class, plus their direct neighbours of
        # the class (restores corners and tips): drops speckle and noise textures, keeps flat regions
        core = m & (ndimage.uniform_filter(m.astype(np.float32), size=3, mode="constant") * 9 >= 4.5)
        m = m & ndimage.binary_dilation(core, structure=box3)
        # fragments up to 2 px apart belong to one object
        groups, n = ndimage.label(ndimage.binary_dilation(m, structure=box3), structure=box3)
        if n == 0:
            continue
        areas = ndimage.sum_labels(m, groups, index=np.arange(1, n + 1))
        slices = ndimage.find_objects(groups)
        for j in np.nonzero(areas >= min_area)[0]:
            # work in the group's box plus a 4 px frame (the ring below reaches 3 px out)
            ys, xs = slices[j]
            y0, y1 = max(ys.start - 4, 0), min(ys.stop + 4, H)
            x0, x1 = max(xs.start - 4, 0), min(xs.stop + 4, W)
            part = m[y0:y1, x0:x1] & (groups[y0:y1, x0:x1] == j + 1)
            part = ndimage.binary_closing(part, structure=box3, border_value=0) | part
            part = ndimage.binary_fill_holes(part)
            # an object stands on the background: most of a thin ring around it is background
            ring = ndimage.binary_dilation(part, structure=box3, iterations=3) & \
                ~ndimage.binary_dilation(part, structure=box3)
            on_background = ring.any() and (~fg[y0:y1, x0:x1][ring]).mean() >= RING_MIN_BACKGROUND
            if not on_background or part.sum() > MAX_AREA_FRACTION * H * W:
                continue
            full = np.zeros((H, W), bool)
            full[y0:y1, x0:x1] = part
            comps.append((ci, full))
    # colour fringes: a component touching a much larger component of another colour is part of it
    areas_ = [int(m.sum()) for _, m in comps]
    keep = []
    for a, (ca, ma) in enumerate(comps):
        bigger = [mb for b, (cb, mb) in enumerate(comps)
                  if cb != ca and areas_[a] < FRINGE_RATIO * areas_[b]]
        fringe = False
        if bigger:
            grown = ndimage.binary_dilation(ma, structure=box3, iterations=2)
            fringe = any((grown & mb).any() for mb in bigger)
        keep.append(not fringe)
    return [c for c, k in zip(comps, keep, strict=True) if k]


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 0.8, noise: float = 8.0) -> np.ndarray:
    """Gaussian blur (sigma in px at 64x64) plus Gaussian pixel noise: a stand-in for a generated image."""
    scale = image.shape[0] / 64.0
    x = ndimage.gaussian_filter(image.astype(np.float32), sigma=(blur * scale, blur * scale, 0))
    x = x + rng.normal(0.0, noise, size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def smooth_noise_image(size: int, rng: np.random.Generator, sigma: float = 3.0) -> np.ndarray:
    """A smooth random colour field (Gaussian noise blurred by ``sigma`` px at 64x64, contrast restored):
    noise with blobs of flat-ish colour, harder for a detector than pixel noise."""
    sig = sigma * size / 64.0
    x = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size, size, 3)), sigma=(sig, sig, 0))
    x = x / (x.std() + 1e-12) * 0.5
    return np.clip(np.rint((np.clip(x, -1, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def detect(image: np.ndarray, keep_masks: bool = False) -> list[Detection]:
    """Find the objects in one uint8 RGB image (HxWx3)."""
    (image,) = _to_uint8_images([image])
    scale = min(image.shape[:2]) / 64.0
    size_cut = (SIZE_PX["small"] + SIZE_PX["large"]) / 2 * scale
    dets = []
    for ci, m in _components(image):
        ys, xs = np.nonzero(m)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        feats = shape_features(m)
        shape, dist = classify_shape(feats)
        feats["shape_distance"] = dist
        side = max(box[2] - box[0], box[3] - box[1])
        dets.append(Detection(shape=shape, color=COLORS[ci], size="large" if side >= size_cut else "small",
                              box=box, area=int(m.sum()), features=feats, mask=m if keep_masks else None))
    dets.sort(key=lambda d: (d.box[1], d.box[0]))
    return dets


# ------------------------------------------------------------------------------------------- scoring

def _matches(dets: Sequence[Detection], group: dict[str, Any]) -> list[Detection]:
    return [d for d in dets if d.shape == group["shape"] and d.color == group["color"]
            and ("size" not in group or d.size == group["size"])]


def score_prompt(detections: Sequence[Detection], spec: Any, strict: bool = False) -> dict[str, Any]:
    """Judge one image's detections against a spec. Returns correct (bool) and the individual checks."""
    spec = normalize_spec(spec)
    groups, rel = spec["objects"], spec["relation"]
    found = [_matches(detections, g) for g in groups]
    counts_ok = []
    for g, f in zip(groups, found, strict=True):
        need = g["count"]
        counts_ok.append(len(f) == need if (need > 1 or strict) else len(f) >= 1)
    rel_ok = None
    if rel is not None:
        rel_ok = any(relation_components(a.box, b.box)[rel["type"]] > RELATION_MIN
                     for a in found[rel["a"]] for b in found[rel["b"]])
    extra_ok = True
    if strict:
        named = {id(d) for f in found for d in f}
        extra_ok = all(id(d) in named for d in detections)
    correct = all(counts_ok) and rel_ok is not False and extra_ok
    return {
        "correct": bool(correct),
        "present": [len(f) >= 1 for f in found],
        "found": [len(f) for f in found],
        "counts_ok": counts_ok,
        "relation_ok": rel_ok,
        "extra_ok": extra_ok,
    }


def _as_prompt(p: Any) -> Prompt:
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        spec = normalize_spec(p)
        return Prompt(text=p, category=category_of(spec), spec=spec)
    spec = normalize_spec(p)
    return Prompt(text=getattr(p, "caption", None) or caption_from_spec(spec), category=category_of(spec),
                  spec=spec)


def evaluate(images: Any, prompts: Sequence[Any], strict: bool = False,
             keep_detections: bool = True, value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, Any]:
    """Score images against prompts (Prompt objects, spec dicts or captions of the world's grammar).

    ``images``: PIL images or uint8 arrays, or float tensors / arrays with values in ``value_range``:
    [-1, 1] by default (the shapes world's renders); pass ``value_range=(0, 1)`` for a pipeline's
    ``output="tensor"`` images.

    ``images`` holds ``k * len(prompts)`` images, prompt-major (images ``j*k .. j*k+k-1`` belong to prompt
    ``j``; k = 1 for one image per prompt). Returns ``overall`` (mean of the per-category accuracies),
    ``by_category`` ({category: accuracy}), ``counts`` ({category: number of scored images}) and
    ``per_prompt`` (one record per image: text, category, correct, checks, detections).
    """
    prompts = [_as_prompt(p) for p in prompts]
    imgs = _to_uint8_images(images, value_range)
    if not prompts:
        raise ShapesSpecError("no prompts to evaluate")
    if len(imgs) % len(prompts) != 0 or not imgs:
        raise ShapesSpecError(f"got {len(imgs)} images for {len(prompts)} prompts; "
                         "pass the same number of images per prompt, prompt-major")
    k = len(imgs) // len(prompts)
    per_prompt = []
    hits: dict[str, list[bool]] = {}
    for j, img in enumerate(imgs):
        p = prompts[j // k]
        dets = detect(img)
        res = score_prompt(dets, p.spec, strict=strict)
        rec = {"index": j, "prompt_index": j // k, "text": p.text, "category": p.category, **res}
        if keep_detections:
            rec["detections"] = [{"shape": d.shape, "color": d.color, "size": d.size, "box": list(d.box),
                                  "area": d.area} for d in dets]
        per_prompt.append(rec)
        hits.setdefault(p.category, []).append(res["correct"])
    by_category = {c: float(np.mean(v)) for c, v in hits.items()}
    ordered = {c: by_category[c] for c in (*CATEGORIES, *sorted(set(by_category) - set(CATEGORIES)))
               if c in by_category}
    return {
        "overall": float(np.mean(list(ordered.values()))),
        "by_category": ordered,
        "counts": {c: len(hits[c]) for c in ordered},
        "strict": strict,
        "per_prompt": per_prompt,
    }


def correct_by_category(result: dict[str, Any]) -> dict[str, str]:
    """An :func:`evaluate` result's per-image verdicts, compactly: {category: "1011..." in image order}."""
    out: dict[str, str] = {}
    for rec in result["per_prompt"]:
        out[rec["category"]] = out.get(rec["category"], "") + ("1" if rec["correct"] else "0")
    return out


def paired_standard_error(a: dict[str, str], b: dict[str, str]) -> float:
    """Standard error of ``overall(a) - overall(b)`` for two runs scored on the same prompts and seeds
    (:func:`correct_by_category` of each): overall is the mean of the C categories' accuracies, so its
    difference has variance sum_c var(a_i - b_i) / n_c / C^2 over each category's n_c paired images."""
    if a.keys() != b.keys() or any(len(a[c]) != len(b[c]) for c in a):
        raise ShapesSpecError("paired standard error: the two runs were not scored on the same images")
    var = 0.0
    for c in a:
        d = np.array([int(x) - int(y) for x, y in zip(a[c], b[c], strict=True)], dtype=float)
        if len(d) > 1:
            var += d.var(ddof=1) / len(d)
    return float(math.sqrt(var) / max(1, len(a)))


# ------------------------------------------------------------------------------------------ prompt sets

def _prompt_path(name: str) -> Path:
    from ..shipped import asset_path

    return asset_path("prompts") / f"shapes_{name}.json"


def load_prompts(name: str = "v1") -> list[Prompt]:
    """A fixed, versioned prompt set: "v1" (100 prompts, 25 per category) or "v1-holdout" (36, 9 per
    category, all using the held-out colour-shape pair)."""
    if name not in PROMPT_SETS:
        raise ShapesSpecError(str(unknown_name("prompt set", name, PROMPT_SETS)))
    data = json.loads(_prompt_path(name).read_text())
    return [Prompt(text=p["text"], category=p["category"], spec=normalize_spec(p["spec"]))
            for p in data["prompts"]]


def build_prompt_set(name: str) -> dict[str, Any]:
    """Deterministically build a prompt set (the JSON files under assets/prompts were written by this;
    a test checks they still agree)."""
    rng = np.random.default_rng({"v1": 1001, "v1-holdout": 1002}[name])
    prompts: list[dict[str, Any]] = []

    def add(category: str, spec: dict[str, Any], prefix: str = "") -> None:
        spec = normalize_spec(spec)
        assert category_of(spec) == category
        prompts.append({"text": caption_from_spec(spec, prefix), "category": category, "spec": spec})

    def obj(pair, **kw):
        return {"shape": pair[1], "color": pair[0], "count": 1, **kw}

    if name == "v1":
        n = 25
        pairs = color_shape_pairs(exclude_holdout=True)
        # single: 25 of the 27 allowed pairs
        for j in rng.permutation(len(pairs))[:n]:
            add("single", {"objects": [obj(pairs[j])]})
        # binding: two objects differing in both colour and shape
        combos = [(a, b) for a in pairs for b in pairs if a[0] != b[0] and a[1] != b[1]]
        for j in rng.permutation(len(combos))[:n]:
            a, b = combos[j]
            add("binding", {"objects": [obj(a), obj(b)]})
        # counting: 2 or 3 of one pair (13 twos, 12 threes)
        order = rng.permutation(len(pairs))
        for k, j in enumerate(order[:n] if n <= len(pairs) else order):
            add("counting", {"objects": [obj(pairs[j], count=2 if k % 2 == 0 else 3)]})
        # position: the four relations in turn, objects differing in colour and shape
        for k, j in enumerate(rng.permutation(len(combos))[:n]):
            a, b = combos[j]
            add("position", {"objects": [obj(a), obj(b)],
                             "relation": {"type": RELATIONS[k % 4], "a": 0, "b": 1}})
    elif name == "v1-holdout":
        (hc, hs), = HOLDOUT_PAIRS
        held = (hc, hs)
        others = [p for p in color_shape_pairs(exclude_holdout=True) if p[0] != hc and p[1] != hs]
        variants = [(size, prefix) for size in (None, "small", "large") for prefix in PREFIXES]
        for size, prefix in variants:
            add("single", {"objects": [obj(held, **({"size": size} if size else {}))]}, prefix)
        for k, j in enumerate(rng.permutation(len(others))[:9]):
            objs = [obj(held), obj(others[j])]
            add("binding", {"objects": objs if k % 2 == 0 else objs[::-1]})
        for k in range(9):
            size = (None, "small", "large")[k % 3]
            extra = {"size": size} if size else {}
            add("counting", {"objects": [obj(held, count=2 + (k // 3) % 2, **extra)]}, PREFIXES[k // 3])
        for k, j in enumerate(rng.permutation(len(others))[:9]):
            objs = [obj(held), obj(others[j])]
            add("position", {"objects": objs if k % 2 == 0 else objs[::-1],
                             "relation": {"type": RELATIONS[k % 4], "a": 0, "b": 1}})
    else:
        raise ShapesSpecError(str(unknown_name("prompt set", name, PROMPT_SETS)))
    return {
        "name": name,
        "version": PROMPT_SET_VERSION,
        "world": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
                  "holdout_pairs": [list(p) for p in HOLDOUT_PAIRS]},
        "counts": {c: sum(p["category"] == c for p in prompts) for c in CATEGORIES},
        "prompts": prompts,
    }


def prompt_set_json(name: str) -> str:
    """The JSON text of a prompt set as stored under assets/prompts (one prompt per line)."""
    d = build_prompt_set(name)
    head = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items() if k != "prompts"]
    n = len(d["prompts"])
    body = [f"  {json.dumps(p)}" + ("," if i < n - 1 else "") for i, p in enumerate(d["prompts"])]
    return "\n".join(["{", *head, ' "prompts": [', *body, " ]", "}"]) + "\n"


# ---------------------------------------------------------------------------------------- calibration

def _perturb(spec: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A caption that is wrong about one thing the image shows: a colour, a shape, a count or a relation."""
    spec = json.loads(json.dumps(normalize_spec(spec)))
    objs, rel = spec["objects"], spec["relation"]
    if rel is not None and rng.random() < 0.5:
        flip = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
        rel["type"] = flip[rel["type"]]
        return spec
    g = objs[int(rng.integers(len(objs)))]
    what = ["color", "shape"] + (["count"] if len(objs) == 1 and g["count"] > 1 else [])
    w = what[int(rng.integers(len(what)))]
    taken = {(o["color"], o["shape"]) for o in objs}
    if w == "count":
        g["count"] = 5 - g["count"]   # 2 <-> 3
    else:
        pool = [v for v in (COLORS if w == "color" else SHAPES) if v != g[w]
                and ((v, g["shape"]) if w == "color" else (g["color"], v)) not in taken]
        g[w] = pool[int(rng.integers(len(pool)))]
    return spec


def calibration(prompt_set: str = "v1", images_per_prompt: int = 4, seed: int = 0) -> dict[str, Any]:
    """The evaluator scored on inputs with known answers: the world's own renders of the prompt set
    (should be ~1), the same renders blurred and noised like a generated image (should stay high),
    pure noise, pixel-wise and smooth colour fields (should be ~0), the renders judged against another
    prompt of the same category that names other objects (mismatched captions, should be ~0) and
    against a one-attribute perturbation of their own prompt (colour / shape / count / relation changed;
    should be 0). Also ``own_strict``: the renders under ``strict=True``."""
    prompts = load_prompts(prompt_set)
    world = ShapesWorld(seed=seed, holdout=False)
    k = images_per_prompt
    own = [world.render(p.spec, seed=seed * 1000 + j).image for p in prompts for j in range(k)]
    rng = np.random.default_rng(seed)
    degraded = [degrade(im, rng) for im in own]
    noise = [rng.integers(0, 256, size=own[0].shape, dtype=np.uint8) for _ in own]
    smooth_noise = [smooth_noise_image(own[0].shape[0], rng) for _ in own]
    # mismatched: each prompt's images judged against the next prompt of the same category that names
    # different objects (categories where every prompt names the same objects are left out)
    def content(p: Prompt):
        return tuple(sorted((o["color"], o["shape"], o["count"]) for o in p.spec["objects"]))

    mismatched_pairs = []
    for j, p in enumerate(prompts):
        same = [q for q in prompts[j + 1:] + prompts[:j]
                if q.category == p.category and content(q) != content(p)]
        if same:
            mismatched_pairs.append((j, same[0]))
    mism_imgs = [own[j * k + i] for j, _ in mismatched_pairs for i in range(k)]
    mismatched = [q for _, q in mismatched_pairs]
    perturbed = [Prompt(text=caption_from_spec(s := _perturb(p.spec, rng)), category=p.category, spec=s)
                 for p in prompts]
    out = {}
    cases = (("own", own, prompts), ("own_blur_noise", degraded, prompts), ("noise", noise, prompts),
             ("smooth_noise", smooth_noise, prompts), ("mismatched", mism_imgs, mismatched),
             ("perturbed", own, perturbed))
    for key, ims, ps in cases:
        r = evaluate(ims, ps, keep_detections=False)
        out[key] = {"overall": r["overall"], "by_category": r["by_category"]}
    out["own_strict"] = {k2: evaluate(own, prompts, strict=True, keep_detections=False)[k2]
                         for k2 in ("overall", "by_category")}
    return out
