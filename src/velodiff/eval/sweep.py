"""The quality-vs-speed sweep behind ``velodiff bench``: every configuration (plan x solver x grid x NFE
x guidance) generates the same prompts from the same seeds; each is scored and timed, and the Pareto front
of time against quality is marked.

Per configuration (one record): its plan's canonical string; ShapesEval accuracy and FD-shapes / KID
against renders of the same prompts (when every prompt is in the shapes world's grammar); latent MSE /
PSNR / SSIM against a cached reference run of the same noise and prompt (``velodiff.eval.reference``);
CLIP score when a CLIP folder is given; for a plan other than "none", the same distances to the plain
("none") run of the same seeds, solver, grid, NFE and guidance (``psnr_vs_plain``, ...); and cost: NFE
(batched network calls), evals (network-sample evaluations per image), median wall seconds per image over
``repeat`` timed generations of the whole set (batched), and peak memory.

Results are written after every configuration; a rerun with the same sweep in the same folder resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import VelodiffError, unknown_name
from ..files import lock_folder, read_text, write_atomic
from ..limits import MAX_BATCH, MAX_IMAGES_PER_PROMPT, MAX_RUNS, MAX_STEPS
from . import tables

RESULTS = "results.json"
TABLE = "results.md"
PLOT = "pareto.png"
SAMPLES = "samples"

#: what a bench writes into its folder that another command or the user may have there (its sample
#: sheets are named by configuration: samples/<id>.png)
BENCH_FILES = (RESULTS, TABLE, PLOT)


def is_bench_folder(folder: Path) -> bool:
    """A bench wrote this folder: its results file says so (:func:`velodiff.files.check_results_folder`)."""
    try:
        return json.loads((folder / RESULTS).read_text()).get("kind") == "bench"
    except (OSError, ValueError, AttributeError):
        return False


#: quality metrics and whether higher is better
QUALITY: dict[str, bool] = {
    "shapes_eval": True,
    "fd_shapes": False,
    "kid_shapes": False,
    "psnr": True,
    "ssim": True,
    "latent_mse": False,
    "clip_score": True,
}
LABELS = {
    "shapes_eval": "ShapesEval",
    "fd_shapes": "FD-shapes",
    "kid_shapes": "KID-shapes",
    "fid": "FID",
    "kid": "KID",
    "psnr": "PSNR vs ref (dB)",
    "psnr_vs_plain": "PSNR vs plain (dB)",
    "ssim": "SSIM vs ref",
    "latent_mse": "latent MSE vs ref",
    "clip_score": "CLIP score",
}
METRICS = ("shapes", "fd", "reference", "clip")


@dataclass
class Sweep:
    """What to run. ``grids``/``guidance`` entries of None mean the model's default."""

    solvers: list[str] = field(default_factory=lambda: ["dpmpp_2m", "unipc", "ddim"])
    nfe: list[int] = field(default_factory=lambda: [4, 8, 16])
    grids: list[str | None] = field(default_factory=lambda: [None])
    guidance: list[float | None] = field(default_factory=lambda: [None])
    #: step plans (``velodiff.plan`` strings); "none" is the baseline (CFG at the guidance scale)
    plans: list[str] = field(default_factory=lambda: ["none"])
    prompts: str | list[str] = "v1"
    limit: int | None = 16
    images_per_prompt: int = 1
    seed: int = 0
    repeat: int = 1
    batch: int = 16
    metrics: list[str] | None = None  # None: every metric that applies; []: none (time and cost only)
    reference_solver: str = "dpmpp_3m"
    reference_steps: int = 100
    reference_grid: str | None = "logsnr"
    fd_features: str = "fd-shapes"
    fd_real_per_prompt: int = 4
    clip: str | None = None
    quality: str | None = None  # the Pareto plot's quality axis (default: the first that applies)

    def configs(self) -> list[dict[str, Any]]:
        """Every combination of the axes, with what a plan sets (``solver=ddim+nfe=6+...``) in place of
        the axes' values, each distinct run once (such a plan is not rerun per solver and NFE)."""
        from ..plan import Plan

        out, seen = [], set()
        axes = (self.guidance, self.plans, self.solvers, self.grids, self.nfe)
        for g, p, s, grid, n in itertools.product(*axes):
            fixed = Plan.parse(p).settings
            c = {
                "solver": fixed.get("solver", s),
                "grid": fixed.get("grid", grid),
                "nfe_budget": int(fixed.get("nfe", fixed.get("steps", n))),
                "guidance": fixed.get("guidance", g),
                "plan": p,
            }
            key = json.dumps(c, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out


    def plain_config(self, c: dict[str, Any]) -> dict[str, Any]:
        """The plain run a configuration is compared with (``*_vs_plain``): the same solver, grid, NFE
        and guidance with no plan; where its plan sets one of them (``solver=ddim+nfe=6``), the sweep's
        own (its first value on that axis: for ``velodiff tune``, the baseline), not the plan's."""
        from ..plan import Plan

        fixed = Plan.parse(c["plan"]).settings
        first = {"solver": self.solvers[0], "grid": self.grids[0], "nfe_budget": self.nfe[0],
                 "guidance": self.guidance[0]}
        given = {"solver": "solver" in fixed, "grid": "grid" in fixed,
                 "nfe_budget": "nfe" in fixed or "steps" in fixed, "guidance": "guidance" in fixed}
        return {**{k: first[k] if given[k] else c[k] for k in first}, "plan": "none"}


SWEEP_KEYS = {f for f in Sweep.__dataclass_fields__}


def load_sweep_file(path: str | Path, keys: Iterable[str] = (), what: str = "sweep") -> dict[str, Any]:
    """A sweep as YAML or JSON: keys of :class:`Sweep` (lists may be given as comma strings), or of
    another mapping (``keys``, e.g. velodiff tune's search space)."""
    keys = set(keys) or SWEEP_KEYS
    p = Path(path)
    if not p.is_file():
        raise VelodiffError(f"{what} file {str(p)!r} not found")
    text = read_text(p, f"{what} file")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - parse errors are the user's file
        raise VelodiffError(f"cannot parse {what} file {str(p)!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise VelodiffError(f"{what} file {str(p)!r} must hold a mapping of {what} keys")
    bad = sorted(set(data) - keys)
    if bad:
        raise unknown_name(f"{what} key", bad[0], keys)
    return data


#: a ``key=value`` option continuing the name before it (``karras:sigma_min=0.1,sigma_max=10``)
_OPTION = re.compile(r"[A-Za-z_]\w*\s*=")


def _split(v: Any) -> list[Any]:
    """A comma-separated list as its items; a name's options (``karras:sigma_min=0.1,rho=7``, a list value
    in brackets) stay with their name."""
    if v is None:
        return [None]
    if not isinstance(v, str):
        return list(v) if isinstance(v, (list, tuple)) else [v]
    pieces, depth, cur = [], 0, ""
    for ch in v:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth <= 0:
            pieces.append(cur)
            cur = ""
        else:
            cur += ch
    pieces.append(cur)
    out: list[str] = []
    for piece in (p.strip() for p in pieces):
        if out and ":" in out[-1] and _OPTION.match(piece):
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out


def check_fixed_guidance(plans: list[str | None], scales: list[float | None]) -> None:
    """Refuse a sweep over guidance scales with a plan that fixes its own (it would run once per scale, at
    its own, under the other scales' names)."""
    from ..plan import Plan

    for p in plans:
        fixed = Plan.parse(p).fixed_guidance()
        if fixed is not None:
            listed = ", ".join("default" if g is None else f"{g:g}" for g in scales)
            raise VelodiffError(
                f"plan {p!r} fixes the guidance scale at {fixed:g}; a sweep over guidance {listed} would "
                f"run it at {fixed:g} each time: give one guidance value, or drop the scale from the plan"
            )


#: the sweep's single-valued keys, by the type a file must give them (None: the default)
INT_KEYS = ("limit", "images_per_prompt", "seed", "repeat", "batch", "reference_steps", "fd_real_per_prompt")
STR_KEYS = ("reference_solver", "reference_grid", "fd_features", "clip", "quality")


def _check_types(v: dict[str, Any]) -> None:
    """One line for a value of the wrong type (a file's ``seed: abc``), before it fails deep in a run."""
    for k in INT_KEYS:
        if v.get(k) is not None and (isinstance(v[k], bool) or not isinstance(v[k], int)):
            raise VelodiffError(f"sweep key {k} takes an integer, got {v[k]!r}")
    for k in STR_KEYS:
        if v.get(k) is not None and not isinstance(v[k], str):
            raise VelodiffError(f"sweep key {k} takes a name or path, got {v[k]!r}")
    prompts = v.get("prompts")
    if prompts is not None and not (
        isinstance(prompts, str) or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))
    ):
        raise VelodiffError(
            f"sweep key prompts takes a prompt set's name, a file or a list of prompts, got {prompts!r}"
        )


