"""Composable multi-prompt guidance (Liu et al. 2022, 'Compositional Visual Generation with Composable
Diffusion Models', Eq. 10 and 12): a prompt of parts joined by ``AND``, each with an optional weight
``:w`` (negative: negation), as in the Stable Diffusion web UI:

    "a red circle AND a blue square :0.8 AND a green background :-0.5"

    x0 = x0_u + w * sum_k weight_k (x0_k - x0_u)                  (weight 1 when not given)

Part 0 is the ``cond`` branch; parts 1.. are branches ``part1``, ``part2``, ... encoded by the model's
text encoder at the start of the run and evaluated in the same batched call, with the unconditional
branch, which the sum needs at every step (also at w = 1, where there is no CFG rule). On top of what
the CFG-family rule made of part 0 (x0_u + w (x0_0 - x0_u); x0_0 where it is off), this rule adds part
0's own weight and the other parts' terms.
"""

from __future__ import annotations

import re

from ..errors import VelodiffError
from ..plan import EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .cfg import START, STOP, TERM, GuidanceRule

_WEIGHT = re.compile(r"^(.*?)\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", re.S)


def split_prompt(prompt: str) -> list[tuple[str, float]]:
    """'a :1.5 AND b :-1' -> [('a', 1.5), ('b', -1.0)] (weight 1 when not given)."""
    parts = []
    for piece in re.split(r"\s+AND\s+", prompt.strip()):
        m = _WEIGHT.match(piece)
        text, weight = (m.group(1), float(m.group(2))) if m else (piece, 1.0)
        # a mistyped number ('a :−2' with a unicode minus, 'a :1,5', 'a :x2') would be read as prompt text
        # at weight 1, a negation silently an addition; other text after ' :' stays text, as A1111 reads it
        # ('a smiley :)')
        bad = None if m else re.search(r"\s:\s*(\S*[\d\u2212+-]\S*)\s*$", piece)
        if bad:
            raise VelodiffError(f"composable prompt part {piece.strip()!r}: weight {bad.group(1)!r} is not a "
                                "number (write 'a red circle :1.5' or ':-1')")
        if not text.strip():
            raise VelodiffError(f"composable prompt {prompt!r} has an empty part; write 'a AND b'")
        parts.append((text.strip(), weight))
    return parts


@register_rule
class ComposableGuidance(GuidanceRule):
    name = "compose"
    layer = TERM + 1  # outside the other terms: PAG's and SLD's branches copy part 0's conditioning
    claims = ("parts",)
    uses = ("uncond",)
    summary = "composable diffusion (Liu et al. 2022): prompts 'a AND b :w' combined (negative w: negation)"
    cost = "+1 eval per step per extra AND part (same batched call)"
    options = {
        "scale": Option(None, "w multiplying every part's weight (default: the run's --guidance)", lo=0.0),
        "start": START,
        "stop": STOP,
    }

    def check(self, run: RunInfo) -> None:
        if "uncond" not in run.conds:
            raise VelodiffError(
                "plan rule 'compose' needs an unconditional branch: pass cond=GuidedCond(cond, uncond)"
            )
        if run.encode is None or not run.prompts:
            raise VelodiffError(
                "plan rule 'compose' needs prompts and the model's text encoder (use a pipeline)"
            )
        counts = {len(split_prompt(p)) for p in run.prompts}
        if len(counts) != 1:
            raise VelodiffError(
                "plan rule 'compose': every prompt of a batch must have the same number of AND parts"
            )
        if self.scale is None and run.guidance is None:
            raise VelodiffError("plan rule 'compose' needs a scale: give scale=W")

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        split = [split_prompt(p) for p in run.prompts]
        self.w = float(self.scale if self.scale is not None else run.guidance)
        self.weights = [[parts[k][1] for parts in split] for k in range(len(split[0]))]
        self.conds = {f"part{k}": run.encode([parts[k][0] for parts in split]) for k in range(len(split[0]))}

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        req = req.with_branch("cond", self.conds["part0"])
        if not self.in_range(req.step):
            return inner(req)
        for k in range(1, len(self.weights)):
            req = req.with_branch(f"part{k}", self.conds[f"part{k}"])
        r = inner(req.with_branch("uncond"))
        c0, u = r.parts["cond"], r.parts["uncond"]
        shape = (-1, *([1] * (c0.ndim - 1)))
        w0 = c0.new_tensor(self.weights[0]).reshape(shape)
        x0 = r.x0 + self.w * (w0 - 1) * (c0 - u)  # part 0's own weight beyond the CFG rule's 1
        for k in range(1, len(self.weights)):
            wk = c0.new_tensor(self.weights[k]).reshape(shape)
            x0 = x0 + self.w * wk * (r.parts[f"part{k}"] - u)
        r.x0 = x0
        return r
