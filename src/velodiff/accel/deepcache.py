"""DeepCache (Ma, Fang and Wang 2024, 'DeepCache: Accelerating Diffusion Models for Free', CVPR) on the
step plan, for diffusers' ``UNet2DConditionModel``.

A UNet's skip branches carry the shallow features from the down path straight to the up path; the deep
path (the deeper down blocks, the mid block, the deeper up blocks) changes slowly from one step to the
next (the paper's Fig. 2). DeepCache picks one skip branch m (``branch``, the paper's and the peer
package's ``cache_branch_id``) and, with the paper's notation (Sec. 3.2, Eq. 4-5):

* on a full step t it runs the whole UNet and keeps F_cache = U_{m+1}^t(.), the up-path feature that
  enters the layer consuming skip branch m (the output of everything deeper);
* on a cached step t-1 it runs only the down path up to branch m (D_1 .. D_m) and the up path from the
  layer consuming branch m on, U_m(Concat(D_m^{t-1}(.), F_cache)), and nothing deeper.

Skip branches are numbered as diffusers' UNet collects them (``down_block_res_samples``): 0 is the
output of ``conv_in``, then each down layer's output (resnet, or resnet + attention) and each
downsampler's, down to the deepest. On SD 1.x / 2.x / SDXL layouts (three per down block) this is the
peer's ``cache_branch_id = 3 * block + layer``; branch 0, the peer's default, is the same on every
UNet (the cached step computes conv_in, the last up layer and conv_out).

Which steps are full (the paper's Sec. 3.3): ``schedule=uniform`` every ``interval``-th step (1:N);
``schedule=nonuniform`` the same number of full steps, ceil(M / N) over the M steps in [start, stop),
placed denser around the centre c = ``center`` * M as the paper's Eq. 7-8 place them,
l_k = linspace(-c^(1/p), (M - c)^(1/p)), i_k = sign(l_k) |l_k|^p + c (p = ``power``; if two points land
on one step, p is lowered by 0.02 until they do not, as the official code does). The official code
evaluates (-c)^(1/p) in complex arithmetic, which gives a near-uniform spacing; velodiff takes the
real, signed root the equation means. The default centre, 0.3, is where the deep features of the
shipped model change most (``feature_change`` on up_blocks.0/1 and the mid block, 20 DPM-Solver++ steps:
the step-to-step change peaks at steps 2-10 and falls below a third of its peak after step 12).
``schedule=budget`` places the same number of full steps where the model's own calibrated feature
changes (``velodiff calibrate cache``, ``accel/calibration.py``: the mid block and the skipped up
blocks, mapped onto this run's grid) make reuse cost the most, by the dynamic program of
``accel/cache_schedule.py`` (CacheQuant's schedule). Both take ``full``, the number of full steps, in
place of the 1:N count. Steps outside [start, stop) are full. A cached
evaluation whose rows (branch, image) were not all in the latest full one runs full instead.

Mechanics: diffusers hooks (``HookRegistry`` with a ``ModelHook.new_forward``, as diffusers' own cache
hooks do) on the modules deeper than the branch: on a full step each passes through and keeps its
output; on a cached step each returns its kept output (re-indexed when the batch's rows changed)
without running. The modules skipped are the whole blocks that are entirely deeper than the branch and,
in the two blocks that the branch cuts, the resnet / attention / resampler layers past it, which is
the peer's cut. Only the kept output that enters the first computed up layer reaches the result; the
others keep diffusers' own block code (concatenations, upsample sizes) shape-consistent, so no
forward is re-implemented or replaced by hand.

Cost: a cached evaluation is still one (partial) network call (nfe 1) and counts
``evals * fraction``, the fraction being the FLOPs of the cached call over those of a full call, per
image, both counted by ``torch.utils.flop_counter`` (convolutions, matmuls, attention) on the first
full and first cached call for each input shape (kept per network for the process).

Forecast: ``order=1`` replaces the reuse by TaylorSeer's first-order forecast (Liu et al. 2025, "From
Reusing to Forecasting", Eq. 8): on a cached step s the kept feature F(s1) of the latest full step
becomes F(s1) + (s - s1) (F(s1) - F(s0)) / (s1 - s0), s0 the full step before (with the same rows);
until two full steps exist it is reused as in DeepCache.

Order: with ``lower_order=true`` cached evaluations are reported approximate (``exact=False``), so
multistep solvers lower their order around them. The default, ``false``, keeps the order, as the peer
and the paper's samplers do, because that stays nearer the plain run on the shipped model
(bench/deepcache/calibration.md, 136 calibration images, DPM-Solver++ 2M, 20 steps, CFG 2.5: PSNR to
plain 39.0 vs 35.4 dB at N=2, 31.4 vs 29.8 dB at N=3, 22.6 vs 22.4 dB at N=5; ShapesEval within noise),
the same finding as LinearAG's estimates (velodiff.guidance.adaptive).
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Accelerator, Cost, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .hooks import HookSet

if TYPE_CHECKING:
    from torch import Tensor

SCHEDULES = ("uniform", "nonuniform", "budget")

#: per network and plan string, (branch, sample shape, conditioning shape) -> (full, cached) FLOPs per row
_FLOPS: weakref.WeakKeyDictionary[Any, dict[str, dict[tuple, list]]] = weakref.WeakKeyDictionary()


def _modules(module: Any, name: str) -> list[Any]:
    part = getattr(module, name, None)
    return list(part) if part is not None else []


def _uncuttable(name: str, block: Any, res: list, att: list, what: str) -> str:
    """Why DeepCache cannot cut a block: one line naming it."""
    why = "has no resnets (a pruned block?)" if not res else f"has {len(res)} resnets, {len(att)} attentions"
    return (f"plan rule 'deepcache' cannot cut this {what}: its {name} ({type(block).__name__}) {why}, "
            "where DeepCache's skip branches need one resnet (and attention) per branch")


def skip_branches(unet: Any) -> int:
    """How many skip branches the UNet has (the length of diffusers' ``down_block_res_samples``); a
    VelodiffError when its blocks do not have the resnets / attentions / resamplers layout DeepCache
    cuts (diffusers' DownBlock2D, CrossAttnDownBlock2D, UpBlock2D, CrossAttnUpBlock2D and kin)."""
    what = type(unet).__name__
    downs, ups = _modules(unet, "down_blocks"), _modules(unet, "up_blocks")
    if not downs or not ups or getattr(unet, "conv_in", None) is None:
        raise VelodiffError(
            f"plan rule 'deepcache' is for UNets (down and up blocks joined by skip branches); "
            f"this model's network is a {what}"
        )
    n = 1
    for i, block in enumerate(downs):
        res, att = _modules(block, "resnets"), _modules(block, "attentions")
        if not res or len(att) not in (0, len(res)):
            raise VelodiffError(_uncuttable(f"down_blocks.{i}", block, res, att, what))
        n += len(res) + (1 if _modules(block, "downsamplers") else 0)
    used = 0
    for i, block in enumerate(ups):
        res, att = _modules(block, "resnets"), _modules(block, "attentions")
        if not res or len(att) not in (0, len(res)):
            raise VelodiffError(_uncuttable(f"up_blocks.{i}", block, res, att, what))
        used += len(res)
    if used != n:
        raise VelodiffError(f"plan rule 'deepcache': this {what}'s up path takes {used} skips of {n}")
    return n


def cached_modules(unet: Any, branch: int) -> list[tuple[str, Any]]:
    """(name, module) of what a cached step does not run for skip ``branch``: the down layers that make
    deeper skips, the mid block and the up layers that consume them (whole blocks where a block is
    entirely deeper), in forward order."""
    n = skip_branches(unet)
    if not 0 <= branch < n:
        raise VelodiffError(
            f"plan rule 'deepcache' option 'branch' must be in [0, {n - 1}] for this UNet "
            f"({n} skip branches), got {branch}"
        )
    out: list[tuple[str, Any]] = []
    skip = 1  # branch 0 is conv_in's output, always computed
    for d, block in enumerate(unet.down_blocks):
        att = _modules(block, "attentions")
        layers: list[tuple[int, list[tuple[str, Any]]]] = []
        for j, res in enumerate(block.resnets):
            mods = [(f"down_blocks.{d}.resnets.{j}", res)]
            if att:
                mods.append((f"down_blocks.{d}.attentions.{j}", att[j]))
            layers.append((skip, mods))
            skip += 1
        samplers = _modules(block, "downsamplers")
        if samplers:
            layers.append((skip, [(f"down_blocks.{d}.downsamplers.{k}", m) for k, m in enumerate(samplers)]))
            skip += 1
        if layers[0][0] > branch:
            out.append((f"down_blocks.{d}", block))
        else:
            out += [m for depth, mods in layers if depth > branch for m in mods]
    if getattr(unet, "mid_block", None) is not None:
        out.append(("mid_block", unet.mid_block))
    consumed = n  # the up path takes the skips back from the deepest (n - 1) to 0
    for u, block in enumerate(unet.up_blocks):
        att = _modules(block, "attentions")
        depths = [consumed - 1 - k for k in range(len(block.resnets))]
        consumed -= len(block.resnets)
        if min(depths) > branch:
            out.append((f"up_blocks.{u}", block))
            continue
        for k, depth in enumerate(depths):
            if depth > branch:
                out.append((f"up_blocks.{u}.resnets.{k}", block.resnets[k]))
                if att:
                    out.append((f"up_blocks.{u}.attentions.{k}", att[k]))
    return out


def nonuniform_steps(m: int, full: int, center: float, power: float) -> list[int]:
    """``full`` step indices in [0, m), 0 first, denser around ``center`` (a step index): the paper's
    Eq. 7-8 with a real signed root; the power is lowered by 0.02 until the indices are distinct."""
    import numpy as np

    full = max(1, min(full, m))
    p = power
    while p > 1.0:
        lo, hi = -(center ** (1 / p)), (m - center) ** (1 / p)
        ls = np.linspace(lo, hi, full + 1)[:-1]
        idx = sorted({int(np.floor(np.sign(v) * abs(v) ** p + center + 1e-9)) for v in ls})
        if len(idx) == full and idx[0] == 0 and idx[-1] < m:
            return idx
        p -= 0.02
    return list(np.linspace(0, m, full, endpoint=False).astype(int))  # p = 1: uniform spacing


class _State:
    """What the hooks share with the rule during one evaluation."""

    def __init__(self) -> None:
        self.mode: str | None = None  # None: pass through; "full": run and keep; "cached": return kept
        self.kept: dict[str, Any] = {}
        #: the outputs of the full evaluation before the latest (same rows), for a forecast
        self.previous: dict[str, Any] = {}
        #: forecast weight w: kept + w (kept - previous); None: reuse the kept output as it is
        self.weight: float | None = None
        self.index: Tensor | None = None  # rows of the kept outputs for this call (None: as kept)

    def recall(self, name: str) -> Any:
        out = self.kept[name]
        if self.weight is not None and name in self.previous:
            out = _forecast(out, self.previous[name], self.weight)
        return out if self.index is None else _take(out, self.index)


def _forecast(value: Any, previous: Any, w: float) -> Any:
    """value + w (value - previous) over tensors in nested tuples / lists / dicts (others as they are)."""
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == previous.shape:
        return value + w * (value - previous)
    if isinstance(value, (tuple, list)):
        items = [_forecast(v, p, w) for v, p in zip(value, previous, strict=True)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _forecast(v, previous[k], w) for k, v in value.items()}
    return value


def _take(value: Any, index: Tensor) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim else value
    if isinstance(value, tuple):
        return type(value)(*(_take(v, index) for v in value)) if hasattr(value, "_fields") else tuple(
            _take(v, index) for v in value
        )
    if isinstance(value, list):
        return [_take(v, index) for v in value]
    if isinstance(value, dict):
        return {k: _take(v, index) for k, v in value.items()}
    return value


def _hook(state: _State, name: str) -> Any:
    from diffusers.hooks import ModelHook

    class DeepCacheHook(ModelHook):
        """Run and keep the output (full step), or return the kept one without running (cached step)."""

        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            if state.mode == "cached":
                return state.recall(name)
            out = self.fn_ref.original_forward(*args, **kwargs)
            if state.mode == "full":
                state.kept[name] = out
            return out

    return DeepCacheHook()


@register_rule
class DeepCache(Accelerator):
    name = "deepcache"
    stateful = True
    layer = 0
    exclusive = "a feature cache"
    summary = "DeepCache (Ma et al. 2024): reuse the UNet's deep features on cached steps (1:N, branch)"
    cost = "1 eval on full steps; the measured FLOP share of the shallow path on cached steps (approximate)"
    options = {
        "interval": Option(3, "N of 1:N: a full evaluation every N steps (1: no reuse)", kind=int, lo=1,
                           hi=1000, aliases=("cache_interval",)),
        "branch": Option(0, "skip branch whose deeper features are cached (0: conv_in's, the shallowest)",
                         kind=int, lo=0, hi=1000, aliases=("cache_branch_id",)),
        "schedule": Option("uniform", "which steps are full: uniform (every N-th), nonuniform "
                           "(the paper's, denser around center) or budget (the same number, placed by "
                           "dynamic programming on the model's calibrated feature changes)", kind=str,
                           choices=SCHEDULES, aliases=("skip_mode",)),
        "full": Option(0, "budget / nonuniform: how many steps in [start, stop) run in full (0: as many "
                       "as 1:interval gives)", kind=int, lo=0, hi=100000),
        "calibration": Option("", "budget: a cache calibration file (default: the one saved for the "
                              "model by velodiff calibrate cache)", kind=str),
        "center": Option(0.3, "nonuniform: where full steps are densest, as a fraction of the steps",
                         lo=0.0, hi=1.0),
        "power": Option(1.4, "nonuniform: the power p of the spacing (> 1; larger: denser at center)",
                        lo=1.0, hi=10.0, aliases=("pow",)),
        "start": Option(0.0, "fraction of the steps before which every step is full", lo=0.0, hi=1.0),
        "stop": Option(1.0, "fraction of the steps from which every step is full", lo=0.0, hi=1.0),
        "lower_order": Option(False, "report cached evaluations as approximate (multistep solvers lower "
                              "their order; off: keep it, nearer the plain run here)", kind=bool),
        "order": Option(0, "0: reuse the deep features (DeepCache); 1: forecast them linearly from the "
                        "last two full steps (TaylorSeer's first order)", kind=int, lo=0, hi=1,
                        aliases=("max_order",)),
    }

    def check(self, run: RunInfo) -> None:
        if run.network is None:
            raise VelodiffError("plan rule 'deepcache' needs a UNet to hook; this denoiser has no network")
        nonuniform = (self.schedule == "nonuniform", "schedule=nonuniform")
        self.refuse_ignored({"center": nonuniform, "power": nonuniform,
                             "calibration": (self.schedule == "budget", "schedule=budget"),
                             "full": (self.schedule != "uniform", "schedule=budget or nonuniform")})
        if "full" in self.values and "interval" in self.values:
            raise VelodiffError("plan rule 'deepcache': give interval or full (the number of full steps), "
                                "not both")
        cached = cached_modules(run.network, self.branch)
        if self.schedule == "budget":
            from .calibration import load_cache_calibration, step_changes

            if run.model is None:
                raise VelodiffError("plan rule 'deepcache': schedule=budget needs a loaded model")
            artefact = load_cache_calibration(run.model, self.calibration or None, run.guidance)
            # the deep features the cached steps reuse: the mid block and the whole up blocks skipped
            blocks = [n for n, _ in cached if n == "mid_block" or n.count(".") == 1 and n.startswith("up_")]
            self.changes = step_changes(artefact, run.ts.tolist(), blocks or ["mid_block"])
        if not self.start <= self.stop:
            raise VelodiffError(
                f"plan rule 'deepcache': start ({self.start:g}) must not exceed stop ({self.stop:g})"
            )

    @property
    def reads_cache_calibration(self) -> bool:
        """Whether a run reads the model's cache calibration (a set made with it depends on it)."""
        return self.schedule == "budget"

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.state = _State()
        self.layout: dict[tuple[str, int], int] = {}  # (branch, image) -> row of the kept outputs
        self.full_steps = self.plan_steps(run.steps)
        #: the grid positions (see ``position``) of the latest full evaluations with the same rows
        self.full_at: list[float] = []
        self.rising = -run.ts.double().cpu().numpy()  # the grid's times negated, for position()
        self.cached_evals = 0
        #: the FLOP share of the latest cached evaluation (None before one ran)
        self.share: float | None = None
        self.hooks = HookSet("velodiff_deepcache")
        try:
            self.names = []
            for name, module in cached_modules(run.network, self.branch):
                self.hooks.add(module, _hook(self.state, name))
                self.names.append(name)
        except BaseException:
            self.hooks.remove()
            raise
        # the share depends on the other rules on the network (tome, pag): counted per plan
        self.flops = _FLOPS.setdefault(run.network, {}).setdefault(run.plan, {})

    def position(self, t: Any) -> float:
        """The position of time t on the run's grid: i at ts[i], fractional between two times."""
        import numpy as np

        return float(np.interp(-float(t), self.rising, np.arange(len(self.rising))))

    def plan_steps(self, steps: int) -> set[int]:
        """The full steps of an N-step run."""
        first, last = int(self.start * steps), int(self.stop * steps)
        m = last - first
        inside: list[int] = []
        if m > 0:
            if self.schedule == "uniform":
                inside = list(range(0, m, self.interval))
            else:
                count = self.full or math.ceil(m / self.interval)  # (both schedules keep step 0 full)
                if self.schedule == "budget":
                    from .cache_schedule import budgeted_schedule

                    chosen = budgeted_schedule(self.changes[first:last], count)
                    inside = [i for i, full in enumerate(chosen) if full]
                else:
                    inside = nonuniform_steps(m, count, self.center * m, self.power)
        return set(range(first)) | {first + i for i in inside} | set(range(last, steps))

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        import torch

        keys = [
            (b, int(i))
            for b in req.branches
            for i in (req.subsets[b].tolist() if b in req.subsets else range(req.x.shape[0]))
        ]
        full = req.step in self.full_steps or not self.layout or any(k not in self.layout for k in keys)
        st = self.state
        if full:
            before, st.kept, st.index = (st.kept, self.layout), {}, None
        else:
            rows = [self.layout[k] for k in keys]
            st.index = None if rows == list(range(len(self.layout))) else torch.tensor(rows)
            if self.order and len(self.full_at) == 2 and st.previous:
                # TaylorSeer's first-order forecast in the step index (Liu et al. 2025, Eq. 8):
                # F(s) = F(s1) + (s - s1) (F(s1) - F(s0)) / (s1 - s0), s the position of the evaluation's
                # time on the grid (a later stage of a step, Heun's at t_{i+1}, is at its own time)
                s0, s1 = self.full_at
                st.weight = (self.position(req.t) - s1) / (s1 - s0)
        cond = req.conds.get(req.branches[0])
        ehs = cond.get("encoder_hidden_states") if isinstance(cond, dict) else None
        # (the counts are kept per plan string, which names the branch)
        shape = (tuple(req.x.shape[1:]), None if ehs is None else tuple(ehs.shape[1:]))
        counts = self.flops.setdefault(shape, [None, None])
        slot = 0 if full else 1
        st.mode = "full" if full else "cached"
        try:
            if counts[slot] is None:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as fc:
                    r = inner(req)
                counts[slot] = fc.get_total_flops() / max(len(keys), 1)
            else:
                r = inner(req)
        finally:
            st.mode, st.index, st.weight = None, None, None
        if full:
            if len(st.kept) == len(self.names):
                layout = {k: i for i, k in enumerate(keys)}
                same = self.order > 0 and before[1] == layout and len(before[0]) == len(self.names)
                at = self.position(req.t)
                if same and self.full_at and self.full_at[-1] != at:
                    st.previous, self.full_at = before[0], [self.full_at[-1], at]
                elif not same:
                    st.previous, self.full_at = {}, [at]
                self.layout = layout
            else:  # a hooked module did not run (another code path): never reuse
                self.layout, st.kept, st.previous, self.full_at = {}, {}, {}, []
            return r
        self.cached_evals += 1
        share = self.share = counts[1] / counts[0] if counts[0] else 1.0
        r.cost = Cost(r.cost.nfe, r.cost.evals * share)
        r.exact = r.exact and not self.lower_order
        return r

    def end(self) -> None:
        self.hooks.remove()
        self.state.kept.clear()
        self.state.previous.clear()
        self.layout = {}
