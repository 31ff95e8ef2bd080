"""W4A8 post-training quantization, group-wise and outlier-aware (after DGQ: Ryu et al. 2024,
"DGQ: Distribution-Aware Group Quantization for Text-to-Image Diffusion Models"), as the plan rule
``w4a8``, simulated in float ("fake quantization").

No maintained library quantizes a diffusion UNet's layers to 4-bit weights with 8-bit activations and
outlier handling on a CPU (torchao's ``Int8DynActInt4WeightQuantizer`` swaps modules and has no outlier
path), so velodiff does it in its own code, to measure what such a kernel would keep of the quality:

* weights: each Linear's weight is cut along its input channels into groups of ``group_size`` and
  quantized asymmetrically to 4 bits per group, ``q = clamp(round(w / s) + z, 0, 15)``,
  ``s = (max - min) / 15``, ``z = round(-min / s)`` (the range widened to hold 0, so z is a 4-bit
  integer as a kernel stores it), then dequantized (once per network, swapped in for
  the run as quantize.py does);
* activations: each Linear's input is quantized symmetrically to 8 bits per token (row), except the
  ``outliers`` fraction of its channels with the largest magnitude in each sample's input, which stay in
  float (the outlier-preserving split of LLM.int8() and DGQ's outlier-aware activation quantization);
  the rounding passes gradients straight through.

A simulated evaluation costs more than a float one (it adds the rounding), so the rule reports quality,
not speed: its single-evaluation error and end-to-end change are in ``bench/quantize``. Convolutions
are not quantized (as the ``int8`` rule).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Accelerator, Option, RunInfo, register_rule
from .hooks import HookSet
from .quantize import linear_layers, same_state, weights_state

if TYPE_CHECKING:
    from torch import Tensor

#: network -> (group_size, {Linear name: dequantized 4-bit weight}): the last group size used on each
#: network only (a server taking any group size from requests must not keep a copy per size)
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def quantize_weight_groups(w: Tensor, group_size: int, bits: int = 4) -> Tensor:
    """``w`` (out, in) quantized asymmetrically to ``bits`` per group of ``group_size`` input channels,
    dequantized (a last group shorter than ``group_size`` is its own group)."""
    import torch

    out_f, in_f = w.shape
    levels = 2**bits - 1
    pad = (-in_f) % group_size
    g = torch.nn.functional.pad(w.float(), (0, pad)).view(out_f, -1, group_size)  # (0s: inside the range)
    # the range holds 0 (as torch.ao's observers), so the zero point z = round(-lo / s) is an integer in
    # [0, 2**bits - 1] a kernel can store (a group all of one sign gave z far outside it: unstorable)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, levels)
    return ((q - zero) * scale).view(out_f, -1)[:, :in_f].to(w.dtype)


def quantize_activations(x: Tensor, outliers: float, bits: int = 8) -> Tensor:
    """``x`` (batch, ..., channels) quantized symmetrically to ``bits`` per token, the ``outliers``
    fraction of channels with the largest magnitude in each sample kept in float (chosen per sample, so
    an image's result does not depend on the others in its batch). Gradients pass straight through the
    rounding (the straight-through estimator, Bengio et al. 2013), so a rule that differentiates the
    network (layout, classifier guidance through it) sees the quantized network's slope, not zero."""
    import torch

    c = x.shape[-1]
    rows = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1, c).float()
    keep = torch.zeros(rows.shape[0], 1, c, dtype=torch.bool, device=x.device)
    k = int(round(outliers * c))
    if k > 0:
        keep.scatter_(-1, rows.abs().amax(1, keepdim=True).topk(k, dim=-1).indices, True)
    inner = rows.masked_fill(keep, 0.0)
    qmax = 2 ** (bits - 1) - 1
    scale = (inner.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    q = torch.clamp(torch.round(inner / scale), -qmax, qmax) * scale
    out = torch.where(keep, rows, q)
    if out.requires_grad:
        out = rows + (out - rows).detach()
    return out.view(x.shape).to(x.dtype)


@register_rule
class W4A8(Accelerator):
    name = "w4a8"
    layer = 0
    exclusive = "a quantization"
    summary = "W4A8, group-wise and outlier-aware (DGQ-style), simulated: what 4/8-bit kernels would keep"
    cost = "same evaluations; simulated (slower than float): reports quality, not speed"
    options = {
        "group_size": Option(64, "input channels per 4-bit weight group", kind=int, lo=8, hi=4096),
        "outliers": Option(0.01, "fraction of each Linear's input channels kept in float", lo=0.0, hi=0.5),
    }

    def check(self, run: RunInfo) -> None:
        if run.network is None or not linear_layers(run.network):
            raise VelodiffError("plan rule 'w4a8': the model has no Linear layers to quantize")

    def weights(self, network: Any) -> dict[str, Tensor]:
        import torch

        key = (int(self.group_size), weights_state(network))  # a changed network is quantized again
        old = _WEIGHTS.get(network)
        if old is None or old[0][0] != key[0] or not same_state(old[0][1], key[1]):
            with torch.inference_mode(False), torch.no_grad():  # usable by a later run with gradients
                _WEIGHTS[network] = (key, {
                    name: torch.nn.Parameter(quantize_weight_groups(m.weight, key[0]), False)
                    for name, m in linear_layers(network)
                })
        return _WEIGHTS[network][1]

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        modules = dict(run.network.named_modules())
        self.swapped: list[tuple[Any, Any]] = []
        self.hooks = HookSet("velodiff_w4a8")
        try:
            for name, weight in self.weights(run.network).items():
                module = modules[name]
                self.swapped.append((module, module.weight))
                module.weight = weight
                self.hooks.add(module, _activation_hook(float(self.outliers)))
        except BaseException:
            self.end()
            raise

    def end(self) -> None:
        for module, original in reversed(getattr(self, "swapped", [])):
            module.weight = original
        self.swapped = []
        if getattr(self, "hooks", None) is not None:
            self.hooks.remove()


def _activation_hook(outliers: float) -> Any:
    from diffusers.hooks import ModelHook

    class ActivationQuant(ModelHook):
        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if args:
                args = (quantize_activations(args[0], outliers), *args[1:])
            else:
                kwargs["input"] = quantize_activations(kwargs["input"], outliers)
            return args, kwargs

    return ActivationQuant()
