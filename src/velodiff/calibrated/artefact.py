"""The solver calibration artefact: what ``velodiff calibrate solver`` fitted for one model at one guidance
scale, found again by the model's hash.

``$VELODIFF_CACHE/calibration/solver-<model hash>-cfg<guidance>.json`` holds, per (solver, NFE), the best
calibrated configuration (``method``: grid, dc or search; its grid ``ts``; its fitted solver
``options``; its error and the best uncalibrated error on the calibration batch) and, when measured,
the name of a safetensors file beside it with DPM-Solver-v3's model statistics (named by its content, so
the JSON, written last and atomically, never names statistics of another run: a killed calibration
leaves the previous artefact or none, never half of one). A copy beside the model
(``--beside-model``) travels with it; a run looks an entry up in the cache's artefact first, then in
that one, so a calibration of one more NFE never hides the others, and a calibration adds to the
artefact already at its path for the same model and scale. Entries are matched on the solver, the NFE and
the options they were fitted for (``configuration``). A file made for another model or guidance scale is
refused with the reason.
"""

from __future__ import annotations

import glob
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..files import write_atomic
from ..solvers.dpm_solver_v3 import ModelStatistics

VERSION = 1


def guidance_tag(guidance: float) -> str:
    """The guidance scale as artefact names spell it: short (``2.5``, ``7``), exact where that is not
    (``7.5000001``), so two scales never share a file."""
    g = float(guidance)
    return f"{g:g}" if float(f"{g:g}") == g else repr(g)


def solver_calibration_path(model_hash: str, guidance: float) -> Path:
    from ..accel.calibration import calibration_dir

    return calibration_dir() / f"solver-{model_hash}-cfg{guidance_tag(guidance)}.json"


def beside_model_path(model_path: str | Path, guidance: float) -> Path:
    """Where an artefact travels with its model: ``<folder>/velodiff/solver-cfg<g>.json`` for a diffusers
    folder, ``<file stem>.solver-cfg<g>.json`` beside a single-file checkpoint."""
    from ..eval.reference import ARTEFACTS

    p = Path(model_path)
    name = f"solver-cfg{guidance_tag(guidance)}.json"
    return p / ARTEFACTS / name if p.is_dir() else p.with_name(f"{p.stem}.{name}")


def save_solver_calibration(
    artefact: dict[str, Any], ems: ModelStatistics | None, path: str | Path | None = None
) -> Path:
    """Write the artefact (and the statistics beside it); returns the JSON's path."""
    from safetensors.torch import save

    p = (
        Path(path)
        if path is not None
        else solver_calibration_path(artefact["model_hash"], artefact["guidance"])
    )
    p.parent.mkdir(parents=True, exist_ok=True)
    artefact = _merged(dict(artefact), p, new_statistics=ems is not None)
    if ems is not None:
        tensors = {"lambdas": ems.raw["lambdas"], "l": ems.raw["l"], "s": ems.raw["s"], "b": ems.raw["b"]}
        data = save({k: v.contiguous() for k, v in tensors.items()})
        ems_path = p.with_name(f"{p.stem}.ems-{hashlib.sha256(data).hexdigest()[:12]}.safetensors")
        write_atomic(ems_path, data)
        artefact["ems"] = ems_path.name
    write_atomic(p, json.dumps(artefact, indent=1) + "\n")
    for old in p.parent.glob(f"{glob.escape(p.stem)}.ems*.safetensors"):  # statistics no artefact names now
        if old.name != artefact.get("ems"):
            old.unlink(missing_ok=True)
    return p


def _entry_key(e: dict[str, Any]) -> str:
    return json.dumps([e.get("solver"), e.get("nfe"), e.get("configuration", {})], sort_keys=True)


def _merged(artefact: dict[str, Any], p: Path, new_statistics: bool) -> dict[str, Any]:
    """``artefact`` with what the artefact already at ``p`` holds for the same model and guidance scale
    and this run did not fit again (a calibration of one more NFE or solver adds to the file); the old
    DPM-Solver-v3 entries go when new statistics are measured (their grids were fitted on the old)."""
    try:
        old = json.loads(p.read_text())
        same = all(old.get(k) == artefact.get(k) for k in ("kind", "version", "model_hash", "guidance"))
    except (OSError, ValueError, AttributeError):
        return artefact
    if not same or not isinstance(old.get("entries"), list):
        return artefact
    fitted = {_entry_key(e) for e in artefact["entries"]}
    kept = [
        e for e in old["entries"]
        if isinstance(e, dict) and _entry_key(e) not in fitted
        and not (new_statistics and e.get("solver") == "dpm_solver_v3")
    ]
    merged = {**artefact, "entries": kept + list(artefact["entries"])}
    merged["entries"].sort(key=lambda e: (int(e.get("nfe", 0)), str(e.get("solver"))))
    if isinstance(old.get("baselines"), dict):
        merged["baselines"] = {**old["baselines"], **artefact.get("baselines", {})}
    if not new_statistics and old.get("ems"):
        merged["ems"] = old["ems"]
    return merged


