"""Training-free layout guidance from cross-attention (Chen et al. 2024, 'Training-Free Layout Control with
Cross-Attention Guidance', backward guidance, Sec. 3.3): after each of the first ``steps`` share of the
steps, the sample is moved down the gradient of an energy that is small when each object's words attend
inside the object's box:

    E(x_t) = sum_objects (1 - sum_{u in box} A_u / sum_u A_u)^2         (Chen et al., Eq. 3)
    x_t <- x_t - scale * sigma_t * grad E / rms(grad E)                  (Eq. 4, with a normalized step)

A_u is the conditional pass's cross-attention (heads averaged, every plain cross-attention layer) to the
object's colour and shape tokens at position u. The paper scales the gradient by eta sigma_t^2; the
normalized step here makes ``scale`` a fraction of the noise level, the same for every model and prompt.

Regions come from explicit boxes (``boxes``: words -> (x0, y0, x1, y1) in [0, 1], y down, a list of
boxes whose union is the region: one per object of a counted group, or a mask: a 2-D array, the cells
at least half covered by its values >= 0.5) or from the
prompt's spatial words: "A above B", "A below B", "A to the left of B", "A to the right of B" give A and
B the two halves of the image. A prompt with no such relation is sampled unguided, unless one of the
A-STAR terms is on.

A-STAR's terms (Agarwal et al. 2023, 'A-STAR: Test-time Attention Segregation and Retention for
Text-to-image Synthesis', Sec. 3), added to the energy with the weights ``segregation`` and
``retention`` (0: off), on each object's map normalized to its maximum, a_m = A_m / max A_m:

    L_seg = sum_{m < n} sum_u min(a_m, a_n) / sum_u (a_m + a_n)                 (A-STAR, Eq. 2)
    L_ret = sum_m (1 - sum_u min(a_m, B_m) / sum_u (a_m + B_m - a_m B_m))      (A-STAR, Eq. 3)

B_m is object m's map at the previous guided step binarized at half its maximum, so a concept the
model attended to early keeps its region. The objects are the layout's, or, for a prompt without boxes
or a relation, its phrases between "and" and commas ("a red cross and a white triangle"); A-STAR's
Gaussian smoothing of the maps is left out (the maps here are 8x8 to 16x16).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..accel.attention import CaptureCrossAttention, ProcessorSwap, RowState, attention_modules
from ..errors import VelodiffError
from ..plan import Accelerator, Cost, Option, RunInfo, register_rule

if TYPE_CHECKING:
    from torch import Tensor

Box = tuple[float, float, float, float]
#: words -> a box, a list of boxes (one per object of a counted group: "red circles" of "two red circles"),
#: or a mask: a 2-D array (any size, stretched over the image) whose values >= 0.5 are the region
Boxes = dict[str, Any]
HALVES: dict[str, tuple[Box, Box]] = {
    "above": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)),
    "below": ((0.0, 0.5, 1.0, 1.0), (0.0, 0.0, 1.0, 0.5)),
    "to the left of": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)),
    "to the right of": ((0.5, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 1.0)),
}
#: the count words a phrase may start with ("two red circles")
COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9, "ten": 10}
ARTICLES = {"the", *COUNTS}


def spatial_parts(prompt: str) -> list[tuple[str, Box]]:
    """The two sides of the prompt's spatial relation, as written, each with its half of the image
    ("a red circle above a blue square" -> [("a red circle", top), ("a blue square", bottom)]); empty
    if the prompt has no such relation."""
    text = prompt.lower().strip().rstrip(".")
    for rel, boxes in HALVES.items():
        parts = [p.strip().strip(",;:").strip() for p in re.split(rf"\s+{rel}\s+", text)]  # "x, above y"
        if len(parts) == 2 and all(object_words(p) for p in parts):
            return list(zip(parts, boxes, strict=True))
    return []


def object_words(part: str) -> str:
    return " ".join(w for w in part.split() if w not in ARTICLES and not w.isdigit())


def count_of(phrase: str) -> int:
    """How many objects a phrase names by its first word ("three blue squares" -> 3, "2 cats" -> 2); 1
    without a count word."""
    first = (phrase.lower().split() or [""])[0]
    return int(first) if first.isdigit() else COUNTS.get(first, 1)


def concepts(prompt: str) -> list[str]:
    """The object words of a prompt's phrases between "and" and commas ("a red cross and a white
    triangle" -> ["red cross", "white triangle"])."""
    parts = re.split(r"\s*,\s*|\s+and\s+", prompt.lower().strip().rstrip("."))
    return [w for w in (object_words(p) for p in parts) if w]