def make_sweep(values: dict[str, Any]) -> Sweep:
    """Validate and normalise sweep values (from a file and/or the command line) into a Sweep."""
    v = dict(values)
    _check_types(v)
    for k in ("solvers", "grids", "nfe", "guidance", "metrics"):
        if k in v:
            v[k] = _split(v[k])
    if v.get("metrics") == ["none"]:  # time and cost only
        v["metrics"] = []
    if "plans" in v:  # plan strings hold commas: a list, or one string of plans separated by ';'
        plans = v["plans"]
        v["plans"] = [p.strip() for p in plans.split(";")] if isinstance(plans, str) else list(plans)
    s = Sweep(**v)
    from ..plan import Plan

    s.plans = [str(Plan.parse(p)) for p in s.plans if p] or ["none"]  # canonical; bad ones refused
    from ..commands.names import check_grid_name, check_solver_name

    for n in s.solvers:  # velodiff's names and other tools' ("DPM++ 2M Karras", "uni_pc")
        check_solver_name(str(n))
    s.grids = [None if g in (None, "default", "") else str(g) for g in s.grids]
    for g in s.grids:  # with "calibrated" and other tools' scheduler names ("gits", "align_your_steps")
        if g is not None:
            check_grid_name(g)
    for key, parse in (("nfe", int), ("guidance", float)):
        values = []
        for v in getattr(s, key):
            try:
                values.append(None if key == "guidance" and v in (None, "default", "") else parse(v))
            except (TypeError, ValueError):
                kind = "integers" if parse is int else "numbers"
                raise VelodiffError(f"{key} takes {kind} (comma-separated), got {v!r}") from None
        setattr(s, key, values)
    if not s.nfe or min(s.nfe) < 1 or max(s.nfe) > MAX_STEPS:
        raise VelodiffError(f"nfe must be a list of integers in [1, {MAX_STEPS}], got {s.nfe}")
    if any(g is not None and not 0 <= g < math.inf for g in s.guidance):
        raise VelodiffError(f"guidance scales must be finite numbers >= 0, got {s.guidance}")
    if len(s.guidance) > 1:
        check_fixed_guidance(s.plans, s.guidance)
    for k in ("solvers", "grids", "guidance"):
        if not getattr(s, k):
            raise VelodiffError(f"{k} is empty: give at least one")
    if s.metrics is not None and s.metrics != [None]:
        for m in s.metrics:
            if m not in METRICS:
                raise unknown_name("metric", m, METRICS)
    else:
        s.metrics = None
    if s.quality is not None and s.quality not in QUALITY:
        raise unknown_name("quality metric", s.quality, QUALITY)
    check_weights(s)
    if s.limit is not None and s.limit < 1:
        raise VelodiffError(f"limit must be >= 1 (or absent: every prompt), got {s.limit}")
    for k in ("repeat", "batch", "images_per_prompt", "reference_steps", "fd_real_per_prompt"):
        if int(getattr(s, k)) < 1:
            raise VelodiffError(f"{k} must be >= 1")
    for k, most in (("repeat", MAX_RUNS), ("images_per_prompt", MAX_IMAGES_PER_PROMPT),
                    ("reference_steps", MAX_STEPS), ("batch", MAX_BATCH)):
        if int(getattr(s, k)) > most:
            raise VelodiffError(f"{k} {getattr(s, k)} is more than {most}")
    return s


