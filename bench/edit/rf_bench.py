"""RF-Inversion and fixed-point inversion on the tiny random SD3 and Flux models (velodiff.models.tiny, no
trained flow model here): round-trip latent error of a random 32x32 image, 8 steps of the model's grid.
Prints the table and writes bench/edit/rf.json.

    python bench/edit/rf_bench.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import velodiff
from velodiff.models.tiny import save_tiny
from velodiff.pipelines.invert import invert

CONFIGS = [
    ("rf", dict(gamma=0.0)),
    ("rf", dict(gamma=0.5)),
    ("rf", dict(gamma=0.0, eta=0.9, stop=0.5)),
    ("rf", dict(gamma=0.5, eta=0.9, stop=0.5)),
    ("fixed-point", dict(solver="euler")),
]


def main() -> None:
    torch.set_num_threads(1)
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print("| model | method | settings | latent max error | latent rms error | NFE to invert |")
    print("|---|---|---|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sd3", "flux"):
            model = velodiff.load(save_tiny(kind, Path(tmp) / kind))
            for method, kw in CONFIGS:
                m = invert(model, img, "a red cube", method, steps=8, **kw).metrics
                settings = ", ".join(f"{k}={v}" for k, v in kw.items())
                rows.append({"model": f"tiny {kind}", "method": method, **kw, **m})
                print(
                    f"| tiny {kind} | {method} | {settings} | {m['latent_max_error']:.3g} | "
                    f"{m['latent_rms_error']:.3g} | {m['invert_nfe']} |"
                )
    out = Path(__file__).with_name("rf.json")
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
