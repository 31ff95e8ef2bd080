"""LoRA adapters on a model's UNet through ``peft`` (the format peft's ``save_pretrained`` writes): a
``lora/`` folder holds ``adapter_config.json`` (the ``LoraConfig``: ``r``, ``lora_alpha``,
``target_modules``) and ``adapter_model.safetensors`` (``get_peft_model_state_dict``'s tensors).
Safetensors only; an adapter whose modules or shapes do not fit the UNet is refused in one line."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import VelodiffError

LORA_DIR = "lora"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: the LoraConfig fields velodiff writes and reads back
#: the LoraConfig fields a LoRA folder keeps (per-module ranks and alphas too: a LoRA of mixed ranks
#: written without them did not load)
CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "init_lora_weights",
               "rank_pattern", "alpha_pattern")


def lora_config_dict(unet: Any, adapter: str = "default") -> dict[str, Any]:
    cfg = unet.peft_config[adapter]
    d = {k: getattr(cfg, k) for k in CONFIG_KEYS}
    tm = d["target_modules"]
    d["target_modules"] = sorted(tm) if isinstance(tm, (set, list, tuple)) else tm
    return {"peft_type": "LORA", **d}


def save_lora(unet: Any, folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Path:
    """The UNet's peft adapter as ``folder/adapter_config.json`` + ``adapter_model.safetensors``."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "velodiff": "lora"})
    (out / CONFIG_FILE).write_text(json.dumps(lora_config_dict(unet), indent=1))
    return out


def _adapter_files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        if (path / LORA_DIR).is_dir():
            path = path / LORA_DIR
        return path / CONFIG_FILE, path / WEIGHTS_FILE
    if path.suffix.lower() != ".safetensors":
        raise VelodiffError(
            f"LoRA {str(path)!r}: expected a .safetensors file or a folder with {WEIGHTS_FILE}"
        )
    return path.with_name(CONFIG_FILE), path


def peek_keys(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensor names of a LoRA (its folder's single .safetensors, or the file), without reading the
    tensors; {} when there is no such file (the loader that follows says why in one line)."""
    from .weights import safe_open

    p = Path(path).expanduser()
    folder = p / LORA_DIR if (p / LORA_DIR).is_dir() else p
    files = [p] if p.is_file() else sorted(folder.glob("*.safetensors"))
    if len(files) != 1 or files[0].suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(files[0]) as f:
            return dict.fromkeys(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file: read_lora refuses it in one line
        return {}


def _module_name(key: str) -> str:
    """The module a peft tensor key belongs to, without the prefixes peft or diffusers add."""
    name = key.split(".lora_A.")[0]
    for prefix in ("base_model.model.", "unet.", "transformer."):
        name = name.removeprefix(prefix)
    return name


def read_lora(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(LoraConfig fields, tensors) of a LoRA folder (or its ``.safetensors`` with the config beside it)."""
    from .weights import check_safetensors, load_file

    cfg_path, weights = _adapter_files(Path(path).expanduser())
    if not weights.is_file():
        raise VelodiffError(f"LoRA {str(path)!r}: no {weights.name}")
    check_safetensors(weights)
    state = load_file(str(weights))
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise VelodiffError(f"{cfg_path}: not valid JSON ({e})") from None
    else:  # no config: infer rank and targets from the tensors (alpha = r, scale 1)
        downs = {k: v for k, v in state.items() if ".lora_A." in k}
        if not downs:
            raise VelodiffError(f"LoRA {str(path)!r}: no lora_A tensors and no {CONFIG_FILE}")
        ranks = {_module_name(k): int(v.shape[0]) for k, v in downs.items()}
        if len(set(ranks.values())) > 1:
            raise VelodiffError(
                f"LoRA {str(path)!r}: its modules have ranks {sorted(set(ranks.values()))} and no "
                f"{CONFIG_FILE} says each one's scale; give the adapter's config beside its weights"
            )
        r = next(iter(ranks.values()))
        # each module by its whole name: peft matches target names as suffixes, so a name cut short
        # ("attentions.0...to_q" of "mid_block.attentions.0...to_q") put adapters in other blocks too
        cfg = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks)}
    return cfg, state


#: key prefixes of the LoRA files other tools write: diffusers' ``save_lora_weights`` (``unet.``,
#: ``text_encoder.``) and kohya / A1111 (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``)
FOREIGN_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "lora_unet_", "lora_te_", "lora_te1_",
                    "lora_te2_")