def check_weights(s: Sweep) -> None:
    """Fail early, in one line, when a metric's weights are absent."""
    if s.fd_features != "fd-shapes":
        from .metrics import feature_extractor

        if not Path(s.fd_features).expanduser().is_file():
            feature_extractor(s.fd_features)  # raises the one-line error
    if s.clip is not None and not (Path(s.clip).expanduser() / "config.json").is_file():
        from .metrics import ClipScore

        ClipScore(s.clip)  # raises the one-line error


# --- prompts --------------------------------------------------------------------------------------


def world_prompts(n: int, seed: int = 7) -> list[str]:
    """``n`` distinct captions drawn by the shapes world (seed ``seed``), none in a fixed prompt set."""
    from ..data.shapes import ShapesWorld
    from .shapes_eval import PROMPT_SETS, load_prompts

    fixed = {p.text for name in PROMPT_SETS for p in load_prompts(name)}
    world = ShapesWorld(seed=seed)
    texts: list[str] = []
    i = 0
    while len(texts) < n and i < 100 * n:
        caption = world.scene(i).caption
        if caption not in fixed and caption not in texts:
            texts.append(caption)
        i += 1
    return texts


def resolve_prompts(spec: str | Sequence[str], limit: int | None = None) -> list[str]:
    """A shapes prompt set name (v1, v1-holdout), ``world`` (captions the shapes world draws, none of
    them in a fixed set: prompts to calibrate on that no evaluation uses), a .txt file (one prompt a
    line), a .json file (a list of strings or ShapesEval's {"prompts": [{"text": ...}]}), or a list of
    prompts; ``limit`` keeps that many, spread evenly over the set."""
    from .shapes_eval import PROMPT_SETS, load_prompts

    if isinstance(spec, str):
        if spec == "world":
            texts = world_prompts(limit or 32)
        elif spec in PROMPT_SETS:
            texts = [p.text for p in load_prompts(spec)]
        else:
            p = Path(spec)
            if not p.is_file():
                raise VelodiffError(
                    f"prompts {spec!r}: not a prompt set ({', '.join(PROMPT_SETS)}) nor an existing file"
                )
            from ..sets.prompts import load_prompt_file  # text or JSON; bad bytes and JSON in one line

            texts = [q.text for q in load_prompt_file(p)]
    else:
        texts = [str(t) for t in spec]
    if not texts:
        raise VelodiffError("the prompt set is empty")
    if limit is not None and limit < len(texts):
        texts = [texts[int(i * len(texts) / limit)] for i in range(limit)]
    return texts


