"""Concept erasure in closed form: Unified Concept Editing (UCE, Gandikota et al. 2024, "Unified Concept
Editing in Diffusion Models", arXiv 2308.14761).

Every cross-attention key and value projection ``W`` (``attn2.to_k`` / ``attn2.to_v``: text embedding ->
key / value) is replaced by the minimiser of the paper's objective (Sec. 3, its TIME / MEMIT-style
least squares, with the ridge term of TIME, Orgad et al. 2023, that the official code adds)::

    erase_scale sum_{i in E} ||W c_i - W_old c*_i||^2 + preserve_scale sum_{j in P} ||W c_j - W_old c_j||^2
        + lamb ||W - W_old||_F^2

whose closed form (UCE's update, here with the scales) is::

    W = (erase_scale sum_E W_old c*_i c_i^T + preserve_scale sum_P W_old c_j c_j^T + lamb W_old)
        (erase_scale sum_E c_i c_i^T + preserve_scale sum_P c_j c_j^T + lamb I)^-1

``c_i`` are the text encoder's output vectors of prompts naming the erased concept, taken from the
concept's last token to the end of the padded sequence (the causal encoder carries the word into every
later position); ``c*_i`` those of the same prompt with the word replaced by the target (``""``: the word
dropped; e.g. ``"circle"``: an anchor concept), aligned from the same last token; ``c_j`` every position of
the prompts naming a preserved concept, and of the empty prompt (classifier-free guidance's unconditional
branch stays exact). Because ``W_old`` factors out on the left, every layer's update is ``W = W_old Q`` with
one ``d x d`` matrix ``Q`` computed once in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import VelodiffError
from ..limits import is_number

#: prompt templates per concept word (``{concept}``; ``{color}`` / ``{size}`` expand over the shapes world,
#: ``{count}`` to "a", or to "two" and "three" for a plural the world knows: "two red triangles")
SHAPES_TEMPLATES: tuple[str, ...] = (
    "{count} {color} {concept}", "{count} {size} {color} {concept}", "{count} {concept}"
)
PROJECTIONS = ("to_k", "to_v")


@dataclass
class Erasure:
    """What :func:`erase_concept` did: the edited network (a copy), the projection matrix ``Q`` and the
    residuals of the objective's two parts, relative to ``||W_old c||`` (0 = met exactly)."""

    unet: Any
    concept: str
    target: str
    preserve: tuple[str, ...]
    layers: list[str]
    erase_residual: float
    preserve_residual: float
    settings: dict[str, Any] = field(default_factory=dict)


def _known_words(model: Any) -> set[str] | None:
    """The vocabulary a shapes-world model was trained on (None: any word is allowed)."""
    card = Path(str(getattr(model, "path", ""))) / "MODEL_CARD.md"
    if not (card.is_file() and "shapes world" in card.read_text(errors="replace").lower()):
        return None
    from ..data.shapes import COLORS, PLURALS, SHAPES, SIZES

    return {*SHAPES, *PLURALS.values(), *COLORS, *SIZES}


def _check_word(model: Any, word: str, what: str, allow_empty: bool = False) -> str:
    word = word.strip()
    if not word:
        if allow_empty:
            return word
        raise VelodiffError(f"the {what} is empty; name a word, e.g. 'triangle'")
    if not re.fullmatch(r"[A-Za-z][A-Za-z \-']*", word):
        raise VelodiffError(f"the {what} {word!r} is not a word (letters only)")
    known = _known_words(model)
    if known is not None and any(w not in known for w in word.split()):
        from ..errors import unknown_name

        raise unknown_name(f"{what} word for this shapes-world model", word, known)
    return word


