"""Calibration (the `cal` set of bench/guidance: v1 x 1 image from seed 1000 and v1-holdout x 1 from seed
1100, 136 images; disjoint from the report set): whether cached DeepCache steps should lower the
multistep solver's order (``lower_order``), judged by the distance to the plain run and ShapesEval.

    /work/main/.venv/bin/python bench/deepcache/calibrate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "guidance"))
import common  # noqa: E402

common.CACHE = HERE / ".cache"
BASE = {"steps": 20, "solver": "dpmpp_2m", "guidance": 2.5}


def main() -> None:
    configs = [("plain", BASE)]
    for n in (2, 3, 5):
        for lo in ("true", "false"):
            plan = f"deepcache:interval={n},lower_order={lo}"
            configs.append((f"N={n} lower_order={lo}", {**BASE, "plan": plan}))
    base = {k: "plain" for k, _ in configs[1:]}
    recs, _ = common.run_configs("cal", configs, "dc", baselines=base, fd=False)
    rows = [[k, common.f3(r["evals"]), f"{r['shapes']:.3f}", common.fmt_paired(r.get("paired_vs_baseline")),
             f"{r.get('psnr_vs_plain', float('nan')):.2f}", f"{r.get('ssim_vs_plain', float('nan')):.4f}"]
            for k, r in recs.items()]
    head = ["configuration", "evals/img", "ShapesEval", "minus plain", "PSNR vs plain", "SSIM"]
    text = common.table(head, rows)
    print(text)
    (HERE / "calibration.md").write_text(
        "# DeepCache calibration: lower_order (cal set, 136 images)\n\nCommand: `/work/main/.venv/bin/python "
        "bench/deepcache/calibrate.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
