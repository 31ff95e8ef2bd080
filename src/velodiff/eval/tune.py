"""`velodiff tune`: the fastest plan whose quality loss against a baseline stays within a budget.

Every candidate is a plan string that fixes the whole run (``solver=unipc+nfe=6+ag:threshold=0.999``,
see ``velodiff.plan.SETTINGS``), measured by the quality-vs-speed sweep (``velodiff.eval.sweep``) on
calibration prompts and seeds beside the baseline (DPM-Solver++ 2M, 20 steps, CFG at the model's
guidance: the sweep's own configuration, the ``none`` plan). The search is a beam search over axes:

1. ``solvers`` x ``nfe`` (x ``grids``): every combination, plain CFG; the ``calibrated`` grid (and the
   ``dpm_solver_v3`` solver) where the model has a solver calibration at the run's guidance
   (``velodiff calibrate solver``), at the solvers and NFE it was made for; left out, with one line,
   where it has none;
2. then each accelerator axis in turn (guidance rules, feature caches, quantization): every option
   added to each plan of the beam;

after each stage the beam is the ``beam`` fastest plans whose loss ``baseline - quality``
(``quality - baseline`` for lower-is-better metrics) is within the budget. "Fastest" is by default the
fewest network evaluations per image, counted after each call (a cached evaluation at its FLOP share),
with the measured seconds per image (text encoding and decoding included) breaking ties: one timed run
per plan on a shared machine varies by tens of percent, evaluations do not (``rank="time"`` ranks by
the measured seconds). Every plan within the budget on calibration is then run on held-out prompts and
seeds, fastest first, ``beam`` at a time (the baseline beside the first round: the same seeds give it
the same images in every round); the fastest within the budget of the
first round that has one wins and is written as ``plan.txt`` (``--plan @DIR/plan.txt`` runs it
anywhere), with ``report.md``, ``pareto.png`` (every calibration record) and ``tune.json``. The
held-out check rejects plans, so a figure to report is measured again on other seeds. Each stage is a
sweep in its own folder, so an interrupted tune resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..files import lock_folder, write_atomic
from .sweep import LABELS, QUALITY, make_sweep, run_sweep


@dataclass
class SearchSpace:
    """What ``tune`` may combine. Each accelerator axis lists plan-rule strings; "" (keep the plan as
    it is) is always an option. Axes whose rules this installation lacks are dropped."""

    solvers: list[str] = field(default_factory=lambda: ["ddim", "dpmpp_2m", "unipc", "deis", "dpm_solver_v3"])
    nfe: list[int] = field(default_factory=lambda: [5, 6, 8, 10, 12])
    #: None: the model's own grid; 'trailing' starts at the last trained step at any NFE (the shipped
    #: model's 'leading' grid starts at t = 0.8 at 5 steps)
    #: 'calibrated': the model's calibrated grids (velodiff calibrate solver), where it has them
    grids: list[str | None] = field(default_factory=lambda: [None, "trailing", "calibrated"])
    axes: dict[str, list[str]] = field(
        default_factory=lambda: {
            "guidance": ["ag:threshold=0.999", "ag:threshold=0.99", "cfg:stop=0.5"],
            "cache": ["deepcache:interval=2", "deepcache:interval=3"],
            "quantization": ["int8"],
        }
    )

    @classmethod
    def of(cls, values: dict[str, Any]) -> SearchSpace:
        unknown = set(values) - {"solvers", "nfe", "grids", "axes"}
        if unknown:
            raise VelodiffError(
                f"search space: unknown key {sorted(unknown)[0]!r}; keys: solvers, nfe, grids, axes"
            )
        space = cls(**values)
        space.check()
        return space

    def check(self) -> None:
        """One line for what a hand-written space gets wrong (a type, a name, a plan)."""
        from ..plan import Plan, parse_setting

        def listed(key: str, v: Any, ok: Callable[[Any], bool], what: str, empty: bool = False) -> None:
            if not isinstance(v, list) or not (v or empty) or not all(ok(x) for x in v):
                need = "a list" if empty else "a non-empty list"
                raise VelodiffError(f"search space: {key} must be {need} of {what}, got {v!r}")

        listed("solvers", self.solvers, lambda x: isinstance(x, str), "solver names")
        listed("nfe", self.nfe, lambda x: isinstance(x, int) and not isinstance(x, bool), "integers")
        listed("grids", self.grids, lambda x: x is None or isinstance(x, str), "grid names or null")
        try:
            for key, values in (("solver", self.solvers), ("nfe", self.nfe), ("grid", self.grids)):
                for v in values:
                    if v is not None:
                        parse_setting(f"{key}={v}")
        except VelodiffError as e:
            raise VelodiffError(f"search space: {e}") from None
        if not isinstance(self.axes, dict):
            raise VelodiffError(f"search space: axes must map names to lists of plans, got {self.axes!r}")
        for axis, options in self.axes.items():
            listed(f"axes.{axis}", options, lambda x: isinstance(x, str), "plan strings", empty=True)
            for opt in options:
                try:
                    Plan.parse(opt)
                except VelodiffError as e:
                    raise VelodiffError(f"search space: axes.{axis} {opt!r}: {e}") from None

    def needs_calibration(self) -> bool:
        """Whether some combination runs on a solver calibration (the calibrated grid, a solver that
        requires fitted options: DPM-Solver-v3)."""
        from ..pipelines.setup import CALIBRATED
        from ..solvers import get_solver

        return CALIBRATED in self.grids or any(get_solver(s).requires for s in self.solvers)

    def available(self) -> SearchSpace:
        """The space without the rules this installation does not have (e.g. int8 without torchao)."""
        from ..plan import Plan

        axes = {}
        for name, options in self.axes.items():
            kept = []
            for opt in options:
                try:
                    rules = Plan.parse(opt).rules
                    if any(type(r).__module__.endswith("quantize") for r in rules):
                        from ..accel.quantize import _torchao

                        _torchao()
                    kept.append(opt)
                except VelodiffError:
                    continue
            if kept:
                axes[name] = kept
        return SearchSpace(self.solvers, self.nfe, self.grids, axes)


@dataclass
class TuneConfig:
    budget: float
    metric: str = "shapes_eval"
    beam: int = 3
    #: calibration: prompts and seeds the held-out check does not use
    calibration_prompts: str = "v1-holdout"
    calibration_seed: int = 1000
    calibration_images: int = 4
    #: the held-out check (it rejects calibrated plans, so a report measures on other seeds again)
    holdout_prompts: str = "v1"
    holdout_seed: int = 2000
    images_per_prompt: int = 2
    limit: int = 1000
    #: the baseline: the sweep's own configuration
    baseline_solver: str = "dpmpp_2m"
    baseline_steps: int = 20
    guidance: float | None = None
    repeat: int = 1
    batch: int = 25
    #: "evals": fewest network evaluations per image, counted after each call (caches at their FLOP
    #: share), time breaking ties; deterministic, so machine load cannot reorder plans. "time": measured
    #: seconds per image (use --repeat on a quiet machine)
    rank: str = "evals"


def check_config(cfg: TuneConfig) -> None:
    if not 0 <= cfg.budget < math.inf:
        raise VelodiffError(f"--budget must be a finite number >= 0 (a quality loss), got {cfg.budget}")
    if cfg.metric not in QUALITY:
        raise VelodiffError(f"--metric {cfg.metric!r}: use one of {', '.join(QUALITY)}")
    if cfg.rank not in ("evals", "time"):
        raise VelodiffError(f"--rank {cfg.rank!r}: use evals or time")
    if cfg.beam < 1:
        raise VelodiffError(f"--beam must be >= 1, got {cfg.beam}")
    from .sweep import resolve_prompts

    for option, prompts in (("--calibration", cfg.calibration_prompts), ("--holdout", cfg.holdout_prompts)):
        try:  # read now: an unknown set or a missing file, before hours of calibration, not after
            resolve_prompts(prompts)
        except VelodiffError as e:
            raise VelodiffError(f"{option}: {e}") from None


def _metrics_for(metric: str) -> list[str]:
    return {"shapes_eval": ["shapes"], "fd_shapes": ["fd"], "kid_shapes": ["fd"], "clip_score": ["clip"]}.get(
        metric, ["reference"]
    )


def within(loss: float, budget: float) -> bool:
    """A loss within the budget, the budget itself included: scores are means of per-image verdicts,
    so a loss of exactly the budget arrives with float round-off on either side (0.825 - 0.805 can be
    0.020000000000000018)."""
    return loss <= budget + 1e-9


def loss(metric: str, baseline: float, value: float) -> float:
    """Quality lost against the baseline (positive = worse), in the metric's units."""
    return baseline - value if QUALITY[metric] else value - baseline


