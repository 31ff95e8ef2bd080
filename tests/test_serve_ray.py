"""``velodiff serve --ray local --replicas 2``: the application as a Ray Serve deployment on a local
cluster. Requests through Ray Serve's proxy are served by both replicas from the one shared job store,
each job completed exactly once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_fixtures import free_port, httpx, server_process

pytest.importorskip("ray.serve")


def test_two_ray_serve_replicas_share_the_queue(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process(
        tmp_path / "jobs.sqlite", port, "--ray", "local", "--replicas", "2", "--max-batch", "2"
    ):

        def one(i: int) -> int:
            body = {
                "model": "default",
                "prompt": f"a shape {i}",
                "seed": i,
                "steps": 12,
                "response_format": "url",
            }
            return httpx.post(f"{url}/v1/images/generations", json=body, timeout=300).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(16)))
        assert codes == [200] * 16
        jobs = httpx.get(f"{url}/api/jobs").json()
        assert len(jobs) == 16 and all(j["state"] == "done" and j["completions"] == 1 for j in jobs)
        assert len({j["runner"] for j in jobs}) == 2  # both replicas ran jobs
        # a job run by one replica is read through either: every image is served
        for j in jobs:
            assert httpx.get(f"{url}{j['images'][0]}").status_code == 200
