"""Classifier steering with a counter trained on the model's own trajectories (issue 12's counting bar).

The shipped noise-aware pair counter (``velodiff.guidance.noisy_counter``) is trained on rendered scenes and
reads the prompt's counts as right in most images ShapesEval counts wrong (bench/edit/count_readers.py).
This bench fine-tunes it on what it will guide: the default model's own sampling trajectories
(DPM-Solver++ 2M, 20 steps, CFG 2.5) on shapes-world captions in no prompt set, every state x_t of a
trajectory labelled with the pair counts ShapesEval's detector reads off that trajectory's final image
(a value classifier: will this x_t end as a correct image). Then it steers with it
(``ClassifierGuidance(classifier=..., through="noisy")``) on the v1 counting prompts at seeds it never saw.
``search`` uses it instead as the verifier of a noise search (rejection among a few seeds).

    python bench/edit/trajectory_counter.py data --start 1000 --n 2000 --out traj-1000.pt  # 10 min
    python bench/edit/trajectory_counter.py data --start 5000 --n 2000 --out traj-5000.pt
    python bench/edit/trajectory_counter.py finetune --data traj-1000.pt,traj-5000.pt \\
        --epochs 1 --out ft1.safetensors
    python bench/edit/trajectory_counter.py sweep --weights ft1.safetensors --seeds 4000,5000,6000 \\
        --out bench/edit/trajectory_counter.json 0 1 3 3:0.5       # scale[:start]; 0 = no guidance
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

import velodiff
from velodiff.data.shapes import ShapesWorld, color_shape_pairs
from velodiff.eval.features import load_versioned, save_encoder
from velodiff.eval.shapes_eval import detect, evaluate, load_prompts, normalize_spec, score_prompt
from velodiff.guidance.classifier import ClassifierGuidance, prompt_target
from velodiff.guidance.noisy_counter import VERSION, NoisyPairCounter, load_noisy_counter, vae_hash
from velodiff.guidance.pair_counter import COUNTS, pair_counts
from velodiff.pipelines import text2img


def data(args: argparse.Namespace, model) -> None:
    """Trajectories on captions of ShapesWorld(seed=8000) (half of the non-counting scenes skipped, so
    counting scenes weigh more), seeds 900000 + start + j; every state after each step, float16."""
    world, rng = ShapesWorld(seed=8000), np.random.default_rng(args.start)
    pairs = set(color_shape_pairs())
    caps, i = [], 0
    while len(caps) < args.n:
        scene = world.scene(args.start * 10 + i)
        i += 1
        if scene.category == "counting" or rng.random() >= 0.5:
            caps.append(scene.caption)
    xs, labels, correct, ts = [], [], [], []
    t0 = time.perf_counter()
    for b in range(0, args.n, 50):
        texts = caps[b : b + 50]
        states: list[tuple[float, torch.Tensor]] = []

        def record(info, states=states) -> None:
            states.append((info.t, info.x.to(torch.float16).cpu()))

        with torch.inference_mode():
            res = text2img(model, texts, seeds=900000 + args.start + b, guidance=2.5, solver="dpmpp_2m",
                           nfe=20, callback=record)
        for text, image in zip(texts, res.images, strict=True):
            dets = detect(np.asarray(image))
            labels.append(pair_counts([d for d in dets if (d.color, d.shape) in pairs]))  # not "unknown"
            correct.append(score_prompt(dets, normalize_spec(text))["correct"])
        xs.append(torch.stack([x for _, x in states], 1))  # (B, steps, C, H, W)
        ts = [t for t, _ in states]
        print(f"{b + len(texts)} images, {time.perf_counter() - t0:.0f} s, "
              f"ShapesEval-correct {np.mean(correct):.3f}", flush=True)
    torch.save({"captions": caps, "xs": torch.cat(xs), "ts": torch.tensor(ts), "labels": torch.from_numpy(
        np.stack(labels)), "correct": torch.tensor(correct)}, args.out)


def finetune(args: argparse.Namespace, model) -> None:
    """The shipped counter fine-tuned (AdamW, one-cycle lr) on every state of 90% of the trajectories;
    the other 10% report, per step, the named pairs' accuracy and how many of the detector's failures the
    counter flags (it reads some named count other than the prompt's) against how many correct images."""
    parts = [torch.load(f) for f in args.data.split(",")]
    xs = torch.cat([d["xs"] for d in parts]).float()
    labels = torch.cat([d["labels"] for d in parts])
    correct = torch.cat([d["correct"] for d in parts])
    target = torch.tensor([prompt_target(c, "pair_counts") for d in parts for c in d["captions"]])
    lam = model.schedule.log_snr(parts[0]["ts"].double()).float()
    n, steps = xs.shape[:2]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=g)
    val, train = perm[: n // 10], perm[n // 10 :]
    net = copy.deepcopy(load_noisy_counter(model))
    for p in net.parameters():
        p.requires_grad_(True)

    @torch.no_grad()
    def report(name: str) -> dict:
        net.eval()
        rows = {}
        for k in (5, 9, 13, 19):
            read = net.logits(xs[val, k], lam[k].expand(len(val)))["pair_counts"].argmax(-1)
            named, says_right, wrong = target[val] > 0, (read == target[val]).all(1), ~correct[val]
            rows[f"step {k + 1}"] = {"named_pairs": float((read == labels[val]).float()[named].mean()),
                                     "flags_failures": float((~says_right)[wrong].float().mean()),
                                     "flags_correct": float((~says_right)[~wrong].float().mean())}
        net.train()
        print(name, json.dumps(rows), flush=True)
        return rows

    info = {"before": report("shipped")}
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    batch, per_epoch = 128, len(train) * steps // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * per_epoch,
                                                pct_start=0.1)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train) * steps, generator=g)[: per_epoch * batch].view(per_epoch, batch)
        for o in order:
            i, k = train[o // steps], o % steps
            logits = net.logits(xs[i, k], lam[k])["pair_counts"]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, COUNTS), labels[i].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        info[f"epoch {epoch + 1}"] = report(f"epoch {epoch + 1}")
    net.eval()
    save_encoder(net, args.out, {"version": VERSION, "vae_hash": vae_hash(model), "data": args.data,
                                 "epochs": args.epochs, "lr": args.lr, "val": info})


