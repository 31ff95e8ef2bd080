"""End-to-end generation speed, velodiff vs diffusers, on identical weights, prompts, noise, time
steps, solver and NFE.

For each model the diffusers pipeline is built from the very modules velodiff loaded
(``model.to_diffusers``), so both run the same weights in the same process. One image per call:
prompt -> text encoders -> sampling -> VAE decode -> an image tensor in [0, 1]; noise from the same
CPU generator seed (velodiff ``noise="torch"``). The solver is one both implement (DPM-Solver++(2M)
for the UNet models, flow Euler for SD3 and Flux) on diffusers' own time steps for that NFE.

Measured per model (``runs`` paired runs after one warm-up each, the order alternating inside the
pairs so that neither side always runs first):

* ``seconds_median``: median seconds per image;
* ``ratio_median``: median over pairs of velodiff's seconds / diffusers' (the bar: <= 1.00);
* ``cpu_seconds_median`` / ``cpu_ratio_median``: the same in process CPU time (all threads), which
  a machine shared with other jobs disturbs less than wall time;
* ``peak_mb``: CUDA: peak allocated memory during a call; CPU: peak resident set size of the
  process during a call (sampled every 2 ms; the weights are shared, so it includes them);
* ``max_abs_diff``: max |velodiff image - diffusers image| over pixels in [0, 1].
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tables

#: the models of the benchmark: the shipped default model and tiny random models (velodiff.models.tiny)
MODELS = ("default", "sd15", "sdxl", "sd3", "flux")
#: the tiny random models the bench builds (any other name is a shipped model or a path)
TINY = ("sd15", "sdxl", "sd3", "flux")
PROMPT = "a photo of a red cat on the table"
#: outputs must agree within this (max abs difference of images in [0, 1]) per weight dtype
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
BAR_MAX_RATIO = 1.00


@dataclass(frozen=True)
class Case:
    """How one model is compared: velodiff's solver, diffusers' scheduler class, CFG scale."""

    solver: str
    scheduler: str
    guidance: float


CASES = {
    "sd": Case("dpmpp_2m", "DPMSolverMultistepScheduler", 7.5),
    "sdxl": Case("dpmpp_2m", "DPMSolverMultistepScheduler", 5.0),
    "sd3": Case("euler", "FlowMatchEulerDiscreteScheduler", 7.0),
    "flux": Case("euler", "FlowMatchEulerDiscreteScheduler", 1.0),
    "pixart": Case("dpmpp_2m", "DPMSolverMultistepScheduler", 4.5),
}


def model_folders(names: Sequence[str], cache: Path) -> dict[str, Path]:
    """Where the named models are: the tiny random ones (:data:`TINY`), built into ``cache`` on first
    use; a shipped model by name (the default one skipped when not installed) or a path."""
    from ..models.tiny import save_tiny
    from ..shipped import resolve_model

    out: dict[str, Path] = {}
    for name in names:
        if name not in TINY:
            path = resolve_model(name)
            if name != "default" or (path / "model_index.json").is_file():
                out[name] = path
            continue
        path = cache / name
        if not (path / "model_index.json").is_file():
            save_tiny(name, path)
        out[name] = path
    return out


class PeakMemory:
    """Peak memory (MB) while the block runs: CUDA allocated memory, or the process's resident set
    size sampled every 2 ms on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        import resource

        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = self.rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float, float, torch.Tensor]:
    """(wall seconds, process CPU seconds, peak MB, output) of one call."""
    with PeakMemory(device) as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, mem.peak_mb, out


def case_for(model: Any) -> Case:
    return CASES["sd" if model.family in ("sd1", "sd2") else model.family]


def diffusers_grid(model: Any, pipe: Any) -> list[float]:
    """velodiff times of the steps diffusers' scheduler just ran (after a call), ending at 0."""
    sched = pipe.scheduler
    if model.family in ("sd3", "flux"):
        return sched.sigmas.double().tolist()  # flow: t = sigma, final 0 included
    return model.schedule.t_from_timestep(sched.timesteps.double().cpu()).tolist() + [0.0]


