"""Composable Diffusion (Liu et al. 2022) on the shipped default model.

The prompt syntax needs the plan rule: "A AND B" with plan "compose" (without it the CLIP tokenizer
lowercases AND and the prompt is the plain conjunction).
Claim: composing object prompts ("A AND B": x0 = x0_u + w sum_k (x0_k - x0_u)) generates
multi-object scenes better than one conjunction prompt ("A and B"); a negative weight negates a part.
Prompts: the 50 two-object prompts of v1 (binding + position categories) as "A and B" (relation
dropped); ShapesEval scores every image against the plain "A and B" (both objects, right colour and
shape). Protocol: on the calibration set (the same 50 pairs x 1 image from seed 1000 + the 18 v1-holdout
pairs from seed 1100) choose w for plain CFG from {1.5, 2.5, 4} and for compose from {1.5, 2, 2.5, 3}
by ShapesEval (ties: lower FD-shapes); on the report set (50 pairs x 2 images, seeds 0-99) compare
both at their chosen w and at w = 2.5. Negation example (no tuning, w = 2.5): "A and B AND B :-1"
(and :-0.5) against plain "A and B", plain "A" and the negative prompt "B": how often A and B are
detected. DPM-Solver++(2M), 20 steps. Run: .venv/bin/python bench/guidance/compose.py
"""

from __future__ import annotations

from common import HERE, Job, f3, fmt_paired, paired, run_configs, shapes, sheet, table, write

OUT = HERE / "compose"
BASE = {"steps": 20, "solver": "dpmpp_2m"}
W_PLAIN = [1.5, 2.5, 4.0]
W_COMPOSE = [1.5, 2.0, 2.5, 3.0]


def pairs(pset: str) -> list[tuple[str, str, str]]:
    from velodiff.data.shapes import caption_from_spec
    from velodiff.eval.shapes_eval import load_prompts

    out = []
    for p in load_prompts(pset):
        if p.category in ("binding", "position"):
            a, b = ({"objects": [o], "relation": None} for o in p.spec["objects"])
            out.append((caption_from_spec(a), caption_from_spec(b), p.category))
    return out


def make_jobs(set_name: str, how: str) -> list[Job]:
    parts = [("v1", 1, 1000), ("v1-holdout", 1, 1100)] if set_name == "cal" else [("v1", 2, 0)]
    js = []
    for pset, k, seed in parts:
        for j, (a, b, cat) in enumerate(x for x in pairs(pset) for _ in range(k)):
            text = {
                "plain": f"{a} and {b}",
                "compose": f"{a} AND {b}",
                "only_a": a,
                "neg1": f"{a} and {b} AND {b} :-1",
                "neg05": f"{a} and {b} AND {b} :-0.5",
            }[how]
            js.append(Job(text, f"{a} and {b}", cat, f"{pset}/{a}/{b}", seed + j))
    return js


def with_negative(js: list[Job]):  # noqa: ANN201
    neg = {j.text: j.spec_text.split(" and ", 1)[1] for j in js}

    def gen(texts, seeds, negative_of=None, **kw):  # noqa: ANN001
        from common import model

        from velodiff.pipelines import text2img

        return text2img(model(), texts, seeds=seeds, negative=[neg[t] for t in texts], output="tensor", **kw)

    return gen


HEAD = [
    "config",
    "prompt (first pair)",
    "plan that ran",
    "evals/img",
    "ShapesEval (both objects)",
    "binding pairs",
    "position pairs",
    "FD-shapes",
    "paired diff vs baseline [95% CI] (wins/losses, p)",
]


def rows_of(recs: dict) -> list[list]:
    return [
        [
            r["label"],
            r["form"],
            r["plan"],
            f3(r["evals"]),
            f3(r["shapes"]),
            *(f3(v) for v in r["by_category"].values()),
            f3(r["fd_shapes"]),
            fmt_paired(r.get("paired_vs_baseline")),
        ]
        for r in recs.values()
    ]


def run_forms(set_name: str, items: list[tuple[str, str, float]], **kw) -> tuple[dict, dict]:
    recs, outs = {}, {}
    for label, how, w in items:
        js = make_jobs(set_name, how)
        plan = "compose" if " AND " in js[0].text else "none"
        r, o = run_configs(
            set_name, [(label, {**BASE, "guidance": w, "plan": plan})], f"compose-{how}", js=js, **kw
        )
        r[label]["form"] = js[0].text
        recs |= r
        outs |= o
    return recs, outs


def best(recs: dict, labels: list[str]) -> str:
    return max(labels, key=lambda lab: (recs[lab]["shapes"], -recs[lab]["fd_shapes"]))


