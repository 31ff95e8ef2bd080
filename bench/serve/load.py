"""Load on loopback against ``velodiff serve``: the same requests served batched and one by one, in one
run, so the two share the machine's load.

Each variant starts a fresh ``velodiff serve`` (the shipped default model, 64x64, its default 20 steps
of DPM-Solver++ 2M, one torch thread), warms it with one request, then sends --requests requests from
--clients concurrent clients through the OpenAI-compatible endpoint (one image each, distinct prompts and
seeds, b64_json). Reported per variant: wall time, throughput (images per second), p50 / p95 latency
(submission to answer, per request), and the batch sizes the worker ran. Variants alternate round by
round (--rounds); the README quotes the medians.

    python bench/serve/load.py --rounds 3 --ray --out bench/serve/load.json

``--ray`` adds a third variant: ``--ray local --replicas 2`` (two Ray Serve replicas, each batching, over
the shared job store).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "batched": ["--max-batch", "8", "--batch-wait", "0.2"],
    "one-by-one": ["--max-batch", "1", "--batch-wait", "0"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], db: Path, device: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "velodiff.cli",
        "serve",
        "--port",
        str(port),
        "--db",
        str(db),
        "--threads",
        str(threads),
        "--device",
        device,
        "--max-queue",
        "256",
        *args,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError("server did not start")


def one(url: str, i: int, steps: int | None) -> float:
    body = {
        "model": "default",
        "prompt": f"a red circle above a blue square, take {i}",
        "n": 1,
        "seed": i,
        "response_format": "b64_json",
        **({"steps": steps} if steps else {}),
    }
    t = time.perf_counter()
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
    r.raise_for_status()
    assert len(r.json()["data"]) == 1
    return time.perf_counter() - t


def run(args: list[str], requests: int, clients: int, steps: int | None, device: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(args, Path(tmp) / "jobs.sqlite", device, threads)
        try:
            one(url, 10_000, steps)  # warm-up
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = list(pool.map(lambda i: one(url, i, steps), range(requests)))
            wall = time.perf_counter() - t
            batches = httpx.get(f"{url}/api/health").json()["batches"][1:]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    q = statistics.quantiles(lat, n=100)
    return {
        "wall_s": wall,
        "images_per_s": requests / wall,
        "p50_s": statistics.median(lat),
        "p95_s": q[94],
        "batches": batches,
        "completed": len(lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default: the model's, 20)")
    ap.add_argument("--device", default="cpu", help="the server's device (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--ray", action="store_true", help="also a local Ray Serve cluster of 2 replicas")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("load.json"))
    a = ap.parse_args()
    variants = dict(VARIANTS)
    if a.ray:
        variants["ray 2 replicas, batched"] = ["--ray", "local", "--replicas", "2", *VARIANTS["batched"]]
    rounds: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(a.rounds):
        for name, args in variants.items():
            res = run(args, a.requests, a.clients, a.steps, a.device, a.threads)
            rounds[name].append(res)
            print(
                f"round {r + 1} {name}: {res['completed']} images in {res['wall_s']:.2f} s, "
                f"{res['images_per_s']:.2f} img/s, p50 {res['p50_s']:.2f} s, p95 {res['p95_s']:.2f} s, "
                f"mean batch {statistics.mean(res['batches'] or [0]):.1f}",
                flush=True,
            )
    summary = {}
    for name, rs in rounds.items():
        summary[name] = {
            k: statistics.median(x[k] for x in rs) for k in ("wall_s", "images_per_s", "p50_s", "p95_s")
        }
        summary[name]["mean_batch"] = statistics.mean([b for x in rs for b in x["batches"]] or [0])
    ratios = [
        b["images_per_s"] / o["images_per_s"]
        for b, o in zip(rounds["batched"], rounds["one-by-one"], strict=True)
    ]
    summary["throughput_ratio_per_round"] = ratios
    summary["throughput_ratio_median"] = statistics.median(ratios)
    if a.ray:
        rr = [
            b["images_per_s"] / o["images_per_s"]
            for b, o in zip(rounds["ray 2 replicas, batched"], rounds["one-by-one"], strict=True)
        ]
        summary["ray_throughput_ratio_per_round"] = rr
    a.out.write_text(
        json.dumps({"config": vars(a) | {"out": str(a.out)}, "summary": summary, "rounds": rounds}, indent=2)
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
