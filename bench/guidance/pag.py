"""Perturbed-Attention Guidance (Ahn et al. 2024) on the shipped default model.

Claim: PAG improves sample quality without CFG (guidance 1.0) or at low CFG (1.5).
Protocol: on the calibration set (common.SETS["cal"]) choose, per guidance and per applied_layers
(mid: s in 1-10, mid|up: s in 0.5-5), the PAG scale with the best ShapesEval (ties: lower FD-shapes); on the report set run
plain and PAG from the same seeds; CFG at 3.0 (the model's best plain range) for reference.
DPM-Solver++(2M), 20 steps. Run: .venv/bin/python bench/guidance/pag.py
"""

from __future__ import annotations

from common import HERE, SCORE_HEAD, rows_of, run_configs, sheet, table, write

OUT = HERE / "pag"
BASE = {"steps": 20, "solver": "dpmpp_2m"}
GUIDANCE = [1.0, 1.5]
SCALES = {"mid": [1.0, 2.0, 3.0, 5.0, 10.0], "mid|up": [0.5, 1.0, 2.0, 3.0, 5.0]}
LAYERS = list(SCALES)


def plan(s: float, layers: str) -> str:
    return f"pag:scale={s:g},applied_layers={layers}"


HEAD = [
    "config",
    "plan that ran",
    *SCORE_HEAD,
    "paired diff vs plain [95% CI] (wins/losses, sign p)",
    "PSNR vs plain",
]


def main() -> None:
    # calibration
    configs, base = [], {}
    for g in GUIDANCE:
        configs.append((f"g{g:g} plain", {**BASE, "guidance": g, "plan": "none"}))
        for layers in LAYERS:
            for s in SCALES[layers]:
                lab = f"g{g:g} pag s={s:g} {layers}"
                configs.append((lab, {**BASE, "guidance": g, "plan": plan(s, layers)}))
                base[lab] = f"g{g:g} plain"
    cal, _ = run_configs("cal", configs, "pag", baselines=base)
    chosen = {}
    for g in GUIDANCE:
        for layers in LAYERS:
            cands = [
                (
                    cal[f"g{g:g} pag s={s:g} {layers}"]["shapes"],
                    -cal[f"g{g:g} pag s={s:g} {layers}"]["fd_shapes"],
                    s,
                )
                for s in SCALES[layers]
            ]
            chosen[(g, layers)] = max(cands)[2]

    # report
    configs, base = [], {}
    for g in GUIDANCE:
        configs.append((f"g{g:g} plain", {**BASE, "guidance": g, "plan": "none"}))
        for layers in LAYERS:
            lab = f"g{g:g} pag s={chosen[(g, layers)]:g} {layers}"
            configs.append((lab, {**BASE, "guidance": g, "plan": plan(chosen[(g, layers)], layers)}))
            base[lab] = f"g{g:g} plain"
    configs.append(("g3 plain (CFG reference)", {**BASE, "guidance": 3.0, "plan": "none"}))
    rep, outs = run_configs("report", configs, "pag", baselines=base)
    sheet([(lab, o["images"][::25][:8]) for lab, o in outs.items()], OUT / "sheet.png")

    write(
        OUT,
        "PAG (Perturbed-Attention Guidance) on the default model",
        [
            "Calibration set (v1 x1 from seed 1000 + v1-holdout x1 from seed 1100, 136 images); chosen scales: "
            + ", ".join(f"guidance {g:g} / {lay}: s={s:g}" for (g, lay), s in chosen.items()),
            table(HEAD, rows_of(cal, psnr=True)),
            "Report set (v1, 100 prompts x 2 images, seeds 0-199), same seeds for every row:",
            table(HEAD, rows_of(rep, psnr=True)),
            "![sheet](sheet.png) (one image per prompt group, every 25th image; rows as the report table)",
        ],
        {"chosen": {f"{g:g}/{lay}": s for (g, lay), s in chosen.items()}, "calibration": cal, "report": rep},
    )


if __name__ == "__main__":
    main()