def is_foreign(state: dict[str, Any]) -> bool:
    """Whether ``state`` is a diffusers or kohya LoRA file rather than a peft UNet adapter."""
    return any(k.startswith(FOREIGN_PREFIXES) for k in state)


def apply_foreign_lora(model: Any, path: str | os.PathLike[str], adapter: str) -> None:
    """A LoRA file in diffusers' ``save_lora_weights`` layout or kohya / A1111's, onto the UNet and the
    text encoder(s), converted by diffusers' own loaders (``lora_state_dict``, ``load_lora_into_unet``,
    ``load_lora_into_text_encoder``); the tensors are read by velodiff's safetensors-only reader."""
    from .weights import check_safetensors, load_file

    weights = Path(path).expanduser()
    if weights.is_dir():
        files = sorted(weights.glob("*.safetensors"))
        if len(files) != 1:
            raise VelodiffError(f"LoRA {str(path)!r}: expected one .safetensors file in the folder")
        weights = files[0]
    check_safetensors(weights)
    state = load_file(str(weights))
    if model.family in ("sd1", "sd2"):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin as loader
    elif model.family == "sdxl":
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as loader
    else:
        raise VelodiffError(f"LoRA {str(path)!r}: diffusers / kohya LoRA files are read for SD 1.x, 2.x and "
                            f"SDXL models, not {model.family}")
    c = model.components
    try:
        converted, alphas = loader.lora_state_dict(state)
        loader.load_lora_into_unet(converted, alphas, c["unet"], adapter_name=adapter)
        for name in ("text_encoder", "text_encoder_2"):
            if name in c and any(k.startswith(f"{name}.") for k in converted):
                loader.load_lora_into_text_encoder(converted, alphas, c[name], prefix=name,
                                                   adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise VelodiffError(
            f"LoRA {str(path)!r} does not fit this model ({str(e).splitlines()[0][:160]})"
        ) from None


def apply_lora(unet: Any, path: str | os.PathLike[str], adapter: str = "default") -> Any:
    """Add the LoRA at ``path`` to ``unet`` (peft, unfused) and return the UNet; refused in one line
    when it was trained for another architecture (modules or shapes that do not fit)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    cfg, state = read_lora(path)
    name = str(path)
    try:
        config = LoraConfig(**{k: cfg[k] for k in CONFIG_KEYS if k in cfg})
    except (TypeError, ValueError) as e:
        raise VelodiffError(f"LoRA {name!r}: bad adapter_config.json ({e})") from None
    own = {k for k, _ in unet.named_modules()}
    for k in state:  # every adapted module must exist in this UNet
        mod = k.split(".lora_")[0]
        if mod not in own:
            raise VelodiffError(
                f"LoRA {name!r} does not fit this model's UNet (no module {mod!r}): "
                "it was trained for another architecture"
            )
    dev = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    try:
        with warnings.catch_warnings():  # a second adapter is meant: peft's note on it is noise here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(config, adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError, re.error) as e:  # re.error: a bad target_modules pattern
        raise VelodiffError(
            f"LoRA {name!r} does not fit this model's UNet ({str(e).splitlines()[0][:160]})"
        ) from None
    want = {k: v.shape for k, v in unet.state_dict().items() if "lora_" in k}
    for k, v in state.items():
        mine = [s for key, s in want.items() if key.replace(f".{adapter}.", ".") == k]
        if mine and tuple(mine[0]) != tuple(v.shape):
            unet.delete_adapters(adapter)
            raise VelodiffError(
                f"LoRA {name!r} does not fit this model's UNet: {k} has shape {tuple(v.shape)}, "
                f"the UNet needs {tuple(mine[0])} (trained for another architecture)"
            )
    res = set_peft_model_state_dict(unet, {k: v.to(dev, dtype) for k, v in state.items()}, adapter)
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        unet.delete_adapters(adapter)
        raise VelodiffError(f"LoRA {name!r} does not fit this model's UNet (unexpected {unexpected[0]!r})")
    missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k and f".{adapter}." in k]
    if missing:  # e.g. lora_A without lora_B: the adapter would load and change nothing
        unet.delete_adapters(adapter)
        key = missing[0].replace(f".{adapter}", "")
        raise VelodiffError(f"LoRA {name!r} is incomplete: it has no {key!r}")
    return unet
