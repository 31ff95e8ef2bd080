"""Attention hooks through diffusers' attention-processor API (``Attention.set_processor``), installed
for one run and removed at its end: perturbed self-attention (PAG's identity map) and the capture of
cross-attention maps per token per step.

A processor here wraps the module's own processor and acts only on the batch rows its rule names for
the current call (``RowState.rows``, set by the rule from ``EvalRequest.rows``); every other row goes
through the original processor unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Accelerator, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class RowState:
    """The rows of the current batched call a processor acts on (None: none, pass through)."""

    rows: slice | None = None


def attention_modules(network: Any, cross: bool, layers: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(name, module) of the network's diffusers ``Attention`` layers that are cross- (or self-)
    attention, whose name matches one of ``layers`` (regular expressions, as diffusers'
    ``pag_applied_layers``; a trailing number must match whole: 'mid' matches 'mid_block...', '1' does
    not match '...11'). Joint (text + image) attention, as in SD3 and Flux, is neither."""
    if network is None:
        return []
    from diffusers.models.attention_processor import Attention

    out = []
    for name, module in network.named_modules():
        if not isinstance(module, Attention) or getattr(module, "add_q_proj", None) is not None:
            continue
        if bool(module.is_cross_attention) != cross:
            continue
        if layers and not any(_matches(layer, name) for layer in layers):
            continue
        out.append((name, module))
    return out


def joint_attention_modules(network: Any, layers: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(name, module) of the network's joint text-image attention layers (SD3's joint blocks, Flux's
    double-stream blocks: image and text tokens attend to each other in one softmax, Esser et al. 2024's
    MM-DiT), which project the text to keys of their own (``add_k_proj``); ``layers`` as above."""
    if network is None:
        return []
    return [(name, module) for name, module in network.named_modules()
            if getattr(module, "add_k_proj", None) is not None and hasattr(module, "set_processor")
            and (not layers or any(_matches(layer, name) for layer in layers))]


def _matches(layer: str, name: str) -> bool:
    last_l, last_n = layer.split(".")[-1], name.split(".")[-1]
    fake_integral = last_l.isnumeric() and last_n.isnumeric() and last_l == last_n
    return re.search(layer, name) is not None and not fake_integral


class ProcessorSwap:
    """Install processors on modules for one run and put the originals back."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, Any]] = []

    def install(self, modules: list[tuple[str, Any]], make: Callable[[str, Any, Any], Any]) -> None:
        for name, module in modules:
            original = module.processor
            self.saved.append((module, original))
            module.set_processor(make(name, module, original))

    def restore(self) -> None:
        for module, original in reversed(self.saved):
            module.set_processor(original)
        self.saved.clear()


def _split_rows(value: Any, rows: slice, batch: int) -> tuple[Any, Any]:
    """(the other rows, the selected rows) of a per-row tensor; anything else serves both."""
    import torch
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return torch.cat([value[: rows.start], value[rows.stop :]]), value[rows]
    return value, value


def _to_tokens(attn: Any, h: Tensor, temb: Tensor | None) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
    """diffusers' processor prelude: spatial norm, (B, C, H, W) -> (B, HW, C), group norm."""
    residual = h
    if attn.spatial_norm is not None:
        h = attn.spatial_norm(h, temb)
    shape = None
    if h.ndim == 4:
        shape = tuple(h.shape)
        h = h.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    return h, residual, shape


