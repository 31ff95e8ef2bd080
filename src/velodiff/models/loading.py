"""``load(path)``: a diffusers folder or a single ``.safetensors`` file, offline, as a LoadedModel.

The path is inspected without loading weights (a folder's JSON configs, a file's tensor names), the
family is detected by asking each registered family in priority order (or taken from ``family=``),
and the family builds the model with diffusers' own classes. Nothing is fetched from the network:
``HF_HUB_OFFLINE=1`` is set and every diffusers/transformers call passes ``local_files_only=True``.
Pickle checkpoints (.ckpt, .bin, .pt, .pth) are refused; they can run code when loaded.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..denoisers import PREDICTION_TYPES
from ..errors import VelodiffError, unknown_name
from ..shipped import SHIPPED, no_such_model, sampling_defaults, shipped_path
from .base import FAMILIES, LoadedModel, families_by_priority, resolve_device, resolve_dtype
from .weights import CONVERT_HINT, PICKLE_SUFFIXES, check_safetensors, safe_open


@contextmanager
def quiet_imports() -> Iterator[None]:
    """While the families build (diffusers imports torchao when it is installed): torchao's notes on
    its GPU-only kernels it cannot load here, and torch's deprecation lines about the enums it
    registers, which no velodiff user asked for, stay below ERROR, and transformers' weight-loading
    progress bar stays off; the loggers' levels and the bar's setting are restored."""
    import logging

    from transformers.utils import logging as transformers_logging

    from ..accel.quantize import TORCHAO_LOGGERS

    loggers = [logging.getLogger(n) for n in TORCHAO_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    bar = transformers_logging.is_progress_bar_enabled()  # its "Loading weights" bar, per text encoder
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bar:
            transformers_logging.enable_progress_bar()


def offline() -> None:
    """Forbid the Hugging Face hub for this process (weights and configs come from local files)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@dataclass
class Source:
    """What a path holds, read without loading weights."""

    path: Path
    kind: str  # "folder" | "single_file"
    model_index: dict[str, Any] = field(default_factory=dict)
    #: a single file's tensor names (empty for folders)
    keys: frozenset[str] = frozenset()
    #: a single file's metadata header
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def pipeline_class(self) -> str:
        return str(self.model_index.get("_class_name", ""))

    def config(self, component: str) -> dict[str, Any]:
        """A folder component's config.json (unet, vae, ...) or scheduler_config.json; {} if absent."""
        if self.kind != "folder":
            return {}
        for name in ("config.json", "scheduler_config.json"):
            p = self.path / component / name
            if p.is_file():
                return _read_json(p)
        return {}

    @cached_property
    def unet_config(self) -> dict[str, Any]:
        return self.config("unet")

    def has_key(self, *prefixes: str) -> bool:
        """Whether a single file has a tensor whose name starts with one of the prefixes."""
        return any(k.startswith(prefixes) for k in self.keys)

    def tensor_shape(self, key: str) -> tuple[int, ...] | None:
        if key not in self.keys:
            return None
        with safe_open(self.path) as f:
            return tuple(f.get_slice(key).get_shape())

    def is_transformer_folder(self, pipelines: Collection[str], transformer_class: str) -> bool:
        """A diffusers folder of one of ``pipelines`` or with a ``transformer_class`` transformer."""
        if self.kind != "folder":
            return False
        return self.pipeline_class in pipelines or (
            self.config("transformer").get("_class_name") == transformer_class
        )