def calibration_check(
    model: Any, name: str, guidance: float | None, log: Callable[[str], None] = print
) -> Callable[[str, str | None, int], bool]:
    """Whether a (solver, grid, NFE) combination can run on this model: the ``calibrated`` grid at the
    solvers and NFE its solver calibration at ``guidance`` holds, ``dpm_solver_v3`` where it holds the
    model statistics, anything else always. A model without a calibration loses the first two (said in
    one line)."""
    from ..calibrated.artefact import load_solver_calibrations
    from ..calibrated.calibrate import configuration
    from ..pipelines.setup import CALIBRATED
    from ..solvers import get_solver
    from .reference import model_identity

    g = float(guidance if guidance is not None else getattr(model, "default_guidance", 1.0))
    try:
        arts = load_solver_calibrations(model_identity(model), g, name or "M", model_path=model.path)
    except VelodiffError as e:
        log(f"tune: the calibrated grid and dpm_solver_v3 are left out: {e}")
        arts = []
    def key(solver: str, nfe: int, fitted_for: dict[str, Any]) -> tuple[str, int, str]:
        return solver, int(nfe), json.dumps(fitted_for, sort_keys=True)

    entries = {key(e["solver"], e["nfe"], e.get("configuration", {}))
               for a in arts for e in a.get("entries", [])}

    def runs(solver: str, grid: str | None, nfe: int) -> bool:
        spec = get_solver(solver)  # another tool's name runs an entry fitted for its own options only
        if grid == CALIBRATED:
            return key(spec.name, nfe, configuration(spec)) in entries
        return not spec.requires or any(a.get("ems") for a in arts)

    return runs


