"""Wall time of the `velodiff` command as a user runs it: a fresh process per run, timed from start to
exit, for `--help`, `generate --help`, an early error (unknown solver) and a real `generate`.

    PYTHONPATH=$PWD/src python bench/startup/run.py --label after --runs 7
    python bench/startup/run.py --variant before=a046c21 --variant after=src --runs 7
    python bench/startup/run.py --compare bench/startup/before.json bench/startup/after.json

Runs are interleaved (case 1, case 2, ..., case 1, ...; and over --variant's, e.g. the code before and
after a change) so a burst of load from other processes lands on every case alike; each case also gets
one untimed warm-up run (file cache), which also records which heavy libraries ended up imported.
Writes LABEL.json and LABEL.md per variant beside this script (or into --dir), compare.md for two
variants, and prints the markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "a red circle above a blue square"
HEAVY = ("torch", "diffusers", "transformers", "numpy", "scipy", "PIL", "matplotlib", "safetensors")

# Runs velodiff.cli:main exactly as the console script does; an atexit handler (which runs on every
# way out, also the CLI's own os._exit) writes which heavy libraries are in sys.modules.
PROBE = """
import atexit, os, sys

def probe():
    with open(os.environ["VELODIFF_STARTUP_PROBE"], "w") as f:
        f.write(",".join(m for m in {heavy!r} if m in sys.modules))

atexit.register(probe)
from velodiff.cli import main
sys.argv[0] = "velodiff"
sys.exit(main())
"""


def cases(tmp: Path) -> dict[str, list[str]]:
    return {
        "help": ["--help"],
        "generate --help": ["generate", "--help"],
        "error: unknown solver": ["generate", PROMPT, "--out", str(tmp / "e.png"), "--solver", "nope"],
        "generate": ["generate", PROMPT, "--out", str(tmp / "x.png")],
    }


def expected_rc(name: str) -> int:
    return 2 if name.startswith("error") else 0


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, int, list[str]]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, p.returncode, (p.stderr or p.stdout).strip().splitlines()[-1:]


def source_dir(spec: str, tmp: Path) -> Path:
    """A folder holding the ``velodiff`` package: SPEC itself, or the src/ of git revision SPEC."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    out = tmp / f"src-{spec}"
    out.mkdir(parents=True)
    top = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--show-toplevel"], capture_output=True,
                         text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", top, "archive", spec, "src"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "src"


def describe(spec: str | None) -> str:
    """The commit a variant's code comes from (a revision, or this checkout's HEAD, + dirty mark)."""
    git = ["git", "-C", str(HERE)]
    if spec is not None and not Path(spec).is_dir():
        return subprocess.run([*git, "rev-parse", "--short", spec], capture_output=True,
                              text=True).stdout.strip()
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", ":/src"], capture_output=True,
                           text=True).stdout.strip()
    return commit + ("+uncommitted src changes" if dirty else "")


