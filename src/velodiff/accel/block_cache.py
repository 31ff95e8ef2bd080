"""Block caches for diffusion transformers (Flux, PixArt, SD3) as plan rules, on diffusers' own cache hooks.

``fbcache``: First-Block Cache (ParaAttention's FBCache, the TeaCache idea: Liu et al. 2024): every
evaluation runs the first transformer block; when its residual changed by less than ``threshold``
(relative mean absolute difference) since the last full evaluation, the remaining blocks are skipped
and their cached residual is added instead (diffusers' first-block-cache hooks, on the blocks its
``apply_first_block_cache`` takes; SD3's last block, which returns no text stream, runs in full).

The rule applies the hooks for one run and removes them at its end (what ``CacheMixin.enable_cache`` /
``disable_cache`` do, on any transformer: SD3's and PixArt's have no ``CacheMixin``), and runs each
evaluation in a cache context named after its batch composition (branches and rows: CFG's batched
cond + uncond call, AG's cond-only call and PAG's three-branch call each keep their own state, as
diffusers' pipelines keep "cond" and "uncond"). A probe hook on the last block, registered beneath the
cache's, tells whether an evaluation ran in full; one that did not is reported approximate
(``exact=False``) and counted at its FLOP share of a full one: the full call's FLOPs less those of the
blocks a cached call skips (``torch.utils.flop_counter`` on the first full call of each batch
composition and shape, remembered per network for the process). ``fbcache:threshold=0`` reuses nothing
and equals the plain run.

``taylorseer``: TaylorSeer (Liu et al. 2025): the blocks' outputs forecast by a Taylor series between
full evaluations (diffusers' ``apply_taylorseer_cache``), with the same contexts, probe and costs.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..errors import VelodiffError
from ..plan import Accelerator, Cost, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .hooks import HookSet

#: the transformer block lists diffusers' cache hooks walk
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


#: network -> {(rule, batch composition, shape): a cached call's FLOPs over a full call's}
_SHARES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transformer_blocks(network: Any) -> list[Any]:
    return [b for name in BLOCK_LISTS for b in (getattr(network, name, None) or [])]


class DiffusersCache(Accelerator):
    """Base: ``config()`` is diffusers' cache config, ``hook_names`` the hooks it registers."""

    layer = 0
    exclusive = "a feature cache"
    stateful = True
    cost = "1 eval on full evaluations; the measured FLOP share on cached ones (approximate)"
    hook_names: tuple[str, ...] = ()

    def apply(self, network: Any) -> None:
        raise NotImplementedError

    def cached_blocks(self, network: Any) -> list[tuple[str, Any]]:
        """(name, block) of the blocks the cache may skip; the probe watches the last one. A block that
        returns no text stream (SD3's last: ``context_pre_only``) is left out: it runs in full."""
        return [(f"{n}.{i}", b) for n in BLOCK_LISTS for i, b in enumerate(getattr(network, n, None) or [])
                if not getattr(b, "context_pre_only", False)]

    def skipped_blocks(self, network: Any) -> list[str]:
        """The names of the blocks a cached call does not run."""
        return [name for name, _ in self.cached_blocks(network)]

    def cached_share(self, network: Any, flops: dict[str, dict[Any, int]]) -> float:
        """A cached call's FLOPs over a full call's, from the full call's per-module counts (keys as
        ``FlopCounterMode.get_flop_counts`` names them: the root's class, then the module path)."""
        total = sum(flops.get("Global", {}).values())
        root = type(network).__name__
        skipped = sum(sum(flops.get(f"{root}.{name}", {}).values()) for name in self.skipped_blocks(network))
        return (total - skipped) / total if total else 1.0

    def check(self, run: RunInfo) -> None:
        if run.network is None or len(transformer_blocks(run.network)) < 2:
            what = type(run.network).__name__ if run.network is not None else "no network"
            raise VelodiffError(
                f"plan rule {self.name!r} is for diffusion transformers (Flux, PixArt, SD3); "
                f"this model has {what}"
                + (" (use deepcache on a UNet)" if hasattr(run.network, "up_blocks") else "")
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        from diffusers.hooks import HookRegistry

        from .hooks import output_hook

        self.ran = False
        self.probe = HookSet("velodiff_block_cache_probe")
        self.probe.add(self.cached_blocks(run.network)[-1][1], output_hook(self._ran))
        self.registry = HookRegistry.check_if_exists_or_initialize(run.network)
        try:
            self.apply(run.network)
        except BaseException:
            self.end()
            raise
        self.registry.invalidate_child_registries_cache()
        self.shares = _SHARES.setdefault(run.network, {})
        self.cached_evals = 0

    def _ran(self, output: Any) -> None:
        self.ran = True

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        from diffusers.models.cache_utils import CacheMixin

        rows = ";".join(f"{b}:{req.subsets[b].tolist() if b in req.subsets else 'all'}" for b in req.branches)
        self.ran = False
        key = (self.name, rows, tuple(req.x.shape))
        # CacheMixin.cache_context sets the context on every stateful hook under the module; it only needs
        # the module, so it serves the transformers without the mixin too
        with CacheMixin.cache_context(
            self.run.network, rows, step_index=req.step, num_inference_steps=self.run.steps
        ):
            if key not in self.shares:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as fc:
                    r = inner(req)
                if self.ran:
                    self.shares[key] = self.cached_share(self.run.network, fc.get_flop_counts())
            else:
                r = inner(req)
        if self.ran:
            return r
        self.cached_evals += 1
        r.cost = Cost(r.cost.nfe, r.cost.evals * self.shares.get(key, 1.0))
        r.exact = False
        return r

    def end(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is not None:
            for name in self.hook_names:
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()
            self.registry = None
        if getattr(self, "probe", None) is not None:
            self.probe.remove()


#: the fraction of evaluations plain ``fbcache`` reuses, through the model's calibrated threshold
DEFAULT_REUSE = 0.3


@register_rule
class FirstBlockCache(DiffusersCache):
    name = "fbcache"
    couples_batch = True  # diffusers' hook compares the residual of the whole batch
    summary = "First-Block Cache (FBCache, TeaCache's idea), DiTs: skip the rest while block 1 barely changes"
    options = {
        "threshold": Option(
            None,
            "relative change of the first block's residual below which the rest is reused "
            "(diffusers' FirstBlockCacheConfig.threshold, 0.05 there; 0: never reuse; default: the "
            "model's calibrated threshold for reuse)",
            lo=0.0,
            hi=10.0,
            aliases=("residual_diff_threshold",),  # cache-dit's name for the same test
        ),
        "reuse": Option(
            DEFAULT_REUSE,
            "without a threshold: the fraction of evaluations to reuse, mapped to this model's threshold by "
            "its calibration (velodiff calibrate cache)",
            lo=0.0,
            hi=1.0,
        ),
        "calibration": Option("", "reuse: a cache calibration file (default: the one saved for the model)",
                              kind=str),
    }
    hook_names = ("fbc_leader_block_hook", "fbc_block_hook")

    def skipped_blocks(self, network: Any) -> list[str]:
        return super().skipped_blocks(network)[1:]  # the first block runs on every call

    def check(self, run: RunInfo) -> None:
        super().check(run)
        if len(self.cached_blocks(run.network)) < 2:
            raise VelodiffError(
                f"plan rule {self.name!r} needs a first block and at least one more to skip; this "
                f"transformer has {len(self.cached_blocks(run.network))} (SD3's last block, which returns "
                "no text stream, always runs)"
            )
        if self.threshold is not None:  # given: diffusers' test as it is
            if "reuse" in self.values:
                raise VelodiffError("plan rule 'fbcache': give threshold or reuse, not both")
            self.refuse_ignored({"calibration": (False, "reuse=F, or no threshold")})
            self.threshold_in_force = self.threshold
            return
        # the threshold this model's calibration maps the reuse fraction to (never a constant copied by hand)
        from .calibration import fbcache_threshold, load_cache_calibration

        if run.model is None:
            raise VelodiffError("plan rule 'fbcache': without threshold=T it needs a loaded model (its "
                                "calibration)")
        artefact = load_cache_calibration(run.model, self.calibration or None, run.guidance)
        self.threshold_in_force = fbcache_threshold(artefact, self.reuse)

    @property
    def reads_cache_calibration(self) -> bool:
        """Whether a run reads the model's cache calibration (a set made with it depends on it)."""
        return self.threshold is None

    def apply(self, network: Any) -> None:
        """diffusers' ``apply_first_block_cache`` on :meth:`cached_blocks` (its own hooks: the head on the
        first, the tail's on the last): the same blocks as it takes, but for SD3's last, which it cannot
        cache (no text stream to add a residual to) and which runs in full here."""
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState
        from diffusers.hooks.hooks import StateManager

        blocks = [b for _, b in self.cached_blocks(network)]
        state = StateManager(FBCSharedBlockState, (), {})
        head, *rest = blocks
        HookRegistry.check_if_exists_or_initialize(head).register_hook(
            FBCHeadBlockHook(state, self.threshold_in_force), self.hook_names[0]
        )
        for i, block in enumerate(rest):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                FBCBlockHook(state, is_tail=i == len(rest) - 1), self.hook_names[1]
            )


@register_rule
class TaylorSeer(DiffusersCache):
    """TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting"): between full evaluations every
    ``interval``-th call, each transformer block's output is forecast by a Taylor series in the step
    offset, its derivatives the divided differences of the block's outputs at the last full evaluations
    (the paper's Eq. 8-9; diffusers' ``apply_taylorseer_cache`` on whole blocks, factors in float32). The
    first ``warmup`` calls run in full. ``interval=1`` forecasts nothing and equals the plain run."""

    name = "taylorseer"
    summary = "TaylorSeer (Liu et al. 2025), DiTs: forecast every block's output by a Taylor series"
    options = {
        "interval": Option(
            5, "a full evaluation every N calls, forecasts between (diffusers' cache_interval)",
            kind=int, lo=1, aliases=("cache_interval",),
        ),
        "warmup": Option(
            3, "full evaluations before the first forecast (disable_cache_before_step; at least 1: a "
            "forecast needs one)", kind=int, lo=1,
            aliases=("disable_cache_before_step",),
        ),
        "order": Option(1, "Taylor order of the forecast (max_order; 0: reuse)", kind=int, lo=0, hi=4,
                        aliases=("max_order",)),
    }
    hook_names = ("taylorseer_cache",)

    def apply(self, network: Any) -> None:
        import re

        import torch
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        patterns = [f"^{re.escape(name)}$" for name, _ in self.cached_blocks(network)]
        config = TaylorSeerCacheConfig(
            cache_interval=self.interval,
            disable_cache_before_step=self.warmup,
            max_order=self.order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=patterns,
        )
        apply_taylorseer_cache(network, config)
