"""Per-block hooks through diffusers' own hook registry (``diffusers.hooks.HookRegistry``, the mechanism
behind diffusers' cache hooks): a hook is registered on a block for one run and removed at its end,
and no ``forward`` is replaced by hand. The first instrument on it records how much each block's output
changes from one step to the next, the curves the feature caches (DeepCache, block caches, budgeted
cache schedules) are calibrated on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Accelerator, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule

if TYPE_CHECKING:
    from torch import Tensor

#: the block containers of diffusers' networks: UNet2DConditionModel (down / mid / up), SD3 and PixArt
#: (transformer_blocks), Flux (transformer_blocks, single_transformer_blocks)
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def network_blocks(network: Any, patterns: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(name, module) of the network's top-level blocks in forward order, e.g. ``down_blocks.0`` ...
    ``mid_block`` ... ``up_blocks.2`` for a UNet, ``transformer_blocks.0`` ... for a DiT; only those
    matching one of ``patterns`` (regular expressions) when given."""
    if network is None:
        return []
    out = []
    for name in ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks"):
        part = getattr(network, name, None)
        if part is None:
            continue
        out += [(f"{name}.{i}", m) for i, m in enumerate(part)] if name in BLOCK_LISTS else [(name, part)]
    return [(n, m) for n, m in out if not patterns or any(re.search(p, n) for p in patterns)]


class HookSet:
    """Hooks registered under one name on several modules through ``HookRegistry``; ``remove`` takes
    them all off."""

    def __init__(self, name: str) -> None:
        self.name, self.modules = name, []

    def add(self, module: Any, hook: Any) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, self.name)
        self.modules.append(module)

    def remove(self) -> None:
        for module in self.modules:
            module._diffusers_hook.remove_hook(self.name, recurse=False)
        self.modules.clear()


def output_hook(on_output: Callable[[Any], None]) -> Any:
    """A diffusers ``ModelHook`` that hands each output of its module to ``on_output``."""
    from diffusers.hooks import ModelHook

    class OutputHook(ModelHook):
        def post_forward(self, module: Any, output: Any) -> Any:
            on_output(output)
            return output

    return OutputHook()


def _flat(output: Any, rows: slice) -> Tensor:
    """The selected rows of every top-level tensor of a block's output, flattened and joined."""
    import torch

    parts = output if isinstance(output, (tuple, list)) else (output,)
    return torch.cat([p[rows].flatten(1).float() for p in parts if isinstance(p, torch.Tensor)], dim=1)


@register_rule
class FeatureChange(Accelerator):
    """Instrument: the relative L1 change of each block's output between consecutive steps, on the
    conditional branch, ``changes[i][block] = |y_i - y_{i-1}|_1 / |y_{i-1}|_1`` per image (B,)
    (DeepCache, Ma et al. 2024, Fig. 2's similarity curves; TeaCache's and CacheQuant's change measure)."""

    name = "feature_change"
    layer = 0
    exclusive = "the feature-change instrument"
    summary = "instrument: relative change of each block's output from step to step (cache calibration)"
    cost = "free"
    options = {
        "blocks": Option(
            (), "regular expressions of block names (default: every block)", kind=tuple, patterns=True
        )
    }

    def check(self, run: RunInfo) -> None:
        if not network_blocks(run.network, self.blocks):
            raise VelodiffError("plan rule 'feature_change': the model has no matching blocks to hook")

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.changes: dict[int, dict[str, Tensor]] = {}
        self.previous: dict[str, Tensor] = {}
        self.rows: slice | None = None
        self.current: dict[str, Tensor] = {}
        self.hooks = HookSet("velodiff_feature_change")
        for name, module in network_blocks(run.network, self.blocks):
            self.hooks.add(module, output_hook(lambda out, name=name: self._record(name, out)))

    def _record(self, name: str, output: Any) -> None:
        if self.rows is not None:
            self.current[name] = _flat(output, self.rows).detach()

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        if req.stage != 0:
            return inner(req)
        self.rows, self.current = req.rows("cond"), {}
        try:
            r = inner(req)
        finally:
            self.rows = None
        step = {}
        for name, y in self.current.items():
            prev = self.previous.get(name)
            if prev is not None and prev.shape == y.shape:
                step[name] = ((y - prev).abs().sum(1) / prev.abs().sum(1).clamp_min(1e-12)).cpu()
        if step:
            self.changes[req.step] = step
        self.previous = self.current
        return r

    def end(self) -> None:
        self.hooks.remove()

    def curves(self) -> dict[str, list[float]]:
        """Per block, the batch-mean change at every recorded step (in step order)."""
        steps = sorted(self.changes)
        names = list(self.changes[steps[0]]) if steps else []
        return {n: [float(self.changes[s][n].mean()) for s in steps] for n in names}
