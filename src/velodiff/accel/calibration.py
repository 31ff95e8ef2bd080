"""Cache calibration: how fast each block's features change along the sampling path of one model, measured
once (``velodiff calibrate cache``) and saved keyed by the model's hash, so a cache schedule is fitted to
the model instead of copied from a paper (``deepcache:schedule=budget``).

The ``feature_change`` instrument records, at every step i of a fine run, the relative L1 change of each
block's output from step i-1 to i (conditional branch, mean over the images). The artefact stores it as
a rate per unit of time at the middle of each step, so it transfers to any grid of the same model:
the change a run's step from t_a to t_b > ... is expected to see is ``rate(t_mid) * |t_a - t_b|``
(linear interpolation of the rate in t).

On a diffusion transformer that ``fbcache`` serves, the calibration also runs the rule itself at a
ladder of thresholds (:data:`FBCACHE_THRESHOLDS`) on the same prompts at the model's default steps and
records, per threshold, the fraction of evaluations that skipped the remaining blocks and the RMS latent
distance to the plain run: ``fbcache:reuse=F`` then takes the threshold that reused a fraction F of the
evaluations on this model (interpolated in log-threshold), instead of a constant copied from a paper.

The artefact lives in ``$VELODIFF_CACHE/calibration/cache-<model hash>.json`` (default
``~/.cache/velodiff``) and is found by the model's hash; a file made for another model is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..files import write_atomic
from ..limits import is_number

VERSION = 1

#: the first-block-cache thresholds the calibration runs (relative L1 change of the first block's residual)
FBCACHE_THRESHOLDS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def calibration_dir() -> Path:
    from ..files import cache_root

    return cache_root() / "calibration"


def cache_calibration_path(model_hash: str) -> Path:
    return calibration_dir() / f"cache-{model_hash}.json"


def calibrate_cache(
    model: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = 50,
    solver: str = "dpmpp_2m",
    guidance: float | None = None,
    batch: int = 16,
) -> dict[str, Any]:
    """Run ``steps``-step generations of ``prompts`` x ``seeds`` with the feature-change instrument on
    every block; return the artefact (rates per block at each step's middle time)."""
    import numpy as np

    from ..eval.reference import model_identity
    from ..pipelines import text2img
    from .hooks import FeatureChange

    if steps < 3:
        raise VelodiffError(f"cache calibration needs at least 3 steps, got {steps}")
    sums: dict[str, np.ndarray] = {}
    count, ts = 0, None
    for i in range(0, len(prompts), batch):
        probe = FeatureChange()
        res = text2img(
            model,
            prompts[i : i + batch],
            seeds=seeds[i : i + batch],
            steps=steps,
            solver=solver,
            guidance=guidance,
            plan=[probe],
            output="latent",
        )
        ts = res.ts.double().numpy()
        n = len(res.seeds)
        for block, curve in probe.curves().items():
            sums[block] = sums.get(block, np.zeros(len(curve))) + n * np.asarray(curve)
        count += n
    assert ts is not None
    # the change recorded at step i (i >= 1) is from the evaluation at ts[i-1] to the one at ts[i]
    dt = ts[:-2] - ts[1:-1]
    mid = (ts[:-2] + ts[1:-1]) / 2
    extra = {}
    if _fbcache_serves(model):
        extra["fbcache"] = fbcache_table(model, prompts, seeds, solver=solver, guidance=guidance, batch=batch)
    return {
        "version": VERSION,
        "kind": "cache",
        "model_hash": model_identity(model),
        "model": str(model.path),
        "solver": solver,
        "steps": steps,
        "guidance": guidance if guidance is not None else model.default_guidance,
        "images": count,
        "t_mid": mid.tolist(),
        "rate": {b: (s / count / dt).tolist() for b, s in sums.items()},
        **extra,
    }


def _fbcache_serves(model: Any) -> bool:
    from ..plan import RunInfo
    from .block_cache import FirstBlockCache

    try:
        run = RunInfo(None, None, None, 1, {}, model=model, network=model.network)
        FirstBlockCache(threshold=0.0).check(run)  # (a threshold given: whether it serves, not a calibration)
    except VelodiffError:
        return False
    return True


def fbcache_table(
    model: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    solver: str = "dpmpp_2m",
    guidance: float | None = None,
    batch: int = 16,
    thresholds: tuple[float, ...] = FBCACHE_THRESHOLDS,
) -> dict[str, Any]:
    """``fbcache`` at each threshold on ``prompts`` x ``seeds`` at the model's default steps: the fraction
    of evaluations that reused the remaining blocks and the RMS latent distance to the plain run."""
    from ..pipelines import text2img
    from .block_cache import FirstBlockCache

    steps = int(model.default_steps)
    kw = dict(steps=steps, solver=solver, guidance=guidance, output="latent")
    reuse, rms = [], []
    plains = [
        text2img(model, prompts[i : i + batch], seeds=seeds[i : i + batch], **kw).latents
        for i in range(0, len(prompts), batch)
    ]
    for th in thresholds:
        cached = total = 0
        sq = 0.0
        for k, i in enumerate(range(0, len(prompts), batch)):
            rule = FirstBlockCache(threshold=th)
            res = text2img(model, prompts[i : i + batch], seeds=seeds[i : i + batch], plan=[rule], **kw)
            cached += rule.cached_evals
            total += res.nfe
            sq += float((res.latents - plains[k]).pow(2).sum())
        reuse.append(cached / max(total, 1))
        rms.append((sq / sum(p.numel() for p in plains)) ** 0.5)
    return {"steps": steps, "thresholds": list(thresholds), "reuse": reuse, "rms_to_plain": rms}


def fbcache_threshold(artefact: dict[str, Any], reuse: float) -> float:
    """The threshold that reused a fraction ``reuse`` of the evaluations in the calibration (log-linear
    between the calibrated thresholds; 0 for no reuse; the largest calibrated beyond the last)."""
    import numpy as np

    table = artefact.get("fbcache")
    if table is None:
        raise VelodiffError(
            "the cache calibration has no first-block-cache table (made before it existed, or not a "
            "transformer that fbcache serves); calibrate the model again"
        )
    if reuse <= 0:
        return 0.0
    fractions = np.maximum.accumulate(np.asarray(table["reuse"], dtype=float))
    logs = np.log(np.asarray(table["thresholds"], dtype=float))
    if reuse <= fractions[0]:
        return float(table["thresholds"][0]) * reuse / max(fractions[0], 1e-12)
    if reuse >= fractions[-1]:
        return float(table["thresholds"][-1])
    j = int(np.searchsorted(fractions, reuse, side="left"))
    lo, hi = fractions[j - 1], fractions[j]
    w = 0.0 if hi == lo else (reuse - lo) / (hi - lo)
    return float(np.exp(logs[j - 1] + w * (logs[j] - logs[j - 1])))


def save_cache_calibration(artefact: dict[str, Any]) -> Path:
    path = cache_calibration_path(artefact["model_hash"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(artefact, indent=1) + "\n")
    return path


def load_cache_calibration(
    model: Any, path: str | Path | None = None, guidance: float | None = None
) -> dict[str, Any]:
    """The model's cache calibration (``path``, or the one saved for its hash); one line when missing
    or made for another model. A run at another guidance scale than the calibration's (``guidance``)
    is warned: the features change at another pace there, so a schedule or threshold fitted to the
    calibration reuses more or less than it planned."""
    from ..eval.reference import model_command_name, model_identity

    want = model_identity(model)
    p = Path(path) if path is not None else cache_calibration_path(want)
    hint = f"velodiff calibrate cache --model {model_command_name(model)}"
    data = read_artefact(p, "cache", VERSION, want, hint)
    damage = _cache_damage(data)
    if damage:
        raise VelodiffError(f"cache calibration {p} is damaged ({damage}); make one with: {hint}")
    made_at = data.get("guidance")
    if guidance is not None and isinstance(made_at, (int, float)) and abs(float(made_at) - guidance) > 1e-9:
        import warnings

        warnings.warn(
            f"cache calibration {p} was made at guidance {made_at:g}, this run is at {guidance:g}: its "
            f"reuse may differ from the calibrated one; to fit this scale: {hint} --guidance {guidance:g}",
            stacklevel=2,
        )
    return data


def _numbers(values: Any, lo: float = -math.inf) -> bool:
    def number(v: Any) -> bool:
        return is_number(v) and math.isfinite(v) and v >= lo

    return isinstance(values, list) and bool(values) and all(number(v) for v in values)


def _cache_damage(data: dict[str, Any]) -> str:
    """What is wrong with a cache calibration's curves and table (a hand-edited or truncated file), or ""."""
    mids, rate = data.get("t_mid"), data.get("rate")
    if not _numbers(mids):
        return "t_mid is not a list of finite numbers"
    if not isinstance(rate, dict) or not rate:
        return "rate is not a table of curves"
    for block, curve in rate.items():
        if not _numbers(curve, 0.0) or len(curve) != len(mids):
            return f"the rate curve of {block} is not {len(mids)} finite non-negative numbers"
    table = data.get("fbcache")
    if table is not None:
        ok = isinstance(table, dict) and _numbers(table.get("thresholds"), 0.0)
        ok = ok and _numbers(table.get("reuse"), 0.0)
        if not ok or len(table["thresholds"]) != len(table["reuse"]) or min(table["thresholds"]) <= 0:
            return "the first-block-cache table is not lists of positive thresholds and reuse fractions"
    return ""


class ForeignArtefact(VelodiffError):
    """A calibration artefact made for another model (passed over where another one fits)."""


def read_artefact(
    p: Path, kind: str, version: int, model_hash: str, hint: str, what: str = ""
) -> dict[str, Any]:
    """A calibration artefact of ``kind`` made for ``model_hash``; one line (ending with the command that
    makes one, ``hint``) when it is missing, not JSON, of another kind or version, or for another model.
    ``what`` qualifies the missing case (e.g. " at guidance 2.5")."""
    if not p.is_file():
        raise VelodiffError(f"no {kind} calibration for this model{what} ({p}); make one with: {hint}")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise VelodiffError(f"{kind} calibration {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != kind or data.get("version") != version:
        raise VelodiffError(f"{p} is not a velodiff {kind} calibration (version {version})")
    if data.get("model_hash") != model_hash:
        raise ForeignArtefact(
            f"{kind} calibration {p} was made for another model (hash {data.get('model_hash')}, this one "
            f"{model_hash}); make one with: {hint}"
        )
    return data


def step_changes(artefact: dict[str, Any], ts: Any, blocks: list[str]) -> list[float]:
    """The expected relative change of ``blocks``' features (their mean) at each step of grid ``ts``:
    entry i is the change from the evaluation at ts[i-1] to the one at ts[i] (entry 0 is 0)."""
    import numpy as np

    missing = [b for b in blocks if b not in artefact["rate"]]
    if missing:
        raise VelodiffError(f"the cache calibration has no curve for {missing[0]}; calibrate the model again")
    t = np.asarray(ts, dtype=float)
    order = np.argsort(artefact["t_mid"])
    mids = np.asarray(artefact["t_mid"])[order]
    rate = np.mean([np.asarray(artefact["rate"][b])[order] for b in blocks], axis=0)
    n = len(t) - 1  # evaluations at ts[0] .. ts[n-1]
    out = [0.0]
    for i in range(1, n):
        m = (t[i - 1] + t[i]) / 2
        out.append(float(np.interp(m, mids, rate) * abs(t[i - 1] - t[i])))
    return out
