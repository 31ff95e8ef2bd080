"""Quantized networks as plan rules, through torchao: ``int8`` (weight-only, or with dynamically
quantized activations), and on a CUDA device ``int4`` (weight-only, group-wise) and ``fp8``.

torchao's ``quantize_`` turns a module's Linear weights into quantized tensor subclasses whose matmul
dequantizes (weight-only) or quantizes the activations on the fly (dynamic). Here each Linear's weight
is quantized once per (network, scheme) into a separate tensor, kept beside the network, and swapped in
for a run and back at its end (``Parameter`` swaps, nothing re-quantized, no ``forward`` replaced):
the network's module tree is unchanged, so block hooks and attention processors of the other rules
(caches, PAG, attention maps) work on the quantized network, and a run without the rule uses the
original weights. Costs: the quantized copies' memory beside the originals (a quarter of float32 for
int8), and a run that quantizes must not share its network with a concurrent run without the rule.

A quantized evaluation is a deterministic, smooth function of the input like the original, only
slightly different, so it stays ``exact`` for the solvers (their higher-order terms stay valid). Its
error against the float network is measured per evaluation by :func:`evaluation_error` and end to end
by the quantization bench (``bench/quantize``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import VelodiffError
from ..plan import Accelerator, Option, RunInfo, register_rule

if TYPE_CHECKING:
    from torch import Tensor

#: scheme -> the weight-swaps of each network it was applied to: {network: (state, {module name: weight})}
_CACHE: dict[str, weakref.WeakKeyDictionary] = {}


#: loggers whose import-time warnings on a CPU build are noise: torchao's CUDA kernels that do not load,
#: torch's notes on the enums torchao registers (the CLI sets them to ERROR)
TORCHAO_LOGGERS = ("torchao", "torch.utils._pytree")


def _torchao() -> Any:
    """torchao's quantization module (diffusers may have imported it already)."""
    try:
        import torchao.quantization as q
    except ImportError:
        raise VelodiffError("quantization needs torchao: pip install 'velodiff[quant]'") from None
    return q


def linear_layers(network: Any, min_features: int = 16) -> list[tuple[str, Any]]:
    """(name, module) of the network's Linear layers worth quantizing: both sides at least
    ``min_features`` wide (narrower ones, e.g. a tiny model's time embedding, gain nothing and lose
    the most) and divisible by 16 as torchao's int8 / int4 kernels want."""
    import torch

    return [
        (n, m)
        for n, m in network.named_modules()
        if isinstance(m, torch.nn.Linear)
        and min(m.in_features, m.out_features) >= min_features
        and m.in_features % 16 == 0
    ]


def weights_state(network: Any) -> tuple[tuple[str, Any, int], ...]:
    """What quantized copies of the network's weights are valid for: each quantizable Linear's weight
    object (a weak reference: an ``id`` is reused by a new tensor once the old one is freed) and its
    in-place version (torch's counter, bumped by an in-place edit such as ``edit.erase.apply_erasure``
    or fusing a LoRA), so a changed network is quantized again. Compare two with :func:`same_state`."""
    return tuple((n, weakref.ref(m.weight), m.weight._version) for n, m in linear_layers(network))


def same_state(a: tuple, b: tuple) -> bool:
    """Whether two :func:`weights_state` name the same live weight objects at the same versions."""
    return len(a) == len(b) and all(
        na == nb and va == vb and ra() is not None and ra() is rb()
        for (na, ra, va), (nb, rb, vb) in zip(a, b, strict=True)
    )