def sweep(args: argparse.Namespace, model) -> None:
    """ShapesEval of the v1 counting prompts (25 x the seed bases) steered by the counter at each
    ``scale[:start]``; 0 is the unguided run."""
    net = (load_versioned(args.weights, NoisyPairCounter, VERSION) if args.weights
           else load_noisy_counter(model))
    prompts = [p for p in load_prompts("v1") if p.category == "counting"]
    texts = [p.text for p in prompts]
    rows = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
    for setting in args.settings:
        scale, _, start = setting.partition(":")
        t0, per = time.perf_counter(), {}
        for base in (int(s) for s in args.seeds.split(",")):
            plan = [] if float(scale) == 0 else [ClassifierGuidance(
                classifier=net.logits, targets=[prompt_target(t, "pair_counts") for t in texts],
                head="pair_counts", through="noisy", scale=float(scale), start=float(start or 0.0))]
            images = text2img(model, texts, seeds=base, steps=20, guidance=2.5, plan=plan).images
            per[base] = evaluate(images, prompts, keep_detections=False)["by_category"]["counting"]
        row = {"weights": args.weights or "shipped", "scale": float(scale), "start": float(start or 0.0),
               "counting": per, "mean": float(np.mean(list(per.values()))),
               "s_per_image": (time.perf_counter() - t0) / (len(texts) * len(per))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


def search(args: argparse.Namespace, model) -> None:
    """Noise search with the counter as verifier (rejection among a few seeds): per prompt and seed base,
    ``--candidates`` trajectories (candidate c has seed base + j + 100000 c; candidate 0 is the unsearched
    image), the counter's log-likelihood of the prompt's counts read at step k, the best candidate kept
    (its image is a plain generation of its seed). Reports counting for each k, against candidate 0 and
    against an oracle that keeps any right candidate."""
    counters = {"shipped": load_noisy_counter(model)}
    if args.weights:
        counters[Path(args.weights).name] = load_versioned(args.weights, NoisyPairCounter, VERSION)
    prompts = [p for p in load_prompts("v1") if p.category == "counting"]
    texts = [p.text for p in prompts]
    target = torch.tensor([prompt_target(t, "pair_counts") for t in texts])
    bases, n = [int(s) for s in args.seeds.split(",")], args.candidates
    states, right = {}, {}
    for base in bases:
        for c in range(n):
            xs: list[torch.Tensor] = []
            res = text2img(model, texts, seeds=[base + j + 100000 * c for j in range(len(texts))], steps=20,
                           guidance=2.5, callback=lambda info, xs=xs: xs.append(info.x.clone()))
            states[base, c] = torch.stack(xs, 1)
            right[base, c] = [score_prompt(detect(np.asarray(im)), p.spec)["correct"]
                              for im, p in zip(res.images, prompts, strict=True)]
    grid = res.ts.double()  # the grid that was run
    row = {"candidates": n, "seeds": bases, "images": len(texts) * len(bases),
           "unsearched": float(np.mean([right[b, 0] for b in bases])),
           "oracle": float(np.mean([[any(right[b, c][j] for c in range(n)) for j in range(len(texts))]
                                    for b in bases]))}
    for name, net in counters.items():
        for k in (int(s) for s in args.steps.split(",")):  # the state after step k, at time grid[k]
            lam = model.schedule.log_snr(grid[k].double()).float()
            kept = []
            for b in bases:
                with torch.no_grad():
                    logits = [net.logits(states[b, c][:, k - 1], lam)["pair_counts"] for c in range(n)]
                    ll = torch.stack([torch.log_softmax(lg, -1).gather(-1, target[..., None])
                                      .squeeze(-1).sum(1) for lg in logits])
                kept += [right[b, int(c)][j] for j, c in enumerate(ll.argmax(0))]
            row[f"{name}, step {k}"] = float(np.mean(kept))
    print(json.dumps(row, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(row, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--start", type=int, required=True)
    d.add_argument("--n", type=int, default=2000)
    d.add_argument("--out", required=True)
    f = sub.add_parser("finetune")
    f.add_argument("--data", required=True)
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--lr", type=float, default=5e-4)
    f.add_argument("--out", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--weights", help="fine-tuned counter (default: the shipped one)")
    s.add_argument("--seeds", default="4000,5000,6000")
    s.add_argument("--out", default=str(Path(__file__).with_name("trajectory_counter.json")))
    s.add_argument("settings", nargs="+", help="scale[:start]")
    r = sub.add_parser("search")
    r.add_argument("--weights", help="a fine-tuned counter, besides the shipped one")
    r.add_argument("--seeds", default="7000,8000,9000,10000,11000,12000")
    r.add_argument("--candidates", type=int, default=4)
    r.add_argument("--steps", default="3,4,6,8,10,12,14,16", help="steps (of 20) the counter reads after")
    r.add_argument("--out", default=str(Path(__file__).with_name("noise_search.json")))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = velodiff.load("default")
    {"data": data, "finetune": finetune, "sweep": sweep, "search": search}[args.cmd](args, model)


if __name__ == "__main__":
    main()
