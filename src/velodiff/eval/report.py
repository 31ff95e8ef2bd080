"""`velodiff report DIR`: one markdown page (``DIR/report.md``) from a bench or eval folder, with its
tables, plots and a contact sheet of sample images, ready to paste into an issue (images are linked by
relative path; attach the PNGs beside it).

* a bench folder holds ``results.json`` of ``kind: "bench"`` (``velodiff bench``);
* an eval folder holds ``velodiff eval shapes`` JSON files (``overall``, ``by_category``, ``config``),
  each with its contact sheet (same name, ``.png``) when present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import VelodiffError
from ..files import write_atomic
from ..limits import is_number
from .tables import markdown_table

REPORT = "report.md"
SHEET = "report_samples.png"
EVAL_PLOT = "report_eval.png"


def _label_strip(label: str, image: Any, width: int = 120) -> Any:
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width + image.width, max(image.height, 14)), (255, 255, 255))
    strip.paste(image, (width, 0))
    ImageDraw.Draw(strip).multiline_text((4, 2), label, fill=(0, 0, 0), spacing=1)
    return strip


def plan_suffix(r: dict[str, Any]) -> str:
    """`` plan `pag```, or nothing for the plain plan: how a page names a record's plan."""
    return f" plan `{r['plan']}`" if r.get("plan", "none") != "none" else ""


def bench_contact_sheet(folder: Path, records: list[dict[str, Any]], max_rows: int = 12) -> Any | None:
    """One row per configuration (Pareto-optimal first): its label and the first row of its samples."""
    from PIL import Image

    recs = [r for r in records if "error" not in r and r.get("sheet") and (folder / r["sheet"]).is_file()]
    recs.sort(key=lambda r: (not r.get("pareto"), r["seconds_per_image"]))
    rows = []
    for r in recs[:max_rows]:
        im = Image.open(folder / r["sheet"]).convert("RGB")
        cell = int(r.get("sheet_cell") or im.height)
        first = im.crop((0, 0, im.width, min(cell, im.height)))
        if first.height < 64:
            s = 64 // first.height + 1
            first = first.resize((first.width * s, first.height * s), Image.NEAREST)
        star = " *" if r.get("pareto") else ""
        label = f"{r['solver']}{star}\n{r['nfe']} NFE, g {r['guidance']:g}\n{r['grid'] or 'default grid'}"
        if r.get("plan", "none") != "none":
            label += f"\n{r['plan']}"
        rows.append(_label_strip(label, first))
    if not rows:
        return None
    from ..images import image_grid

    size = (max(r.width for r in rows), max(r.height for r in rows))
    cells = []
    for r in rows:  # (one size for the grid: each row on white)
        cell = Image.new("RGB", size, (255, 255, 255))
        cell.paste(r, (0, 0))
        cells.append(cell)
    return image_grid(cells, cols=1, gap=4)


def bench_report(folder: Path, result: dict[str, Any]) -> str:
    from .sweep import PLOT, sweep_table

    recs = result["records"]
    ok = [r for r in recs if "error" not in r]
    q = result.get("quality")
    lines = [f"# velodiff bench: {result.get('model', '')}", ""]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    n_img = result["n_images"]
    lines += [f"{len(ok)} configurations ({len(recs) - len(ok)} failed), {n_img} images each.", ""]
    asked = result.get("configurations")
    if isinstance(asked, int) and len(recs) < asked:  # the bench was stopped (killed, Ctrl-C) part way
        lines += [f"**Unfinished**: {len(recs)} of the {asked} configurations asked for were measured; "
                  "rerun the bench's command with this folder as --out to finish it.", ""]
    if q and ok:
        front = sorted((r for r in ok if r.get("pareto")), key=lambda r: r["seconds_per_image"])
        lines.append("Pareto front (fastest first): " + ", ".join(
            f"`{r['solver']}` {r['nfe']} NFE{plan_suffix(r)} ({r['seconds_per_image']:.3f} s, {q} {r[q]:.3g})"
            for r in front))
        lines.append("")
    lines += ["## Results", "", sweep_table(result)]
    if (folder / PLOT).is_file():
        lines += ["## Quality vs time", "", f"![quality vs time]({PLOT})", ""]
    sheet = bench_contact_sheet(folder, recs)
    if sheet is not None:
        from ..images import png_bytes

        write_atomic(folder / SHEET, png_bytes(sheet))
        lines += ["## Samples", "", "First samples of each configuration (* = on the Pareto front), "
                  "the same seeds in every row.", "", f"![samples]({SHEET})", ""]
    return "\n".join(lines)


