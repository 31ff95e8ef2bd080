"""CFG++ (Chung et al. 2024) vs CFG with DDIM on the shipped default model.

Claim: CFG++ (guidance lambda in [0, 1], re-noising with the unconditional noise) gives better
alignment / quality than CFG at comparable guidance strength, especially at low step counts.
Comparable strength: one DDIM step of CFG++ at lambda equals one DDIM step of CFG at
w_i = lambda / (1 - rho_{i+1} / rho_i), rho = sigma / alpha (expand both updates: they share
alpha' x0_u + sigma' eps_u and differ by lambda alpha' D vs w (alpha' - sigma' alpha / sigma) D,
D = x0_c - x0_u); `w_eq` below is the mean of w_i over the steps before the last (the last is w = lambda).
Protocol: on the calibration set, per step count (10, 20), choose CFG's w from {1.5, 2, 3, 5} and
CFG++'s lambda from {0.2, 0.4, 0.6, 0.8, 1.0} by ShapesEval (ties: lower FD-shapes); on the report
set compare (a) each at its chosen setting and (b) CFG++ at its chosen lambda vs CFG at w_eq(lambda),
same seeds. DDIM (eta 0) on the model's default (Karras) grid. Run: .venv/bin/python bench/guidance/cfgpp.py
"""

from __future__ import annotations

import numpy as np
from common import (
    HERE,
    SCORE_HEAD,
    fmt_paired,
    model,
    paired,
    rows_of,
    run_configs,
    sheet,
    table,
    write,
)

OUT = HERE / "cfgpp"
STEPS = [10, 20]
WS = [1.5, 2.0, 3.0, 5.0]
LAMBDAS = [0.2, 0.4, 0.6, 0.8, 1.0]


def w_eq(lam: float, steps: int) -> float:
    from velodiff.pipelines import text2img

    m = model()  # the grid the pipeline really runs
    ts = text2img(m, "a red circle", steps=steps, solver="ddim", guidance=1.0, seeds=[0], output="tensor").ts
    rho = [float(m.schedule.sigma(t) / m.schedule.alpha(t)) for t in ts]
    return float(np.mean([lam / (1 - rho[i + 1] / rho[i]) for i in range(len(rho) - 2)]))


def cfg(steps: int, w: float) -> dict:
    return {"steps": steps, "solver": "ddim", "guidance": w, "plan": "none"}


def cfgpp(steps: int, lam: float) -> dict:
    return {"steps": steps, "solver": "ddim", "guidance": 1.0, "plan": f"cfgpp:scale={lam:g}"}


HEAD = [
    "config",
    "plan that ran",
    *SCORE_HEAD,
    "paired diff vs row's CFG baseline [95% CI] (wins/losses, p)",
]


def main() -> None:
    eq = {(lam, n): w_eq(lam, n) for lam in LAMBDAS for n in STEPS}
    configs = [(f"{n} steps cfg w={w:g}", cfg(n, w)) for n in STEPS for w in WS]
    configs += [(f"{n} steps cfgpp lambda={lam:g}", cfgpp(n, lam)) for n in STEPS for lam in LAMBDAS]
    cal, _ = run_configs("cal", configs, "cfgpp")
    best_w = {
        n: max(
            WS,
            key=lambda w: (
                cal[f"{n} steps cfg w={w:g}"]["shapes"],
                -cal[f"{n} steps cfg w={w:g}"]["fd_shapes"],
            ),
        )
        for n in STEPS
    }
    best_l = {
        n: max(
            LAMBDAS,
            key=lambda lam: (
                cal[f"{n} steps cfgpp lambda={lam:g}"]["shapes"],
                -cal[f"{n} steps cfgpp lambda={lam:g}"]["fd_shapes"],
            ),
        )
        for n in STEPS
    }

    configs, base = [], {}
    for n in STEPS:
        b = f"{n} steps cfg w={best_w[n]:g} (chosen)"
        configs.append((b, cfg(n, best_w[n])))
        lab = f"{n} steps cfgpp lambda={best_l[n]:g} (chosen)"
        configs.append((lab, cfgpp(n, best_l[n])))
        base[lab] = b
        we = round(eq[(best_l[n], n)], 2)
        configs.append((f"{n} steps cfg w={we:g} (= w_eq of the chosen lambda)", cfg(n, we)))
    rep, outs = run_configs("report", configs, "cfgpp", baselines=base)
    matched = {}
    for n in STEPS:
        we = round(eq[(best_l[n], n)], 2)
        a = rep[f"{n} steps cfg w={we:g} (= w_eq of the chosen lambda)"]["correct"]
        b = rep[f"{n} steps cfgpp lambda={best_l[n]:g} (chosen)"]["correct"]
        from common import jobs

        matched[n] = paired(a, b, jobs("report"))
    sheet([(lab, o["images"][::25][:8]) for lab, o in outs.items()], OUT / "sheet.png")

    eq_rows = [[f"{lam:g}", *(f"{eq[(lam, n)]:.2f}" for n in STEPS)] for lam in LAMBDAS]
    write(
        OUT,
        "CFG++ vs CFG (DDIM) on the default model",
        [
            "Effective CFG scale w_eq of CFG++'s lambda on this grid (mean per-step equivalent w, last step excluded):",
            table(["lambda", *(f"w_eq, {n} steps" for n in STEPS)], eq_rows),
            "Calibration set (136 images); chosen: "
            + "; ".join(f"{n} steps: CFG w={best_w[n]:g}, CFG++ lambda={best_l[n]:g}" for n in STEPS),
            table(HEAD, rows_of(cal)),
            "Report set (v1, 100 prompts x 2 images, seeds 0-199), same seeds for every row:",
            table(HEAD, rows_of(rep)),
            "CFG++ (chosen lambda) minus CFG at matched strength w_eq, paired: "
            + "; ".join(f"{n} steps: {fmt_paired(p)}" for n, p in matched.items()),
            "![sheet](sheet.png) (every 25th image; rows as the report table)",
        ],
        {
            "w_eq": {f"{lam:g}/{n}": v for (lam, n), v in eq.items()},
            "chosen": {"cfg_w": best_w, "cfgpp_lambda": best_l},
            "calibration": cal,
            "report": rep,
            "cfgpp_minus_cfg_at_w_eq": matched,
        },
    )


if __name__ == "__main__":
    main()