def _from_tokens(attn: Any, h: Tensor, residual: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    """diffusers' processor epilogue: output projection, back to (B, C, H, W), residual, rescale."""
    h = attn.to_out[1](attn.to_out[0](h))
    if shape is not None:
        h = h.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        h = h + residual
    return h / attn.rescale_output_factor


class RowProcessor:
    """Base of the processors here: wraps the module's own processor, which serves every call while
    ``state.rows`` is None; otherwise ``act`` handles the call."""

    def __init__(self, original: Any, state: RowState) -> None:
        self.original, self.state = original, state

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if self.state.rows is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows = self.state.rows
        return self.act(attn, rows, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)

    def act(self, attn: Any, rows: slice, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
            attention_mask: Tensor | None, temb: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        raise NotImplementedError


class IdentitySelfAttention(RowProcessor):
    """Perturbed self-attention (Ahn et al. 2024, 'Self-Rectifying Diffusion Sampling with
    Perturbed-Attention Guidance', Sec. 3.2): on the selected rows the attention map is the identity,
    so the layer outputs its value projection, to_out(to_v(h)); the other rows use the original
    processor."""

    def act(self, attn, rows, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        import torch

        b = hidden_states.shape[0]
        h_rest, h_sel = _split_rows(hidden_states, rows, b)
        parts = [_split_rows(v, rows, b) for v in (encoder_hidden_states, attention_mask, temb)]
        tokens, residual, shape = _to_tokens(attn, h_sel, parts[2][1])
        out_sel = _from_tokens(attn, attn.to_v(tokens), residual, shape)
        if not len(h_rest):
            return out_sel
        out_rest = self.original(attn, h_rest, *(p[0] for p in parts), **kwargs)
        return torch.cat([out_rest[: rows.start], out_sel, out_rest[rows.start :]])


def explicit_attention(
    attn: Any, h: Tensor, encoder_hidden_states: Tensor | None, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """diffusers' classic ``AttnProcessor`` math with the attention map kept, for tokens ``h`` (B, N, C):
    the map (B * heads, N, T), softmax over the T keys, and the values (B * heads, T, d); self-attention
    when ``encoder_hidden_states`` is None. The output is ``attn.batch_to_head_dim(bmm(map, values))``."""
    context = h if encoder_hidden_states is None else encoder_hidden_states
    mask = attn.prepare_attention_mask(attention_mask, context.shape[1], h.shape[0])
    if attn.norm_cross and encoder_hidden_states is not None:
        context = attn.norm_encoder_hidden_states(context)
    q = attn.head_to_batch_dim(attn.to_q(h))
    k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
    return attn.get_attention_scores(q, k, mask), v


class CaptureCrossAttention(RowProcessor):
    """Cross-attention computed with an explicit attention map, handing the selected rows' maps,
    averaged over heads, (rows, HW, tokens), to ``sink``: detached, or with their graph (``detach=False``:
    layout guidance differentiates an energy of them)."""

    def __init__(
        self, original: Any, state: RowState, sink: Callable[[Tensor], None], detach: bool = True
    ) -> None:
        super().__init__(original, state)
        self.sink, self.detach = sink, detach

    def act(self, attn, rows, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        import torch

        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        h, residual, shape = _to_tokens(attn, hidden_states, temb)
        b, n, _ = h.shape
        probs, v = explicit_attention(attn, h, encoder_hidden_states, attention_mask)
        maps = probs.view(b, attn.heads, n, -1).mean(1)[rows]
        self.sink(maps.detach() if self.detach else maps)
        if isinstance(self.original, RowProcessor):  # another rule's processor (regional): it has the output
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return _from_tokens(attn, out, residual, shape)


def joint_text_attention(attn: Any, h: Tensor, context: Tensor, rotary: Any = None) -> Tensor:
    """(B, N, T): each of the N image tokens' attention over the T text tokens in a joint attention layer,
    averaged over heads: the image-to-text block of the joint softmax, renormalised over the text keys
    (the same as a softmax over the text keys alone), the queries and keys made as diffusers' processors
    make them: SD3's ``JointAttnProcessor2_0`` (image tokens first) and Flux's ``FluxAttnProcessor``
    (text first, rotary embedding ``rotary`` over the joint sequence)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    if isinstance(attn, FluxAttention):  # (B, S, heads, d)
        d = attn.head_dim
        q = attn.norm_q(attn.to_q(h).unflatten(-1, (-1, d)))
        k = attn.norm_added_k(attn.add_k_proj(context).unflatten(-1, (-1, d)))
        if rotary is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            t = context.shape[1]
            q = apply_rotary_emb(q, tuple(f[t:] for f in rotary), sequence_dim=1)
            k = apply_rotary_emb(k, tuple(f[:t] for f in rotary), sequence_dim=1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    else:  # (B, heads, S, d)
        d = attn.to_k.out_features // attn.heads
        q = attn.to_q(h).unflatten(-1, (attn.heads, d)).transpose(1, 2)
        k = attn.add_k_proj(context).unflatten(-1, (attn.heads, d)).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
    scores = (q.float() @ k.float().transpose(-1, -2)) * d**-0.5  # scaled dot product (SDPA's scale)
    return scores.softmax(-1).mean(1)


class CaptureJointAttention:
    """Wraps a joint attention layer's processor, whose output it returns untouched, handing the selected
    rows' image-to-text maps (:func:`joint_text_attention`, detached) to ``sink``."""

    def __init__(self, original: Any, state: RowState, sink: Callable[[Tensor], None]) -> None:
        self.original, self.state, self.sink = original, state, sink

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        rows = self.state.rows
        if rows is not None and encoder_hidden_states is not None:
            h, context = hidden_states[rows], encoder_hidden_states[rows]
            self.sink(joint_text_attention(attn, h, context, image_rotary_emb).detach())
        rotary = () if image_rotary_emb is None else (image_rotary_emb,)  # (Flux's processor takes it 5th)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *rotary, **kwargs)


@register_rule
class AttentionMaps(Accelerator):
    """Capture the cross-attention maps of the conditional branch per token per step: after the run,
    ``maps[i]`` is a (B, tokens, h, w) float32 CPU tensor for step i, the head- and layer-averaged
    softmax over tokens at latent resolution (each layer's map resized bilinearly); on SD3 and Flux the
    image-to-text block of their joint attention (:func:`joint_text_attention`; T: the text context's
    length). Token positions: ``LoadedModel.context_tokens``. Layout guidance and prompt-to-prompt read
    these (UNets, PixArt); ``velodiff generate --attention-maps FILE`` saves them."""

    name = "attention_maps"
    layer = 0
    exclusive = "the attention-map instrument"
    summary = "instrument: capture cross-attention maps per token per step (for layout and editing)"
    cost = "free in evaluations; the captured layers use explicit attention (slower than SDPA)"
    options = {
        "every": Option(1, "capture every k-th step", kind=int, lo=1, hi=10000),
        "layers": Option(
            (), "regular expressions of layer names (default: every cross-attention layer)", kind=tuple,
            patterns=True,
        ),
    }

    def _modules(self, run: RunInfo) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        cross = [m for m in attention_modules(run.network, True, self.layers) if m[1].norm_q is None]
        return cross, joint_attention_modules(run.network, self.layers)

    def check(self, run: RunInfo) -> None:
        if not any(self._modules(run)):
            raise VelodiffError(
                "plan rule 'attention_maps': the model has no matching cross- or joint attention layers"
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self.maps: dict[int, Tensor] = {}
        self.state, self.swap, self.pending = RowState(), ProcessorSwap(), []
        cross, joint = self._modules(run)
        sink = self.pending.append
        self.swap.install(cross, lambda name, mod, orig: CaptureCrossAttention(orig, self.state, sink))
        self.swap.install(joint, lambda name, mod, orig: CaptureJointAttention(orig, self.state, sink))

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        import torch
        if req.stage != 0 or req.step % self.every:
            return inner(req)
        self.state.rows = req.rows("cond")
        try:
            r = inner(req)
        finally:
            self.state.rows = None
        h, w = req.x.shape[-2:]
        layers: dict[tuple[int, ...], list[Tensor]] = {}  # summed per token grid, resized once (it is linear)
        for p in self.pending:
            layers.setdefault(tuple(p.shape), []).append(p)
        if self.pending:
            total = sum(_spatial(torch.stack(same).sum(0), h, w) for same in layers.values())
            self.maps[req.step] = (total / len(self.pending)).float().cpu()
        self.pending.clear()
        return r

    def end(self) -> None:
        self.swap.restore()


def attention_sheet(
    maps: dict[int, Tensor], tokens: list[tuple[int, str]], image: Any, scale: int = 1
) -> Any:
    """A PIL sheet: the image, then one heat map per prompt token (``tokens``: (map index, token), as
    ``LoadedModel.context_tokens`` gives them), each the mean over the captured steps, stretched to its
    own min..max, at the image's size, captioned with its token."""
    import torch
    from PIL import Image

    from ..images import image_grid

    mean = torch.stack([m[0] for m in maps.values()]).mean(0)  # (T, h, w), first image
    size = image.size
    cells, captions = [image], ["image"]
    for k, tok in tokens:
        if k >= mean.shape[0]:  # (past the context the network read)
            continue
        m = mean[k]
        m = ((m - m.min()) / (m.max() - m.min()).clamp_min(1e-12) * 255).round().to(torch.uint8).numpy()
        cells.append(Image.fromarray(m, mode="L").resize(size, Image.BILINEAR).convert("RGB"))
        captions.append(tok.replace("</w>", "").replace("\u2581", ""))
    return image_grid(cells, cols=min(len(cells), 8), scale=scale, captions=captions, caption_lines=1,
                      caption_height=14)


def _spatial(probs: Tensor, h: int, w: int) -> Tensor:
    """(B, N, T) maps over N = h' w' tokens of a downsampled grid -> (B, T, h, w)."""
    import torch
    b, n, t = probs.shape
    hh, ww = token_grid(n, h, w)
    grid = probs.transpose(1, 2).reshape(b, t, hh, ww).float()
    if (hh, ww) == (h, w):
        return grid
    return torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)


def token_grid(n: int, h: int, w: int) -> tuple[int, int]:
    """The (h', w') grid of a layer's n tokens, downsampled from the latent's h x w: halved with
    rounding up until it holds n tokens, as a UNet's (and a DiT's 2x2 patches) downsample it (9 x 25
    -> 5 x 13 -> 3 x 7: the aspect alone gave 3 x 8 there); else the aspect's nearest grid."""
    hh, ww = h, w
    while hh * ww > n:
        hh, ww = -(-hh // 2), -(-ww // 2)
    if hh * ww == n:
        return hh, ww
    f = math.sqrt(h * w / n)
    return round(h / f), round(w / f)
