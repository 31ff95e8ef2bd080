"""Issue 11's bars on the shipped model: calibrated vs every uncalibrated configuration, on prompts and
seeds the calibration never saw, at CFG 2.5.

First calibrate (the command whose time and evaluations the report quotes):

    velodiff calibrate solver --model default --nfe 5,6,8,10 --guidance 2.5
    python bench/calibrate/model.py      # writes bench/calibrate/model.json and prints the tables

* held-out set: 16 v1 prompts (every sixth) with seeds 0-15; the calibration used 12 shapes-world
  captions that are in no prompt set, seeds 1000-1011;
* latent MSE to a 200-step DPM-Solver++ 3M reference from the same noise, for every deterministic velodiff
  solver x grid, every diffusers scheduler configuration of ``diffusers_configs.py`` (each class with
  every spacing / sigma / order flag it takes, and its AYS timesteps), and each calibrated configuration; the
  calibrated one reported per NFE is the one with the lowest *calibration* error;
* ShapesEval (v1 x 2 images) of that configuration at 6 and 8 NFE against DPM-Solver++ 2M (Karras) at 20.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers_configs import configurations, run_diffusers  # bench/calibrate/, the script's own folder

import velodiff
from velodiff.calibrated import entry_options, load_solver_calibration, load_statistics, model_problem
from velodiff.eval.reference import model_hash
from velodiff.eval.shapes_eval import evaluate, load_prompts
from velodiff.eval.solver_bench import default_grids, deterministic_solvers
from velodiff.grids import make_grid
from velodiff.pipelines import text2img
from velodiff.solvers import get_solver

NFES = (5, 6, 8)
GUIDANCE = 2.5


def shapes_eval(model, **kw) -> float:
    """ShapesEval overall on v1 x 2 images, seeds 0-199 (prompt-major, as velodiff eval shapes)."""
    prompts = load_prompts("v1")
    texts = [p.text for p in prompts for _ in range(2)]
    images = []
    for i in range(0, len(texts), 50):
        images += text2img(model, texts[i : i + 50], seeds=list(range(i, min(i + 50, len(texts)))),
                           guidance=GUIDANCE, output="pil", **kw).images
    return evaluate(images, prompts, keep_detections=False)["overall"]


BASELINES = Path(__file__).with_name("model_baselines.json")


def baselines(model, test) -> dict:
    """Every uncalibrated configuration's held-out MSE per NFE (cached in model_baselines.json, which
    does not depend on any calibration; a configuration missing there is run and added)."""
    out = {int(k): v for k, v in json.loads(BASELINES.read_text()).items()} if BASELINES.is_file() else {}
    grids = default_grids(model.schedule)
    for nfe in NFES:
        unc = out.setdefault(nfe, {})
        for s in deterministic_solvers():
            steps = get_solver(s).steps_for_nfe(nfe)
            for g in grids:
                if f"velodiff {s} / {g}" in unc:
                    continue
                try:
                    ts = make_grid(g, model.schedule, steps)
                except velodiff.VelodiffError:
                    continue
                unc[f"velodiff {s} / {g}"] = test.score(ts, s)
        for label, cls, over in configurations():
            if f"diffusers {label}" not in unc:
                got = run_diffusers(test, cls, over, nfe)
                if got is not None:
                    unc[f"diffusers {label}"] = test.error(got[0])
        print(nfe, "baselines", min(unc, key=unc.get), min(unc.values()), flush=True)
    BASELINES.write_text(json.dumps(out, indent=1) + "\n")
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", help="an artefact file (default: the model's, from the cache)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("model.json")), help="report file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = velodiff.load("default")
    texts = [p.text for p in load_prompts("v1")][::6][:16]
    test = model_problem(model, texts, list(range(len(texts))), GUIDANCE)
    test.objective = "mse"  # the bar's measure
    t0 = time.perf_counter()
    test.reference()
    base = baselines(model, test)
    art = load_solver_calibration(model_hash(model.path), GUIDANCE, "default", path=args.calibration,
                                  model_path=model.path)  # the cache's, else the one shipped beside it
    ems = load_statistics(art) if art.get("ems") else None
    keys = ("seconds", "evaluations", "images", "prompts", "methods")
    report = {"calibration": {k: art.get(k) for k in keys},
              "held_out": {"prompts": "v1[::6][:16]", "seeds": "0-15"}, "nfe": {}}
    runs = {}  # (nfe, calibrated entry) -> its text2img options (the artefact's grid and fitted options)
    for nfe in NFES:
        unc = base[nfe]
        cal = {}
        for e in art["entries"]:
            if e["nfe"] != nfe:
                continue
            opts = entry_options(e)
            if e["solver"] == "dpm_solver_v3":
                opts["ems"] = ems
            cal[f"{e['solver']} / {e['method']}"] = {
                "test": test.score(torch.tensor(e["ts"], dtype=torch.float64), e["solver"], opts),
                "calibration": e["error"]}
            runs[(nfe, f"{e['solver']} / {e['method']}")] = {"solver": e["solver"], "grid": e["ts"],
                                                             "solver_options": opts}
        pick = min(cal, key=lambda k: cal[k]["calibration"])
        best = min(unc, key=unc.get)
        best_d = min((k for k in unc if k.startswith("diffusers")), key=unc.get)
        row = {"calibrated_pick": pick, "calibrated_mse": cal[pick]["test"], "best_uncalibrated": best,
               "best_uncalibrated_mse": unc[best], "ratio": cal[pick]["test"] / unc[best],
               "best_diffusers": best_d, "best_diffusers_mse": unc[best_d], "calibrated": cal,
               "uncalibrated": dict(sorted(unc.items(), key=lambda kv: kv[1])[:15])}
        report["nfe"][nfe] = row
        print(nfe, {k: v for k, v in row.items() if k not in ("calibrated", "uncalibrated")}, flush=True)
    report["scoring_seconds"] = time.perf_counter() - t0
    se = {"dpmpp_2m karras 20 NFE": shapes_eval(model, solver="dpmpp_2m", nfe=20)}
    for nfe in (6, 8):
        se[f"dpmpp_2m karras {nfe} NFE"] = shapes_eval(model, solver="dpmpp_2m", nfe=nfe)
        pick = report["nfe"][nfe]["calibrated_pick"]
        se[f"calibrated {pick} {nfe} NFE"] = shapes_eval(model, **runs[(nfe, pick)])
    report["shapes_eval"] = se
    print(se, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