def shapes_specs(texts: Sequence[str]) -> list[dict[str, Any]] | None:
    """The shapes-world spec of every prompt, or None when some prompt is outside its grammar."""
    from ..data.shapes import normalize_spec

    try:
        return [normalize_spec(t) for t in texts]
    except ValueError:
        return None


# --- Pareto front ----------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]], higher_better: bool = True) -> list[bool]:
    """Which (time, quality) points no other point dominates (no slower-or-equal time with
    better-or-equal quality, one of them strictly)."""
    sign = 1.0 if higher_better else -1.0
    q = [(t, sign * v) for t, v in points]
    out = []
    for i, (t, v) in enumerate(q):
        dominated = any(
            (t2 <= t and v2 >= v) and (t2 < t or v2 > v) for j, (t2, v2) in enumerate(q) if j != i
        )
        out.append(not dominated)
    return out


def config_id(c: dict[str, Any]) -> str:
    g = "default" if c["guidance"] is None else f"{c['guidance']:g}"
    plan = c.get("plan", "none")
    tail = "" if plan == "none" else "_" + re.sub(r"[^A-Za-z0-9._-]+", "-", plan)
    return f"{c['solver']}_{c['grid'] or 'default'}_nfe{c['nfe_budget']}_g{g}{tail}"


# --- the run --------------------------------------------------------------------------------------


def _planned_nfe(c: dict[str, Any]) -> int:
    """The configuration's NFE budget, or the one its plan sets (steps count as NFE, for progress)."""
    from ..plan import Plan

    settings = Plan.parse(c["plan"]).settings
    return int(settings.get("nfe", settings.get("steps", c["nfe_budget"])))


def _generate(model: Any, texts: list[str], seeds: list[int], batch: int, **kw: Any) -> tuple[Any, Any, Any]:
    """Latents, images and the last batch's result, whose ``evals`` is made the mean over every image
    (a plan may spend different evaluations on different images)."""
    from ..pipelines import text2img

    lats, imgs, res, evals = [], [], None, 0.0
    for i in range(0, len(texts), batch):
        res = text2img(model, texts[i : i + batch], seeds=seeds[i : i + batch], output="tensor", **kw)
        lats.append(res.latents.cpu())
        imgs.append(res.images.cpu())
        evals += res.evals * len(res.seeds)
    res.evals = round(evals / len(texts), 4)
    return torch.cat(lats), torch.cat(imgs), res


