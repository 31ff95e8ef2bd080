"""The bounds on the numbers a user types. Past them a run only exhausts memory or time (a billion steps
or images allocated their lists until memory ran out), so every command refuses them in one line."""

import math
import numbers

from .errors import VelodiffError

#: the largest image side in pixels (8K images)
MAX_SIDE = 8192
#: the most solver steps or network evaluations per image (a discrete schedule has 1000 timesteps)
MAX_STEPS = 1000
#: the most images per prompt a scoring run (eval shapes, bench, tune) makes
MAX_IMAGES_PER_PROMPT = 1000
#: the most images per prompt `generate-set` makes (FID sets from one prompt)
MAX_SET_IMAGES_PER_PROMPT = 100_000
#: the most steps of any time grid (fine references included: 10**11 allocated until memory ran out)
MAX_GRID_STEPS = 1_000_000
#: the most timed runs a measurement repeats
MAX_RUNS = 1000
#: the most samples (images, mixture points, training examples) in one batch
MAX_BATCH = 65_536
#: the most elements of one sample of the solver bench's image mixture
MAX_SAMPLE_ELEMENTS = 1 << 20
#: the seeds velodiff takes: torch's (``Generator.manual_seed``: 64 bits, either sign; -1 is 2**64 - 1);
#: the server's jobs and brush APIs take the same range, its ComfyUI API ComfyUI's KSampler one, [0, SEED_END)
SEED_MIN, SEED_END = -(2**63), 2**64


def is_number(v: object) -> bool:
    """A real number a user may pass: Python's or numpy's, not a bool (True would read as 1)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_integer(v: object) -> bool:
    """An integer a user may pass: Python's or numpy's, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_guidance(scale: float, what: str = "guidance scale", high: float = math.inf) -> float:
    """A guidance scale, refused in one line unless a finite number in [0, ``high``] (an infinite scale
    turns CFG's w * (c - u) into NaN where c = u, which would read as the model's fault)."""
    if not (is_number(scale) and math.isfinite(scale) and 0 <= scale <= high):
        bound = ">= 0" if high == math.inf else f"in [0, {high:g}]"
        raise VelodiffError(f"{what} must be a finite number {bound}, got {scale}")
    return float(scale)


def check_strength(strength: float, what: str = "strength", zero: bool = True) -> float:
    """An image-to-image strength (diffusers' ``strength``: the share of the steps re-run from the noised
    image), refused in one line outside [0, 1]; ``zero=False`` where a run must re-run something (a
    collage's harmonising pass, a brush layer): (0, 1]."""
    if not is_number(strength):
        raise VelodiffError(f"{what} must be a number, got {type(strength).__name__}")
    s = float(strength)
    if not (math.isfinite(s) and (s >= 0 if zero else s > 0) and s <= 1):
        bounds = "[0, 1] (0 returns the image, 1 ignores it)" if zero else (
            "(0, 1] (the share of the steps re-run)"
        )
        raise VelodiffError(f"{what} must be in {bounds}, got {strength:g}")
    return s