def load_solver_calibration(
    model_hash: str,
    guidance: float,
    model_name: str = "M",
    path: str | Path | None = None,
    model_path: str | Path | None = None,
) -> dict[str, Any]:
    """The artefact for this model hash and guidance scale: ``path``, else the cache's, else the one
    beside the model (``model_path``); one line when it is missing or made for another model or scale."""
    p = Path(path) if path is not None else solver_calibration_path(model_hash, guidance)
    if path is None and not p.is_file() and model_path is not None:
        if beside_model_path(model_path, guidance).is_file():
            p = beside_model_path(model_path, guidance)
    from ..accel.calibration import read_artefact

    hint = f"velodiff calibrate solver --model {model_name} --guidance {guidance_tag(guidance)}"
    data = read_artefact(p, "solver", VERSION, model_hash, hint, f" at guidance {guidance_tag(guidance)}")
    if abs(float(data.get("guidance", float("nan"))) - float(guidance)) > 1e-9:
        raise VelodiffError(
            f"solver calibration {p} was made at guidance {data.get('guidance')!r}, not {float(guidance)!r}; "
            f"make one with: {hint}"
        )
    data["_path"] = str(p)
    return data


def load_solver_calibrations(
    model_hash: str, guidance: float, model_name: str = "M", model_path: str | Path | None = None
) -> list[dict[str, Any]]:
    """Every artefact for this model hash and guidance scale, the cache's first, then the one beside the
    model; one made for another model (e.g. the files beside it, loaded with another config) is passed
    over; one line when none fits, saying why."""
    paths = [solver_calibration_path(model_hash, guidance)]
    if model_path is not None:
        paths.append(beside_model_path(model_path, guidance))
    found = [p for p in paths if p.is_file()]
    if not found:
        return [load_solver_calibration(model_hash, guidance, model_name)]  # says which command to run
    from ..accel.calibration import ForeignArtefact

    fits, errors = [], []
    for p in found:
        try:
            fits.append(load_solver_calibration(model_hash, guidance, model_name, path=p))
        except VelodiffError as e:
            errors.append(e)
    if not fits:
        raise errors[0]
    for e in errors:  # another model's is expected beside a model loaded otherwise; damage is said
        if not isinstance(e, ForeignArtefact):
            warnings.warn(f"{e} (passed over: the run uses {fits[0]['_path']})", stacklevel=3)
    return fits


def load_statistics(artefact: dict[str, Any]) -> ModelStatistics:
    """DPM-Solver-v3's statistics of an artefact."""
    from ..models.weights import load_file

    name = artefact.get("ems")
    if not name:
        raise VelodiffError(
            f"solver calibration {artefact.get('_path')} has no DPM-Solver-v3 statistics; calibrate with "
            "--methods dpm_solver_v3"
        )
    p = Path(artefact["_path"]).parent / name
    if not p.is_file():
        raise VelodiffError(f"DPM-Solver-v3 statistics {p} are missing; calibrate again")
    d = load_file(p)
    return ModelStatistics(d["lambdas"], d["l"], d["s"], d["b"])


def find_entry(
    artefact: dict[str, Any], solver: str, nfe: int, configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The calibrated configuration of ``solver`` at ``nfe``; one line listing what there is if none,
    or saying the file is damaged (a hand-edited or truncated artefact)."""
    return find_entry_in([artefact], solver, nfe, configuration=configuration)[0]


def _described(configuration: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in configuration.items()) or "its own default options"


def find_entry_in(
    artefacts: list[dict[str, Any]],
    solver: str,
    nfe: int,
    model_name: str = "M",
    configuration: dict[str, Any] | None = None,
    asked: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entry, the artefact holding it): the first of ``artefacts`` that calibrated ``solver`` at
    ``nfe`` for ``configuration`` (``calibrate.configuration``: velodiff's own options when ``{}``; any
    when None); one line listing what they hold if none does, or naming the configuration an entry was
    fitted for when only another's is there (``asked``: the solver as the run named it)."""
    for art in artefacts:
        entries = art.get("entries", [])
        well_formed = isinstance(entries, list) and all(
            isinstance(e, dict)
            and isinstance(e.get("solver"), str)
            and isinstance(e.get("nfe"), int)
            and isinstance(e.get("ts"), list)
            and all(isinstance(t, (int, float)) for t in e["ts"])
            and isinstance(e.get("options", {}), dict)
            for e in entries
        )
        if not well_formed:
            raise VelodiffError(f"solver calibration {art.get('_path')} is damaged (malformed entries); "
                                "calibrate again")
        for e in entries:
            if e["solver"] == solver and int(e["nfe"]) == int(nfe):
                if configuration is None or e.get("configuration", {}) == configuration:
                    return e, art
    other = next((e for a in artefacts for e in a.get("entries", [])
                  if e["solver"] == solver and int(e["nfe"]) == int(nfe)), None)
    if other is not None:
        guidance = artefacts[0].get("guidance")
        raise VelodiffError(
            f"the calibrated {solver} grid at {nfe} NFE was fitted for {solver} with "
            f"{_described(other.get('configuration', {}))}, not {_described(configuration or {})}; run "
            f"velodiff calibrate solver --model {model_name} --guidance {guidance_tag(guidance)} --nfe {nfe} "
            f"--solvers '{asked or solver}'"
        )
    have = sorted({(e["solver"], int(e["nfe"])) for a in artefacts for e in a.get("entries", [])})
    listed = ", ".join(f"{s}@{n}" for s, n in have) or "none"
    where = " and ".join(str(a.get("_path")) for a in artefacts)
    guidance = artefacts[0].get("guidance") if artefacts else None
    at = f" --guidance {guidance_tag(guidance)}" if isinstance(guidance, (int, float)) else ""
    raise VelodiffError(
        f"no calibrated grid for solver {solver!r} at {nfe} NFE in {where} (calibrated: {listed}); run "
        f"velodiff calibrate solver --model {model_name}{at} --nfe {nfe} --solvers {solver}"
    )