class Quantize(Accelerator):
    """Base of the quantization rules: ``config()`` gives torchao's config for the options."""

    layer = 0
    exclusive = "a quantization"
    cost = "same evaluations; cheaper matmuls where the kernels are (time in bench/quantize)"
    #: device types the scheme has kernels for
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: the dtype the kernel quantizes from (None: the weight's own)
    weight_dtype: str | None = None

    def quantizable(self, module: Any) -> bool:
        """Whether this scheme's kernel takes the Linear (beyond :func:`linear_layers`' rule)."""
        return True

    def config(self) -> Any:
        raise NotImplementedError

    def scheme(self) -> str:
        """The cache key: every option's effective value (``int8`` and ``int8:activations=none`` share)."""
        return self.name + "".join(f":{k}={getattr(self, k)}" for k in sorted(self.options))

    def check(self, run: RunInfo) -> None:
        if run.network is None or not linear_layers(run.network):
            raise VelodiffError(f"plan rule {self.name!r}: the model has no Linear layers to quantize")
        device = next(run.network.parameters()).device.type
        if device not in self.devices:
            raise VelodiffError(
                f"plan rule {self.spec()!r} needs a {' or '.join(self.devices)} device "
                f"(torchao's kernels for it); this model is on {device}"
            )

    def quantized_weights(self, network: Any) -> dict[str, Tensor]:
        """Each quantizable Linear's weight, quantized (made on first use, then kept for the network; made
        outside inference mode, so a later run with gradients, e.g. layout guidance, can use them)."""
        import torch

        per_network = _CACHE.setdefault(self.scheme(), weakref.WeakKeyDictionary())
        state = weights_state(network)
        if network not in per_network or not same_state(per_network[network][0], state):
            with torch.inference_mode(False), torch.no_grad():
                per_network[network] = (state, self._quantize(network))
        return per_network[network][1]

    def _quantize(self, network: Any) -> dict[str, Tensor]:
        import torch

        q = _torchao()
        weights = {}
        dtype = getattr(torch, self.weight_dtype) if self.weight_dtype else None
        for name, m in linear_layers(network):
            if not self.quantizable(m):
                continue
            weight = m.weight.detach().to(dtype or m.weight.dtype, copy=True)
            holder = torch.nn.Linear(m.in_features, m.out_features, bias=False, device=weight.device,
                                     dtype=weight.dtype)
            holder.weight = torch.nn.Parameter(weight, requires_grad=False)
            q.quantize_(holder, self.config())
            weights[name] = holder.weight
        return weights

    def begin(self, run: RunInfo) -> None:
        super().begin(run)
        modules = dict(run.network.named_modules())
        self.swapped: list[tuple[Any, Any]] = []
        for name, weight in self.quantized_weights(run.network).items():
            module = modules[name]
            self.swapped.append((module, module.weight))
            module.weight = weight

    def end(self) -> None:
        for module, original in reversed(getattr(self, "swapped", [])):
            module.weight = original
        self.swapped = []


@register_rule
class Int8(Quantize):
    """int8 weights (per output channel), activations in float (``activations=none``, torchao's
    Int8WeightOnlyConfig) or quantized per token at run time (``dynamic``,
    Int8DynamicActivationInt8WeightConfig): diffusers' TorchAoConfig ``int8wo`` / ``int8dq``."""

    name = "int8"
    summary = "int8 weights through torchao (weight-only, or dynamic int8 activations): int8wo / int8dq"
    options = {
        "activations": Option("none", "none: weight-only (int8wo); dynamic: int8 activations too (int8dq)",
                              kind=str, choices=("none", "dynamic")),
    }

    def config(self) -> Any:
        q = _torchao()
        if self.activations == "dynamic":
            return q.Int8DynamicActivationInt8WeightConfig()
        return q.Int8WeightOnlyConfig()


@register_rule
class Int4(Quantize):
    """int4 weights in groups of ``group_size`` input channels, activations in bfloat16 (torchao's
    Int4WeightOnlyConfig, diffusers' ``int4wo``) on torch's own CUDA kernel (tinygemm,
    ``aten._weight_int4pack_mm``: torchao's ``tile_packed_to_4d`` format, quantized from bfloat16
    weights; torchao's default ``plain`` format needs the separate mslk kernels). Linears whose input
    width is not a multiple of ``group_size`` stay in float."""

    name = "int4"
    devices = ("cuda",)
    weight_dtype = "bfloat16"
    summary = "int4 group-wise weights through torchao (int4wo; CUDA)"
    options = {"group_size": Option(128, "input channels per scale: 32, 64, 128 or 256", kind=int, lo=32)}

    def check(self, run: RunInfo) -> None:
        if self.group_size not in (32, 64, 128, 256):
            raise VelodiffError(f"plan rule 'int4': group_size is 32, 64, 128 or 256, not {self.group_size}")
        super().check(run)
        if not any(self.quantizable(m) for _, m in linear_layers(run.network)):
            raise VelodiffError(f"plan rule {self.spec()!r}: no Linear layer's input width is a multiple of "
                                f"group_size {self.group_size}; try a smaller group_size")

    def config(self) -> Any:
        return _torchao().Int4WeightOnlyConfig(group_size=self.group_size,
                                               int4_packing_format="tile_packed_to_4d")

    def quantizable(self, module: Any) -> bool:
        return module.in_features % self.group_size == 0


@register_rule
class Fp8(Quantize):
    """float8 (e4m3) weights, activations in float (``none``) or float8 per tensor at run time
    (``dynamic``): torchao's Float8WeightOnlyConfig / Float8DynamicActivationFloat8WeightConfig,
    diffusers' ``float8wo`` / ``float8dq``; CUDA (Ada / Hopper for the dynamic kernels)."""

    name = "fp8"
    devices = ("cuda",)
    summary = "float8 weights (and activations) through torchao (float8wo / float8dq; CUDA)"
    options = {
        "activations": Option("none", "none: weight-only; dynamic: float8 activations too", kind=str,
                              choices=("none", "dynamic")),
    }

    def config(self) -> Any:
        q = _torchao()
        if self.activations == "dynamic":
            return q.Float8DynamicActivationFloat8WeightConfig()
        return q.Float8WeightOnlyConfig()


def evaluation_error(model: Any, rule: Quantize, *, t: float = 0.5, seed: int = 0, prompt: str = "") -> float:
    """Relative L2 error ``|f_q(x) - f(x)| / |f(x)|`` of one conditional network evaluation (x0) of the
    quantized network against the float one, at time ``t`` from the prior's noise scaled as at t."""
    import torch

    from ..noise import prior_sample, randn

    network = model.network
    noise = randn(model.latent_shape(1, *model.default_size), seed)
    x = prior_sample(model.schedule, t, noise).to(model.device, model.dtype)  # a flow's x_t is narrower
    cond = model.encode_prompt([prompt or "a photo"], guided=False)
    den = model.denoiser
    with torch.inference_mode():
        ref = den(x, t, cond)
        run = RunInfo(schedule=model.schedule, ts=torch.tensor([t, 0.0]), solver=None, batch=1,
                      conds={"cond": cond}, model=model, network=network)
        rule.check(run)
        rule.begin(run)
        try:
            out = den(x, t, cond)
        finally:
            rule.end()
    return float((out - ref).flatten().norm() / ref.flatten().norm())


#: the times a single-evaluation report samples (``evaluation_report``)
REPORT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def quantization_rules(plans: Sequence[str]) -> list[tuple[str, Any]]:
    """(plan string, rule) for plan strings that are one quantization rule each (int8, fp8, int4,
    w4a8); one line for one that is not, or for none."""
    from ..plan import Plan
    from .w4a8 import W4A8

    rules = []
    for text in plans:
        parsed = Plan.parse(text).rules
        if len(parsed) != 1 or not isinstance(parsed[0], (Quantize, W4A8)):
            raise VelodiffError(f"{text!r} is not one quantization rule (int8, fp8, int4, w4a8)")
        rules.append((text, parsed[0]))
    if not rules:
        raise VelodiffError("no quantization rule to report; give one, e.g. int8")
    return rules


def evaluation_report(
    model: Any, plans: Sequence[str], prompts: Sequence[str], times: Sequence[float] = REPORT_TIMES
) -> list[dict[str, Any]]:
    """Each quantization rule's :func:`evaluation_error` over ``prompts`` x ``times`` (prompt i with noise
    seed i): ``{"plan", "median", "max", "n"}`` per rule (``velodiff bench quantize``). Each plan string is
    one quantization rule (int8, fp8, int4, w4a8), or one line says it is not."""
    import statistics

    records = []
    for text, rule in quantization_rules(plans):
        errors = [evaluation_error(model, rule, t=t, seed=i, prompt=p)
                  for i, p in enumerate(prompts) for t in times]
        records.append(
            {"plan": text, "median": statistics.median(errors), "max": max(errors), "n": len(errors)}
        )
    return records
