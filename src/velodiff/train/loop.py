"""The shared training loop: steps, LR warm-up, gradient clipping, EMA, loss CSV, progress bar,
time budget, and checkpoints that resume bit-exactly."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import Stopped, VelodiffError
from ..files import lock_folder, write_atomic
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    save_checkpoint,
    split_prefix,
    with_prefix,
)
from .ema import EMA


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for every random draw of one step: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    #: clip each module's gradient norm on its own (two networks trained against each other, as DMD's
    #: generator and fake score) instead of all modules' together; the logged norm is the first module's
    clip_per_module: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    max_minutes: float | None = None
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)


#: step_fn(step, generator) -> (loss to backpropagate, dict of scalars (floats or 0-d tensors) to log)
StepFn = Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, Any]]]


def lr_at(cfg: LoopConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


#: settings (``LoopConfig.extra``) a resumed run may change: how long it trains, how many pairs it
#: caches, what its student samples with by default; any other change (the teacher, the guidance, the
#: batch, the method, the architecture) is refused, since the run would go on learning something else
GROWS = frozenset({"steps", "reflow_steps", "distill_steps", "pairs", "eval_pairs", "sample_steps", "rounds"})
#: per method, settings that only decide how its student is measured or samples by default, so a resume
#: may change them too: a guided student's default scale (it learns every scale in [w_min, w_max]), the
#: ODE steps reflow measures straightness with
AFTER_TRAINING = {"guided": frozenset({"guidance"}), "reflow": frozenset({"ode_steps"})}
#: the ``LoopConfig.extra`` key a stage of a chain (a progressive round, reflow's distillation phase) holds
#: the digest of the weights it starts from in (``checkpoint.weights_digest``): a resume from other ones,
#: because the stage before was trained further, is refused
START = "start"


def run_loop(
    run: Path,
    cfg: LoopConfig,
    modules: dict[str, nn.Module],
    step_fn: StepFn,
    *,
    desc: str = "train",
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``modules`` with AdamW until ``cfg.steps`` (or the time budget); resume from ``run``'s
    latest checkpoint when there is one. Returns a summary (steps, wall seconds, final loss).

    The modules train on the device they are on; the loss is read back to the host only every
    ``cfg.log_every`` steps (a GPU runs ahead in between). The run folder is this process's while it
    trains: a second run of the same folder is one line (they would delete each other's checkpoints).
    SIGTERM (in the main thread) ends the run after the current step and its checkpoint, raising
    :class:`velodiff.errors.Stopped`; ``--max-minutes`` ends it the same way but returns (not completed)."""
    run.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(run, "--run")
    try:
        return _run_loop(run, cfg, modules, step_fn, desc=desc, quiet=quiet)
    finally:
        lock.close()


