"""Every shipped model on 1 600 images no model or plan was chosen on: ShapesEval v1 prompts x 16 images
from seed 20000 (seeds 20000-21599; the bars' protocol is v1 x 2 from seed 0, 200 images, where one
model's score moves by up to 0.06 between seed sets). Each row beside the teacher (DPM-Solver++ 2M, 20
steps, CFG 2.5) on the same prompts and seeds: the ratio of the overall scores and their paired
difference with its standard error (``shapes_eval.paired_standard_error``).

    python bench/distill/fresh.py --out bench/distill/fresh        # ~25 min on two CPU threads

Each row is one ``velodiff eval shapes`` run, one torch thread, ``--jobs`` of them side by side, its
output in ``--out/raw`` (not kept in git); ``fresh.json`` keeps each row's per-image verdicts, and a
rerun reuses a row found in either while its model's files are unchanged (``stamp.py``), so the table
can be rebuilt or extended."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stamp import model_stamp

SEED, PER_PROMPT = 20000, 16
#: row name -> (what it is, extra ``velodiff eval shapes`` arguments); "teacher" is the baseline
ROWS: dict[str, tuple[str, list[str]]] = {
    "teacher": ("teacher, dpmpp_2m 20 steps CFG 2.5 (40 evals)", ["--model", "default"]),
    "unipc12": ("teacher, unipc 12 steps (velodiff tune at 0.02 on the teacher; 24 evals)",
                ["--model", "default", "--solver", "unipc", "--steps", "12"]),
    "pruned": ("default-pruned (0.70x FLOPs; 40 evals)", ["--model", "default-pruned"]),
    "guided20": ("default-guided, its 20 steps (20 evals)", ["--model", "default-guided"]),
    "guided8": ("default-guided, dpmpp_2m 8 trailing (velodiff tune at 0.02; 8 evals)",
                ["--model", "default-guided", "--solver", "dpmpp_2m", "--steps", "8", "--grid", "trailing"]),
    "6step": ("default-6step (DMD of default-4step's 6-step sampler; 6 evals)", ["--model", "default-6step"]),
    "6step-tuned": ("default-6step, deis 6 (velodiff tune at 0.02; 6 evals)",
                    ["--model", "default-6step", "--solver", "deis", "--steps", "6"]),
    "6step-at4": ("default-6step run at 4 steps (4 evals)", ["--model", "default-6step", "--steps", "4"]),
    "4step": ("default-4step (progressive, then DMD; 4 evals)", ["--model", "default-4step"]),
    "lcm": ("default-lcm (4 evals)", ["--model", "default-lcm"]),
    "2step": ("default-2step (2 evals)", ["--model", "default-2step"]),
    "1step": ("default-1step (1 eval)", ["--model", "default-1step"]),
}


def run(out: Path, name: str, args: list[str], stamp: str, known: dict) -> None:
    path = out / "raw" / f"{name}.json"
    if _fresh_raw(out, name, stamp) or (known.get(name, {}).get("args") == args
                                         and known[name].get("model_hash") == stamp):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["velodiff", "eval", "shapes", "--images-per-prompt", str(PER_PROMPT), "--seed", str(SEED),
           "--threads", "1", "--json", str(path), *args]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    path.with_suffix(".hash").write_text(stamp)


def _fresh_raw(out: Path, name: str, stamp: str) -> bool:
    """Whether ``raw/NAME.json`` was measured on the model's present weights."""
    h = out / "raw" / f"{name}.hash"
    return (out / "raw" / f"{name}.json").is_file() and h.is_file() and h.read_text() == stamp


def main() -> None:
    from velodiff.eval.shapes_eval import correct_by_category, paired_standard_error
    from velodiff.eval.tables import markdown_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.out / "fresh.json"
    known = json.loads(summary.read_text())["records"] if summary.is_file() else {}
    stamps = {n: model_stamp(extra) for n, (_, extra) in ROWS.items()}
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda kv: run(args.out, kv[0], kv[1][1], stamps[kv[0]], known), ROWS.items()))

    def verdicts_of(name: str) -> dict[str, str]:
        if _fresh_raw(args.out, name, stamps[name]):
            return correct_by_category(json.loads((args.out / "raw" / f"{name}.json").read_text()))
        return known[name]["verdicts"]

    verdicts = {n: verdicts_of(n) for n in ROWS}
    base = verdicts["teacher"]

    def categories(v: dict[str, str]) -> dict[str, float]:
        return {c: s.count("1") / len(s) for c, s in v.items()}

    def overall(v: dict[str, str]) -> float:  # ShapesEval's overall: the mean of the categories
        return sum(categories(v).values()) / len(v)

    teacher = overall(base)
    records, rows = {}, []
    for name, (label, extra) in ROWS.items():
        v = verdicts[name]
        cats, score = categories(v), overall(v)
        rec = {"label": label, "args": extra, "model_hash": stamps[name], "overall": score,
               "ratio": score / teacher, "difference": score - teacher,
               "paired_se": paired_standard_error(v, base), "by_category": cats,
               "images": sum(len(s) for s in v.values()), "verdicts": v}
        records[name] = rec
        diff = f"{rec['difference']:+.3f} ± {rec['paired_se']:.3f}"
        scores = [f"{rec['overall']:.3f}", f"{rec['ratio']:.3f}", diff, *(f"{x:.3f}" for x in cats.values())]
        rows.append([label, *scores])
    table = markdown_table(["model / plan", "ShapesEval", "x teacher", "paired difference", *base],
                           rows, align="lrrrrrrr")
    body = {"seed": SEED, "images_per_prompt": PER_PROMPT, "records": records}
    summary.write_text(json.dumps(body, indent=1) + "\n")
    (args.out / "fresh.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