def regions_from_prompt(prompt: str) -> Boxes:
    """Object words -> box from the prompt's spatial relation (empty if it has none)."""
    boxes: Boxes = {}
    for part, box in spatial_parts(prompt):
        add_regions(boxes, object_words(part), [box])
    return boxes


def add_regions(boxes: Boxes, words: str, regions: list[Any]) -> None:
    """Put ``regions`` (one per object) under ``words`` in ``boxes``: one region as itself, several as a
    list; an object named twice ("a red circle above a red circle") becomes one group holding both
    sides' regions, not only the last side's."""
    if words in boxes:
        regions = [*box_list(boxes[words]), *regions]
    boxes[words] = regions if len(regions) > 1 else regions[0]


def is_mask(region: Any) -> bool:
    """Whether a region is a mask (a 2-D array) rather than a box."""
    return getattr(region, "ndim", None) == 2


def box_list(value: Any) -> list[Any]:
    """A layout value as a list of regions (one box or mask, or one box per object of a counted group)."""
    return [value] if is_mask(value) or isinstance(value[0], int | float) else list(value)


def read_mask(path: str, what: str) -> Any:
    """A mask image (white = the region) as a float array in [0, 1]; one line if it cannot be read."""
    import numpy as np

    from ..images import open_image

    if not Path(path).is_file():
        raise VelodiffError(f"{what} mask {path!r} does not exist")
    return np.asarray(open_image(path, f"{what} mask").convert("L"), dtype=np.float32) / 255.0


def parse_boxes(
    text: str, what: str, example: str, repeat: bool = False, masks: bool = False, lower: bool = False
) -> dict[str, Any]:
    """'NAME: x0,y0,x1,y1; NAME: ...' -> {NAME: box}, each box checked (one line if malformed); ``what``
    names an item in the messages ("layout", "region"), ``example`` shows one. A name given twice is
    refused, or with ``repeat`` collects its boxes in a list (one per object). With ``masks``, a path to
    an image file in place of the numbers is a mask (white = the region); ``lower`` lower-cases names."""
    boxes: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(";"))):
        name, colon, coords = item.rpartition(":")
        region: Any = ()
        try:
            region = tuple(float(v) for v in coords.split(","))
        except ValueError:
            path = Path(coords.strip())
            if masks and colon and path.is_file():
                region = read_mask(coords.strip(), what)
            elif masks and colon and (path.suffix[1:].isalpha() or "/" in coords):  # a path: name the file
                raise VelodiffError(f"{what} {name.strip()!r}: mask {str(path)!r} does not exist") from None
        if masks and not colon and (Path(item).suffix[1:].isalpha() or "/" in item):  # a bare mask path
            raise VelodiffError(f"{what} {item!r}: name what the mask is for, e.g. 'red circle: {item}'")
        if not colon or not name.strip() or not (is_mask(region) or len(region) == 4):
            paths = " or a mask image's path" if masks else ""
            raise VelodiffError(f"{what} {item!r}: write '{example}' with four numbers in [0, 1]{paths}")
        name = name.strip().lower() if lower else name.strip()
        check_region_box(name, region, what)
        if name in boxes and not repeat:
            raise VelodiffError(f"{what} {name!r} is given twice; give each {what} once")
        boxes[name] = [*box_list(boxes[name]), region] if name in boxes else region
    if not boxes:
        raise VelodiffError(f"no {what} given; write '{example}; ...'")
    return boxes


