"""Compiled execution as a plan rule: ``compile`` runs the network through ``torch.compile`` (TorchInductor
by default) and, with ``channels_last=true``, in channels-last memory format, for the run only.

``nn.Module.compile`` compiles the module in place (its ``__call__`` goes through the compiled code; the
module tree, parameters and hooks stay as they are), and ``end`` restores the eager call, so a run
without the rule is eager again. TorchDynamo keeps its compiled code per code object: the first run of
a (network, shape, options) pays the compilation (tens of seconds on a CPU), the next ones reuse it.
Rules that hook inside the network (caches, attention instruments) are traced with it: graph breaks
there fall back to eager Python, so they stay correct but gain less.

A compiled evaluation computes the same function with reordered floating-point operations (fused
kernels), so it stays ``exact`` for the solvers; its distance to the eager output and its time per
evaluation against the physical limit (FLOPs over the measured matmul peak) are reported by
``velodiff bench roofline``.
"""

from __future__ import annotations

from typing import Any

from ..errors import VelodiffError
from ..plan import Accelerator, Option, RunInfo, register_rule

#: torch.compile modes that need no CUDA graphs (those work on every device)
MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@register_rule
class Compile(Accelerator):
    name = "compile"
    layer = 0
    exclusive = "compiled execution"
    cost = "same evaluations; the first run per shape pays the compilation (time in bench/compile)"
    summary = "torch.compile of the network (TorchInductor), optionally channels-last"
    options = {
        "mode": Option("default", "torch.compile mode", kind=str, choices=MODES),
        "channels_last": Option(False, "run the network in channels-last memory format", kind=bool),
        "backend": Option(
            "inductor",
            "torch.compile backend (eager: Dynamo's tracing only)",
            kind=str,
            choices=("inductor", "eager", "aot_eager"),
        ),
    }

    def check(self, run: RunInfo) -> None:
        if run.network is None:
            raise VelodiffError("plan rule 'compile' needs a model with a network (a UNet or a transformer)")
        device = next(run.network.parameters()).device.type
        if self.mode in ("reduce-overhead", "max-autotune") and device != "cuda":
            raise VelodiffError(
                f"plan rule 'compile': mode {self.mode!r} uses CUDA graphs; on {device} use "
                f"'default' or 'max-autotune-no-cudagraphs'"
            )

    def begin(self, run: RunInfo) -> None:
        import torch

        super().begin(run)
        network: Any = run.network
        self.previous = getattr(network, "_compiled_call_impl", None)
        network.compile(mode=self.mode, backend=self.backend, dynamic=False)
        self.format_changed = bool(self.channels_last)
        if self.format_changed:
            network.to(memory_format=torch.channels_last)

    def end(self) -> None:
        import torch

        network: Any = getattr(self, "run", None) and self.run.network
        if network is None:
            return
        network._compiled_call_impl = self.previous
        if getattr(self, "format_changed", False):
            network.to(memory_format=torch.contiguous_format)
            self.format_changed = False
