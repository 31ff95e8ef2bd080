"""Time per network evaluation against the physical limit of the machine, per plan (issue 10, item 6).

The limit of one evaluation is its floating-point work over the machine's measured matmul rate:
``limit = FLOPs per evaluation / peak``, the FLOPs counted by ``torch.utils.flop_counter`` on one call
of the network (convolutions, matmuls, attention; elementwise work is not counted, so the limit is a
lower bound), the peak the median rate of a square float32 matmul (``peak_size``) on the same device
and threads. A plan's evaluation time is the sampling loop's time over its evaluations (a text2img run
to latents at fixed steps, medians of ``rounds`` alternating runs, after a warm-up that pays any
compilation), so solver and plan overheads count. ``x limit`` = time / limit: 1 means the network runs
at the matmul peak. The distance of each plan's latents to the plain run's is reported beside it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch


def matmul_peak(size: int = 1024, repeats: int = 9, device: str | torch.device = "cpu") -> float:
    """FLOP/s of a float32 ``size`` x ``size`` matmul on ``device`` with the current threads (median)."""
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    a @ b
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times)


def evaluation_flops(model: Any, batch: int, prompt: str = "a red circle") -> float:
    """FLOPs of one conditional network evaluation per image row at the model's default size."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = model.default_size
    x = torch.randn(model.latent_shape(batch, h, w), device=model.device)
    cond = model.encode_prompt([prompt] * batch, guided=False)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.denoiser(x, 0.5, cond)
    return counter.get_total_flops() / batch


def roofline(
    model: Any,
    plans: Sequence[str],
    *,
    batch: int = 1,
    steps: int = 10,
    rounds: int = 7,
    prompt: str = "a red circle",
    peak_size: int = 1024,
) -> list[dict[str, Any]]:
    """One record per plan: seconds per evaluation row, FLOPs, peak, limit, x limit, distance to the plain
    run (max abs latent difference), evaluations."""
    from ..pipelines import text2img

    prompts, seeds = [prompt] * batch, list(range(batch))
    kw = dict(steps=steps, output="latent")

    def run(plan: str) -> Any:
        rules = [] if plan in ("", "none") else [plan]
        return text2img(model, prompts, seeds=seeds, plan=rules, **kw)

    plain = run("none").latents
    outputs = {p: run(p) for p in plans}  # warm-up: compilation, quantized copies, caches
    times: dict[str, list[float]] = {p: [] for p in plans}
    for _ in range(rounds):
        for p in plans:  # alternating, so a busy spell of the machine touches every plan alike
            t0 = time.perf_counter()
            run(p)
            times[p].append(time.perf_counter() - t0)
    flops = evaluation_flops(model, batch, prompt)
    peak = matmul_peak(peak_size, device=model.device)
    records = []
    for p in plans:
        res = outputs[p]
        evals = res.evals * batch  # image rows evaluated
        per_eval = statistics.median(times[p]) / evals
        limit = flops / peak
        records.append(
            {
                "plan": p,
                "batch": batch,
                "steps": steps,
                "evals_per_image": res.evals,
                "s_per_eval_row": per_eval,
                "gflop_per_eval_row": flops / 1e9,
                "peak_gflops": peak / 1e9,
                "limit_s": limit,
                "x_limit": per_eval / limit,
                "max_abs_diff_to_plain": float((res.latents - plain).abs().max()),
                "threads": torch.get_num_threads(),
                "device": str(model.device),
            }
        )
    return records


def roofline_table(records: Sequence[dict[str, Any]]) -> str:
    """The roofline records as a markdown table (one row per plan and batch)."""
    from .tables import markdown_table

    headers = ["plan", "batch", "ms / eval row", "GFLOP / eval row", "peak GFLOP/s", "limit ms", "x limit",
               "max diff"]
    rows = [[f"`{r['plan']}`", r["batch"], f"{1e3 * r['s_per_eval_row']:.2f}",
             f"{r['gflop_per_eval_row']:.3f}", f"{r['peak_gflops']:.1f}", f"{1e3 * r['limit_s']:.2f}",
             f"{r['x_limit']:.2f}", f"{r['max_abs_diff_to_plain']:.1e}"] for r in records]
    return markdown_table(headers, rows, align="lrrrrrrr") + "\n"
