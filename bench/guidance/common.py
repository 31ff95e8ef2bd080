"""Shared harness of the guidance benchmarks (bench/guidance/*.py): prompt/seed sets, generation with
the shipped default model (single-threaded), ShapesEval per image, paired statistics against a
baseline from the same seeds, image statistics, markdown + JSON output, contact sheets.

Sets (seeds as `velodiff bench`: image j of a set uses seed + j, prompt-major):
  cal     calibration: v1 prompts x 1 image from seed 1000, then v1-holdout x 1 image from seed 1100
          (136 images); settings are chosen here only
  report  v1 prompts x 2 images from seed 0 (200 images); every reported number
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"  # generated images/latents per configuration (not committed)

SETS: dict[str, list[tuple[str, int, int]]] = {  # name -> [(prompt set, images per prompt, first seed)]
    "cal": [("v1", 1, 1000), ("v1-holdout", 1, 1100)],
    "report": [("v1", 2, 0)],
}

_MODEL: Any = None


def model() -> Any:
    global _MODEL
    if _MODEL is None:
        import velodiff

        torch.set_num_threads(1)
        _MODEL = velodiff.load(velodiff.default_model.default_model_path())
    return _MODEL


@dataclass(frozen=True)
class Job:
    text: str  # prompt given to the model
    spec_text: str  # prompt ShapesEval scores against (the plain caption)
    category: str
    prompt_id: str  # images of one prompt share it (cluster for the bootstrap)
    seed: int


def jobs(set_name: str) -> list[Job]:
    from velodiff.eval.shapes_eval import load_prompts

    out = []
    for pset, k, seed in SETS[set_name]:
        ps = load_prompts(pset)
        for j, (p, _) in enumerate((p, r) for p in ps for r in range(k)):
            out.append(Job(p.text, p.text, p.category, f"{pset}/{p.text}", seed + j))
    return out


def key_of(cfg: dict[str, Any], js: list[Job]) -> str:
    blob = json.dumps([cfg, [(j.text, j.seed) for j in js]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate(js: list[Job], cfg: dict[str, Any], *, tag: str, batch: int = 34, gen=None) -> dict[str, Any]:
    """Images (N,3,H,W in [0,1]), latents, evals per image, nfe, canonical plan, seconds per image for
    one configuration (text2img keywords in cfg), cached under .cache/<tag>/<key>.pt."""
    key = key_of(cfg, js)
    path = CACHE / tag / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True) | {"cached": True}
    if gen is None:
        from velodiff.pipelines import text2img

        def gen(texts, seeds, **kw):  # noqa: ANN001
            return text2img(model(), texts, seeds=seeds, output="tensor", **kw)

    imgs, lats, evals, plan, nfe = [], [], 0.0, None, None
    t0 = time.perf_counter()
    for i in range(0, len(js), batch):
        part = js[i : i + batch]
        r = gen([j.text for j in part], [j.seed for j in part], **cfg)
        imgs.append(r.images.cpu())
        lats.append(r.latents.cpu())
        evals += float(r.evals) * len(part)
        plan, nfe = r.plan, r.nfe
    sec = (time.perf_counter() - t0) / len(js)
    out = {
        "images": torch.cat(imgs),
        "latents": torch.cat(lats),
        "evals": evals / len(js),
        "nfe": nfe,
        "plan": str(plan),
        "seconds_per_image": sec,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out | {"cached": False}


# --- scoring ------------------------------------------------------------------------------------


def shapes(images: torch.Tensor, js: list[Job]) -> dict[str, Any]:
    """ShapesEval per image against each job's spec text: overall (mean over categories), per
    category, and the per-image 0/1 vector (for paired statistics)."""
    from velodiff.eval.shapes_eval import evaluate

    res = evaluate(images, [j.spec_text for j in js], keep_detections=False, value_range=(0, 1))
    correct = np.array([bool(r["correct"]) for r in res["per_prompt"]])
    cats = sorted({j.category for j in js}, key=["single", "binding", "counting", "position"].index)
    by_cat = {c: float(correct[[j.category == c for j in js]].mean()) for c in cats}
    return {"shapes": float(np.mean(list(by_cat.values()))), "by_category": by_cat, "correct": correct}


def paired(
    base: np.ndarray, new: np.ndarray, js: list[Job], reps: int = 4000, seed: int = 0
) -> dict[str, Any]:
    """new - base on per-image 0/1 (or real) scores from the same seeds: mean difference, 95% CI of a
    bootstrap over prompts (images of one prompt resampled together), wins/losses and the two-sided
    sign test on the discordant pairs."""
    from scipy.stats import binomtest

    base, new = np.asarray(base, float), np.asarray(new, float)
    ids = sorted({j.prompt_id for j in js})
    index = {p: i for i, p in enumerate(ids)}
    cl = np.array([index[j.prompt_id] for j in js])
    d = new - base
    sums = np.bincount(cl, weights=d, minlength=len(ids))
    cnts = np.bincount(cl, minlength=len(ids)).astype(float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(ids), size=(reps, len(ids)))
    boots = sums[pick].sum(1) / cnts[pick].sum(1)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {
        "diff": float(d.mean()),
        "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
        "wins": wins,
        "losses": losses,
        "sign_p": float(p),
    }


def fmt_paired(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    lo, hi = p["ci95"]
    return f"{p['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({p['wins']}/{p['losses']}, p={p['sign_p']:.2g})"


def image_stats(images: torch.Tensor) -> dict[str, float]:
    """Oversaturation measures on images in [0, 1]. The shapes world is flat palette objects (value
    >= 0.75) on a dark background (20/255), so colour is measured on the object pixels only
    (foreground: brightest channel >= 0.35): their mean HSV saturation and value, the fraction of the
    image they cover, the mean intensity of the background (value < 0.2), the fraction of channel
    values clipped to 0 or 1 (the renders have none), and the intensity contrast (per-image std)."""
    x = images.clamp(0, 1).double()
    mx, mn = x.max(1).values, x.min(1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx))
    fg, bg = mx >= 0.35, mx < 0.2
    clipped = ((x <= 0.5 / 255) | (x >= 254.5 / 255)).double().mean()
    inten = x.mean(1)
    return {
        "fg_saturation": float(sat[fg].mean()),
        "fg_value": float(mx[fg].mean()),
        "fg_fraction": float(fg.double().mean()),
        "bg_level": float(inten[bg].mean()),
        "clipped": float(clipped),
        "contrast": float(inten.flatten(1).std(1).mean()),
    }


def real_renders(js: list[Job], per_prompt: int = 4) -> np.ndarray:
    """Renders of the shapes world for the jobs' prompts (uint8 N,H,W,3), as velodiff bench's FD."""
    from velodiff.data.shapes import ShapesWorld

    world = ShapesWorld(size=int(model().default_size[0]))
    texts = list(dict.fromkeys(j.spec_text for j in js))
    return np.stack([world.render(t, seed=r).image for t in texts for r in range(per_prompt)])


_FD: dict[str, Any] = {}


def fd_shapes(images: torch.Tensor, js: list[Job]) -> float:
    """FD-shapes (velodiff's shapes-world feature FD, not FID) against 4 renders per prompt."""
    from velodiff.eval.metrics import DistributionMetrics

    key = hashlib.sha256("|".join(j.spec_text for j in js).encode()).hexdigest()
    if key not in _FD:
        m = DistributionMetrics("fd-shapes", kid=False)
        m.add_real(real_renders(js))
        _FD[key] = m
    m = _FD[key]
    m.reset_fake()
    m.add_fake(images)
    return float(m.compute()["fd"])


def vs_plain(res: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    from velodiff.eval.metrics import reference_distances

    d = reference_distances(res["latents"], res["images"], plain["latents"], plain["images"])
    return {f"{k}_vs_plain": v for k, v in d.items()}


# --- output -------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]], align: str = "") -> str:
    from velodiff.eval.tables import markdown_table

    return markdown_table(headers, rows, align or "l" + "r" * (len(headers) - 1))


#: the score columns every guidance bench reports (after its config column), and their cells
SCORE_HEAD = ["evals/img", "ShapesEval", "single", "binding", "counting", "position", "FD-shapes"]


def score_cells(r: dict[str, Any]) -> list[str]:
    cats = (f3(v) for v in r["by_category"].values())
    return [f3(r["evals"]), f3(r["shapes"]), *cats, f3(r.get("fd_shapes"))]


def rows_of(recs: dict[str, Any], psnr: bool = False) -> list[list[str]]:
    """A table row per record: its label, plan, scores and paired difference to the baseline (and, with
    ``psnr``, its PSNR to the plain run of the same seeds)."""
    return [
        [r["label"], r["plan"], *score_cells(r), fmt_paired(r.get("paired_vs_baseline")),
         *([f3(r.get("psnr_vs_plain"))] if psnr else [])]
        for r in recs.values()
    ]


def f3(x: Any) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def sheet(rows: list[tuple[str, torch.Tensor]], path: Path, cols: int = 8, scale: int = 1) -> None:
    """A contact sheet: one row of `cols` images per labelled configuration (label on the first)."""
    from velodiff.files import save_image_atomic
    from velodiff.images import image_grid
    from velodiff.pipelines.images import to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    pils, caps = [], []
    for label, imgs in rows:
        ims = to_pil(imgs[:cols])
        pils += ims
        caps += [label] + [""] * (len(ims) - 1)
    save_image_atomic(image_grid(pils, cols=cols, scale=scale, captions=caps, caption_height=22), path)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items() if k not in ("images", "latents")}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return "".join("1" if v else "0" for v in x) if x.dtype == bool else x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write(out: Path, title: str, sections: list[str], data: dict[str, Any]) -> None:
    """results.md (title, the command, the sections) and results.json beside it."""
    from velodiff.files import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    cmd = "/work/main/.venv/bin/python " + " ".join(
        [str(Path(sys.argv[0]).resolve().relative_to(HERE.parent.parent)), *sys.argv[1:]]
    )
    import subprocess

    rev = subprocess.run(
        ["git", "-C", str(HERE), "log", "-1", "--format=%h", "--", "../../src"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(HERE), "status", "--short", "--", "../../src"], capture_output=True, text=True
    ).stdout.strip()
    src = f"velodiff src at commit {rev}" + (" (with uncommitted changes)" if dirty else "")
    md = (
        "\n\n".join(
            [
                f"# {title}",
                f"Command (from the repository root): `{cmd}`; {src}; 1 CPU thread.",
                *filter(None, sections),
            ]
        )
        + "\n"
    )
    write_atomic(out / "results.md", md.encode())
    write_atomic(
        out / "results.json",
        (json.dumps(jsonable({"command": cmd, "src": src, **data}), indent=1) + "\n").encode(),
    )
    print(md)


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def run_configs(
    set_name: str,
    configs: list[tuple[str, dict[str, Any]]],
    tag: str,
    *,
    baselines: dict[str, str] | None = None,
    fd: bool = True,
    stats: bool = False,
    js: list[Job] | None = None,
    gen=None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Generate and score every (label, text2img keywords) on one set; a label's baseline (another
    label, run earlier in the list) gives the paired ShapesEval difference and the distances to it.
    Returns (records by label, outputs by label)."""
    js = js if js is not None else jobs(set_name)
    baselines = baselines or {}
    recs: dict[str, dict[str, Any]] = {}
    outs: dict[str, Any] = {}
    for label, cfg in configs:
        res = generate(js, cfg, tag=f"{tag}-{set_name}", gen=gen)
        sc = shapes(res["images"], js)
        rec = {
            "label": label,
            "config": cfg,
            "plan": res["plan"],
            "evals": res["evals"],
            "nfe": res["nfe"],
            "seconds_per_image": res["seconds_per_image"],
            **sc,
        }
        if fd:
            rec["fd_shapes"] = fd_shapes(res["images"], js)
        if stats:
            rec.update(image_stats(res["images"]))
        b = baselines.get(label)
        if b is not None and b in recs:
            rec["baseline"] = b
            rec["paired_vs_baseline"] = paired(recs[b]["correct"], sc["correct"], js)
            rec.update(vs_plain(res, outs[b]))
        recs[label], outs[label] = rec, res
        log(
            f"[{tag}/{set_name}] {label:40s} shapes {sc['shapes']:.3f} evals {res['evals']:.1f}"
            f"{' fd %.2f' % rec['fd_shapes'] if fd else ''} {'(cached)' if res['cached'] else '%.3fs/img' % res['seconds_per_image']}"
        )
    return recs, outs
