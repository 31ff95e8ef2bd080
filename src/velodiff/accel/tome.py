"""Token Merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion") as
the plan rule ``tome``, on a UNet's self-attention through diffusers' attention-processor API.

In every transformer block whose latent resolution is at most ``max_downsample`` times below the
latent's, the tokens entering self-attention are merged before it and unmerged after (tomesd's default,
``merge_attn``; cross-attention and the MLP see all tokens):

* bipartite soft matching with a 2D random stride (the paper's Sec. 3-4): the h x w token grid is cut
  into ``sx`` x ``sy`` windows; one token per window (random with ``use_rand``, else the first) is a
  destination, the rest are sources;
* each source is matched to its most similar destination by the cosine similarity of the block's input
  tokens; the r = ``ratio`` * N sources with the highest similarity are merged into their destinations
  (averaged), the others kept;
* self-attention runs on the N - r tokens; its output is unmerged: every merged source takes its
  destination's output.

The random destinations come from a generator seeded by ``seed`` at the start of every run (tomesd draws
from a process-wide one), one draw per call shared by every row, so a run is a pure function of its
inputs and an image is the same alone or batched with others (cond and uncond of a CFG pair merge alike).
tomesd takes the first token of each window for an odd batch instead (to keep a CFG pair alike, which the
shared draw does anyway); velodiff does not: there an image at guidance 1 changed with its batch. The rule
installs its processor on each block's ``attn1`` (``Attention.set_processor``, wrapping the one there)
and a diffusers hook that reads the block's input, and restores both at the end of the run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Accelerator, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .hooks import HookSet

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: merge, unmerge: (B, N, C) -> (B, N - r, C) and back
Merge = tuple[Any, Any]


def bipartite_soft_matching_2d(
    metric: Tensor, h: int, w: int, sx: int, sy: int, r: int, generator: torch.Generator | None
) -> Merge:
    """ToMe's bipartite soft matching with a 2D (random) stride; ``metric`` (B, h*w, C) gives the
    similarities. ``generator`` None: the first token of each window is its destination."""
    import torch

    b, n, _ = metric.shape
    if r <= 0:
        return _identity, _identity
    gy, gx = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(gy, gx, 1, dtype=torch.int64)
    else:
        pick = torch.randint(sy * sx, (gy, gx, 1), generator=generator)
    # -1 marks each window's destination, 0 the sources; tokens outside whole windows are sources
    window = torch.zeros(gy, gx, sy * sx, dtype=torch.int64).scatter_(2, pick, -1)
    grid = window.view(gy, gx, sy, sx).transpose(1, 2).reshape(gy * sy, gx * sx)
    if gy * sy < h or gx * sx < w:
        grid = torch.nn.functional.pad(grid, (0, w - gx * sx, 0, h - gy * sy))
    order = grid.reshape(1, n, 1).argsort(dim=1).to(metric.device)  # destinations first
    n_dst = gy * gx
    dst_pos, src_pos = order[:, :n_dst], order[:, n_dst:]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    src = unit.gather(1, src_pos.expand(b, -1, unit.shape[-1]))
    dst = unit.gather(1, dst_pos.expand(b, -1, unit.shape[-1]))
    r = min(src.shape[1], r)
    best, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)  # each source's closest destination
    ranked = best.argsort(dim=-1, descending=True)[..., None]
    kept, merged = ranked[:, r:], ranked[:, :r]  # sources kept, sources merged
    into = best_dst[..., None].gather(1, merged)  # the destination each merged source joins

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        xs = x.gather(1, src_pos.expand(b, -1, c))
        xd = x.gather(1, dst_pos.expand(b, -1, c))
        keep = xs.gather(1, kept.expand(-1, -1, c))
        xd = xd.scatter_reduce(1, into.expand(-1, -1, c), xs.gather(1, merged.expand(-1, -1, c)), "mean")
        return torch.cat([keep, xd], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        c = y.shape[-1]
        keep, yd = y[:, : kept.shape[1]], y[:, kept.shape[1] :]
        out = torch.zeros(b, n, c, device=y.device, dtype=y.dtype)
        out.scatter_(1, dst_pos.expand(b, -1, c), yd)
        out.scatter_(1, src_pos.expand(b, -1, 1).gather(1, kept).expand(-1, -1, c), keep)
        from_dst = yd.gather(1, into.expand(-1, -1, c))
        out.scatter_(1, src_pos.expand(b, -1, 1).gather(1, merged).expand(-1, -1, c), from_dst)
        return out

    return merge, unmerge


def _identity(x: Tensor) -> Tensor:
    return x


class _State:
    """What the rule shares with its hooks and processors during a run."""

    def __init__(self) -> None:
        self.size: tuple[int, int] = (0, 0)  # the latent's (height, width) of the current evaluation
        self.block_input: Tensor | None = None
        self.generator: torch.Generator | None = None
        self.merged_calls = 0


class ToMeProcessor:
    """Self-attention on merged tokens, around the processor that was there."""

    def __init__(self, rule: ToMe, inner: Any) -> None:
        self.rule, self.inner = rule, inner

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        rule, st = self.rule, self.rule.state
        metric = st.block_input
        n = hidden_states.shape[1]
        big_h, big_w = st.size
        if encoder_hidden_states is not None or metric is None or hidden_states.ndim != 3 or not big_h:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        down = int(math.ceil(math.sqrt(big_h * big_w // n)))
        h, w = int(math.ceil(big_h / down)), int(math.ceil(big_w / down))
        if down > rule.max_downsample or h * w != n:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        gen = st.generator if rule.use_rand else None
        merge, unmerge = bipartite_soft_matching_2d(metric, h, w, rule.sx, rule.sy, int(n * rule.ratio), gen)
        st.merged_calls += 1
        return unmerge(self.inner(attn, merge(hidden_states), None, *args, **kwargs))


def self_attention_blocks(unet: Any) -> list[Any]:
    """The UNet's transformer blocks with a self-attention ``attn1`` (diffusers' BasicTransformerBlock)."""
    return [m for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "norm1") and m.attn1 is not None]


def attention_downsamples(unet: Any) -> set[int]:
    """How far below the latent's resolution each level with attention runs (1, 2, 4, ...)."""
    kinds = list(unet.config.get("down_block_types") or [])
    levels = {2**i for i, kind in enumerate(kinds) if "Attn" in kind}
    if "Attn" in str(unet.config.get("mid_block_type") or "") and kinds:
        levels.add(2 ** (len(kinds) - 1))
    return levels


