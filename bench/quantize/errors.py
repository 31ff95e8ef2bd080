"""Relative error of one network evaluation (x0) of each quantized network against the float one, on
the shipped model: 8 v1 prompts x 5 times t in (0.1 .. 0.9), noise from seeds 0-7. Median and max.

    python bench/quantize/errors.py        # writes bench/quantize/errors.json
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

import velodiff
from velodiff.accel.quantize import evaluation_error
from velodiff.default_model import default_model_path
from velodiff.eval.shapes_eval import load_prompts
from velodiff.plan import parse_rule

SCHEMES = ["int8", "int8:activations=dynamic", "w4a8", "w4a8:outliers=0"]


def main() -> None:
    torch.set_num_threads(1)
    model = velodiff.load(default_model_path())
    prompts = [p.text for p in load_prompts("v1")][:8]
    out = {}
    for scheme in SCHEMES:
        errs = [
            evaluation_error(model, parse_rule(scheme), t=t, seed=i, prompt=p)
            for i, p in enumerate(prompts)
            for t in (0.1, 0.3, 0.5, 0.7, 0.9)
        ]
        out[scheme] = {"median": statistics.median(errs), "max": max(errs), "n": len(errs)}
        print(scheme, out[scheme])
    Path(__file__).with_name("errors.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