def parse_layout(text: str, masks: bool = False) -> Boxes:
    """'red circle: 0.1,0.1,0.45,0.45; blue square: 0.55,0.5,0.95,0.95' -> {words: box}; words given
    again add a box to their list ('red circles: ...; red circles: ...': one box per circle); with
    ``masks``, 'red circle: circle.png' reads a mask image."""
    return parse_boxes(text, "layout", "words: x0,y0,x1,y1", repeat=True, masks=masks, lower=True)


def layout_text(boxes: Boxes) -> str:
    """:func:`parse_layout`'s inverse for boxes (a mask has no text form): 'words: x0,y0,x1,y1; ...', the
    words once per object of a counted group, each number as Python writes it (read back exactly)."""
    items = [(words, box) for words, value in boxes.items() for box in box_list(value)]
    return "; ".join(f"{words}: {','.join(repr(float(v)) for v in box)}" for words, box in items)


def check_region_box(name: str, box: Any, what: str = "layout") -> None:
    """One line for a box outside the image or a mask that covers nothing (``what``: whose region, e.g.
    "region" for regional prompting's, "--layer" for a brush's)."""
    if is_mask(box):
        if not float(box.max()) >= 0.5:
            raise VelodiffError(f"{what} mask {name!r} covers nothing (white, >= 0.5, is the region)")
        return
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise VelodiffError(
            f"{what} box {name!r} {tuple(box)} must satisfy 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1"
        )


def named_regions(value: Any, what: str) -> dict[str, Any]:
    """``value`` as a dict of words (or region prompts) to boxes, masks or lists of them; a list of boxes
    without their words, or a key that is no text, is one line."""
    if not isinstance(value, dict) or any(not isinstance(k, str) for k in value):
        raise VelodiffError(f"{what} maps the words of the prompt to boxes (x0, y0, x1, y1) in [0, 1], e.g. "
                            f"{{'red circle': (0.1, 0.1, 0.45, 0.45)}}; got {value!r:.80}")
    return dict(value)


def check_boxes(boxes: Boxes, prompt: str) -> None:
    from .p2p import PIECES

    named_regions(boxes, "layout boxes")

    words = PIECES.findall(prompt.lower())
    for name, value in boxes.items():
        for box in box_list(value):
            check_region_box(name, box)
        own = PIECES.findall(name.lower())
        missing = [w for w in own if w not in words]
        if missing:
            raise VelodiffError(f"layout object {name!r}: {missing[0]!r} is not in the prompt {prompt!r}")
        # its words together and in order, so that they name one object ('blue circle' is no object of
        # 'a red circle above a blue square', though both words are in it)
        if not any(words[i : i + len(own)] == own for i in range(len(words) - len(own) + 1)):
            raise VelodiffError(
                f"layout object {name!r} is not a phrase of the prompt {prompt!r}: name an object with "
                "the prompt's own words, together and in order (e.g. 'red circle' in 'a big red circle')"
            )


def check_covers(what: str, name: str, box: Any, h: int, w: int) -> None:
    """One line when a region covers no cell of the h x w latent it steers (it would change nothing):
    a box holds a cell when it holds the cell's centre, a mask when at least half of the cell is white."""
    if not bool(region_mask(box, h, w).any()):
        kind = "mask" if is_mask(box) else "box"
        raise VelodiffError(
            f"{what} {kind} {name!r} covers no cell of the {w}x{h} latent (a box must hold a cell's centre, "
            "a mask half of a cell): draw a larger region"
        )


def box_mask(box: Any, n: int, latent_hw: tuple[int, int] | None = None) -> Tensor:
    """A (n,) mask over the row-major grid of a layer's n tokens, downsampled from a latent of size
    ``latent_hw`` (default: square): 1 where the cell centre is in the box (or, for a mask, where the
    cell is at least half region)."""
    from ..accel.attention import token_grid

    h, w = token_grid(n, *(latent_hw or (1, 1)))
    if h * w != n:
        raise VelodiffError(f"{n} attention tokens do not make a grid of a {latent_hw} latent's shape")
    return region_mask(box, h, w).reshape(-1)