def main() -> None:
    items = [(f"plain w={w:g}", "plain", w) for w in W_PLAIN] + [
        (f"compose w={w:g}", "compose", w) for w in W_COMPOSE
    ]
    cal, _ = run_forms("cal", items)
    bp = best(cal, [f"plain w={w:g}" for w in W_PLAIN])
    bc = best(cal, [f"compose w={w:g}" for w in W_COMPOSE])
    wp, wc = cal[bp]["config"]["guidance"], cal[bc]["config"]["guidance"]

    items = [(f"plain w={wp:g} (chosen)", "plain", wp), (f"compose w={wc:g} (chosen)", "compose", wc)]
    items += [("plain w=2.5", "plain", 2.5)] * (wp != 2.5) + [("compose w=2.5", "compose", 2.5)] * (wc != 2.5)
    rep, outs = run_forms("report", items)
    js = make_jobs("report", "plain")
    labels = list(rep)
    rep[labels[1]]["baseline"] = labels[0]
    rep[labels[1]]["paired_vs_baseline"] = paired(rep[labels[0]]["correct"], rep[labels[1]]["correct"], js)
    same_w = None
    if "compose w=2.5" in rep or "plain w=2.5" in rep:
        pl = "plain w=2.5" if "plain w=2.5" in rep else labels[0]
        co = "compose w=2.5" if "compose w=2.5" in rep else labels[1]
        same_w = paired(rep[pl]["correct"], rep[co]["correct"], js)

    # negation
    neg_items = [
        ("plain 'A and B'", "plain", None),
        ("plain 'A'", "only_a", None),
        ("compose 'A and B AND B :-1'", "neg1", None),
        ("compose 'A and B AND B :-0.5'", "neg05", None),
        ("'A and B', negative prompt 'B'", "plain", "negative"),
    ]
    neg_rows, neg_data, neg_outs = [], {}, {}
    for label, how, special in neg_items:
        njs = make_jobs("report", how)
        plan = "compose" if " AND " in njs[0].text else "none"
        cfg = {**BASE, "guidance": 2.5, "plan": plan} | ({"negative_of": "B"} if special else {})
        from common import generate

        res = generate(njs, cfg, tag=f"compose-{how}-report", gen=with_negative(njs) if special else None)
        a_ok = shapes(
            res["images"],
            [Job(j.text, j.spec_text.split(" and ")[0], j.category, j.prompt_id, j.seed) for j in njs],
        )["correct"]
        b_ok = shapes(
            res["images"],
            [Job(j.text, j.spec_text.split(" and ", 1)[1], j.category, j.prompt_id, j.seed) for j in njs],
        )["correct"]
        d = {
            "A present": float(a_ok.mean()),
            "B present": float(b_ok.mean()),
            "A and not B": float((a_ok & ~b_ok).mean()),
            "evals": res["evals"],
            "plan": res["plan"],
        }
        neg_data[label], neg_outs[label] = d, res
        neg_rows.append(
            [
                label,
                njs[0].text,
                d["plan"],
                f3(d["evals"]),
                f3(d["A present"]),
                f3(d["B present"]),
                f3(d["A and not B"]),
            ]
        )
    sheet([(lab, o["images"][::13][:8]) for lab, o in (outs | neg_outs).items()], OUT / "sheet.png")

    write(
        OUT,
        "Composable Diffusion ('A AND B') vs one conjunction prompt on the default model",
        [
            f"Calibration set (68 two-object prompts x 1 image); chosen: plain w={wp:g}, compose w={wc:g}.",
            table(HEAD, rows_of(cal)),
            "Report set (the 50 two-object v1 prompts x 2 images, seeds 0-99), same seeds for every row; "
            "paired diff: compose (chosen) minus plain (chosen):",
            table(HEAD, rows_of(rep)),
            f"Compose minus plain at the same w = 2.5: {fmt_paired(same_w)}" if same_w else "",
            "Negation (report set, w = 2.5, no tuning; the example prompt is the first pair): fraction of images "
            "with object A detected, with object B detected, and with A but no B.",
            table(
                [
                    "config",
                    "prompt (first pair)",
                    "plan that ran",
                    "evals/img",
                    "A present",
                    "B present",
                    "A and not B",
                ],
                neg_rows,
            ),
            "![sheet](sheet.png) (every 13th image; rows: the report table, then the negation table)",
        ],
        {
            "chosen": {"plain_w": wp, "compose_w": wc},
            "calibration": cal,
            "report": rep,
            "compose_minus_plain_same_w": same_w,
            "negation": neg_data,
        },
    )


if __name__ == "__main__":
    main()