def measure(args: argparse.Namespace) -> list[dict]:
    """Time every case for every variant (label, code), runs interleaved over variants and cases."""
    exe = args.velodiff or shutil.which("velodiff") or str(Path(sys.executable).parent / "velodiff")
    tmp = Path(tempfile.mkdtemp(prefix="velodiff-startup-"))
    todo = cases(tmp)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only}
    variants: dict[str, tuple[str | None, dict[str, str]]] = {}
    try:
        for v in args.variant or [f"{args.label}="]:
            label, _, spec = v.partition("=")
            env = dict(os.environ)
            if spec:
                env["PYTHONPATH"] = os.pathsep.join(
                    [str(source_dir(spec, tmp))] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            variants[label] = (spec or None, env)
        times = {(lab, k): [] for lab in variants for k in todo}
        imported: dict[tuple[str, str], list[str]] = {}
        where: dict[str, str] = {}
        for label, (_, env) in variants.items():
            where[label] = subprocess.run(  # where the timed runs import velodiff from (no import)
                [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('velodiff').origin)"],
                env=env, capture_output=True, text=True).stdout.strip()
            for name, argv in todo.items():  # warm-up + which modules get imported
                probe_file = tmp / "probe.txt"
                env_probe = dict(env, VELODIFF_STARTUP_PROBE=str(probe_file))
                _, rc, last = run_once([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], env_probe)
                if rc != expected_rc(name):
                    raise SystemExit(f"{label} {name}: exit {rc}, expected {expected_rc(name)}: {last}")
                imported[label, name] = [m for m in probe_file.read_text().split(",") if m]
        baseline = []
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        for _ in range(args.runs):
            baseline.append(run_once([sys.executable, "-c", "pass"], dict(os.environ))[0])
            for name, argv in todo.items():
                for label, (_, env) in variants.items():
                    dt, rc, last = run_once([exe, *argv], env)
                    if rc != expected_rc(name):
                        raise SystemExit(f"{label} {name}: exit {rc}, expected {expected_rc(name)}: {last}")
                    times[label, name].append(dt)
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = []
    for label, (spec, _) in variants.items():
        rows = []
        for name, argv in todo.items():
            ts = times[label, name]
            rows.append({
                "case": name,
                "command": "velodiff " + " ".join(_quote(a) for a in argv).replace(str(tmp), "$TMP"),
                "median_s": round(statistics.median(ts), 3),
                "min_s": round(min(ts), 3),
                "max_s": round(max(ts), 3),
                "runs_s": [round(t, 3) for t in ts],
                "imported": imported[label, name],
            })
        out.append({
            "label": label,
            "commit": describe(spec),
            "velodiff_source": str(Path(where[label]).parent).replace(str(tmp), "$TMP"),
            "interleaved_with": [lab for lab in variants if lab != label],
            "executable": exe,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": load,
            "loadavg_after": load_after,
            "runs": args.runs,
            "python_startup_median_s": round(statistics.median(baseline), 3),
            "results": rows,
        })
    return out


def _quote(a: str) -> str:
    return f'"{a}"' if " " in a else a


def markdown(res: dict) -> str:
    lines = [
        f"## velodiff start-up: {res['label']} ({res['commit']})",
        "",
        f"{res['runs']} runs per case, interleaved over cases"
        + (f" and with {', '.join(res['interleaved_with'])}" if res.get("interleaved_with") else "")
        + f"; wall time of the whole process; python {res['python']}, {res['cpus']} CPUs, load average "
        f"(1/5/15 min) {_load(res, 'loadavg_before')} at start, {_load(res, 'loadavg_after')} at the end; "
        f"`python -c pass`: {res['python_startup_median_s']:.3f} s; velodiff imported from "
        f"`{res.get('velodiff_source')}`.",
        "",
        "| case | command | median s | min s | max s | heavy libraries imported |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in res["results"]:
        lines.append(f"| {r['case']} | `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                     f"{r['max_s']:.3f} | {', '.join(r['imported']) or 'none'} |")
    return "\n".join(lines) + "\n"


def _load(res: dict, key: str) -> str:
    la = res.get(key)
    return "n/a" if not la else " / ".join(f"{x:.2f}" for x in la)


def compare(before: dict, after: dict) -> str:
    b = {r["case"]: r for r in before["results"]}
    lines = [
        f"## velodiff start-up: {before['label']} ({before['commit']}) vs "
        f"{after['label']} ({after['commit']})",
        "",
        "| case | before median s (min-max) | after median s (min-max) | saved |",
        "|---|---:|---:|---:|",
    ]
    for r in after["results"]:
        if r["case"] not in b:
            continue
        x = b[r["case"]]
        saved = x["median_s"] - r["median_s"]
        lines.append(f"| {r['case']} | {x['median_s']:.3f} ({x['min_s']:.3f}-{x['max_s']:.3f}) | "
                     f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
                     f"{saved:.3f} s ({saved / x['median_s']:.0%}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="run", help="names the output files LABEL.json / LABEL.md")
    ap.add_argument("--variant", action="append", metavar="LABEL=SRC",
                    help="time the code in SRC (a folder holding the velodiff package, or a git revision "
                    "whose src/ is used), as LABEL; repeat to interleave variants run by run (the first "
                    "two also give compare.md). Default: the current environment, as --label")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=HERE, help="where LABEL.json / LABEL.md go")
    ap.add_argument("--velodiff", help="the console script to time (default: `velodiff` on PATH, "
                    "else beside this Python)")
    ap.add_argument("--only", action="append", help="time only this case (repeatable)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                    help="print (and write COMPARE.md) a before/after table from two JSON files")
    args = ap.parse_args()
    if args.compare:
        text = compare(*(json.loads(p.read_text()) for p in args.compare))
        (args.dir / "compare.md").write_text(text)
        print(text)
        return
    results = measure(args)
    args.dir.mkdir(parents=True, exist_ok=True)
    for res in results:
        (args.dir / f"{res['label']}.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.dir / f"{res['label']}.md").write_text(markdown(res))
        print(markdown(res))
    if len(results) >= 2:
        text = compare(results[0], results[1])
        (args.dir / "compare.md").write_text(text)
        print(text)

if __name__ == "__main__":
    main()