def check_templates(templates: Any, what: str = "templates") -> list[str]:
    """Prompt templates: a non-empty list of strings, each with ``{concept}``, other braces only the
    fields :func:`expand_templates` fills (``{color}``, ``{size}``, ``{count}``); one line otherwise."""
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise VelodiffError(f"{what} is a non-empty list of prompt templates with {{concept}}, "
                            f"got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or "{concept}" not in t:
            raise VelodiffError(f"every {what} entry needs {{concept}}, e.g. 'a photo of a {{concept}}'; "
                                f"got {t!r}")
        try:
            t.format(concept="x", color="red", size="small", count="a")
        except (KeyError, IndexError, ValueError):
            raise VelodiffError(
                f"{what} entry {t!r}: only {{concept}}, {{color}}, {{size}} and {{count}} may stand in "
                "braces (write others as {{ }})"
            ) from None
    return list(templates)


def expand_templates(templates: Sequence[str], word: str) -> list[str]:
    """The prompts of ``templates`` for one concept word (``{color}``, ``{size}``, ``{count}`` expand
    over the world)."""
    from ..data.shapes import COLORS, PLURALS, SIZES

    plural = word in PLURALS.values()
    out = []
    for tpl in templates:
        colors = COLORS if "{color}" in tpl else ("",)
        sizes = SIZES if "{size}" in tpl else ("",)
        counts = ("two", "three") if plural and "{count}" in tpl else ("a",)
        for n in counts:
            for c in colors:
                for s in sizes:
                    out.append(" ".join(tpl.format(concept=word, color=c, size=s, count=n).split()))
    return list(dict.fromkeys(out))


def _embed(model: Any, prompts: list[str]) -> Tensor:
    cond = model.encode_prompt(prompts, guided=False)
    return cond["encoder_hidden_states"].detach().to("cpu", torch.float64)


def _last_token(tokenizer: Any, head: str) -> int:
    """Index (with BOS) of the last token of ``head``."""
    return len(tokenizer(" ".join(head.split()), add_special_tokens=True).input_ids) - 2  # drop EOS


def _concept_ends(tokenizer: Any, prompt: str, concept: str, target: str) -> tuple[int, int]:
    """The index of the last token of the concept's last occurrence (a whole word) in ``prompt``, and of
    the target's in the same prompt with the concept replaced (an empty target: the token before the
    place where the concept was)."""
    word = rf"\b{re.escape(concept)}\b"
    last = [*re.finditer(word, prompt)][-1]
    before = re.sub(word, target, prompt[: last.start()])
    return _last_token(tokenizer, prompt[: last.end()]), _last_token(tokenizer, before + target)


def edit_vectors(
    model: Any,
    concepts: Sequence[str],
    targets: Sequence[str],
    preserve: Sequence[str],
    templates: Sequence[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """(c, c*, c_preserve): the rows the closed form fits (float64, each (n, d)), every concept word
    with its target word."""
    tok = model.components["tokenizer"]
    cs, cts = [], []
    for concept, target in zip(concepts, targets, strict=True):
        prompts = expand_templates(templates, concept)
        targets_ = [" ".join(re.sub(rf"\b{re.escape(concept)}\b", target, p).split()) for p in prompts]
        e_old, e_new = _embed(model, prompts), _embed(model, targets_)
        n_tok = e_old.shape[1]
        for k, p in enumerate(prompts):
            a, b = _concept_ends(tok, p, concept, target)
            length = n_tok - max(a, b)
            cs.append(e_old[k, a : a + length])
            cts.append(e_new[k, b : b + length])
    keep = [p for w in preserve for p in expand_templates(templates, w)] + [""]
    cp = _embed(model, keep).reshape(-1, cs[0].shape[-1])
    return torch.cat(cs), torch.cat(cts), cp


def _words(text: str | Sequence[str]) -> list[str]:
    words = text.split(",") if isinstance(text, str) else text
    if not isinstance(words, Sequence) or any(not isinstance(w, str) for w in words):
        raise VelodiffError(f"a concept, target or preserved word is a string (or a list of them), "
                            f"got {text!r}")
    return [w.strip() for w in words]


def closed_form(
    c: Tensor,
    c_star: Tensor,
    c_keep: Tensor,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.1,
) -> Tensor:
    """``Q`` with ``W_new = W_old Q`` for every projection (UCE's closed form with W_old factored out):
    Q = (erase_scale C*^T C + preserve_scale Cp^T Cp + lamb I)(erase_scale C^T C + preserve_scale Cp^T Cp
    + lamb I)^-1, rows of C, C*, Cp being the vectors c_i, c*_i, c_j."""
    c, c_star, c_keep = (v.to(torch.float64) for v in (c, c_star, c_keep))
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    keep = preserve_scale * c_keep.T @ c_keep
    num = erase_scale * c_star.T @ c + keep + lamb * eye  # sum v* c^T, with v* = W_old c*
    den = erase_scale * c.T @ c + keep + lamb * eye  # sum c c^T
    # W = W_old num den^-1; solve den^T Q^T = num^T instead of inverting (den is symmetric)
    return torch.linalg.solve(den, num.T).T


def cross_attention_projections(unet: Any, which: Sequence[str] = PROJECTIONS) -> dict[str, torch.nn.Linear]:
    """The text-side projections of every cross-attention layer (``attn2``), by module name."""
    out = {}
    for name, mod in unet.named_modules():
        parts = name.split(".")
        if (
            len(parts) >= 2
            and parts[-2] == "attn2"
            and parts[-1] in which
            and isinstance(mod, torch.nn.Linear)
        ):
            out[name] = mod
    if not out:
        raise VelodiffError("this network has no cross-attention key/value projections (attn2.to_k / to_v)")
    return out


def erase_concept(
    model: Any,
    concept: str | Sequence[str],
    preserve: Sequence[str] = (),
    target: str | Sequence[str] = "",
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.1,
    projections: Sequence[str] = PROJECTIONS,
    templates: Sequence[str] = SHAPES_TEMPLATES,
) -> Erasure:
    """Erase ``concept`` (a word, or several: ``"triangle,triangles"``) from ``model``'s cross-attention,
    mapping each to ``target`` (``""``: the word left out; one target for all, or one per word:
    ``"circle,circles"``) and keeping each word of ``preserve``. Returns an :class:`Erasure` whose
    ``unet`` is an edited copy; ``model`` is not changed (see :func:`apply_erasure`,
    :func:`save_erased`)."""
    import copy

    from ..pipelines.common import check_model_like
    from ..sampling import network_lock

    check_model_like(model, ("network", "encode_prompt"))
    for name, v in (("erase_scale", erase_scale), ("preserve_scale", preserve_scale), ("lamb", lamb)):
        if not is_number(v):
            raise VelodiffError(f"{name} must be a number, got {v!r}")
    concepts = [_check_word(model, w, "concept") for w in _words(concept)]
    targets = [_check_word(model, w, "target", allow_empty=True) for w in _words(target)]
    if len(targets) == 1:
        targets *= len(concepts)
    if len(targets) != len(concepts):
        raise VelodiffError(
            f"{len(concepts)} concept words and {len(targets)} targets; give one target or one per word"
        )
    preserve = tuple(dict.fromkeys(_check_word(model, w, "preserved concept") for w in _words(preserve)))
    templates = check_templates(templates)
    for c, t in zip(concepts, targets, strict=True):
        if c in preserve:
            raise VelodiffError(f"{c!r} is both erased and preserved; drop it from --preserve")
        if c == t:
            raise VelodiffError(f"the target {t!r} is the erased concept itself; pick another word or ''")
    projections = (projections,) if isinstance(projections, str) else tuple(projections)  # not its letters
    bad = [p for p in projections if p not in PROJECTIONS]
    if bad or not projections:
        raise VelodiffError(f"projections must be among {', '.join(PROJECTIONS)}; got {list(projections)}")
    if not (0 <= erase_scale < math.inf and 0 <= preserve_scale < math.inf and 0 < lamb < math.inf):
        raise VelodiffError("erase_scale and preserve_scale must be finite numbers >= 0 and lamb finite > 0")
    if "tokenizer" not in getattr(model, "components", {}):
        raise VelodiffError(
            f"concept erasure needs a text encoder with a CLIP tokenizer; {model.family} has none"
        )
    c, c_star, c_keep = edit_vectors(model, concepts, targets, preserve, templates)
    q = closed_form(c, c_star, c_keep, erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb)
    with network_lock(model.network):  # not a copy of another thread's run, its rules' weights and hooks
        unet = copy.deepcopy(model.network)
    layers = cross_attention_projections(unet, projections)
    num_e = den_e = num_p = den_p = 0.0
    with torch.no_grad():
        for mod in layers.values():
            w_old = mod.weight.detach().to("cpu", torch.float64)
            w_new = w_old @ q
            if not bool(w_new.isfinite().all()):  # never written: it would replace a good folder with NaNs
                raise VelodiffError("the erased weights are not finite (the model's cross-attention "
                                    "projections or text embeddings hold NaN or inf); check the model")
            num_e += float(((c @ w_new.T - c_star @ w_old.T) ** 2).sum())
            den_e += float(((c_star @ w_old.T) ** 2).sum())
            num_p += float(((c_keep @ (w_new - w_old).T) ** 2).sum())
            den_p += float(((c_keep @ w_old.T) ** 2).sum())
            mod.weight.copy_(w_new.to(mod.weight.dtype))
    return Erasure(
        unet=unet,
        concept=",".join(concepts),
        target=",".join(dict.fromkeys(targets)),
        preserve=preserve,
        layers=list(layers),
        erase_residual=(num_e / max(den_e, 1e-30)) ** 0.5,
        preserve_residual=(num_p / max(den_p, 1e-30)) ** 0.5,
        settings={
            "erase_scale": erase_scale,
            "preserve_scale": preserve_scale,
            "lamb": lamb,
            "projections": list(projections),
            "templates": list(templates),
            "erase_vectors": int(c.shape[0]),
            "preserve_vectors": int(c_keep.shape[0]),
        },
    )


def apply_erasure(model: Any, erasure: Erasure) -> Any:
    """``model`` with the edited network in place of its own (the same object, changed). An erasure
    made for another network (a layer it does not have, or of another shape) is one line, and nothing
    is written (a pruned student's weights were half overwritten before the error)."""
    from ..pipelines.common import check_model_like
    from ..sampling import network_lock

    check_model_like(model, ("network",))
    if not isinstance(erasure, Erasure):
        raise VelodiffError(f"apply_erasure takes erase_concept's Erasure, got {type(erasure).__name__}")
    net = model.network
    pairs = []
    for name, mod in erasure.unet.named_modules():
        if name in erasure.layers:
            try:
                own = net.get_submodule(name)
            except AttributeError:
                own = None
            if own is None or getattr(own, "weight", None) is None or own.weight.shape != mod.weight.shape:
                raise VelodiffError(f"this erasure was made for another network: the model has no layer "
                                    f"{name} of shape {tuple(mod.weight.shape)}; erase from this model")
            pairs.append((own, mod))
    with network_lock(net), torch.no_grad():
        for own, mod in pairs:
            own.weight.copy_(mod.weight)
    return model


def save_erased(model: Any, erasure: Erasure, out: Path) -> Path:
    """A diffusers model folder: ``model``'s components copied, the edited UNet (float32 safetensors),
    the sampling defaults kept, and a card saying what was erased. Loadable with ``--model out``."""
    import json

    from ..distill.teacher import SAMPLING_FILE, save_student

    src = Path(model.path)
    if not (src / "unet").is_dir():
        raise VelodiffError(f"the model at {src} is not a diffusers folder with a unet/; cannot write a copy")
    sampling = {}
    if (src / SAMPLING_FILE).is_file():
        sampling = json.loads((src / SAMPLING_FILE).read_text())
    s = erasure.settings
    n_layers = len(erasure.layers) // max(1, len(s["projections"]))
    kept = ", ".join(erasure.preserve) or "nothing but the empty prompt"
    card = (
        f"# Concept erasure (UCE) of {erasure.concept!r} from a shapes world model\n\n"
        f"Base model: {src}. Cross-attention {', '.join(s['projections'])} of {n_layers} "
        f"layers edited in closed form (Gandikota et al. 2024) to map {erasure.concept!r} to "
        f"{erasure.target or 'the word left out'!r}, preserving {kept}.\n\n"
        f"Settings: {json.dumps(s)}\n\nRelative residuals: erase {erasure.erase_residual:.4f}, "
        f"preserve {erasure.preserve_residual:.4f}.\n"
    )
    return save_student(src, erasure.unet, Path(out), sampling, card)
