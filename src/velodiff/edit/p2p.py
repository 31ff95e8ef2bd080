"""Prompt-to-prompt (Hertz et al. 2022, 'Prompt-to-Prompt Image Editing with Cross-Attention Control'):
edit an image by its prompt while keeping its layout, by injecting the source prompt's attention maps into
the edited prompts' pass, from the same starting noise (drawn, or an inversion's).

The run's images are the source prompt (row 0 of the batch) and the edited prompts (rows 1..). In every
cross-attention layer, on the conditional branch, for the first ``cross_steps`` share of the steps, each
edited row's attention map (softmax over tokens, per head) is replaced (Sec. 3.2):

* ``replace`` (word swap): M*_t := M_t, the source's maps token for token (the prompts must tokenize to
  the same length);
* ``refine`` (adding a phrase): M*_t := (M_t)_{j(i)} for every target token i aligned to a source token
  j(i), and the edited row's own map for the new tokens (the alignment of the token sequences);
* ``words`` / ``weight`` (attention re-weighting, on top of either): the maps of the named words of the
  edited prompts scaled by ``weight`` (the paper's c in [-2, 2]).

Self-attention maps of the edited rows are the source's for the first ``self_steps`` share of the steps,
as the reference code does (``self_replace_steps``, on layers of at most 32x32 tokens). The unconditional
branch is left alone (the reference code edits the conditional half of the batch only). The layers run
explicit attention (diffusers' classic AttnProcessor math) through ``Attention.set_processor`` for the run
and get their processors back at its end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..accel.attention import (
    ProcessorSwap,
    RowProcessor,
    _from_tokens,
    _to_tokens,
    attention_modules,
    explicit_attention,
)
from ..errors import VelodiffError
from ..plan import Accelerator, EvalRequest, EvalResult, Evaluate, Option, RunInfo, register_rule

if TYPE_CHECKING:
    from torch import Tensor

MODES = ("auto", "replace", "refine")
#: the reference code replaces self-attention on layers of at most this many tokens (32 x 32)
SELF_MAX_TOKENS = 32 * 32


@dataclass
class EditState:
    rows: slice | None = None
    #: the row groups (source first, then the edits) edited in this call: the conditional branch's, and
    #: the unconditional branch's too with ``uncond``
    groups: tuple[slice, ...] = ()
    #: collect the conditional rows' cross-attention maps (the local blend's mask)
    collect: bool = False
    cross: bool = False
    self_attn: bool = False


def token_ids(run: RunInfo, prompt: str) -> list[int]:
    """The prompt's token ids as the text encoder reads them (start and end tokens included)."""
    model = run.model
    key = getattr(model, "context_tokenizer", "tokenizer")
    tok = getattr(model, "components", {}).get(key) if model is not None else None
    if tok is None:
        raise VelodiffError("plan rule 'p2p' needs a model with a CLIP tokenizer (Stable Diffusion family)")
    return list(tok(prompt, truncation=True, max_length=tok.model_max_length)["input_ids"])


#: a prompt's pieces as CLIP's tokenizer splits them before BPE (its pattern: contractions, runs of
#: letters, single digits, runs of anything else but spaces)
PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+")


def word_positions(
    run: RunInfo, prompt: str, word: str, rule: str = "p2p", required: bool = True
) -> list[int]:
    """Token positions of ``word`` in ``prompt`` (every token of every occurrence; punctuation is its own
    token, as the tokenizer has it), or one line if it is absent (``required=False``: none)."""
    tok = run.model.components[run.model.context_tokenizer]
    pieces, target = PIECES.findall(prompt.lower()), PIECES.findall(word.lower())
    starts = [run.model.context_offset()]  # after CLIP's start token; T5 has none
    for piece in pieces:
        starts.append(starts[-1] + len(tok(piece, add_special_tokens=False)["input_ids"]))
    n = len(target)
    out = [q for i in range(len(pieces) - n + 1) if n and pieces[i : i + n] == target
           for q in range(starts[i], starts[i + n])]
    if not out and required:
        raise VelodiffError(f"plan rule {rule!r}: the word {word!r} is not in the prompt {prompt!r}")
    end = len(token_ids(run, prompt)) - 1  # the end token's position: words past it were truncated
    return [q for q in out if q < end]


