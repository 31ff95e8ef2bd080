"""Which image is which in a set: image ``i`` uses prompt ``i // images_per_prompt``, seed
``seed + i`` (as ``velodiff generate`` numbers a batch's seeds) and file ``images/NNNNNN.png``; images
are rendered in chunks aligned on multiples of ``batch`` (``[c*batch, (c+1)*batch)``), the unit of
work and of batching everywhere, so an image is always computed in the same batch, by any process,
in any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .prompts import Prompt

#: the folder of a set's image files
IMAGES = "images"


def sample_seed(base: int, index: int) -> int:
    """Image ``index``'s seed: ``base + index`` (as ``velodiff generate`` numbers a batch's seeds)."""
    return int(base) + int(index)


@dataclass(frozen=True)
class Item:
    """One image of the set: its index, prompt, seed, file (relative to the set folder) and where
    its prompt came from."""

    index: int
    prompt: str
    seed: int
    file: str
    source: dict[str, Any]


def file_name(index: int, total: int) -> str:
    """Image ``index``'s file, relative to the set folder (six digits or more, zero-padded)."""
    return f"{IMAGES}/{index:0{max(6, len(str(total - 1)))}d}.png"


def plan_items(prompts: Sequence[Prompt], config: dict[str, Any]) -> list[Item]:
    """Every image of the set, in index order (``config``: seed and images_per_prompt)."""
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
