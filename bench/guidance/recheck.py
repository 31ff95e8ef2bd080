"""Re-generate the first 34 images of cached configurations with the velodiff source as it is now and
compare with the cached images (the source changed while the benchmarks ran). Prints max |diff|.
Run: .venv/bin/python bench/guidance/recheck.py"""

from __future__ import annotations

import shutil

import torch
from common import CACHE, generate, jobs, key_of

CHECKS = [
    (
        "pag",
        "cal",
        {"steps": 20, "solver": "dpmpp_2m", "guidance": 1.0, "plan": "pag:scale=3,applied_layers=mid|up"},
    ),
    (
        "pag",
        "cal",
        {"steps": 20, "solver": "dpmpp_2m", "guidance": 1.5, "plan": "pag:scale=3,applied_layers=mid"},
    ),
    ("pag", "report", {"steps": 20, "solver": "dpmpp_2m", "guidance": 1.5, "plan": "none"}),
    (
        "apg",
        "report",
        {"steps": 20, "solver": "dpmpp_2m", "guidance": 8.0, "plan": "apg:eta=0,norm_threshold=1.7"},
    ),
    (
        "linear_ag",
        "report",
        {"steps": 20, "solver": "dpmpp_2m", "guidance": 2.5, "plan": "linear_ag:every=3,warmup=2"},
    ),
]


def main() -> None:
    shutil.rmtree(CACHE / "recheck", ignore_errors=True)  # always generate anew
    for tag, set_name, cfg in CHECKS:
        js = jobs(set_name)
        old = torch.load(CACHE / f"{tag}-{set_name}" / f"{key_of(cfg, js)}.pt", weights_only=True)
        new = generate(js[:34], cfg, tag="recheck")
        d = (new["images"] - old["images"][:34]).abs().max().item()
        print(f"{tag}/{set_name} {cfg['plan']} g={cfg['guidance']}: max |image diff| = {d:.2e}")


if __name__ == "__main__":
    main()