def alignment(src: list[int], tgt: list[int], length: int, mode: str) -> tuple[list[int], list[float]]:
    """For each target position i < length: the source position its map comes from and alpha (1: the
    source's map, 0: the row's own). Padding after the end token aligns end to end."""
    import difflib

    if mode == "replace":
        if len(src) != len(tgt):
            raise VelodiffError(
                f"plan rule 'p2p': mode replace needs prompts of the same token length ({len(src) - 2} and "
                f"{len(tgt) - 2} tokens); use mode=refine"
            )
        return list(range(length)), [1.0] * length
    index, alpha = list(range(length)), [0.0] * length
    for a, b, n in difflib.SequenceMatcher(None, src, tgt, autojunk=False).get_matching_blocks():
        for k in range(n):
            index[b + k], alpha[b + k] = a + k, 1.0
    for i in range(len(tgt), length):  # padding: the end token's repeats
        index[i], alpha[i] = min(length - 1, i - len(tgt) + len(src)), 1.0
    return index, alpha


class EditAttention(RowProcessor):
    """Explicit attention whose maps on the edited rows are overwritten from the source row (row 0 of
    the selected rows) as the rule's state says for this call."""

    def __init__(self, original: Any, state: EditState, rule: PromptToPrompt, cross: bool) -> None:
        super().__init__(original, state)
        self.rule, self.cross = rule, cross

    def act(self, attn, rows, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        import torch

        st = self.state
        edit = st.cross if self.cross else st.self_attn
        collect = self.cross and st.collect
        if not (edit or collect):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        h, residual, shape = _to_tokens(attn, hidden_states, temb)
        b, n, _ = h.shape
        if not self.cross and n > SELF_MAX_TOKENS:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        probs, v = explicit_attention(attn, h, encoder_hidden_states, attention_mask)  # (B * heads, N, T)
        p = probs.view(b, attn.heads, n, -1).clone()
        if collect:  # the conditional rows' maps, heads averaged, for the local blend
            self.rule.blend_maps.append(p[st.groups[0]].mean(1).detach())
        for sl in self.state.groups if edit else ():
            src = p[sl.start]
            for r in range(sl.start + 1, sl.stop):
                p[r] = self.rule.edited(src, p[r], r - sl.start, self.cross)
        out = attn.batch_to_head_dim(torch.bmm(p.view(b * attn.heads, n, -1).to(v.dtype), v))
        return _from_tokens(attn, out, residual, shape)


@register_rule
class PromptToPrompt(Accelerator):
    """Prompt-to-prompt editing: the batch is the source prompt then the edited prompts, from one noise."""

    name = "p2p"
    layer = 0
    exclusive = ("attention processors", "cross-attention processors")
    summary = "prompt-to-prompt (Hertz et al. 2022): edit by prompt, the source's attention maps injected"
    cost = "free in evaluations; the hooked layers use explicit attention"
    options = {
        "mode": Option("auto", "replace (word swap), refine (added words) or auto", kind=str, choices=MODES),
        "cross_steps": Option(0.8, "share of the steps with the source's cross-attention maps", lo=0, hi=1,
                              aliases=("cross_replace_steps",)),  # the reference code's names
        "self_steps": Option(0.4, "share of the steps with the source's self-attention maps", lo=0, hi=1,
                             aliases=("self_replace_steps",)),
        "words": Option((), "words of the edited prompts whose attention is re-weighted (word=c: its own "
                        "factor)", kind=tuple),
        "weight": Option(1.0, "the re-weighting factor c of the words without their own", lo=-10, hi=10),
        "uncond": Option(
            False, "edit the unconditional branch's maps too (the reference code: no)", kind=bool
        ),
        "blend": Option(
            (), "local blend: words whose attention bounds the edit (outside: the source)", kind=tuple
        ),
        "threshold": Option(0.3, "local blend: the share of a map's maximum inside the region", lo=0, hi=1),
    }

    def check(self, run: RunInfo) -> None:
        if not attention_modules(run.network, True):
            raise VelodiffError("plan rule 'p2p': the model has no plain cross-attention layers (SD family)")
        for w in self.words:
            word, _, factor = w.partition("=")
            if factor:
                _factor(w, factor)
        if run.batch < 2 or len(run.prompts) != run.batch:
            raise VelodiffError(
                "plan rule 'p2p' needs a batch of the source prompt then the edited prompts, one image each"
            )
        self._plan(run)

    def _plan(self, run: RunInfo) -> None:
        import torch

        src = token_ids(run, run.prompts[0])
        length = int(run.model.components["tokenizer"].model_max_length)
        self.index, self.alpha, self.scale = [], [], []
        device = getattr(run.model, "device", None)  # where the attention runs: no copy per call there
        for prompt in run.prompts[1:]:
            tgt = token_ids(run, prompt)
            mode = self.mode if self.mode != "auto" else ("replace" if len(tgt) == len(src) else "refine")
            index, alpha = alignment(src, tgt, length, mode)
            scale = torch.ones(length)
            for w in self.words:  # "word" at the rule's weight, or "word=c" at its own (the paper's c)
                word, _, factor = w.partition("=")
                for pos in word_positions(run, prompt, word.strip()):
                    scale[pos] = self.weight if not factor else _factor(w, factor)
            self.index.append(torch.tensor(index, device=device))
            self.alpha.append(torch.tensor(alpha, device=device))
            self.scale.append(scale.to(device))
        self.blend_pos = []
        for prompt in run.prompts:
            found = [word_positions(run, prompt, w, required=False) for w in self.blend]
            self.blend_pos.append([q for pos in found for q in pos])
        if self.blend and not any(self.blend_pos):
            raise VelodiffError(
                f"plan rule 'p2p': the blend words {list(self.blend)} are in none of the prompts"
            )

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        self._plan(run)
        self.state, self.swap, self.blend_maps = EditState(), ProcessorSwap(), []
        for cross in (True, False):
            mods = [m for m in attention_modules(run.network, cross) if m[1].norm_q is None]
            self.swap.install(mods, lambda name, mod, orig, c=cross: EditAttention(orig, self.state, self, c))

    def edited(self, src: Tensor, own: Tensor, k: int, cross: bool) -> Tensor:
        """Edited row k's maps (heads, N, T) from the source's and its own."""
        if not cross:
            return src
        index, alpha, scale = (
            t.to(src.device) for t in (self.index[k - 1], self.alpha[k - 1], self.scale[k - 1])
        )
        t = src.shape[-1]
        mapped = src[..., index[:t]]
        a = alpha[:t].to(src.dtype)
        out = a * mapped + (1 - a) * own
        return out * scale[:t].to(src.dtype)

    def evaluate(self, req: EvalRequest, inner: Evaluate) -> EvalResult:
        n = max(1, self.run.steps)
        self.state.cross = req.step < self.cross_steps * n
        self.state.self_attn = req.step < self.self_steps * n
        self.state.collect = bool(self.blend) and req.stage == 0
        active = self.state.cross or self.state.self_attn or self.state.collect
        groups = [req.rows("cond")]
        if self.uncond and "uncond" in req.branches and "uncond" not in req.subsets:
            groups.append(req.rows("uncond"))
        self.state.groups = tuple(groups)
        self.state.rows = slice(min(g.start for g in groups), max(g.stop for g in groups)) if active else None
        try:
            return inner(req)
        finally:
            self.state.rows = None

    def after_step(self, info: Any) -> Tensor | None:
        """Local blend (Hertz et al. 2022, Sec. 3.2, 'local editing'; the reference code's LocalBlend):
        the region is where the blend words' attention (layers averaged, max-pooled 3x3, over its
        maximum) exceeds ``threshold`` in the source or the edit; outside it the edit takes the source's
        sample, x_k <- x_0 + M (x_k - x_0)."""
        import torch
        import torch.nn.functional as F

        from ..accel.attention import _spatial

        maps, self.blend_maps = self.blend_maps, []
        if not self.blend or not maps:
            return None
        h, w = info.x.shape[-2:]
        a = torch.stack([_spatial(m.float(), h, w) for m in maps]).mean(0)  # (B, T, h, w)
        region = []
        for r, pos in enumerate(self.blend_pos[: a.shape[0]]):
            if not pos:
                region.append(torch.zeros(h, w, device=a.device))
                continue
            m = F.max_pool2d(a[r, pos].mean(0)[None, None], 3, stride=1, padding=1)[0, 0]
            region.append((m / m.max().clamp_min(1e-12) > self.threshold).float())
        x = info.x.clone()
        for k in range(1, min(len(region), x.shape[0])):
            mask = torch.maximum(region[0], region[k]).to(x)
            x[k] = x[0] + mask * (x[k] - x[0])
        return x

    def end(self) -> None:
        self.swap.restore()


def edit_prompt(
    model: Any,
    source: str,
    targets: str | Sequence[str],
    *,
    seed: int = 0,
    mode: str = "auto",
    cross_steps: float = 0.8,
    self_steps: float = 0.4,
    words: Sequence[str] = (),
    weight: float = 1.0,
    uncond: bool = False,
    blend: Sequence[str] = (),
    threshold: float = 0.3,
    latents: Any = None,
    plan: Any = None,
    **options: Any,
) -> Any:
    """Generate ``source`` and its edits ``targets`` from one noise (seed ``seed``, or ``latents``: a
    (1, C, h, w) starting sample, e.g. an inversion's ``inv.latents`` with the same steps and grid) under
    prompt-to-prompt; returns the pipeline's GenerationResult, images[0] the source, then the edits.
    ``options`` as :func:`velodiff.pipelines.text2img`."""
    import torch

    from ..noise import check_seed
    from ..pipelines import text2img
    from ..pipelines.common import check_image_size, check_model, initial_noise

    check_model(model)
    check_seed(seed)  # named as the one seed it is (not as a list of seeds)
    ts = [targets] if isinstance(targets, str) else targets
    if not isinstance(ts, list | tuple) or not all(isinstance(t, str) for t in ts):
        raise VelodiffError(f"targets is an edited prompt or a list of them, got {type(targets).__name__}")
    if not ts:
        raise VelodiffError("no edited prompt given")
    if "seeds" in options:
        raise VelodiffError("edit_prompt takes one seed (seed=), shared by the source and its edits")
    if latents is not None and not (isinstance(latents, torch.Tensor) and latents.is_floating_point()):
        got = type(latents).__name__
        raise VelodiffError(f"latents must be a floating-point tensor (1, C, h, w), got {got}")
    prompts = [source, *ts]
    given = dict(
        mode=mode,
        cross_steps=cross_steps,
        self_steps=self_steps,
        words=(words,) if isinstance(words, str) else tuple(words),  # one word, not its letters
        weight=weight,
        uncond=uncond,
        blend=(blend,) if isinstance(blend, str) else tuple(blend),  # one word, not its letters
        threshold=threshold,
    )
    rule = PromptToPrompt(**{k: v for k, v in given.items() if v != PromptToPrompt.options[k].default})
    h, w = options.pop("height", None), options.pop("width", None)
    h, w = model.default_size[0] if h is None else h, model.default_size[1] if w is None else w
    check_image_size(model, h, w)  # (0 ran at the default size)
    if latents is None:
        latents = initial_noise(model.latent_shape(1, h, w), [seed])
    if latents.shape[0] != 1:
        raise VelodiffError(f"latents for one source image, (1, C, h, w); got {tuple(latents.shape)}")
    z = latents.expand(len(prompts), *latents.shape[1:]).contiguous()
    rules = [rule] + ([] if plan is None else [plan])
    return text2img(
        model, prompts, height=h, width=w, seeds=[seed] * len(prompts), latents=z, plan=rules, **options
    )


def _factor(item: str, factor: str) -> float:
    """The c of a re-weighted word ``word=c``, in the option's range [-10, 10]."""
    try:
        c = float(factor)
    except ValueError:
        raise VelodiffError(f"plan rule 'p2p': re-weighted word {item!r}: write word=c, c a number") from None
    if not -10 <= c <= 10:
        raise VelodiffError(f"plan rule 'p2p': re-weighted word {item!r}: c must be in [-10, 10]")
    return c
