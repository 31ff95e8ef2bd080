"""Regional prompting: each region of the image under its own prompt, the whole prompt as the base.

Two ways to fuse the regions, weighted per position by the region masks W_i (a region's weight is
1 - ``base_ratio`` inside it, 0 outside) and the base W_bg = max(0, 1 - sum_i W_i):

``mode=attention`` (Regional Prompter's attention mode, hako-mikan's sd-webui-regional-prompter; the
diffusers community pipeline ``regional_prompting_stable_diffusion``): in the chosen cross-attention
layers the conditional rows attend to every region's prompt and to the whole prompt, and the layer's
outputs are fused per query position,

    out = (W_bg out_base + sum_i W_i out_i) / (W_bg + sum_i W_i)

(exact for the whole layer: its output projection is affine and the weights sum to 1). One network
call per step as without the rule; the extra cost is a cross-attention per region in those layers.

``mode=latent`` (Bar-Tal et al. 2023, 'MultiDiffusion: Fusing Diffusion Paths for Controlled Image
Generation', region-based generation, Sec. 3.2 and 4.2): each region's prompt is a branch of the
batched call and the predictions are fused per latent pixel, the closed form of the MultiDiffusion
step (Eq. 5), x0_c' = (W_bg x0_c + sum_i W_i x0_i) / (W_bg + sum_i W_i); with classifier-free guidance
the fused prediction takes the conditional one's place, x0 = x0_u + w (x0_c' - x0_u) (MultiDiffusion's
guided paths with one shared unconditional pass). Bootstrapping (Sec. 4.2): for the first
``bootstrap`` share of the steps each region's prompt sees, outside its region, a constant random-colour
image noised to the current level instead of the sample, so its object forms inside.

Regions come from ``regions`` (Python: region prompt -> (x0, y0, x1, y1) in [0, 1], y down, for every
image; the CLI's ``--regions``) or from the prompt's spatial words: "A above B", "A to the left of B",
... give the prompts "A" and "B" their halves of the image (velodiff.edit.layout). Images whose prompt
has no relation are sampled exactly as without the rule.

The defaults (attention mode, base ratio 0.4, the finest-resolution cross-attention layers) were chosen
on the shipped model's ShapesEval position prompts at seeds the reported figures do not use
(bench/edit/README.md): a single-object prompt alone in a region tends to take the other region's object
as its one object and erase its own, which the base prompt's share and the coarse layers' global view
prevent.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..accel.attention import ProcessorSwap, RowProcessor, RowState, attention_modules, token_grid
from ..errors import VelodiffError
from ..guidance.cfg import STOP, TERM
from ..plan import Accelerator, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule
from .layout import (
    Box,
    check_covers,
    check_region_box,
    named_regions,
    parse_boxes,
    region_mask,
    spatial_parts,
)

if TYPE_CHECKING:
    from torch import Tensor

#: how many constant-colour backgrounds bootstrapping draws from (MultiDiffusion: a fixed set)
N_COLOURS = 8


def parse_regions(text: str) -> dict[str, Box]:
    """'a red circle: 0,0,0.5,1; a blue square: 0.5,0,1,1' -> {region prompt: box}; a mask image's path
    in place of the numbers is a mask (white = the region)."""
    return parse_boxes(text, "region", "prompt: x0,y0,x1,y1", masks=True)


def finest_layers(network: Any) -> tuple[str, ...]:
    """Names of a UNet's cross-attention layers at the finest resolution any of them has (down block
    i and up block n-1-i share a resolution; the mid block is the coarsest); every cross-attention layer
    of a network without down and up blocks."""
    mods = [name for name, _ in attention_modules(network, True)]
    n = len(getattr(network, "down_blocks", ()))

    def level(name: str) -> int:
        m = re.match(r"(down|up)_blocks\.(\d+)\.", name)
        if m is None:
            return n  # mid block
        return int(m.group(2)) if m.group(1) == "down" else n - 1 - int(m.group(2))

    if not n:
        return tuple(mods)
    finest = min(level(name) for name in mods)
    return tuple(name for name in mods if level(name) == finest)


class RegionState(RowState):
    """What the processors read for the current call: the regions' contexts (B, T, D) and weights
    (B, 1, h, w) at latent resolution, zero for the images without that region."""

    contexts: tuple[Tensor, ...] = ()
    weights: tuple[Tensor, ...] = ()


class RegionalCrossAttention(RowProcessor):
    """Cross-attention whose selected rows fuse the base output with each region's (module
    docstring); every other row, and the base itself, come from the module's own processor."""

    def act(self, attn, rows, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        import torch.nn.functional as F

        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        sel, t = hidden_states[rows], None if temb is None else temb[rows]
        base, fused, total = out[rows], 0.0, 0.0
        for context, weight in zip(self.state.contexts, self.state.weights, strict=True):
            if out.ndim == 3:  # (B, N, C) tokens of an h' x w' grid with the latent's aspect
                grid = token_grid(out.shape[1], *weight.shape[-2:])
                weight = F.interpolate(weight, size=grid, mode="nearest").flatten(2).transpose(1, 2)
            else:
                weight = F.interpolate(weight, size=out.shape[-2:], mode="nearest")
            region = self.original(attn, sel, context.to(sel), None, t, **kwargs)
            fused, total = fused + weight * region, total + weight
        background = (1 - total).clamp_min(0)
        out = out.clone()
        out[rows] = (background * base + fused) / (background + total)
        return out


@register_rule
class RegionalPrompting(Accelerator):
    """Regional prompting (module docstring); ``regions`` (Python only): region prompt -> box or mask (a
    2-D array, values >= 0.5 the region), for every image."""

    name = "regional"
    layer = TERM
    summary = "regional prompting: each region its own prompt (Regional Prompter attention / MultiDiffusion)"
    cost = "attention: a cross-attention per region in the chosen layers; latent: +1 eval per region"
    options = {
        "mode": Option("attention", "fuse cross-attention outputs (attention) or predictions (latent, "
                       "MultiDiffusion)", kind=str, choices=("attention", "latent")),
        "base_ratio": Option(0.4, "the whole prompt's share inside a region (Regional Prompter's base ratio)",
                             lo=0, hi=1),
        "layers": Option(("finest",), "attention mode: regular expressions of the cross-attention layers, "
                         "or 'finest' (those at the finest resolution)", kind=tuple, patterns=True),
        "stop": STOP,
        "bootstrap": Option(0.2, "latent mode: share of the steps with bootstrapping (MultiDiffusion: 0.2)",
                            lo=0, hi=1),
        "scale": Option(None, "latent mode: guidance scale w of the fusion (default: the run's --guidance)",
                        lo=0.0),
    }

    @property
    def exclusive(self) -> str:  # type: ignore[override]
        """attention mode fuses cross-attention outputs: one rule of that kind (p2p and layout compute
        theirs themselves, so regional's would be bypassed or edited)."""
        return "cross-attention processors" if self.mode == "attention" else ""

    def __init__(self, regions: dict[str, Box] | None = None, **values: Any) -> None:
        super().__init__(**values)
        self.regions = named_regions(regions or {}, "regions")
        for text, box in self.regions.items():
            if not text.strip():
                raise VelodiffError("a region's prompt is empty; write 'a red circle: 0,0,0.5,1'")
            check_region_box(text, box, "region")

    def check(self, run: RunInfo) -> None:
        if run.model is None or run.encode is None or not run.prompts:
            raise VelodiffError("plan rule 'regional' needs a pipeline run (text2img) with its prompts")
        if self.mode == "attention" and not self.layer_names(run.network):
            raise VelodiffError(
                "plan rule 'regional': the model has no matching cross-attention layers (use mode=latent)"
            )

    def layer_names(self, network: Any) -> tuple[str, ...]:
        if self.layers == ("finest",):
            return finest_layers(network)
        return tuple(name for name, _ in attention_modules(network, True, self.layers))

    def begin(self, run: RunInfo) -> None:
        import torch

        super().begin(run)
        prompts = (list(run.prompts) * (run.batch // max(1, len(run.prompts))))[: run.batch]
        per_image = [list(self.regions.items()) or spatial_parts(p) for p in prompts]
        self.w = float(self.scale if self.scale is not None else (run.guidance or 1.0))
        self.last = int(self.stop * run.steps)
        # region k: the images with at least k + 1 regions (the others' rows repeat the whole prompt)
        self.branches: list[tuple[Any, Tensor, list[Box]]] = []
        for k in range(max((len(r) for r in per_image), default=0)):
            rows = [b for b, r in enumerate(per_image) if len(r) > k]
            texts = [r[k][0] if len(r) > k else prompts[b] for b, r in enumerate(per_image)]
            self.branches.append((run.encode(texts), torch.tensor(rows), [per_image[b][k][1] for b in rows]))
        self.colours: Tensor | None = None
        self.cached: list[Tensor] | None = None
        self.state, self.swap = RegionState(), ProcessorSwap()
        if self.mode == "attention" and self.branches:
            names = set(self.layer_names(run.network))
            mods = [m for m in attention_modules(run.network, True) if m[0] in names]
            self.swap.install(mods, lambda name, mod, orig: RegionalCrossAttention(orig, self.state))
            self.state.contexts = tuple(cond["encoder_hidden_states"] for cond, _, _ in self.branches)

    def weights(self, x: Tensor) -> list[Tensor]:
        """Per region: its weight (1 - base_ratio inside, 0 outside), (B, 1, h, w) on x's grid (made
        once per run)."""
        if self.cached is None or self.cached[0].shape != (x.shape[0], 1, *x.shape[-2:]):
            h, w = x.shape[-2:]
            for text, box in self.regions.items():
                check_covers("regional", text, box, h, w)
            self.cached = []
            for _, rows, boxes in self.branches:
                weight = x.new_zeros(x.shape[0], 1, h, w)
                for b, box in zip(rows.tolist(), boxes, strict=True):
                    weight[b, 0] = (1 - self.base_ratio) * region_mask(box, h, w)
                self.cached.append(weight)
        return self.cached

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        if not self.branches or req.step >= self.last:
            return inner(req)
        weights = self.weights(req.x)
        if self.mode == "attention":
            self.state.weights, self.state.rows = tuple(weights), req.rows("cond")
            try:
                return inner(req)
            finally:
                self.state.rows = None
        booting = req.step < int(self.bootstrap * self.run.steps)
        for k, (cond, rows, _) in enumerate(self.branches):
            x = self.bootstrapped(req, k, weights[k] > 0) if booting else None
            req = req.with_branch(f"region{k}", cond, rows, x)
        r = inner(req)
        c = r.parts["cond"]
        fused, total = c.new_zeros(c.shape), c.new_zeros(weights[0].shape)
        for k, (_, rows, _) in enumerate(self.branches):
            rows = rows.to(c.device)
            fused[rows] += weights[k][rows] * r.parts[f"region{k}"]
            total += weights[k]
        background = (1 - total).clamp_min(0)
        fused = (background * c + fused) / (background + total)  # MultiDiffusion, Eq. 5
        w = self.w if "uncond" in r.parts else 1.0  # guided where the CFG rule ran
        r.x0 = r.x0 + w * (fused - c)
        return r

    def bootstrapped(self, req: EvalRequest, k: int, inside: Tensor) -> Tensor:
        """Region k's input while bootstrapping: the sample inside the region, a noised constant-colour
        image outside (MultiDiffusion, Sec. 4.2); colours and noise fixed by the step and region."""
        import torch

        from ..denoisers import broadcast_time

        x = req.x
        if self.colours is None:
            g = torch.Generator().manual_seed(0)
            size = [n * self.run.model.vae_scale_factor for n in x.shape[-2:]]
            colour = torch.rand(N_COLOURS, 3, 1, 1, generator=g).expand(-1, -1, *size)
            self.colours = self.run.model.encode(colour).to(x)
        g = torch.Generator().manual_seed(1000 * req.step + k)
        background = self.colours[torch.randint(N_COLOURS, (x.shape[0],), generator=g)]
        eps = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x)
        t = broadcast_time(req.t, x)
        noised = self.run.schedule.alpha(t).to(x) * background + self.run.schedule.sigma(t).to(x) * eps
        inside = inside.to(x)
        return inside * x + (1 - inside) * noised

    def end(self) -> None:
        self.swap.restore()
