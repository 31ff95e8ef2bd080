"""LoRA adapters on a model's UNet through ``peft`` (the format peft's ``save_pretrained`` writes): a
``lora/`` folder holds ``adapter_config.json`` (the ``LoraConfig``: ``r``, ``lora_alpha``,
``target_modules``) and ``adapter_model.safetensors`` (``get_peft_model_state_dict``'s tensors).
Safetensors only; an adapter whose modules or shapes do not fit the UNet is refused in one line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import VelodiffError

LORA_DIR = "lora"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: the LoraConfig fields velodiff writes and reads back
CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "init_lora_weights")


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
        r = int(next(iter(downs.values())).shape[0])
        targets = sorted({k.split(".lora_A.")[0].split(".", 1)[-1] for k in downs})
        cfg = {"r": r, "lora_alpha": r, "target_modules": targets}
    return cfg, state


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