def region_mask(box: Any, h: int, w: int) -> Tensor:
    """A (h, w) float mask on a grid: 1 where the cell centre lies in the box; for a mask (any size,
    stretched over the grid), where the cell's mean of it is at least 0.5."""
    import torch

    if is_mask(box):
        m = torch.as_tensor(box, dtype=torch.float32)[None, None]
        return (torch.nn.functional.interpolate(m, size=(h, w), mode="area")[0, 0] >= 0.5).float()

    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    inside = ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None, :]
    return inside.float()


@register_rule
class LayoutGuidance(Accelerator):
    """Layout guidance (module docstring); ``boxes`` (Python only): words -> box or list of boxes, for
    every image. Its normalised gradient steps amplify float rounding, so an image in a batch differs
    from the same seed drawn alone (README: run one image per call to reproduce it)."""

    name = "layout"
    stateful = True
    layer = 0
    exclusive = ("attention processors", "cross-attention processors")
    needs_grad = True
    summary = ("layout guidance from cross-attention (Chen et al. 2024; A-STAR's segregation / retention "
               "terms), regions from boxes or spatial words")
    cost = "a forward and backward conditional pass per guided step and iteration"
    options = {
        "scale": Option(0.05, "step size, a fraction of sigma_t per iteration", lo=0, hi=10),
        "steps": Option(0.5, "share of the steps that are guided: the samples after the first "
                        "int(steps x N) - 1 steps are steered (the starting noise is not)", lo=0, hi=1),
        "iters": Option(3, "gradient iterations per guided step", kind=int, lo=1, hi=20),
        "segregation": Option(0.0, "A-STAR's segregation term's weight (overlap of the objects' maps)",
                              lo=0, hi=100),
        "retention": Option(0.0, "A-STAR's retention term's weight (each object keeps its region)", lo=0,
                            hi=100),
    }

    def __init__(self, boxes: Boxes | None = None, **values: Any) -> None:
        super().__init__(**values)
        self.boxes = named_regions(boxes or {}, "layout boxes")

    def check(self, run: RunInfo) -> None:
        if not [m for m in attention_modules(run.network, True) if m[1].norm_q is None]:
            raise VelodiffError(
                "plan rule 'layout': the model has no plain cross-attention layers (SD family)"
            )
        if run.model is None or not run.prompts:
            raise VelodiffError("plan rule 'layout' needs a pipeline run (text2img) with its prompts")
        for p in run.prompts:
            if self.boxes:
                check_boxes(self.boxes, p)

    def begin(self, run: RunInfo) -> None:
        import torch

        from .p2p import word_positions

        super().begin(run)
        self.state, self.swap, self.maps = RowState(), ProcessorSwap(), []
        mods = [m for m in attention_modules(run.network, True) if m[1].norm_q is None]
        state, sink = self.state, self.maps.append  # maps with their graph: the energy's gradient
        self.swap.install(mods, lambda _name, _mod, orig: CaptureCrossAttention(orig, state, sink, False))
        prompts = list(run.prompts) * (run.batch // max(1, len(run.prompts))) if run.prompts else []
        astar = self.segregation > 0 or self.retention > 0
        self.objects: list[list[tuple[Tensor, Box | list[Box] | None]]] = []
        device = getattr(run.model, "device", None)  # where the maps are: no copy per attention call
        for p in prompts[: run.batch]:
            regions: dict[str, Box | list[Box] | None] = {**(self.boxes or regions_from_prompt(p))}
            if not regions and astar:
                regions = dict.fromkeys(concepts(p))
            objs = []
            for words, box in regions.items():
                # the phrase where it occurs ("a red circle and a red square": each "red" to its object),
                # else each of its words wherever it is
                pos = word_positions(run, p, words, rule="layout", required=False) or [
                    q for w in words.split() for q in word_positions(run, p, w, rule="layout")]
                if not pos:
                    raise VelodiffError(
                        f"plan rule 'layout': {words!r} is past the prompt's token limit; shorten the prompt"
                    )
                objs.append((torch.tensor(pos, dtype=torch.long, device=device), box))
            self.objects.append(objs)
        self.guided = int(self.steps * run.steps)
        self.spent = Cost(0, 0)
        self.latent_hw: tuple[int, int] | None = None  # the sample's (h, w), set at each guided step
        #: A-STAR's B_m: (layer, image) -> each object's binarized map at the last guided step
        self.previous: dict[tuple[int, int], list[Tensor]] = {}
        self.current: dict[tuple[int, int], list[Tensor]] = {}

    def evaluate(self, req: Any, inner: Any) -> Any:
        import torch

        with torch.no_grad():  # only the energy's own passes need a graph
            return inner(req)

    def after_step(self, info: Any) -> Tensor | None:
        import torch

        if info.i + 1 >= self.guided or info.t <= 0 or not any(self.objects):
            return None
        run, x = self.run, info.x
        if self.latent_hw is None:  # the first guided step: every explicit region must reach the latent
            for name, value in (self.boxes or {}).items():
                for b in box_list(value):
                    check_covers("layout", name, b, int(x.shape[-2]), int(x.shape[-1]))
        self.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))  # the maps' grids keep its aspect
        sigma = float(run.schedule.sigma(info.t))
        cond = run.conds["cond"]
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone()
            for _ in range(self.iters):
                x.requires_grad_(True)
                self.maps.clear()
                self.state.rows = slice(0, x.shape[0])
                try:
                    run.model.denoiser(x, info.t, cond)
                    self.spent += Cost(1, 1)  # a forward pass (and its backward) per iteration
                finally:
                    self.state.rows = None
                energy = self.energy(self.maps)
                self.maps.clear()
                if not energy.requires_grad:  # nothing to steer yet (retention's first step, one object)
                    break
                (g,) = torch.autograd.grad(energy, x)
                rms = g.pow(2).mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt().clamp_min(1e-12)
                x = (x - self.scale * sigma * g / rms).detach()
        self.previous, self.current = self.current, {}
        return x.detach()

    def extra_cost(self) -> Cost:
        spent, self.spent = self.spent, Cost(0, 0)
        return spent

    def energy(self, maps: list[Tensor]) -> Tensor:
        """Chen et al. 2024, Eq. 3 (objects with a box), plus A-STAR's Eqs. 2 and 3 at their weights;
        averaged over the layers, summed over images."""
        import torch

        total = torch.zeros(())
        for layer, a in enumerate(maps):  # (B, N, T)
            for b, objs in enumerate(self.objects):
                normed = []
                for pos, box in objs:
                    att = a[b][:, pos.to(a.device)].mean(-1)  # (N,)
                    if box is not None:  # the union of the object's boxes
                        masks = [box_mask(b, att.shape[0], self.latent_hw) for b in box_list(box)]
                        m = torch.stack(masks).amax(0).to(att)
                        total = total + (1 - (att * m).sum() / att.sum().clamp_min(1e-12)) ** 2
                    normed.append(att / att.max().clamp_min(1e-12))
                total = total + self.astar(normed, self.previous.get((layer, b)))
                if self.retention > 0:  # B_m for the next guided step
                    self.current[(layer, b)] = [(n.detach() >= 0.5).to(n) for n in normed]
        return total / max(1, len(maps))

    def astar(self, maps: list[Tensor], previous: list[Tensor] | None) -> Tensor | float:
        """A-STAR's segregation (Eq. 2) and retention (Eq. 3) terms of one image's normalized maps."""
        loss: Tensor | float = 0.0
        if self.segregation > 0:
            for i, a_m in enumerate(maps):
                for a_n in maps[i + 1 :]:
                    overlap = a_m.minimum(a_n).sum() / (a_m + a_n).sum().clamp_min(1e-12)
                    loss = loss + self.segregation * overlap
        if self.retention > 0 and previous is not None:
            for a_m, b_m in zip(maps, previous, strict=True):
                iou = a_m.minimum(b_m).sum() / (a_m + b_m - a_m * b_m).sum().clamp_min(1e-12)
                loss = loss + self.retention * (1 - iou)
        return loss

    def end(self) -> None:
        self.swap.restore()
        self.maps = []