def _run_loop(
    run: Path,
    cfg: LoopConfig,
    modules: dict[str, nn.Module],
    step_fn: StepFn,
    *,
    desc: str,
    quiet: bool,
) -> dict[str, Any]:
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    fused = bool(params) and params[0].is_cuda
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=fused or None
    )
    emas = {name: EMA(m, cfg.ema_decay) for name, m in modules.items()}
    clip_groups = [[p for p in m.parameters() if p.requires_grad] for m in modules.values()]
    clip_groups = [g for g in clip_groups if g] if cfg.clip_per_module else [params]
    step, wall = 0, 0.0
    resumed_loss = float("nan")
    log_path = run / "loss.csv"

    ck = latest_checkpoint(run)
    if ck is not None:
        tensors, meta = load_checkpoint(ck)
        saved_cfg = meta.get("config", {})
        for key in ("lr", "seed", "warmup", "weight_decay", "grad_clip", "ema_decay"):
            if key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
                raise VelodiffError(
                    f"run {run} was started with {key}={saved_cfg[key]}, not {getattr(cfg, key)}; "
                    "use a new --run folder"
                )
        saved_extra, extra = (json.loads(json.dumps(e)) for e in (saved_cfg.get("extra", {}), cfg.extra))
        free = GROWS | AFTER_TRAINING.get(saved_extra.get("method"), frozenset())
        for key in sorted(set(saved_extra) & set(extra) - free):  # what the run learns from and how
            if key == START and saved_extra[key] != extra[key]:
                raise VelodiffError(
                    f"run {run} was trained from other weights than this stage starts from now (the stage "
                    f"before it trained further since); delete {run} to train this stage again from them, "
                    "or use a new --run folder"
                )
            if saved_extra[key] != extra[key]:
                raise VelodiffError(
                    f"run {run} was started with {key}={saved_extra[key]!r}, not {extra[key]!r}; "
                    "use a new --run folder (or the run's own settings)"
                )
        for name, m in modules.items():
            m.load_state_dict(split_prefix(tensors, f"model.{name}."))
            emas[name].load_state_dict(split_prefix(tensors, f"ema.{name}."), meta["ema_updates"])
        load_optimizer_tensors(opt, split_prefix(tensors, "opt."), meta["optimizer"])
        step, wall = int(meta["step"]), float(meta["wall_s"])
        threads = meta.get("torch_threads")
        if threads is not None and int(threads) != torch.get_num_threads() and not fused:  # CPU sums
            warnings.warn(f"run {run} was trained with {threads} CPU threads, this resume with "
                          f"{torch.get_num_threads()}: it goes on, but not bit-exactly as one uninterrupted "
                          f"run (give --threads {threads})", stacklevel=2)
        if not quiet:
            print(f"resumed {run} at step {step} ({wall / 60:.1f} min trained)", flush=True)
    # rows after the checkpoint go (all of them: killed before one), and the checkpoint's own row when
    # only a stop logged it (a time budget, a signal, a shorter --steps): one run's log, however split
    logged = step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step >= cfg.steps
    resumed_loss = _truncate_log(log_path, step if logged else step - 1)

    def checkpoint() -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, m in modules.items():
            tensors.update(with_prefix(f"model.{name}.", m.state_dict()))
            tensors.update(with_prefix(f"ema.{name}.", emas[name].state_dict()))
        ot, ometa = optimizer_tensors(opt)
        tensors.update(with_prefix("opt.", ot))
        cfg_json = {k: v for k, v in vars(cfg).items() if k not in ("max_minutes",)}
        save_checkpoint(
            run,
            step,
            {k: v.detach().cpu() for k, v in tensors.items()},
            {
                "config": cfg_json,
                "optimizer": ometa,
                "ema_updates": next(iter(emas.values())).updates,
                "wall_s": wall,
                "torch_threads": torch.get_num_threads(),
            },
        )

    stop = {"flag": False, "signal": 0}

    def on_term(signum: int, frame: Any) -> None:
        stop["flag"], stop["signal"] = True, signum

    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    new_log = not log_path.exists()
    logf = log_path.open("a", newline="")
    writer = csv.writer(logf)
    if new_log:
        writer.writerow(["step", "loss", "lr", "grad_norm", "wall_s", "extra"])
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=desc, mininterval=5.0, dynamic_ncols=True)
    t_start = time.perf_counter() - wall
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    if wall >= budget:  # the run's training time (over its resumes) is spent: not one more step
        stop["flag"] = True
    last = resumed_loss
    smooth = None
    try:
        for m in modules.values():
            m.train()
        while step < cfg.steps and not stop["flag"]:
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, logs = step_fn(step, step_generator(cfg.seed, step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = (
                [torch.nn.utils.clip_grad_norm_(g, cfg.grad_clip) for g in clip_groups][0]
                if cfg.grad_clip > 0
                else torch.tensor(0.0)
            )
            opt.step()
            for name, m in modules.items():
                emas[name].update(m)
            step += 1
            wall = time.perf_counter() - t_start
            if wall >= budget:
                stop["flag"] = True
            save = step % cfg.checkpoint_every == 0 or step == cfg.steps or stop["flag"]
            if step % cfg.log_every == 0 or step == cfg.steps or save:
                last = loss.item()  # a NaN stops the run before it reaches a checkpoint
                if not math.isfinite(last):
                    raise VelodiffError(f"the loss became {last} by step {step}; lower --lr")
                smooth = last if smooth is None else 0.8 * smooth + 0.2 * last
                logs = {k: round(float(v), 5) for k, v in logs.items()}
                writer.writerow(
                    [step, f"{last:.6f}", f"{lr:.3e}", f"{float(gn):.4f}", f"{wall:.1f}", json.dumps(logs)]
                )
                logf.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if save:
                checkpoint()
    finally:
        logf.close()
        if bar is not None:
            bar.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if stop["signal"] and step < cfg.steps:  # checkpointed above (a stop saves): end as the signal would
        name = signal.Signals(stop["signal"]).name
        raise Stopped(f"{desc}: stopped by {name} at step {step} of {cfg.steps}; rerun the same command to "
                      f"resume from {run}", stop["signal"])
    return {
        "steps": step,
        "wall_s": wall,
        "final_loss": last,
        "smoothed_loss": smooth,
        "emas": emas,
        "completed": step >= cfg.steps,
    }


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _truncate_log(path: Path, step: int) -> float:
    """Drop loss rows after the resumed step (written after the last checkpoint of a killed run); returns
    the last loss kept (nan if none), the run's final loss when it resumes already complete."""
    if not path.exists():
        return float("nan")
    rows = list(csv.reader(path.open()))

    def kept(r: list[str]) -> bool:  # a row half written when the run was killed goes too
        if not r or r[0] == "step":
            return True
        try:
            float(r[1])
            return int(r[0]) <= step
        except (ValueError, IndexError):
            return False

    keep = [r for r in rows if kept(r)]
    text = io.StringIO()
    csv.writer(text).writerows(keep)
    write_atomic(path, text.getvalue())  # whole or not at all: a full disk keeps the old log
    losses = [float(r[1]) for r in keep if r and r[0] != "step"]
    return losses[-1] if losses else float("nan")


def _latest(run: Path) -> Path:
    """A finished or interrupted run's latest checkpoint; one line when there is none."""
    if not Path(run).is_dir():
        raise VelodiffError(f"run folder {str(run)!r} does not exist")
    ck = latest_checkpoint(run)
    if ck is None:
        raise VelodiffError(f"no checkpoint in {run}")
    return ck


def load_run_weights(run: Path, name: str, ema: bool = True) -> dict[str, torch.Tensor]:
    """The (EMA) weights of module ``name`` from a run's latest checkpoint."""
    ck = _latest(run)
    tensors, _ = load_checkpoint(ck)
    return split_prefix(tensors, f"{'ema' if ema else 'model'}.{name}.")


def run_meta(run: Path, stage: str | None = None, what: str = "run") -> dict[str, Any]:
    """The latest checkpoint's metadata; with ``stage`` ("autoencoder", "ldm"), refused in one line
    when the run trained another stage (the two runs of ``train export`` given the wrong way round)."""
    ck = _latest(run)
    meta = json.loads((ck / "state.json").read_text())
    found = meta.get("config", {}).get("extra", {}).get("stage")
    if stage is not None and found != stage:
        made = f"`velodiff train {found}`" if found else "another tool"
        raise VelodiffError(f"{what} {str(run)!r} is a run of {made}, not of `velodiff train {stage}`")
    return meta