def _sheet(images: torch.Tensor, cols: int = 8) -> bytes:

    from ..images import image_grid, png_bytes
    from ..pipelines.images import to_pil

    pils = to_pil(images)
    return png_bytes(image_grid(pils, cols=min(cols, len(pils))))


def sweep_key(sweep: Sweep, model_id: str, machine: dict[str, Any] | None = None) -> str:
    """What a resumed sweep's records must share to be kept: the model, the images asked and the
    ``machine`` they were timed on (device, dtype, threads: records timed on one thread were reused
    beside two-thread ones, and the header then said two); the axes may grow."""
    d = asdict(sweep)
    for k in ("solvers", "nfe", "grids", "guidance", "plans", "repeat", "quality"):
        d.pop(k)
    return hashlib.sha256(json.dumps([model_id, d, machine or {}], sort_keys=True).encode()).hexdigest()[:16]


def run_sweep(
    model: Any,
    sweep: Sweep,
    out_dir: str | Path,
    *,
    model_id: str,
    model_name: str = "",
    defaults: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str = "",
    replace: bool = False,
) -> dict[str, Any]:
    """Run every configuration, write ``results.json``, ``results.md``, ``pareto.png`` and sample
    sheets under ``out_dir``; return the results dict. Finished configurations of ``out_dir`` this sweep
    does not ask for, or measured otherwise (another sweep key: prompts, seeds, model, machine), are
    refused in one line (nothing lost), or replaced with ``replace=True``."""
    from tqdm import tqdm

    from .metrics import (
        ClipScore,
        DistributionMetrics,
        median,
        peak_memory,
        reference_distances,
        time_repeats,
    )
    from .reference import ReferenceConfig, reference_runs

    out = Path(out_dir)
    defaults = dict(defaults or {})
    texts = resolve_prompts(sweep.prompts, sweep.limit)
    k = sweep.images_per_prompt
    jobs = [t for t in texts for _ in range(k)]
    seeds = [sweep.seed + j for j in range(len(jobs))]
    specs = shapes_specs(texts)
    wanted = set(METRICS if sweep.metrics is None else sweep.metrics)
    use_shapes = "shapes" in wanted and specs is not None
    use_fd = "fd" in wanted and (specs is not None or sweep.fd_features != "fd-shapes")
    use_ref = "reference" in wanted
    use_clip = "clip" in wanted and sweep.clip is not None
    if sweep.metrics and "clip" in sweep.metrics and sweep.clip is None:
        raise VelodiffError("the clip metric needs CLIP weights: pass --clip PATH to a local CLIP folder")
    if sweep.metrics and "shapes" in sweep.metrics and specs is None:
        raise VelodiffError("ShapesEval needs prompts of the shapes world; some are outside its grammar")
    clip = ClipScore(sweep.clip) if use_clip else None
    trained = getattr(model, "trained_steps", None)  # a few-step student: many steps leave its training
    if use_ref and trained is not None and sweep.reference_steps > trained:
        why = (f"the reference runs this model at {sweep.reference_steps} steps; it was distilled for "
               f"{trained}, so that is no reference for it")
        if sweep.metrics and "reference" in sweep.metrics:
            raise VelodiffError(f"{why}: score it against its teacher (velodiff tune --baseline-model) or "
                                "with the shapes / fd metrics")
        log(f"bench: no reference metric: {why}")
        use_ref = False

    if use_fd and len(jobs) < 2:  # before any sampling, not after it
        if sweep.metrics and "fd" in sweep.metrics:
            raise VelodiffError(f"FD needs at least 2 images per configuration, got {len(jobs)}; raise "
                                "--limit or --images-per-prompt")
        use_fd = False  # the default metrics: the others still run
    fd = None
    if use_fd:
        if specs is None:  # (before the feature network loads)
            raise VelodiffError("FD needs a real image set; only the shapes world provides one here")
        fd = DistributionMetrics(sweep.fd_features)
        from ..data.shapes import ShapesWorld

        world = ShapesWorld(size=int(model.default_size[0]))
        import numpy as np

        reals = [world.render(s, seed=r).image for s in specs for r in range(sweep.fd_real_per_prompt)]
        fd.add_real(np.stack(reals))
    fd_key = "fd_shapes" if fd is not None and fd.name == "FD-shapes" else "fid"
    kid_key = "kid_shapes" if fd_key == "fd_shapes" else "kid"

    configs = sweep.configs()
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no folder
    lock = lock_folder(out, "--out")  # one writer: two benches of one folder replace each other
    try:
        results_path = out / RESULTS
        machine = {"device": str(model.device), "dtype": str(model.dtype), "threads": torch.get_num_threads()}
        key = sweep_key(sweep, model_id, machine)
        done: dict[str, dict[str, Any]] = {}
        old: dict[str, Any] = {}
        if results_path.is_file():
            try:
                old = json.loads(results_path.read_text())
                if old.get("sweep_key") == key:
                    # a record of an older velodiff without the per-image verdicts is measured again: a
                    # tune's paired standard errors need them on both sides
                    needed = {"shapes_correct"} if use_shapes else set()
                    # a record timed fewer times than this sweep's repeat is timed again (its median would
                    # stand for a count it does not have)
                    done = {r["id"]: r for r in old.get("records", [])
                            if "error" not in r and needed <= r.keys()
                            and len(r.get("seconds", ())) >= sweep.repeat}
            except (ValueError, KeyError, AttributeError):
                done, old = {}, {}
        records = old.get("records") if isinstance(old, dict) else None
        gone = ({str(r.get("id")) for r in records or [] if isinstance(r, dict)}
                - {config_id(c) for c in configs})
        keep = "give another --out to keep them, or --replace to replace them"
        if gone:  # refused, or said before they are replaced (not found missing afterwards)
            some = f"{', '.join(sorted(gone)[:3])}{', ...' * (len(gone) > 3)}"
            held = (f"bench: {out} holds {len(gone)} finished configuration{'s' * (len(gone) != 1)} this "
                    f"sweep does not ask for ({some})")
            if not replace:
                raise VelodiffError(f"{held}; {keep}")
            log(f"{held}; this sweep's results replace them")
        elif records and old.get("sweep_key") != key and not replace:  # the same ids, measured otherwise
            raise VelodiffError(f"bench: {out} holds {len(records)} results of another sweep (other prompts, "
                                f"seeds, images, model or machine settings); {keep}")

        result: dict[str, Any] = {
            "kind": "bench",
            "sweep_key": key,
            "command": command,
            "model": model_name or model.path,
            "model_hash": model_id,
            "model_info": model.describe(),
            "device": str(model.device),
            "threads": torch.get_num_threads(),
            "sweep": asdict(sweep),
            "prompts": texts,
            "seeds": seeds,
            "n_images": len(jobs),
            "configurations": len(configs),  # asked for: a killed bench's file holds fewer records
            "metrics": {"shapes_eval": use_shapes, fd_key: use_fd, "reference": use_ref,
                        "clip_score": use_clip},
            "records": [],
        }
        if use_ref:
            result["reference"] = {"solver": sweep.reference_solver, "steps": sweep.reference_steps,
                                   "grid": sweep.reference_grid}

        def save(final: bool = False) -> None:  # after every configuration: the JSON; at the end all files
            if final:
                finish(result, out, sweep.quality)
            else:
                mark_pareto(result, sweep.quality)
                write_atomic(results_path, json.dumps(result, indent=1) + "\n")
            for cid in gone:  # the replaced records' sample sheets go with them (once the JSON is new)
                if re.fullmatch(r"[A-Za-z0-9._-]+", cid) and cid not in (".", ".."):  # (ids read from a file)
                    (out / SAMPLES / f"{cid}.png").unlink(missing_ok=True)
            gone.clear()

        def guidance_of(value: float | None) -> float:
            return value if value is not None else defaults.get("guidance", model.default_guidance)

        weights = [_planned_nfe(c) * sweep.repeat for c in configs]
        refs: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        plain: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # the "none" plan's outputs
        kept = sum(config_id(c) in done for c in configs)
        if kept:
            log(f"bench: resuming {out}: {kept} of {len(configs)} configurations measured already")
        # warm-up (first-call costs stay out of the timings)
        _generate(model, jobs[:1], seeds[:1], 1, steps=1, solver="ddim", guidance=1.0)
        bar = tqdm(total=sum(weights), desc="bench", unit="nfe", disable=not progress, dynamic_ncols=True)
        for c, w in zip(configs, weights, strict=True):
            cid = config_id(c)
            bar.set_description(f"bench {cid}")
            if cid in done:
                result["records"].append(done[cid])
                bar.update(w)
                continue
            g = guidance_of(c["guidance"])
            kw = {"solver": c["solver"], "grid": c["grid"], "nfe": c["nfe_budget"], "guidance": g,
                  "plan": c["plan"]}
            rec: dict[str, Any] = {"id": cid, **c, "guidance": float(g)}
            try:
                with peak_memory(model.device) as mem:
                    (lat, imgs, res), times = time_repeats(
                        lambda kw=kw: _generate(model, jobs, seeds, sweep.batch, **kw), sweep.repeat
                    )
            except VelodiffError as e:
                rec["error"] = str(e)
                log(f"warning: {cid}: {e}")
                result["records"].append(rec)
                bar.update(w)
                save()
                continue
            # a plan that sets the solver or guidance ran with its own (velodiff.plan.SETTINGS); its
            # distance to the plain run is to the sweep's own configuration (for velodiff tune: the
            # baseline) and another tool's sampler name ("DPM++ 2M Karras") ran velodiff's solver on its
            # grid: the record says what ran, and what was asked where that differs
            ran = {"solver": res.solver, "grid": res.grid or c["grid"]}
            asked = {k: c[k] for k in ran if c[k] is not None and c[k] != ran[k]}
            if asked:
                rec["requested"] = asked
            rec.update(ran, guidance=float(res.guidance), nfe_budget=_planned_nfe(c))
            rec.update(steps=res.steps, nfe=res.nfe, evals=res.evals,
                       seconds_per_image=median(times) / len(jobs), seconds=[round(t, 4) for t in times],
                       peak_memory_mb=round(mem["peak_memory_mb"], 1), memory_kind=mem["memory_kind"])
            if use_shapes:
                from .shapes_eval import correct_by_category, evaluate

                # text2img's tensors are in [0, 1] (ShapesEval's own default is the world's [-1, 1])
                ev = evaluate(imgs, texts, keep_detections=False, value_range=(0, 1))
                rec["shapes_eval"] = ev["overall"]
                rec["shapes_by_category"] = ev["by_category"]
                rec["shapes_correct"] = correct_by_category(ev)  # per image: paired errors against a baseline
            if fd is not None:
                fd.reset_fake()
                fd.add_fake(imgs)
                m = fd.compute()
                rec[fd_key], rec[kid_key] = m["fd"], m.get("kid")
            if use_ref:
                gk = float(res.guidance)  # the scale that ran: a plan's cfg:scale=4 is compared at 4
                if gk not in refs:
                    bar.set_description(f"bench reference (guidance {gk:g})")
                    rc = ReferenceConfig(sweep.reference_solver, sweep.reference_steps,
                                         sweep.reference_grid, gk)
                    rl, ri, info = reference_runs(model, jobs, seeds, rc, model_id=model_id,
                                                  batch=sweep.batch)
                    refs[gk] = (rl, ri)
                rec.update(reference_distances(lat, imgs, *refs[gk]))
            # an accelerated plan beside the plain run of the same seeds (same solver, grid, NFE, guidance;
            # for a plan setting them, the sweep's own: Sweep.plain_config)
            base = sweep.plain_config(c)
            gb = guidance_of(base["guidance"])
            same = (base["solver"], base["grid"], base["nfe_budget"], float(gb))
            if c["plan"] == "none":
                plain[same] = (lat, imgs)
            elif "none" in sweep.plans:
                if same not in plain:  # not run in this sweep (a resumed one): the plain run again, untimed
                    plain_kw = {"solver": base["solver"], "grid": base["grid"], "nfe": base["nfe_budget"],
                                "guidance": gb, "plan": "none"}
                    plain[same] = _generate(model, jobs, seeds, sweep.batch, **plain_kw)[:2]
                dist = reference_distances(lat, imgs, *plain[same])
                rec.update({f"{k}_vs_plain": v for k, v in dist.items()})
            if clip is not None:
                clip.scores = []
                clip.update(imgs, jobs)
                rec["clip_score"] = clip.compute()["clip_score"]
            sheet = f"{SAMPLES}/{cid}.png"
            (out / SAMPLES).mkdir(exist_ok=True)
            write_atomic(out / sheet, _sheet(imgs[:16]))
            rec["sheet"], rec["sheet_cell"] = sheet, int(imgs.shape[-2])
            result["records"].append(rec)
            bar.update(w)
            save()
        bar.close()
        save(final=True)  # (a sweep whose every record was there before has written nothing yet)
        return result
    finally:
        lock.close()


