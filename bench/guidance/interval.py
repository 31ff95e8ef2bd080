"""Guidance in a limited interval (Kynkaanniemi et al. 2024) on the shipped default model.

Claim: applying CFG only in a middle interval of noise levels is as good or better than CFG on every
step (it avoids the high-noise steps where guidance hurts and the low-noise ones where it does
nothing), and it is cheaper (1 eval instead of 2 outside the interval).
Intervals are set in the paper's noise level sigma/alpha (EDM sigma) and converted to velodiff's
schedule time t (`cfg:t_lo=..,t_hi=..`): the paper's SD-XL interval (0.28, 5.42], only its upper
cut (0, 5.42], only its lower cut (0.28, inf), and a narrow (0.5, 3].
Protocol: on the calibration set choose w for full CFG from {1.5, 2.5, 4} and for each interval from
{2.5, 4} (the paper's interval also 6) (the paper: limiting the interval lets w go higher) by ShapesEval (ties: lower FD-shapes);
on the report set run each at its chosen w, full CFG also at 2.5. DPM-Solver++(2M), 20 steps.
Run: .venv/bin/python bench/guidance/interval.py
"""

from __future__ import annotations

import math

from common import (
    HERE,
    SCORE_HEAD,
    fmt_paired,
    jobs,
    model,
    paired,
    rows_of,
    run_configs,
    sheet,
    table,
    write,
)

OUT = HERE / "interval"
BASE = {"steps": 20, "solver": "dpmpp_2m"}
INTERVALS = {
    "(0.28, 5.42] (paper)": (0.28, 5.42),
    "(0, 5.42]": (0.0, 5.42),
    "(0.28, inf)": (0.28, math.inf),
    "(0.5, 3]": (0.5, 3.0),
}
W_FULL = [1.5, 2.5, 4.0]
W_INT = {
    "(0.28, 5.42] (paper)": [2.5, 4.0, 6.0],
    "(0, 5.42]": [2.5, 4.0],
    "(0.28, inf)": [2.5, 4.0],
    "(0.5, 3]": [2.5, 4.0],
}


def t_of(rho: float) -> float:
    """Schedule time of noise level rho = sigma / alpha (velodiff's log_snr is log(alpha / sigma) = -log rho)."""
    import torch

    s = model().schedule
    if rho == 0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    return float(s.t_from_log_snr(torch.tensor(-math.log(rho), dtype=torch.float64)))


def plan(name: str) -> str:
    lo, hi = INTERVALS[name]
    parts = [f"t_lo={t_of(lo):.4f}"] * (lo > 0) + [f"t_hi={t_of(hi):.4f}"] * (not math.isinf(hi))
    return "cfg:" + ",".join(parts)


HEAD = [
    "config",
    "plan that ran",
    *SCORE_HEAD,
    "paired diff vs full CFG (chosen w) [95% CI] (wins/losses, p)",
]


def main() -> None:
    configs = [(f"full w={w:g}", {**BASE, "guidance": w, "plan": "none"}) for w in W_FULL]
    configs += [
        (f"{n} w={w:g}", {**BASE, "guidance": w, "plan": plan(n)}) for n in INTERVALS for w in W_INT[n]
    ]
    cal, _ = run_configs("cal", configs, "interval")

    def pick(labels: list[str]) -> str:
        return max(labels, key=lambda lab: (cal[lab]["shapes"], -cal[lab]["fd_shapes"]))

    bf = pick([f"full w={w:g}" for w in W_FULL])
    chosen = {n: pick([f"{n} w={w:g}" for w in W_INT[n]]) for n in INTERVALS}
    configs = [(bf + " (chosen)", cal[bf]["config"])]
    if cal[bf]["config"]["guidance"] != 2.5:
        configs.append(("full w=2.5", {**BASE, "guidance": 2.5, "plan": "none"}))
    configs += [(lab + " (chosen)", cal[lab]["config"]) for lab in chosen.values()]
    rep, outs = run_configs(
        "report", configs, "interval", baselines={lab: configs[0][0] for lab, _ in configs[1:]}
    )
    same_w = {}
    if "full w=2.5" in rep:
        for lab in rep:
            if not lab.startswith("full"):
                same_w[lab] = paired(rep["full w=2.5"]["correct"], rep[lab]["correct"], jobs("report"))
    sheet([(lab, o["images"][::25][:8]) for lab, o in outs.items()], OUT / "sheet.png")

    write(
        OUT,
        "CFG in a limited interval vs CFG on every step, on the default model",
        [
            "Intervals in sigma/alpha and the t they map to: "
            + "; ".join(f"{n}: `{plan(n)}`" for n in INTERVALS),
            f"Calibration set (136 images); chosen: full CFG {bf}; " + "; ".join(chosen.values()),
            table(HEAD, rows_of(cal)),
            "Report set (v1, 100 prompts x 2 images, seeds 0-199), same seeds for every row:",
            table(HEAD, rows_of(rep)),
            (
                "Each interval (at its chosen w) minus full CFG at w = 2.5 (the model's usual scale, and the better full-CFG row "
                "on this set), paired: " + "; ".join(f"{k}: {fmt_paired(v)}" for k, v in same_w.items())
            )
            if same_w
            else "",
            "![sheet](sheet.png) (every 25th image; rows as the report table)",
        ],
        {
            "intervals_rho": {k: list(v) for k, v in INTERVALS.items()},
            "plans": {n: plan(n) for n in INTERVALS},
            "chosen": {"full": bf, **chosen},
            "calibration": cal,
            "report": rep,
            "same_w_2.5": same_w,
        },
    )


if __name__ == "__main__":
    main()