def _read_json(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VelodiffError(f"cannot read {p}: {e}") from None
    if not isinstance(data, dict):
        raise VelodiffError(f"{p} is damaged: a config is a JSON object, this holds a {type(data).__name__}")
    return data


def inspect_source(path: str | os.PathLike[str]) -> Source:
    """Classify ``path`` (folder with model_index.json, or .safetensors file); refuse anything else."""
    p = Path(path).expanduser()
    if not p.exists():
        raise no_such_model(path)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            if any(p.glob("*.safetensors")) or (p / "config.json").is_file():
                hint = "; pass the .safetensors file itself, or the pipeline folder above it"
            else:
                hint = "; expected a diffusers pipeline folder (model_index.json with unet/, vae/, ...)"
            raise VelodiffError(f"{str(p)!r} is not a diffusers model folder: no model_index.json{hint}")
        return Source(p, "folder", model_index=_read_json(index))
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise VelodiffError(
            f"{p.name} is a pickle checkpoint, which velodiff never loads "
            f"(unpickling can run code); {CONVERT_HINT}"
        )
    if suffix != ".safetensors":
        raise VelodiffError(
            f"{p.name}: expected a diffusers folder or a .safetensors file, got {suffix or 'no suffix'!r}"
        )
    check_safetensors(p)  # pickle bytes under a .safetensors name are refused before any parser sees them
    with safe_open(p) as f:
        keys, meta = frozenset(f.keys()), dict(f.metadata() or {})
    return Source(p, "single_file", keys=keys, metadata=meta)


def detect_family(source: Source) -> str:
    for spec in families_by_priority():
        if spec.detect(source):
            return spec.name
    if source.kind == "folder":
        raise VelodiffError(
            f"{str(source.path)!r}: pipeline {source.pipeline_class or '(no _class_name)'} "
            f"matches no known family "
            f"({', '.join(sorted(FAMILIES))}); pass family= (CLI: --family) to force one"
        )
    expected = "; ".join(
        f"{s.name}: {', '.join(s.expected_keys)}" for s in families_by_priority() if s.expected_keys
    )
    sample = ", ".join(sorted(source.keys)[:3]) or "no tensors"
    raise VelodiffError(
        f"{source.path.name}: its tensor names match no known model family (found e.g. {sample}); "
        f"expected keys like {expected}"
    )


def load(
    path: str | os.PathLike[str],
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    family: str | None = None,
    prediction_type: str | None = None,
    config: str | os.PathLike[str] | None = None,
    lora: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    fuse_lora: bool = True,
    lora_scale: float | Sequence[float] = 1.0,
) -> LoadedModel:
    """Load a model for velodiff's sampling core.

    * ``path``: a shipped model's name (``"default"``, see ``velodiff.shipped``), a diffusers pipeline
      folder (``model_index.json``) or a single ``.safetensors`` checkpoint (original Stable Diffusion /
      SDXL layout; configs from ``config``, a local diffusers folder, else velodiff's bundled ones).
    * ``dtype``: "float32", "bfloat16" or "float16" for the weights (latents are kept in float32).
    * ``device``: "cpu", "cuda", "cuda:N", "mps", or None for the best one available.
    * ``family``: force a family ("sd1", "sd2", "sdxl", ... see ``FAMILIES``) instead of detecting it.
    * ``prediction_type``: override the scheduler config's ("epsilon", "v_prediction", "sample").
    * ``lora``: a LoRA, or a list of them, applied to the UNet (and the text encoders where the file has
      theirs): a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``), its
      ``.safetensors``, or a diffusers / kohya (A1111) LoRA file; a folder's own ``lora/`` is applied first.
    * ``lora_scale``: each LoRA's strength (diffusers' ``lora_scale`` / ``set_adapters`` weights, ComfyUI's
      LoraLoader strength, A1111's ``<lora:name:S>``): one number for all, or one per LoRA; 0 turns a
      LoRA off. A folder's own ``lora/`` keeps scale 1.
    * ``fuse_lora``: merge the adapters, at their scales, into the weights (diffusers' ``fuse_lora`` then
      ``unload_lora``: a plain UNet, as fast as one without them); False keeps peft's layers (to train
      them further or change their scale).
    """
    from . import _register_builtin

    _register_builtin()
    offline()
    if not isinstance(path, str | os.PathLike) or not str(path).strip():  # ("" read as the current folder)
        raise VelodiffError(f"load takes a shipped model's name ({', '.join(SHIPPED)}), a diffusers folder "
                            f"or a .safetensors file, got {path!r}")
    if str(path) in SHIPPED and (isinstance(path, str) or not Path(path).exists()):  # Path("default") too
        path = shipped_path(str(path))
    source = inspect_source(path)
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    if family is not None and family not in FAMILIES:
        raise unknown_name("model family", family, FAMILIES)
    name = family or detect_family(source)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise unknown_name("prediction type", prediction_type, PREDICTION_TYPES)
    loras, scales = _lora_list(lora, lora_scale)
    if config is not None and source.kind == "folder":
        raise VelodiffError(
            f"config= (CLI: --config) is for single-file checkpoints; {source.path} is a diffusers folder "
            "with its own configs"
        )
    with torch.inference_mode(False), quiet_imports():
        model = FAMILIES[name].build(
            source,
            dtype=torch_dtype,
            device=dev,
            prediction_type=prediction_type,
            config=Path(config).expanduser() if config is not None else None,
        )
    from ..schedules import RectifiedFlow

    flow = isinstance(model.schedule, RectifiedFlow)
    if prediction_type is not None and (prediction_type == "flow") != flow:  # ran, making wrong images
        kind = "a rectified flow" if flow else "a diffusion (VP) schedule"
        fits = "flow" if flow else "epsilon, v_prediction or sample"
        raise VelodiffError(f"prediction_type {prediction_type!r} does not fit this model: its schedule is "
                            f"{kind}, which takes {fits}")
    model.path = str(source.path)
    model.loaded_with = loaded_with(source, config, family, prediction_type)
    _apply_sampling_file(model, Path(source.path))
    own = Path(source.path) / "lora"
    for i, adapter in enumerate([own] if source.kind == "folder" and own.is_dir() else []):
        _apply_lora(model, adapter, f"folder_{i}")
    for i, path_i in enumerate(loras):
        _apply_lora(model, path_i, f"user_{i}")
    model.loras = tuple((str(Path(p).expanduser().resolve()), s) for p, s in zip(loras, scales, strict=True))
    if loras:  # every adapter active, each at its own scale
        adapters = (["folder_0"] if source.kind == "folder" and own.is_dir() else []) + [
            f"user_{i}" for i in range(len(loras))
        ]
        weights = [1.0] * (len(adapters) - len(loras)) + scales
        _set_lora_scales(model, adapters, weights)
    if fuse_lora:
        with torch.inference_mode(False):
            for name in ("unet", "text_encoder", "text_encoder_2"):  # the text encoders: a kohya LoRA's
                _fuse(model.components.get(name))
    return model


def loaded_with(
    source: Source, config: Any, family: str | None, prediction_type: str | None
) -> dict[str, str]:
    """What makes the files another network (``LoadedModel.loaded_with``): a single file's config folder,
    a family or prediction type other than the files' own. (A LoRA on top keeps the base model's
    identity: it runs the base model's calibrations, as other tools keep their sampler settings.)"""
    out: dict[str, str] = {}
    if config is not None:
        out["config"] = str(Path(config).expanduser().resolve())
    if family is not None:
        try:
            own = detect_family(source)
        except VelodiffError:
            own = None
        if family != own:
            out["family"] = family
    folder = source.kind == "folder"
    files_say = source.config("scheduler").get("prediction_type", "epsilon") if folder else None
    if prediction_type is not None and prediction_type != files_say:
        out["prediction_type"] = prediction_type
    return out


def _lora_list(
    lora: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None, scale: float | Sequence[float]
) -> tuple[list[Path], list[float]]:
    """The LoRA paths and one scale per path (one scale given: the same for all), checked."""
    paths = [] if lora is None else [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)
    if isinstance(scale, str):
        raise VelodiffError(f"a LoRA scale must be a number, got {scale!r}")
    one = isinstance(scale, numbers.Real) or getattr(scale, "ndim", None) == 0  # 0.5, np.float32, tensor(0.5)
    scales = [scale] if one else list(scale)
    if not paths:
        if scales != [1.0]:
            raise VelodiffError("a LoRA scale was given without a LoRA")
        return [], []
    if len(scales) == 1:
        scales = scales * len(paths)
    if len(scales) != len(paths):
        raise VelodiffError(
            f"{len(scales)} LoRA scales for {len(paths)} LoRAs: give one for all, or one per LoRA"
        )
    out = []
    for s in scales:
        try:
            if isinstance(s, (bool, str)):
                raise TypeError
            out.append(float(s))
        except (TypeError, ValueError):
            raise VelodiffError(f"a LoRA scale must be a finite number, got {s!r}") from None
        if not math.isfinite(out[-1]):
            raise VelodiffError(f"a LoRA scale must be a finite number, got {s!r}")
    return [Path(p).expanduser() for p in paths], out


def _set_lora_scales(model: LoadedModel, adapters: list[str], weights: list[float]) -> None:
    """Activate ``adapters`` at ``weights`` on the UNet (diffusers' ``set_adapters``) and on each text
    encoder that holds some of them (diffusers' ``set_weights_and_activate_adapters``, as its pipelines'
    ``set_adapters`` do)."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    with torch.inference_mode(False):
        model.components["unet"].set_adapters(adapters, weights)
        for name in ("text_encoder", "text_encoder_2"):
            module = model.components.get(name)
            held = getattr(module, "peft_config", None) or {}
            pairs = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in held]
            if pairs:
                set_weights_and_activate_adapters(module, [a for a, _ in pairs], [w for _, w in pairs])


def _fuse(module: Any) -> None:
    """Merge a module's peft adapters into its weights and drop the layers (a plain module again)."""
    if not getattr(module, "peft_config", None) and not getattr(module, "_hf_peft_config_loaded", False):
        return
    if hasattr(module, "fuse_lora"):  # diffusers' models
        module.fuse_lora()
        module.unload_lora()
        return
    from diffusers.utils.peft_utils import recurse_remove_peft_layers  # transformers' text encoders
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    recurse_remove_peft_layers(module)


def _apply_lora(model: LoadedModel, path: Path, adapter: str) -> None:
    from .lora import apply_foreign_lora, apply_lora, is_foreign, peek_keys

    unet = model.components.get("unet")
    if unet is None:
        raise VelodiffError(f"LoRA {str(path)!r}: the model has no UNet to apply it to")
    if not path.exists():
        raise VelodiffError(f"LoRA {str(path)!r} does not exist")
    with torch.inference_mode(False):
        if is_foreign(peek_keys(path)):  # diffusers' save_lora_weights layout, or kohya / A1111's
            apply_foreign_lora(model, path, adapter)
        else:
            apply_lora(unet, path, adapter)


def _apply_sampling_file(model: LoadedModel, path: Path) -> None:
    """A folder's own sampling defaults (``sampling.json``: the shipped models', and those ``velodiff
    distill`` writes for its students: solver, steps, guidance, grid, grid_options, embedded_guidance)
    replace the family's."""
    d = sampling_defaults(path) if path.is_dir() else {}
    for key in ("solver", "steps", "guidance", "grid", "grid_options"):
        if key in d:
            setattr(model, f"default_{key}", d[key])
    if "embedded_guidance" in d:  # a guidance-distilled student's scale input (one pass per step)
        model.embedded_guidance = float(d["embedded_guidance"])
    if "trained_steps" in d:
        model.trained_steps = int(d["trained_steps"])  # type: ignore[attr-defined]
    if "trained_guidance" in d:  # the [w_min, w_max] a guidance-distilled student was trained for
        model.trained_guidance = tuple(float(w) for w in d["trained_guidance"])  # type: ignore[attr-defined]


def set_clip_skip(m: Any, clip_skip: int) -> None:
    """``--clip-skip K`` on a loaded model, refused in one line where its prompt encoder does not take it
    (PixArt, Flux: it was ignored without a word) or has K layers or fewer."""
    if not clip_skip:
        return
    if not getattr(m, "uses_clip_skip", False):
        raise VelodiffError(f"--clip-skip: this {m.family} model's prompt encoder does not take it")
    layers = [getattr(getattr(c, "config", None), "num_hidden_layers", None)
              for k, c in m.components.items() if k.startswith("text_encoder")]
    fewest = min((n for n in layers if n), default=None)
    if fewest is not None and clip_skip >= fewest:
        raise VelodiffError(f"--clip-skip {clip_skip}: the text encoder has {fewest} layers; skip fewer")
    m.clip_skip = clip_skip