def make_callers(
    model: Any, pipe: Any, *, steps: int, size: tuple[int, int], seed: int, prompt: str
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(velodiff call, diffusers call), each generating one image tensor (1, 3, H, W) in [0, 1]."""
    from ..pipelines import text2img

    case = case_for(model)
    h, w = size
    dkw: dict[str, Any] = {"guidance_scale": case.guidance}
    if model.family == "flux":
        dkw["guidance_scale"] = model.embedded_guidance or 0.0  # the embedded guidance (dev); no true CFG
    if model.family == "pixart":
        dkw["use_resolution_binning"] = False  # the size asked for (velodiff does not bin either)

    def run_diffusers() -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(seed)
        return pipe(
            prompt, num_inference_steps=steps, height=h, width=w, generator=g, output_type="pt", **dkw
        ).images

    run_diffusers()  # warm-up; also sets the scheduler's time steps for this NFE
    grid = diffusers_grid(model, pipe)

    def run_velodiff() -> torch.Tensor:
        return text2img(
            model,
            prompt,
            grid=grid,
            solver=case.solver,
            guidance=case.guidance,
            seeds=[seed],
            noise="torch",
            height=h,
            width=w,
            output="tensor",
        ).images

    run_velodiff()  # warm-up
    return run_velodiff, run_diffusers


def bench_model(
    name: str,
    path: Path,
    *,
    nfe: int,
    runs: int,
    device: str,
    dtype: str,
    seed: int = 0,
    prompt: str = PROMPT,
    size: int | None = None,
    progress: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """The two records (velodiff, diffusers) for one model."""
    import diffusers
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from ..models import load
    from ..models.tiny import IMAGE_SIZE

    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    model = load(path, dtype=dtype, device=device)
    case = case_for(model)
    sched_cls = getattr(diffusers, case.scheduler)
    pipe = model.to_diffusers(sched_cls.from_config(model.components["scheduler_config"]))
    pipe.set_progress_bar_config(disable=True)
    hw = (size, size) if size else (IMAGE_SIZE, IMAGE_SIZE) if name in TINY else model.default_size
    steps = nfe  # both solvers make one network call per step
    callers = dict(
        zip(
            ("velodiff", "diffusers"),
            make_callers(model, pipe, steps=steps, size=hw, seed=seed, prompt=prompt),
            strict=True,
        )
    )
    secs: dict[str, list[float]] = {"velodiff": [], "diffusers": []}
    cpu: dict[str, list[float]] = {"velodiff": [], "diffusers": []}
    peaks: dict[str, float] = {"velodiff": 0.0, "diffusers": 0.0}
    outs: dict[str, torch.Tensor] = {}
    for r in range(runs):
        for impl in ("velodiff", "diffusers") if r % 2 == 0 else ("diffusers", "velodiff"):
            s, c, mb, out = timed(callers[impl], model.device)
            secs[impl].append(s)
            cpu[impl].append(c)
            peaks[impl] = max(peaks[impl], mb)
            outs[impl] = out
        if progress is not None:
            progress()
    diff = float((outs["velodiff"].float().cpu() - outs["diffusers"].float().cpu()).abs().max())

    def paired(x: dict[str, list[float]]) -> float:
        return statistics.median(v / d for v, d in zip(x["velodiff"], x["diffusers"], strict=True))

    common = {
        "model": name,
        "family": model.family,
        "nfe": nfe,
        "steps": steps,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "size": list(hw),
        "runs": runs,
        "max_abs_diff": diff,
        "tolerance": TOLERANCE[model.dtype],
        "ratio_median": paired(secs),
        "cpu_ratio_median": paired(cpu),
    }
    return [
        {
            **common,
            "impl": impl,
            "solver": case.solver if impl == "velodiff" else case.scheduler,
            "seconds_median": statistics.median(secs[impl]),
            "seconds": secs[impl],
            "cpu_seconds_median": statistics.median(cpu[impl]),
            "peak_mb": peaks[impl],
        }
        for impl in ("velodiff", "diffusers")
    ]


def pipeline_table(records: Sequence[dict[str, Any]], command: str = "") -> str:
    """One row per model: seconds per image, the paired ratio, peak memory, output difference."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_model.setdefault(r["model"], {})[r["impl"]] = r
    lines = []
    if command:
        lines += [f"`{command}`", ""]
    headers = ["model", "device / dtype", "NFE", "velodiff s/img", "diffusers s/img",
               "ratio (median of pairs)", "CPU-time ratio", "peak MB velodiff / diffusers",
               "max abs diff", "bar"]
    rows = []
    for name, pair in by_model.items():
        v, d = pair["velodiff"], pair["diffusers"]
        ok = v["ratio_median"] <= BAR_MAX_RATIO and v["max_abs_diff"] <= v["tolerance"]
        rows.append([
            f"{name} ({v['family']})", f"{v['device']} / {v['dtype']}", v["nfe"],
            f"{v['seconds_median']:.4f}", f"{d['seconds_median']:.4f}", f"{v['ratio_median']:.3f}",
            f"{v['cpu_ratio_median']:.3f}", f"{v['peak_mb']:.0f} / {d['peak_mb']:.0f}",
            f"{v['max_abs_diff']:.2e}", "pass" if ok else "FAIL",
        ])
    lines.append(tables.markdown_table(headers, rows, align="llrrrrrrrl"))
    if any(pair["velodiff"]["device"].startswith("cpu") for pair in by_model.values()):
        lines += ["", "Peak MB on the CPU is the whole process's resident set during the call (the two "
                  "pipelines share its weights and libraries), so it does not tell them apart; on a GPU it "
                  "is each call's peak allocated memory."]
    return "\n".join(lines) + "\n"