def tune(
    model: Any,
    cfg: TuneConfig,
    space: SearchSpace,
    out: str | Path,
    *,
    model_id: str,
    model_name: str = "",
    defaults: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    baseline_model: tuple[Any, str, str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Search ``space`` for the fastest plan within ``cfg.budget``; write the results under ``out``.
    ``baseline_model``: (model, hash, name, defaults) whose plain run is the baseline instead of
    ``model``'s (a student's plans against its teacher's 20 steps). The folder is this process's while
    it tunes: a second tune of it is one line (they would replace each other's stages)."""
    check_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(out, "--out")
    try:
        return _tune(model, cfg, space, out, model_id=model_id, model_name=model_name, defaults=defaults,
                     progress=progress, log=log, baseline_model=baseline_model)
    finally:
        lock.close()


def _tune(
    model: Any,
    cfg: TuneConfig,
    space: SearchSpace,
    out: Path,
    *,
    model_id: str,
    model_name: str,
    defaults: dict[str, Any] | None,
    progress: bool,
    log: Callable[[str], None],
    baseline_model: tuple[Any, str, str, dict[str, Any]] | None,
) -> dict[str, Any]:
    space = space.available()
    stages: list[dict[str, Any]] = []

    def measure(
        name: str, plans: list[str], prompts: str, seed: int, images: int, baseline: bool = True
    ) -> dict[str, dict[str, Any]]:
        """The sweep of ``plans`` (beside the baseline): records by plan string (``none``: the baseline)."""
        sw = make_sweep(
            {
                "solvers": [cfg.baseline_solver],
                "nfe": [cfg.baseline_steps],
                "guidance": [cfg.guidance],
                "plans": ["none", *plans] if baseline else plans,
                "prompts": prompts,
                "limit": cfg.limit,
                "seed": seed,
                "images_per_prompt": images,
                "repeat": cfg.repeat,
                "batch": cfg.batch,
                "metrics": _metrics_for(cfg.metric),
                "quality": cfg.metric,
            }
        )
        log(f"tune: {name}: {len(plans)} plans{' beside the baseline' if baseline else ''} on {prompts} "
            f"(seeds from {seed})")
        records: dict[str, dict[str, Any]] = {}
        if baseline and baseline_model is not None:  # the baseline on its own model, the same seeds
            bm, bid, bname, bdefaults = baseline_model
            sw_base = replace(sw, plans=["none"])
            base = run_sweep(bm, sw_base, out / f"{name}-baseline", model_id=bid, model_name=bname,
                             defaults=bdefaults, progress=progress, log=log,
                             command=f"velodiff tune ({name}, baseline {bname})", replace=True)
            records["none"] = base["records"][0]
            sw = replace(sw, plans=plans)
        res = run_sweep(
            model,
            sw,
            out / name,
            model_id=model_id,
            model_name=model_name,
            defaults=defaults,
            progress=progress,
            log=log,
            command=f"velodiff tune ({name})",
            replace=True,  # a stage's folder is the tune's own: a resumed tune's stage asks for what it needs
        )
        return {**records, **{r["plan"]: r for r in res["records"]}}

    def score(
        records: dict[str, dict[str, Any]], stage: str, base_record: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        from .shapes_eval import paired_standard_error

        base_rec = base_record or records["none"]
        if base_rec.get(cfg.metric) is None:  # nothing to measure a loss against
            why = base_rec.get("error") or f"it has no {cfg.metric}"
            raise VelodiffError(f"the baseline run failed ({why}); no plan can be scored against it")
        base = base_rec[cfg.metric]
        rows = []
        for plan, r in records.items():
            if plan == "none" or "error" in r or r.get(cfg.metric) is None:
                continue
            row = {
                "stage": stage,
                "plan": plan,
                "seconds_per_image": r["seconds_per_image"],
                "evals": r["evals"],
                cfg.metric: r[cfg.metric],
                "loss": loss(cfg.metric, base, r[cfg.metric]),
                "psnr_vs_baseline": r.get("psnr_vs_plain"),
            }
            if cfg.metric == "shapes_eval" and "shapes_correct" in r and "shapes_correct" in base_rec:
                row["loss_se"] = paired_standard_error(base_rec["shapes_correct"], r["shapes_correct"])
            rows.append(row)
        return rows

    def speed(r: dict[str, Any]) -> tuple[float, float]:
        """What "fastest" means: measured seconds, or the evaluations counted per image (caches at
        their FLOP share) with the measured time breaking ties (``rank``)."""
        if cfg.rank == "time":
            return (r["seconds_per_image"], r["evals"])
        return (round(r["evals"], 6), r["seconds_per_image"])

    def fastest_within(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ok = sorted((r for r in rows if within(r["loss"], cfg.budget)), key=speed)
        return ok[: cfg.beam]

    # stage 1: solver x grid x NFE (what needs a calibration only where the model has it)
    guidance = cfg.guidance if cfg.guidance is not None else (defaults or {}).get("guidance")
    runs = calibration_check(model, model_name, guidance, log) if space.needs_calibration() else None
    first = []
    for solver in space.solvers:
        for grid in space.grids:
            for n in space.nfe:
                if runs is not None and not runs(solver, grid, n):
                    continue
                first.append(f"solver={solver}+nfe={n}" + (f"+grid={grid}" if grid else ""))
    recs = measure("1-solvers", first, cfg.calibration_prompts, cfg.calibration_seed, cfg.calibration_images)
    baseline_cal = recs["none"]
    rows = score(recs, "solvers")
    beam = fastest_within(rows)
    stages.append({"stage": "solvers", "rows": rows, "beam": [r["plan"] for r in beam]})
    # stages 2..: one accelerator axis at a time, on every plan of the beam
    for i, (axis, options) in enumerate(space.axes.items(), start=2):
        if not beam:
            break
        plans = [f"{b['plan']}+{opt}" for b in beam for opt in options]
        recs = measure(
            f"{i}-{axis}", plans, cfg.calibration_prompts, cfg.calibration_seed, cfg.calibration_images
        )
        rows = score(recs, axis)
        beam = fastest_within(beam + rows)
        stages.append({"stage": axis, "rows": rows, "beam": [r["plan"] for r in beam]})

    result: dict[str, Any] = {
        "config": asdict(cfg),
        "space": asdict(space),
        "model": model_name,
        "model_hash": model_id,
        "baseline": {
            "model": baseline_model[2] if baseline_model is not None else model_name,
            "solver": cfg.baseline_solver,
            "steps": cfg.baseline_steps,
            "calibration": {k: baseline_cal.get(k) for k in (cfg.metric, "seconds_per_image", "evals")},
        },
        "stages": stages,
        "plan": None,
    }
    if not beam:  # nothing within the budget on calibration
        result["why"] = (
            f"no plan of the space is within {cfg.budget:g} of the baseline on the calibration set"
        )
        _write(out, result, cfg)
        raise VelodiffError(f"tune: {result['why']}; raise --budget or widen the space (more NFE)")
    # the held-out check: every plan within the budget on calibration, fastest first, `beam` at a time;
    # the fastest of the first round with a plan within the budget on the held-out set wins
    seen: dict[str, dict[str, Any]] = {}
    for st in stages:
        for r in st["rows"]:
            if within(r["loss"], cfg.budget):
                seen.setdefault(r["plan"], r)
    queue = sorted(seen.values(), key=speed)
    result["holdout"], winner = [], None
    base_held: dict[str, Any] | None = None  # the baseline runs in the first round only (same seeds)
    for k in range(0, len(queue), cfg.beam):
        batch = [r["plan"] for r in queue[k : k + cfg.beam]]
        recs = measure(
            f"holdout-{k // cfg.beam + 1}",
            batch,
            cfg.holdout_prompts,
            cfg.holdout_seed,
            cfg.images_per_prompt,
            baseline=base_held is None,
        )
        base_held = base_held or recs["none"]
        held = score(recs, "holdout", base_held)
        result["holdout"] += held
        result["baseline"]["holdout"] = {
            key: base_held.get(key) for key in (cfg.metric, "seconds_per_image", "evals")
        }
        passing = sorted((r for r in held if within(r["loss"], cfg.budget)), key=speed)
        if passing:
            winner = passing[0]
            break
    if winner is None:
        result["why"] = "no calibrated plan kept its quality on the held-out prompts"
        _write(out, result, cfg)
        raise VelodiffError(f"tune: {result['why']} (see {out / 'report.md'}); raise --budget")
    result["plan"] = winner["plan"]
    base_s, plan_s = result["baseline"]["holdout"]["seconds_per_image"], winner["seconds_per_image"]
    if k > 0:  # the baseline was timed in the first round only: time the two again, side by side
        recs = measure("holdout-timing", [winner["plan"]], cfg.holdout_prompts, cfg.holdout_seed,
                       cfg.images_per_prompt)
        base_s, plan_s = recs["none"]["seconds_per_image"], recs[winner["plan"]]["seconds_per_image"]
    result["timing"] = {"baseline_seconds_per_image": base_s, "plan_seconds_per_image": plan_s,
                        "round": "holdout-timing" if k > 0 else "holdout-1"}
    result["speedup"] = base_s / plan_s
    _write(out, result, cfg)
    return result


#: what a tune writes beside its stage folders
TUNE_JSON = "tune.json"
TUNE_FILES = (TUNE_JSON, "plan.txt", "report.md", "pareto.png")


def is_tune_folder(folder: Path) -> bool:
    """A tune wrote this folder (:func:`velodiff.files.check_results_folder`)."""
    return (folder / TUNE_JSON).is_file()


def _write(out: Path, result: dict[str, Any], cfg: TuneConfig) -> None:
    from .plots import pareto_png
    from .sweep import mark_pareto

    write_atomic(out / TUNE_JSON, json.dumps(result, indent=1) + "\n")
    if result.get("plan"):
        write_atomic(
            out / "plan.txt",
            (
                f"# velodiff tune: the fastest plan within {cfg.budget:g} "
                f"{LABELS.get(cfg.metric, cfg.metric)} of "
                f"{cfg.baseline_solver} {cfg.baseline_steps} steps (calibrated on {cfg.calibration_prompts}, "
                f"confirmed on {cfg.holdout_prompts}); run it with --plan @plan.txt\n{result['plan']}\n"
            ),
        )
    else:  # no plan met the budget: a plan.txt of an earlier tune here must not be run as this one's
        (out / "plan.txt").unlink(missing_ok=True)
    write_atomic(out / "report.md", report(result, cfg))
    cal = result["baseline"]["calibration"]
    records = [{"stage": "baseline", "plan": "baseline", "nfe": cal["evals"], **cal}]
    for st in result["stages"]:
        records += [
            {
                "stage": st["stage"],
                "plan": r["plan"],
                "nfe": r["evals"],
                "seconds_per_image": r["seconds_per_image"],
                cfg.metric: r[cfg.metric],
            }
            for r in st["rows"]
        ]
    res = {"records": records}
    mark_pareto(res, cfg.metric)
    png = pareto_png(
        res["records"],
        cfg.metric,
        LABELS.get(cfg.metric, cfg.metric),
        QUALITY[cfg.metric],
        group="stage",
        name=lambda r: r["plan"],
    )
    write_atomic(out / "pareto.png", png)


def report(result: dict[str, Any], cfg: TuneConfig) -> str:
    from .tables import markdown_table

    label = LABELS.get(cfg.metric, cfg.metric)
    base = result["baseline"]
    lines = [
        "# velodiff tune",
        "",
        f"Model: `{result['model']}`. Budget: {cfg.budget:g} {label} below the baseline "
        f"(`{base.get('model')}`, {cfg.baseline_solver}, {cfg.baseline_steps} steps, CFG). "
        f"Calibration: `{cfg.calibration_prompts}` x "
        f"{cfg.calibration_images} images from seed {cfg.calibration_seed}; held out: "
        f"`{cfg.holdout_prompts}` x "
        f"{cfg.images_per_prompt} from seed {cfg.holdout_seed}, every plan within the budget on calibration, "
        f"fastest first, {cfg.beam} at a time, until one keeps the budget (the held-out set rejects plans: "
        f"measure the winner again on other seeds to report it).",
        "",
    ]
    if result.get("plan"):
        hb = base["holdout"]
        win = next(r for r in result["holdout"] if r["plan"] == result["plan"])
        tm = result.get("timing") or {  # (a tune.json written before the timing was kept)
            "plan_seconds_per_image": win["seconds_per_image"], "round": "the held-out rounds",
            "baseline_seconds_per_image": hb["seconds_per_image"]}
        se = f", paired standard error {win['loss_se']:.3f}" if win.get("loss_se") is not None else ""
        lines += [
            f"**Plan: `{result['plan']}`**: {result['speedup']:.2f}x faster than the baseline on the "
            f"held-out prompts ({tm['plan_seconds_per_image']:.4f} vs {tm['baseline_seconds_per_image']:.4f} "
            f"s / image, timed side by side in {tm['round']}), "
            f"{label} {win[cfg.metric]:.3f} vs {hb[cfg.metric]:.3f} (loss {win['loss']:+.3f}{se}).",
            "",
        ]
    else:
        lines += [f"**No plan**: {result.get('why', '')}.", ""]

    def table(rows: list[dict[str, Any]], head: str) -> list[str]:
        body = [
            [
                f"`{r['plan']}`",
                f"{r['seconds_per_image']:.4f}",
                f"{r['evals']:g}",
                f"{r[cfg.metric]:.3f}",
                f"{r['loss']:+.3f}" + (f" ± {r['loss_se']:.3f}" if r.get("loss_se") is not None else ""),
                "-" if r.get("psnr_vs_baseline") is None else f"{r['psnr_vs_baseline']:.1f}",
            ]
            for r in sorted(rows, key=lambda r: r["seconds_per_image"])
        ]
        return [
            head,
            "",
            markdown_table(
                ["plan", "s / image", "evals / image", label, "loss (± paired SE)", "PSNR vs baseline (dB)"],
                body,
            ),
            "",
        ]

    cal = base["calibration"]
    lines += [
        f"Baseline on calibration: {cal[cfg.metric]:.3f} {label}, {cal['seconds_per_image']:.4f} s / image.",
        "",
    ]
    for st in result["stages"]:
        lines += table(st["rows"], f"## Stage: {st['stage']} (beam after it: {', '.join(st['beam']) or '-'})")
    if result.get("holdout"):
        lines += table(result["holdout"], "## Held-out check")
    return "\n".join(lines)