@register_rule
class ToMe(Accelerator):
    name = "tome"
    layer = 0
    # its processors reorder tokens per image: prompt-to-prompt's copied self-attention maps would not align
    exclusive = ("token merging", "attention processors")
    summary = "Token Merging for SD (Bolya & Hoffman 2023): self-attention on merged tokens"
    cost = "same evaluations; self-attention on (1 - ratio) of the tokens where it applies"
    options = {
        "ratio": Option(0.5, "fraction of the tokens merged away (tomesd's ratio)", lo=0.0, hi=0.99),
        "max_downsample": Option(
            1,
            "merge in blocks at most this far below the latent's resolution (1, 2, 4 or 8; tomesd's)",
            kind=int,
            lo=1,
            hi=8,
        ),
        "sx": Option(2, "stride of the destination windows along x", kind=int, lo=1, hi=16),
        "sy": Option(2, "stride of the destination windows along y", kind=int, lo=1, hi=16),
        "use_rand": Option(True, "a random destination per window (else the first)", kind=bool),
        "seed": Option(0, "seed of the random destinations, drawn anew every run", kind=int, lo=0),
    }

    def check(self, run: RunInfo) -> None:
        if run.network is None or not hasattr(run.network, "up_blocks"):
            what = type(run.network).__name__ if run.network is not None else "no network"
            raise VelodiffError(
                f"plan rule 'tome' is for UNets with self-attention blocks; this model has {what}"
            )
        if not self_attention_blocks(run.network):
            raise VelodiffError("plan rule 'tome': this UNet has no self-attention blocks to merge tokens in")
        self.refuse_ignored({"seed": (self.use_rand, "use_rand=true")})
        if self.max_downsample not in (1, 2, 4, 8):  # a UNet's levels halve: 3 would mean 2 at some sizes
            raise VelodiffError(
                f"plan rule 'tome' option 'max_downsample' is 1, 2, 4 or 8, got {self.max_downsample}"
            )
        levels = attention_downsamples(run.network)
        if levels and min(levels) > self.max_downsample:
            raise VelodiffError(
                f"plan rule 'tome' merges nothing on this UNet: its self-attention runs at "
                f"{', '.join(f'1/{d}' for d in sorted(levels))} of the latent's resolution; "
                f"set max_downsample={min(levels)} or more"
            )

    def begin(self, run: RunInfo) -> None:
        import torch

        super().begin(run)
        self.state = _State()
        self.state.generator = torch.Generator().manual_seed(int(self.seed))
        self.hooks = HookSet("velodiff_tome")
        self.restore: list[tuple[Any, Any]] = []
        try:
            for block in self_attention_blocks(run.network):
                self.hooks.add(block, _input_hook(self.state))
                inner = block.attn1.get_processor()
                self.restore.append((block.attn1, inner))
                block.attn1.set_processor(ToMeProcessor(self, inner))
        except BaseException:
            self.end()
            raise

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        size = (int(req.x.shape[-2]), int(req.x.shape[-1]))
        if size != self.state.size:
            self.check_size(size)
        self.state.size = size
        return inner(req)

    def check_size(self, size: tuple[int, int]) -> None:
        """Refuse a ratio > 0 that merges no token at this latent size (r = int(ratio * N) is 0 at every
        level); ratio=0 is the plain run on purpose."""
        levels = [d for d in attention_downsamples(self.run.network) if d <= self.max_downsample] or [1]
        n = math.ceil(size[0] / min(levels)) * math.ceil(size[1] / min(levels))
        if self.ratio > 0 and int(n * self.ratio) < 1:
            raise VelodiffError(
                f"plan rule 'tome' merges nothing here: ratio={self.ratio:g} of the {n} tokens of this "
                f"{size[0]}x{size[1]} latent is less than one token; use ratio >= {1 / n:.3g}"
            )

    def end(self) -> None:
        for attn, processor in reversed(getattr(self, "restore", [])):
            attn.set_processor(processor)
        self.restore = []
        if getattr(self, "hooks", None) is not None:
            self.hooks.remove()
        if getattr(self, "state", None) is not None:
            self.state.block_input = None


def _input_hook(state: _State) -> Any:
    from diffusers.hooks import ModelHook

    class BlockInput(ModelHook):
        """Keep the block's input tokens: the similarity metric of its merge (tomesd's)."""

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            state.block_input = args[0] if args else kwargs.get("hidden_states")
            return args, kwargs

    return BlockInput()
