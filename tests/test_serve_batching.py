"""Batching and overload: concurrent compatible jobs run as one batch (their images those of the same
seeds run alone, up to float summation order); 40 simultaneous submissions against a bound of 8 each get
202 or 429, and every accepted job completes exactly once."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageChops

from serve_fixtures import httpx, running_server


def submit(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/api/jobs", json=body, timeout=60)


def result(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/api/jobs/{job_id}/result", timeout=300).json()


def image(url: str, path: str) -> Image.Image:
    return Image.open(io.BytesIO(httpx.get(f"{url}{path}").content)).convert("RGB")


def test_concurrent_compatible_jobs_share_a_batch(tmp_path):
    with running_server(tmp_path, max_batch=8, batch_wait=4.0) as (url, srv):
        bodies = [{"prompt": f"shape {i}", "seed": 100 + i, "steps": 4} for i in range(6)]
        bodies.append({"prompt": "other size", "seed": 1, "steps": 4, "width": 32, "height": 32})
        with ThreadPoolExecutor(7) as pool:
            ids = [r.json()["id"] for r in pool.map(lambda b: submit(url, b), bodies)]
        jobs = [result(url, i) for i in ids]
        assert all(j["state"] == "done" and j["completions"] == 1 for j in jobs)
        # the six 64x64 jobs ran as one batch (they came within the 1 s quiet gap); 32x32 did not join
        assert 6 in srv.worker.batches and max(srv.worker.batches) == 6
        batched = image(url, jobs[2]["images"][0])
    with running_server(tmp_path, max_batch=1, batch_wait=0.0) as (url, srv):
        alone = result(url, submit(url, bodies[2]).json()["id"])
        assert list(srv.worker.batches) == [1]
        diff = ImageChops.difference(batched, image(url, alone["images"][0]))
        assert max(hi for _, hi in diff.getextrema()) <= 2


def test_overload_bound_8_and_40_simultaneous_submissions(tmp_path):
    with running_server(tmp_path, max_queue=8, max_batch=4, batch_wait=0.0) as (url, srv):
        bodies = [{"prompt": f"load {i}", "seed": i, "steps": 30} for i in range(40)]
        with ThreadPoolExecutor(40) as pool:
            replies = list(pool.map(lambda b: submit(url, b), bodies))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {202, 429}
        accepted = [r.json()["id"] for r in replies if r.status_code == 202]
        assert 8 <= len(accepted) < 40  # the bound holds at the moment of each submission
        assert all(int(r.headers["Retry-After"]) >= 1 for r in replies if r.status_code == 429)
        jobs = [result(url, i) for i in accepted]
        assert [j["state"] for j in jobs] == ["done"] * len(accepted)
        assert all(j["completions"] == 1 and j["attempts"] == 1 for j in jobs)
        # the store holds exactly the accepted jobs, each with its images once
        rows = srv.store.jobs(limit=1000)
        assert sorted(j.id for j in rows) == sorted(accepted)
        assert sum(srv.worker.batches) == len(accepted)


@pytest.mark.parametrize("n", [3])
def test_a_job_of_n_images_is_never_split(tmp_path, n):
    with running_server(tmp_path, max_batch=4, batch_wait=0.5) as (url, srv):
        with ThreadPoolExecutor(3) as pool:
            ids = [
                r.json()["id"]
                for r in pool.map(
                    lambda s: submit(url, {"prompt": "p", "n": n, "seed": s, "steps": 3}), [0, 10, 20]
                )
            ]
        jobs = [result(url, i) for i in ids]
        assert all(len(j["images"]) == n for j in jobs)
        assert all(b % n == 0 and b <= 4 for b in srv.worker.batches)  # 3 + 3 > 4: one job per batch