def _eval_files(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (ValueError, OSError):
            continue
        if (
            isinstance(d, dict)
            and isinstance(d.get("overall"), (int, float))
            and isinstance(d.get("by_category"), dict)
            and all(isinstance(v, (int, float)) for v in d["by_category"].values())
        ):
            out.append((p, d))
    return out


def eval_report(folder: Path, evals: list[tuple[Path, dict[str, Any]]]) -> str:
    from .plots import bars_png

    cats: list[str] = []
    for _, d in evals:
        cats += [c for c in d["by_category"] if c not in cats]
    rows = []
    for p, d in evals:
        c = d.get("config", {})
        cells = [f"{d['by_category'][k]:.3f}" if k in d["by_category"] else "-" for k in cats]
        rows.append([p.stem, c.get("model", "-"), c.get("prompts", "-"), c.get("solver", "-"),
                     c.get("nfe", "-"), c.get("guidance", "-"), f"{d['overall']:.3f}", *cells])
    headers = ["run", "model", "prompts", "solver", "NFE", "guidance", "overall", *cats]
    lines = [f"# velodiff eval: {folder.name}", "", "## ShapesEval", "",
             markdown_table(headers, rows, align="llllrrr" + "r" * len(cats)), ""]
    if len(evals) > 1:
        plot = bars_png([p.stem for p, _ in evals], [d["overall"] for _, d in evals], "ShapesEval overall",
                        "accuracy")
        write_atomic(folder / EVAL_PLOT, plot)
        lines += [f"![ShapesEval overall]({EVAL_PLOT})", ""]
    sheets = [(p, p.with_suffix(".png")) for p, _ in evals if p.with_suffix(".png").is_file()]
    if sheets:
        lines += ["## Samples", ""]
        for p, s in sheets:
            lines += [f"**{p.stem}** (green bar: correct, red: wrong)", "", f"![{p.stem}]({s.name})", ""]
    return "\n".join(lines)


def check_bench_result(result: dict[str, Any], where: Path) -> None:
    """The fields the page ranks and prints, each named with its record when it is missing or no
    finite number (a NaN time was put first on the Pareto front); the quality may be +inf (the PSNR of a
    configuration equal to its reference, which velodiff bench writes as Infinity)."""
    recs = result.get("records")
    if not isinstance(recs, list):
        raise VelodiffError(f"{where}: 'records' must be a list")
    if not isinstance(result.get("n_images"), int):
        raise VelodiffError(f"{where}: 'n_images' must be an integer, got {result.get('n_images')!r}")
    q = result.get("quality")
    numbers = ("nfe", "guidance", "seconds_per_image", *((q,) if isinstance(q, str) else ()))
    for i, r in enumerate(recs):
        if not isinstance(r, dict):
            raise VelodiffError(f"{where}: records[{i}] must be an object")
        if "error" in r:
            continue
        if not isinstance(r.get("solver"), str):
            raise VelodiffError(f"{where}: records[{i}].solver must be a name, got {r.get('solver')!r}")
        for key in numbers:
            v = r.get(key)
            if key == q and v == math.inf:
                continue
            if not is_number(v) or not math.isfinite(v):
                raise VelodiffError(f"{where}: records[{i}].{key} must be a finite number, got {v!r}")


def build_report(folder: str | Path) -> Path:
    """Write ``folder/report.md`` for a bench or eval folder; return its path."""
    folder = Path(folder)
    if not folder.exists():
        raise VelodiffError(f"{str(folder)!r} does not exist; give a bench or eval output folder")
    if not folder.is_dir():
        raise VelodiffError(f"{str(folder)!r} is not a folder; give a bench or eval output folder")
    res_path = folder / "results.json"
    if res_path.is_file():
        try:
            result = json.loads(res_path.read_text())
        except ValueError:
            raise VelodiffError(f"{res_path} is not valid JSON") from None
        if not isinstance(result, dict) or result.get("kind") != "bench":
            raise VelodiffError(f"{res_path} is not a `velodiff bench` result")
        check_bench_result(result, res_path)
        try:
            text = bench_report(folder, result)
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a damaged or hand-edited file
            raise VelodiffError(
                f"{res_path}: a field is missing or malformed ({type(e).__name__}: {e})"
            ) from None
    else:
        evals = _eval_files(folder)
        if not evals:
            raise VelodiffError(f"no bench results.json and no `velodiff eval` JSON in {str(folder)!r}")
        text = eval_report(folder, evals)
    out = folder / REPORT
    write_atomic(out, text)
    return out
