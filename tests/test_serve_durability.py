"""Durability with a real SIGKILL: jobs acknowledged by ``velodiff serve`` (queued and running) survive
the kill; the restarted server finishes each exactly once, with the bytes an uninterrupted run gives.
Also: the server listens on the configured address only (loopback)."""

from __future__ import annotations

import time
from pathlib import Path

from serve_fixtures import free_port, httpx, server_process

ARGS = ("--max-batch", "1", "--batch-wait", "0")  # one job per call: bytes independent of batch mates


def listening(port: int) -> list[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        p = Path(name)
        if not p.exists():
            continue
        for line in p.read_text().splitlines()[1:]:
            f = line.split()
            addr, hexport = f[1].rsplit(":", 1)
            if int(hexport, 16) == port and f[3] == "0A":  # LISTEN
                out.append(addr)
    return out


def test_sigkill_and_restart_finish_every_accepted_job_once_with_the_same_bytes(tmp_path):
    db, port = tmp_path / "jobs.sqlite", free_port()
    url = f"http://127.0.0.1:{port}"
    bodies = [{"prompt": f"a shape {i}", "seed": 40 + i, "steps": 25, "solver": "heun"} for i in range(5)]
    with server_process(db, port, *ARGS) as proc:
        assert listening(port) == ["0100007F"]  # 127.0.0.1, nothing else
        ids = [httpx.post(f"{url}/api/jobs", json=b, timeout=30).json()["id"] for b in bodies]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/api/jobs/{ids[1]}").json()["state"] != "running":  # one done, one running
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before = {i: httpx.get(f"{url}/api/jobs/{i}").json()["state"] for i in ids}
        proc.kill()  # SIGKILL: no shutdown handler runs
        proc.wait()
    assert before[ids[1]] == "running" and {before[i] for i in ids[2:]} == {"queued"}
    with server_process(db, port, *ARGS):
        assert httpx.get(f"{url}/api/health").json()["recovered"] == 1  # the job that was running
        jobs = [httpx.get(f"{url}/api/jobs/{i}/result", timeout=300).json() for i in ids]
        assert all(j["state"] == "done" and j["completions"] == 1 for j in jobs), [
            {k: j.get(k) for k in ("state", "completions", "attempts", "error")} for j in jobs]
        assert jobs[1]["attempts"] == 2 and jobs[0]["attempts"] == 1
        assert len(httpx.get(f"{url}/api/jobs").json()) == len(ids)  # no job twice
        got = [httpx.get(f"{url}{j['images'][0]}").content for j in jobs]
        # the uninterrupted run: the same requests again, on the restarted server
        again = [httpx.post(f"{url}/api/jobs", json=b, timeout=30).json()["id"] for b in bodies]
        ref = [httpx.get(f"{url}/api/jobs/{i}/result", timeout=300).json() for i in again]
        assert got == [httpx.get(f"{url}{j['images'][0]}").content for j in ref]
