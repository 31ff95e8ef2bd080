"""k-diffusion's ``sampling`` module for the parity tests, loaded without its package ``__init__``
(which imports training dependencies: jsonmerge, torchvision, ...): the one helper of ``utils`` it
uses is supplied, and ``torchdiffeq`` (used by log_likelihood only) stubbed when absent. None when
k-diffusion is not installed (``pip install --no-deps k-diffusion``)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def load_k_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "torchdiffeq")}
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    if "torchdiffeq" not in sys.modules and importlib.util.find_spec("torchdiffeq") is None:
        sys.modules["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    try:
        mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", root / "sampling.py")
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