def quality_metric(result: dict[str, Any], quality: str | None = None) -> str | None:
    recs = [r for r in result["records"] if "error" not in r]
    if quality is not None:
        return quality if any(r.get(quality) is not None for r in recs) else None
    present = [q for q in ("shapes_eval", "psnr", "fd_shapes", "clip_score", "ssim", "latent_mse")
               if recs and all(r.get(q) is not None for r in recs)]
    varying = [q for q in present if len({r[q] for r in recs}) > 1]  # a constant metric ranks nothing
    return (varying or present or [None])[0]


def mark_pareto(result: dict[str, Any], quality: str | None) -> str | None:
    q = quality_metric(result, quality)
    recs = [r for r in result["records"] if "error" not in r]
    for r in result["records"]:
        r.pop("pareto", None)
    if q is None:
        return None
    marks = pareto_front([(r["seconds_per_image"], r[q]) for r in recs], QUALITY.get(q, True))
    for r, m in zip(recs, marks, strict=True):
        r["pareto"] = bool(m)
    result["quality"] = q
    return q


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if 0 < abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{nd}f}"
    return str(v)


def sweep_table(result: dict[str, Any]) -> str:
    recs = result["records"]
    cols = [("solver", "solver"), ("grid", "grid"), ("guidance", "guidance"), ("nfe", "NFE"),
            ("steps", "steps"), ("seconds_per_image", "s / image")]
    if any(r.get("plan", "none") != "none" for r in recs):
        cols[:0] = [("plan", "plan")]
        cols.insert(-1, ("evals", "evals / image"))
    for key in ("shapes_eval", "fd_shapes", "kid_shapes", "fid", "kid", "latent_mse", "psnr", "ssim",
                "clip_score", "psnr_vs_plain"):
        if any(r.get(key) is not None for r in recs):
            cols.append((key, LABELS[key]))
    rows = []
    for r in recs:
        if "error" in r:
            head = [r.get("plan", "none")] if cols[0][0] == "plan" else []
            rows.append([*head, r["solver"], r["grid"] or "default", _fmt(r["guidance"]),
                         f"NFE {r['nfe_budget']}: {r['error']}"])
            continue
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if key == "grid":
                v = v or "default"
            if key in ("solver", "grid") and key in r.get("requested", {}):
                v = f"{r['requested'][key]} ({v})"  # another tool's name, and what it ran
            if key == "seconds_per_image":
                v = f"{v:.3f}"
            elif key in LABELS and type(v) is int:
                v = float(v)  # a metric read back from JSON as 0 or 1 is shown as the others are
            cells.append(_fmt(v, 2) if key in ("psnr", "psnr_vs_plain") and isinstance(v, float) else _fmt(v))
        rows.append([*cells, "**yes**" if r.get("pareto") else ""])
    ref = result.get("reference")
    runs, threads = result["sweep"]["repeat"], result["threads"]
    notes = [
        "",
        f"Model `{result['model']}` ({result['model_info']}), {result['n_images']} images "
        f"({len(result['prompts'])} prompts), the same seeds for every configuration; "
        f"s / image: median over {runs} timed run{'s' * (runs != 1)} of the whole set, batch "
        f"{result['sweep']['batch']}, {threads} thread{'s' * (threads != 1)} on {result['device']}.",
    ]
    if ref:
        notes.append(f"Reference: `{ref['solver']}`, {ref['steps']} steps, grid `{ref['grid']}`, same noise, "
                     "prompt and guidance (DPM-Solver-v3 protocol).")
    if result.get("quality"):
        notes.append(f"Pareto front: seconds per image against {LABELS[result['quality']]}.")
    table = tables.markdown_table([h for _, h in cols] + ["Pareto"], rows)
    return "\n".join([table, *notes]) + "\n"


def finish(result: dict[str, Any], out: Path, quality: str | None = None) -> None:
    """Mark the Pareto front and write results.json, results.md and pareto.png (atomically)."""
    from .plots import pareto_png

    q = mark_pareto(result, quality)
    write_atomic(out / RESULTS, json.dumps(result, indent=1) + "\n")
    write_atomic(out / TABLE, sweep_table(result))
    if q is not None:
        write_atomic(out / PLOT, pareto_png(result["records"], q, LABELS[q], QUALITY.get(q, True)))
