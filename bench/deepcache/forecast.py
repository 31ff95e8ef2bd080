"""DeepCache with TaylorSeer's first-order forecast (``deepcache:order=1``) against plain DeepCache
(reuse) on the held-out set of bench/deepcache (v1 x 2 images, seeds 5000+, DPM-Solver++ 2M, 20 steps,
CFG 2.5): ShapesEval, the paired difference to the plain run, PSNR / SSIM to the plain images.

    /work/main/.venv/bin/python bench/deepcache/forecast.py            # forecast.md, ~6 min, 1 thread

No setting is chosen here: order 1 is TaylorSeer's default (max_order=1), the intervals are the ones
bench/deepcache reports."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "guidance"))
import common  # noqa: E402

common.CACHE = HERE / ".cache"
common.SETS["heldout"] = [("v1", 2, 5000)]
BASE = {"steps": 20, "solver": "dpmpp_2m", "guidance": 2.5}
CONFIGS = [("plain", BASE)] + [
    (
        f"deepcache N={n}{' order 1' if k else ''}",
        {**BASE, "plan": f"deepcache:interval={n}" + (",order=1" if k else "")},
    )
    for n in (3, 5)
    for k in (0, 1)
]


def main() -> None:
    import torch

    torch.set_num_threads(1)
    recs, _ = common.run_configs(
        "heldout", CONFIGS, "dc", baselines={k: "plain" for k, _ in CONFIGS[1:]}, fd=False
    )
    lines = [
        "| plan | evals / image | ShapesEval | vs plain [95% CI] | PSNR to plain | SSIM to plain |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for label, r in recs.items():
        p = r.get("paired_vs_baseline")
        lines.append(
            f"| {label} | {common.f3(r['evals'])} | {r['shapes']:.3f} | {common.fmt_paired(p) if p else ''} "
            f"| {r.get('psnr_vs_plain', float('nan')):.1f} | {r.get('ssim_vs_plain', float('nan')):.3f} |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "forecast.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
