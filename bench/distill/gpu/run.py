"""Few-step students of the default model trained on one GPU inside a fixed time budget (issue 13).

    BUDGET_S=500 python bench/distill/gpu/run.py OUT_DIR     # on a CUDA machine (README.md: the run)

The chain, every stage a `velodiff distill` command (printed to OUT_DIR/log.txt as it runs):

1. reflow (2-rectified flow) from the shipped 4-step progressive student `default-4step`, with its
   1-step distillation: 4 064 teacher pairs, the recipe of `default-2step`'s card; gives `rfA` (1 step)
   and `rfA-2steps`;
2. four DMD runs side by side on the same GPU, from `rfA` (1 step) and `rfA-2steps` (2 steps), each under
   two rules: `dmd` (regression weight 0.25, the fake score updated with the generator) and `dmd2`
   (regression 0.05, five fake-score updates per generator update, DMD2's two time-scale rule), batch 64;
   each run is stopped at growing budgets (--max-minutes), exported at the step reached (--steps), and
   every export is scored by ShapesEval on the selection seeds 2000, 3000, 4000 and 5000 (v1 x 2, 800
   images, on the CPU) while the run goes on;
3. the best export of each step count on the selection seeds is written to OUT_DIR (its UNet in two
   float16 safetensors halves, `velodiff`'s loader does not read them: join them with `join.py`), with
   every run's loss log and learning curve in results.json. The protocol's seeds (0, 1000) are never
   looked at here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET_S", 520))
END = T0 + BUDGET
TINY = os.environ.get("TINY") == "1"  # a dry run on the CPU: a few pairs and steps
DEVICE = "cpu" if TINY else "cuda"
OUT = Path(sys.argv[1])
WORK = Path(os.environ.get("WORK", "/tmp/distill-gpu"))
SEEDS = (2000, 3000, 4000, 5000)
V = [sys.executable, "-m", "velodiff.cli"]
PAIRS = ["--pairs", "64", "--eval-pairs", "8"] if TINY else ["--pairs", "4064", "--eval-pairs", "32"]
RULES = {
    "dmd": ["--regression-weight", "0.25", "--fake-updates", "1"],
    "dmd2": ["--regression-weight", "0.05", "--fake-updates", "5"],
}
CHUNKS = (0.05, 0.1) if TINY else (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)  # cumulative trained minutes
RESERVE_S = 20 if TINY else 80  # left after the last chunk: export, scoring, packing
LOG = OUT / "log.txt"
lock = threading.Lock()
curves: dict[str, list[dict]] = {}


def say(text: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {text}"
    with lock:
        print(line, flush=True)
        with LOG.open("a") as f:
            f.write(line + "\n")


def sh(args: list, log: Path) -> int:
    cmd = [str(a) for a in args]
    say("$ velodiff " + " ".join(cmd[3:]))
    with log.open("a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        say(f"exit {rc}; the end of {log.name}:\n" + log.read_text()[-3000:])
    return rc


def score(model: Path, tag: str) -> float:
    """Mean ShapesEval overall over the selection seeds (the CPU, one thread per seed set)."""
    procs = []
    for s in SEEDS:
        j = WORK / "evals" / f"{tag}-{s}.json"
        cmd = [*V, "eval", "shapes", "--model", model, "--images-per-prompt", "2", "--seed", s,
               "--threads", "1", "--device", "cpu", "--json", j]
        procs.append((j, subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)))
    vals = []
    for j, p in procs:
        p.wait()
        if j.exists():
            vals.append(json.loads(j.read_text())["overall"])
    return sum(vals) / len(vals) if len(vals) == len(SEEDS) else float("nan")


def trained(run: Path) -> tuple[int, float]:
    latest = run / "dmd" / "latest"
    if not latest.exists():
        return 0, 0.0
    meta = json.loads((run / "dmd" / latest.read_text().strip() / "state.json").read_text())
    return int(meta["step"]), float(meta["wall_s"])


def dmd_run(name: str, init: Path, k: int, rule: list[str]) -> None:
    run = WORK / name
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "pairs").exists():
        (run / "pairs").symlink_to(WORK / "rf" / "pairs")
    log = WORK / f"{name}.log"
    base = [*V, "distill", "dmd", "--init", init, "--run", run, *PAIRS, "--student-steps", k, *rule,
            "--batch", "8" if TINY else "64", "--lr", "1e-5", "--checkpoint-every", "100000",
            "--threads", "1", "--device", DEVICE, "--quiet"]
    scorers = []
    for minutes in CHUNKS:
        step, wall = trained(run)
        allowed = (wall + END - time.time() - RESERVE_S) / 60
        m = min(minutes, allowed)
        if m - wall / 60 < (0.02 if TINY else 0.4):
            break
        if sh([*base, "--out", WORK / f"{name}-stopped", "--steps", 10**7, "--max-minutes", f"{m:.3f}"], log):
            break
        step, wall = trained(run)
        out = WORK / f"{name}-{step}"
        if sh([*base, "--out", out, "--steps", step], log):
            break
        summary = json.loads((run / "summary.json").read_text())

        def scored(out: Path = out, step: int = step, wall: float = wall, held: float = summary["held_out"]):
            value = score(out, out.name)
            with lock:
                curves.setdefault(name, []).append(
                    {"step": step, "train_s": round(wall, 1), "held_out": held, "selection": value,
                     "folder": str(out)})
            say(f"{name} step {step} ({wall:.0f} s trained): selection {value:.4f}, held-out {held:.4f}")

        t = threading.Thread(target=scored, daemon=True)
        t.start()
        scorers.append(t)
    for t in scorers:
        t.join()


def split_unet(folder: Path, dest: str) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        save_file({k: sd[k].half().contiguous() for k in part}, str(OUT / f"{dest}-unet-{i}.safetensors"))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (WORK / "evals").mkdir(parents=True, exist_ok=True)
    import torch

    say(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; budget {BUDGET:.0f} s")
    rf = [*V, "distill", "reflow", "--init", "default-4step", "--out", WORK / "rfA", "--run", WORK / "rf",
          *PAIRS, "--reflow-steps", "20" if TINY else "1500", "--distill-steps", "10" if TINY else "1000",
          "--batch", "8", "--lr", "4e-5", "--ema", "0.99", "--checkpoint-every", "100000", "--threads", "1",
          "--device", DEVICE, "--quiet"]
    if sh(rf, WORK / "reflow.log"):
        return
    say("reflow done: " + (WORK / "rf" / "summary.json").read_text().replace("\n", " ")[:600]
        if (WORK / "rf" / "summary.json").exists() else "reflow done")
    runs = [threading.Thread(target=dmd_run, args=(f"{r}-k{k}", WORK / ("rfA" if k == 1 else "rfA-2steps"), k,
                                                   RULES[r]), daemon=True)
            for k in (1, 2) for r in RULES]
    for t in runs:
        t.start()
    for t in runs:  # a run still going 40 s past the budget is left behind (its scored exports count)
        t.join(timeout=max(0.0, END + 40 - time.time()))
    with lock:
        pack()
    say("done")
    os._exit(0)


def pack() -> None:
    best: dict[str, dict] = {}
    for name, pts in curves.items():
        k = name.split("-k")[1]
        for p in pts:
            if p["selection"] == p["selection"] and p["selection"] > best.get(k, {}).get("selection", -1):
                best[k] = {**p, "run": name}
    for k, p in best.items():
        split_unet(Path(p["folder"]), f"best-{k}step")
        print(f"best {k}-step: {p['run']} step {p['step']} selection {p['selection']:.4f}", flush=True)
    logs = {f.name: f.read_text()[-20000:] for f in WORK.glob("*.log")}
    losses = {d.name: (d / "dmd" / "loss.csv").read_text() for d in WORK.iterdir()
              if (d / "dmd" / "loss.csv").exists()}
    extra = {}
    for d in [WORK / "rf", *(WORK / n for n in curves)]:
        if (d / "summary.json").exists():
            extra[d.name] = json.loads((d / "summary.json").read_text())
    (OUT / "results.json").write_text(json.dumps(
        {"curves": curves, "best": best, "summaries": extra, "logs": logs, "losses": losses}, indent=1))


if __name__ == "__main__":
    main()
