"""velodiff's own jobs API: a job runs once and gives the images its seed gives; progress streams over
SSE; bad input is a 4xx with one line and the server keeps serving; a full queue is a 429 with
Retry-After; cancelling frees the slot; layout jobs (guidance and collage) give the library's images;
a job past its timeout fails."""

from __future__ import annotations

import io
import json
import socket
import time

import pytest
from PIL import Image, ImageChops

from serve_fixtures import httpx, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve"), max_queue=3, max_batch=1, batch_wait=0.0) as s:
        yield s


def run_job(url: str, **body) -> dict:
    r = httpx.post(f"{url}/api/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()
    # committed as queued; the worker may have claimed it before the store was read back for the answer
    assert job["state"] in ("queued", "running", "done"), job["state"]
    r = httpx.get(f"{url}/api/jobs/{job['id']}/result", timeout=120)
    return r.json()


def png(url: str, path: str) -> Image.Image:
    r = httpx.get(f"{url}{path}", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def test_job_runs_once_and_its_seed_fixes_its_images(server):
    url, _ = server
    a = run_job(url, prompt="a red circle", n=2, seed=7, steps=4)
    assert a["state"] == "done" and a["completions"] == 1 and a["attempts"] == 1
    assert len(a["images"]) == 2
    ims = [png(url, p) for p in a["images"]]
    assert all(im.size == (64, 64) for im in ims)
    assert ims[0].tobytes() != ims[1].tobytes()  # seeds 7 and 8
    b = run_job(url, prompt="a red circle", n=2, seed=7, steps=4)  # the same request: the same bytes
    for pa, pb in zip(a["images"], b["images"], strict=True):
        assert httpx.get(f"{url}{pa}").content == httpx.get(f"{url}{pb}").content
    c = run_job(url, prompt="a red circle", n=1, seed=8, steps=4)  # image i of a job is seed + i's image
    diff = ImageChops.difference(png(url, c["images"][0]).convert("RGB"), ims[1].convert("RGB"))
    assert max(hi for _, hi in diff.getextrema()) <= 2  # a batch of 1 vs 2: float sums in another order
    # the CLI's seed range: a negative seed is torch's 64-bit one (-1 is 2**64 - 1), as `--seed -1` gives
    d, e = (run_job(url, prompt="a red circle", n=1, seed=s, steps=4) for s in (-1, 2**64 - 1))
    assert httpx.get(f"{url}{d['images'][0]}").content == httpx.get(f"{url}{e['images'][0]}").content


def test_progress_streams_over_sse(server):
    url, _ = server
    job = httpx.post(f"{url}/api/jobs", json={"prompt": "a blue square", "steps": 20, "preview": True}).json()
    events = []
    with httpx.stream("GET", f"{url}/api/jobs/{job['id']}/events", timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and events[-1]["images"]
    steps = [e["step"] for e in events if e["type"] == "progress"]
    # the stream may start after the first step: from there on, every step in order
    assert steps and steps == list(range(steps[0], 21)) and len(steps) >= 3
    previews = [e["preview"] for e in events if e["type"] == "progress"]
    assert all(p.startswith("data:image/png;base64,") for p in previews)


LONG = "red " * 100


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("{bad json", "malformed JSON"),
        ('"just a string"', "JSON object"),
        ({"prompt": "x", "model": "nope"}, "unknown model 'nope'"),
        ({"prompt": "x", "plan": "nope"}, "unknown plan rule 'nope'"),
        ({"prompt": "x", "solver": "nope"}, "unknown solver 'nope'"),
        ({"prompt": "x", "grid": "nope"}, "unknown grid 'nope'"),
        ({"prompt": "x", "width": 66}, "not a positive multiple of 4"),
        ({"prompt": "x", "n": 99}, "n must be between 1 and 8"),
        ({"prompt": LONG}, "tokens long"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "x", "steps": "many"}, "steps"),
        ({"prompt": "x", "colour": "red"}, "unknown field 'colour'"),
        ({"prompt": "a red circle", "layout_mode": "paste"}, "use guidance or collage"),
        ({"prompt": "a red circle", "layout_mode": "collage"}, "needs layout boxes or a prompt"),
        ({"prompt": "a red circle", "layout": "green circle: 0,0,1,1"}, "'green' is not in the prompt"),
        ({"prompt": "a red circle", "layout": "red circle: 0,0,2,1"}, "must satisfy"),
        ({"prompt": "a red circle", "layout": "red circle: /etc/hostname"}, "four numbers"),  # no paths
        ({"prompt": "x", "plan": "@/etc/hostname"}, "reads no plan file"),  # nor plan files
        ({"prompt": "x", "plan": "steps=500"}, "steps must be between 1 and 200"),  # a plan's steps too
        ({"prompt": "x", "width": 0}, "not a positive multiple"),  # 0 is not "the default"
        ({"prompt": "x", "seed": -(2**63) - 1}, "seed must be in [-2**63, 2**64)"),
        ({"prompt": "x", "n": "2"}, "n: Input should be a valid integer"),  # JSON types as declared
        ({"prompt": "x", "steps": True}, "steps: Input should be a valid integer"),
        # accepted, then failed in the worker: refused at submission by the rules' own checks
        ({"prompt": "x", "grid": "linear_quadratic"}, "rectified flows"),
        ({"prompt": "x", "plan": "fp8"}, "needs a cuda device"),
        ({"prompt": "x", "plan": "cfg_zero"}, "for flow-matching models"),
        ({"prompt": "x", "plan": "fbcache"}, "for diffusion transformers"),
        ({"prompt": "x", "plan": "cfgpp"}, "use solver ddim"),
    ],
)
def test_bad_input_is_one_line_4xx_and_the_server_goes_on(server, body, needle):
    url, _ = server
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/api/jobs", content=data, timeout=30)
    assert 400 <= r.status_code < 500
    msg = r.json()["error"]
    assert needle in msg and "\n" not in msg and "Traceback" not in msg
    assert httpx.get(f"{url}/api/health").json()["ok"]


def wait_state(url: str, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}: {job['state']}")


def test_full_queue_429_and_cancel_frees_the_slot(server):
    url, srv = server
    assert srv.store.max_queue == 3
    slow = {"prompt": "slow", "steps": 200, "solver": "heun"}
    ids = [httpx.post(f"{url}/api/jobs", json=slow).json()["id"] for _ in range(3)]
    wait_state(url, ids[0], ("running",))
    r = httpx.post(f"{url}/api/jobs", json=slow)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "queue is full" in r.json()["error"]
    # cancel a queued job: its slot is free at once
    assert httpx.post(f"{url}/api/jobs/{ids[2]}/cancel").json()["state"] == "cancelled"
    r = httpx.post(f"{url}/api/jobs", json=slow)
    assert r.status_code == 202
    ids.append(r.json()["id"])
    # cancel the running one and the rest: none completes
    for i in ids:
        httpx.post(f"{url}/api/jobs/{i}/cancel")
    for i in ids:
        job = wait_state(url, i, ("cancelled", "done"))
        assert job["state"] == "cancelled" and job["completions"] == 0 and job["images"] == []
    assert httpx.get(f"{url}/api/health").json()["active"] == 0


def test_layout_jobs_run_the_library_and_a_collage_stops_when_cancelled(server):
    """layout_mode collage runs velodiff.edit.collage (the same image as the Python call), with boxes
    from the prompt's count; layout boxes in guidance mode add layout guidance; a running collage is
    cancelled between any two of its steps."""
    import numpy as np

    from velodiff.edit.collage import collage
    from velodiff.edit.layout import LayoutGuidance
    from velodiff.pipelines import text2img

    url, srv = server
    job = run_job(url, prompt="two red circles", layout_mode="collage", seed=3, steps=4)
    assert job["state"] == "done" and job["params"]["kind"] == "collage" and len(job["images"]) == 1
    model, _ = srv.engine.model(None)
    want = collage(model, "two red circles", seeds=[3], steps=4, guidance=job["params"]["guidance"])
    got = np.asarray(png(url, job["images"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(want.images[0], dtype=np.int16)).max() <= 2
    boxes = "red circle: 0.05,0.05,0.45,0.45"
    job = run_job(url, prompt="a red circle", layout=boxes, seed=3, steps=4)
    assert job["state"] == "done" and job["params"]["layout"] == {"red circle": [0.05, 0.05, 0.45, 0.45]}
    plan = [LayoutGuidance(boxes={"red circle": (0.05, 0.05, 0.45, 0.45)})]
    want = text2img(model, "a red circle", seeds=[3], steps=4, guidance=job["params"]["guidance"], plan=plan)
    got = np.asarray(png(url, job["images"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(want.images[0], dtype=np.int16)).max() <= 2
    slow = {"prompt": "three red circles", "layout_mode": "collage", "steps": 200, "solver": "heun"}
    job = httpx.post(f"{url}/api/jobs", json=slow).json()
    wait_state(url, job["id"], ("running",))
    httpx.post(f"{url}/api/jobs/{job['id']}/cancel")
    job = wait_state(url, job["id"], ("cancelled", "done"))
    assert job["state"] == "cancelled" and job["images"] == []
    job = run_job(url, prompt="a red circle", seed=3, steps=4)  # the worker goes on, its model intact
    want = text2img(model, "a red circle", seeds=[3], steps=4, guidance=job["params"]["guidance"])
    got = np.asarray(png(url, job["images"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(want.images[0], dtype=np.int16)).max() <= 2


def test_a_job_past_its_timeout_fails(server):
    url, _ = server
    job = run_job(url, prompt="slow", steps=200, solver="heun", timeout_s=0.3)
    assert job["state"] == "failed" and "timed out after 0.3 s" in job["error"]
    assert job["images"] == []


def test_waiting_for_a_result_takes_a_positive_timeout(server):
    url, _ = server
    job = httpx.post(f"{url}/api/jobs", json={"prompt": "x", "steps": 1}).json()
    r = httpx.get(f"{url}/api/jobs/{job['id']}/result", params={"timeout": -5})
    assert r.status_code == 400 and "timeout must be in (0, 86400]" in r.json()["error"]  # was a 504 at once
    assert httpx.get(f"{url}/api/jobs/{job['id']}/result", timeout=60).json()["state"] == "done"


def test_a_job_cannot_ask_for_more_time_than_the_server_gives(tmp_path):
    with running_server(tmp_path, timeout_s=0.3) as (url, _):
        job = run_job(url, prompt="slow", steps=200, solver="heun", timeout_s=1e9)
        assert job["state"] == "failed" and "timed out after 0.3 s" in job["error"]


def test_openapi_documents_the_errors_sent_and_docs_need_no_cdn(server):
    url, _ = server
    doc = httpx.get(f"{url}/openapi.json").json()
    submit = doc["paths"]["/api/jobs"]["post"]["responses"]
    assert "422" not in submit and {"400", "403", "429"} <= set(submit)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    r = httpx.post(f"{url}/api/jobs", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 400 and set(r.json()) == {"error"}  # what the document says
    page = httpx.get(f"{url}/docs").text
    assert "cdn." not in page and "/docs-assets/swagger-ui-bundle.js" in page
    assert httpx.get(f"{url}/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_a_page_of_another_site_cannot_drive_the_server(server):
    """A cross-site form or text/plain POST needs no CORS preflight and the server reads any body as
    JSON: a request whose Origin is not the server's is refused (403), as ComfyUI refuses it; the page's
    own requests (same origin) and clients that send no Origin go through."""
    url, srv = server
    before = srv.store.count(("queued", "running", "done", "failed", "cancelled"))
    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    for path, body in (("/api/jobs", {"prompt": "x", "steps": 2}), ("/queue", {"clear": True}),
                       ("/interrupt", {}), ("/v1/images/generations", {"prompt": "x"})):
        r = httpx.post(f"{url}{path}", content=json.dumps(body), headers=evil)
        error = r.json()["error"]  # in the shape of the API called (OpenAI's and ComfyUI's: an object)
        assert r.status_code == 403 and "cross-origin request" in str(error), (path, r.text)
    assert srv.store.count(("queued", "running", "done", "failed", "cancelled")) == before
    same = {"Origin": url, "Content-Type": "text/plain"}
    r = httpx.post(f"{url}/api/jobs", content=json.dumps({"prompt": "x", "steps": 1}), headers=same)
    assert r.status_code == 202
    wait_state(url, r.json()["id"], ("done",))


def test_bench_reports_are_listed_and_served(tmp_path):
    (tmp_path / "reports" / "serve").mkdir(parents=True)
    (tmp_path / "reports" / "serve" / "README.md").write_text("| a | b |\n|---|---|\n")
    (tmp_path / "reports" / "pareto.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "reports" / "notes.txt").write_text("not a report")
    with running_server(tmp_path, reports=tmp_path / "reports") as (url, _):
        listed = httpx.get(f"{url}/api/reports").json()
        assert [r["path"] for r in listed] == ["pareto.png", "serve/README.md"]
        assert httpx.get(f"{url}/reports/serve/README.md").text.startswith("| a | b |")
        assert httpx.get(f"{url}/reports/%2e%2e/jobs.sqlite").status_code == 404


def test_a_job_cancelled_elsewhere_leaves_no_progress_behind(tmp_path):
    """A running job cancelled through the shared store by another process (a second replica) gets no
    final event here; its last progress must not stay in the broker of a long-running server."""
    from velodiff.serve.engine import Request
    from velodiff.serve.queue import JobStore
    from velodiff.serve.state import ServeConfig, Server

    srv = Server(ServeConfig(db=tmp_path / "jobs.sqlite", batch_wait=0.0, timeout_s=None))
    srv.start()
    other = JobStore(tmp_path / "jobs.sqlite")
    try:
        job = srv.submit_sync(Request(prompt="a red circle", steps=60, seed=0))
        deadline = time.monotonic() + 60
        while job.id not in srv.broker.progress and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.id in srv.broker.progress
        other.finish(job.id, "cancelled", "cancelled by another replica")
        while srv.worker.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.store.get(job.id).state == "cancelled"
        assert srv.broker.progress == {}
    finally:
        srv.stop()
        other.close()


def test_a_job_moves_to_done_at_most_once_and_only_from_running(tmp_path):
    """Every move is one conditional UPDATE: a job cancelled (or timed out) while its batch ran is not
    completed afterwards, and a job completes once."""
    from velodiff.serve.queue import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        cancelled = store.submit({"n": 1}, "k", 1)
        store.claim(4)
        assert store.finish(cancelled.id, "cancelled", "by the user")
        assert not store.complete(cancelled.id, [b"png"], ["a.png"])
        assert store.get(cancelled.id).state == "cancelled" and store.get(cancelled.id).filenames == []
        job = store.submit({"n": 1}, "k", 1)
        store.claim(4)
        assert store.complete(job.id, [b"png"], ["b.png"])
        assert not store.complete(job.id, [b"png"], ["c.png"])
        assert store.get(job.id).filenames == ["b.png"]
    finally:
        store.close()


def test_jobs_whose_plan_decides_for_the_whole_batch_are_never_batched():
    """FBCache skips the blocks for every row of a call or none: a job's image would change with the jobs
    beside it, so such jobs (and collages) get a key of their own; other plans share keys."""
    from velodiff.serve.engine import batch_key

    params = {"model": "m", "width": 64, "height": 64, "steps": 4, "n": 1}
    for plan in ("fbcache", "fbcache:threshold=0.1+cfg"):
        assert batch_key({**params, "plan": plan}) != batch_key({**params, "plan": plan})
    assert batch_key({**params, "kind": "collage"}) != batch_key({**params, "kind": "collage"})
    for plan in (None, "deepcache:interval=3", "tome:max_downsample=2"):
        assert batch_key({**params, "plan": plan}) == batch_key({**params, "plan": plan})


def test_a_batch_takes_the_compatible_jobs_that_exactly_fill_it(tmp_path):
    from velodiff.serve.queue import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        ids = [store.submit({"n": 2}, "k", 2).id for _ in range(3)]
        other = store.submit({"n": 1}, "other", 1).id
        assert [j.id for j in store.claim(4)] == ids[:2]  # 2 + 2 images fill a batch of 4
        assert [j.id for j in store.claim(4)] == ids[2:]  # another batch key never joins
        assert [j.id for j in store.claim(4)] == [other]
    finally:
        store.close()


def test_a_job_cancelled_while_running_leaves_its_batch_at_the_next_step(tmp_path):
    """The worker reads the batch's states every step: a job cancelled while it runs is dropped, and a
    batch with no job left stops instead of running to its last step."""
    from velodiff.serve.events import Broker
    from velodiff.serve.queue import JobStore
    from velodiff.serve.worker import Worker

    class Engine:
        steps_run = 0

        def run(self, jobs, on_step):
            for i in range(10):
                self.steps_run += 1
                if i == 2:
                    worker.cancel(jobs[0].id)
                if on_step(i, 10, None):
                    break
            return [[] for _ in jobs]

    store = JobStore(tmp_path / "jobs.sqlite")
    engine = Engine()
    worker = Worker(store, engine, Broker())
    try:
        job = store.submit({"n": 1, "steps": 10}, "k", 1)
        worker._run(store.claim(1))
        assert engine.steps_run == 3 and store.get(job.id).state == "cancelled"
        # cancelled between its claim and its run: no 'started' after its 'cancelled', one step at most
        published = []
        worker.broker.publish = published.append
        job = store.submit({"n": 1, "steps": 10}, "k", 1)
        claimed = store.claim(1)
        worker.cancel(job.id)
        engine.steps_run = 0
        worker._run(claimed)
        assert [e["type"] for e in published if e.get("job") == job.id] == ["cancelled"]
        assert engine.steps_run == 1
    finally:
        store.close()


def test_the_history_is_bounded_and_keeps_the_newest(tmp_path):
    """Beyond max_history finished jobs the oldest go, images and all, in the transaction that finishes
    another; queued and running jobs are never touched."""
    from velodiff.serve.queue import JobStore

    store = JobStore(tmp_path / "jobs.sqlite", max_queue=100, max_history=3)
    try:
        ids = [store.submit({"n": 1}, "k", 1).id for _ in range(7)]
        for i, job in enumerate(store.claim(5)):  # the first five run; two stay queued
            if i % 2 == 0:
                assert store.complete(job.id, [b"png"], [f"img-{i}.png"])
            else:
                assert store.finish(job.id, "failed", "boom")
        kept = [j.id for j in store.jobs(("done", "failed", "cancelled"))]
        assert kept == ids[2:5]
        assert [j.id for j in store.jobs(("queued",))] == ids[5:]
        assert store.get(ids[0]) is None and store.get(ids[4]).filenames == ["img-4.png"]
        rows = store._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        assert rows == 2  # images of jobs 2 and 4; job 0's went with it
        assert all(store.finish(j, "cancelled", "cleared") for j in ids[5:])
        assert [j.id for j in store.jobs(("done", "failed", "cancelled"))] == ids[4:]
        # an old job finishing after newer ones is the newest in the history, not pruned as it finishes
        old, *newer = [store.submit({"n": 1}, "k", 1).id for _ in range(4)]
        store.claim(4)
        assert all(store.finish(j, "cancelled", "cleared") for j in newer)
        assert store.complete(old, [b"png"], ["old.png"]) and store.get(old).filenames == ["old.png"]
        assert {j.id for j in store.jobs(("done", "failed", "cancelled"))} == {old, *newer[1:]}
    finally:
        store.close()


def test_a_job_the_server_died_running_three_times_fails_instead_of_running_again(tmp_path):
    """recover() requeues what a killed server was running; a job it was running at each of three
    deaths (one that takes the server down, out of memory) fails with the reason, so the next start
    serves the others."""
    from velodiff.serve.queue import MAX_ATTEMPTS, JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        poison, other = (store.submit({"n": 1}, k, 1).id for k in ("a", "b"))
        for death in range(1, MAX_ATTEMPTS + 1):
            claimed = [j.id for j in store.claim(1)]
            assert claimed == [poison]  # the oldest first, again after each recovery
            assert store.recover() == (1 if death < MAX_ATTEMPTS else 0)
        job = store.get(poison)
        assert job.state == "failed" and f"stopped {MAX_ATTEMPTS} times" in job.error
        assert [j.id for j in store.claim(1)] == [other]
    finally:
        store.close()


def test_a_job_store_that_is_not_a_database_is_refused_and_left_as_it_was(tmp_path):
    """--db naming a file that is not SQLite (a typo for another file) or a folder: one line, and the file
    is not touched (no -wal / -shm beside it)."""
    from velodiff.errors import VelodiffError
    from velodiff.serve.queue import JobStore

    other = tmp_path / "notes.txt"
    other.write_bytes(b"my notes, not a database\n" * 100)
    with pytest.raises(VelodiffError, match="cannot be used: file is not a database"):
        JobStore(other)
    assert other.read_bytes() == b"my notes, not a database\n" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(VelodiffError, match="is a folder"):
        JobStore(tmp_path)


def test_a_failing_job_store_stops_no_worker_and_its_jobs_run_when_it_works_again(tmp_path, monkeypatch):
    """A job store that cannot be written (a full disk: SQLite's 'database or disk is full') keeps the
    worker alive: it says why (/api/health's store_error), waits, and once the store works again puts the
    job it could not record back in the queue and runs it to the end."""
    import sqlite3

    from velodiff.serve import worker as worker_module
    from velodiff.serve.events import Broker
    from velodiff.serve.queue import JobStore
    from velodiff.serve.worker import Worker

    class Engine:
        def run(self, jobs, on_step):
            return [[Image.new("RGB", (8, 8))] * j.params["n"] for j in jobs]

    monkeypatch.setattr(worker_module, "STORE_RETRY_S", 0.05)
    store = JobStore(tmp_path / "jobs.sqlite")
    worker = Worker(store, Engine(), Broker(), batch_wait=0.0)
    full = {"on": True}
    complete, finish = store.complete, store.finish

    def disk_full(real):
        def call(*args, **kwargs):
            if full["on"]:
                raise sqlite3.OperationalError("database or disk is full")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(store, "complete", disk_full(complete))
    monkeypatch.setattr(store, "finish", disk_full(finish))
    try:
        job = store.submit({"n": 1, "steps": 2}, "k", 1)
        worker.start()
        deadline = time.monotonic() + 30
        while worker.store_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.store_error == "OperationalError: database or disk is full"
        assert worker._thread.is_alive()
        full["on"] = False
        while store.get(job.id).state != "done" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.get(job.id).state == "done" and worker.store_error is None
        assert store.get(job.id).attempts == 1  # the store's failure was not counted as the job's
    finally:
        worker.stop()
        store.close()


def test_a_server_stopping_puts_its_running_job_back_in_the_queue_at_once(tmp_path):
    """Stopping the server (Ctrl-C) stops the running batch at its next step, not after it: the job goes
    back in the queue as never started (no attempt counted, so restarts never fail it as a crash) and
    runs at the next start."""
    import threading

    from velodiff.serve.events import Broker
    from velodiff.serve.queue import JobStore
    from velodiff.serve.worker import Worker

    class Engine:
        steps_run = 0

        def run(self, jobs, on_step):
            for i in range(1000):
                self.steps_run += 1
                if i == 2:
                    threading.Thread(target=worker.stop).start()
                time.sleep(0.01)
                if on_step(i, 1000, None):
                    break
            return [[Image.new("RGB", (8, 8))] * j.params["n"] for j in jobs]

    store = JobStore(tmp_path / "jobs.sqlite")
    engine = Engine()
    worker = Worker(store, engine, Broker(), batch_wait=0.0)
    try:
        job = store.submit({"n": 1, "steps": 1000}, "k", 1)
        worker.start()
        worker._thread.join(timeout=30)
        assert not worker._thread.is_alive() and engine.steps_run < 100
        back = store.get(job.id)
        assert back.state == "queued" and back.attempts == 0
    finally:
        store.close()


def test_a_job_store_has_one_recovering_server_at_a_time(tmp_path, capsys):
    """A second server recovering the same --db would requeue the jobs the first is running (they would
    run twice): it is refused in one line while the first holds the store, and may start once the
    first has closed it; a process sharing the store without recovering it (a Ray Serve replica) is
    not refused."""
    from velodiff.cli import main
    from velodiff.errors import VelodiffError
    from velodiff.serve.queue import JobStore

    db = tmp_path / "jobs.sqlite"
    first, second, replica = JobStore(db), JobStore(db), JobStore(db)
    try:
        job = first.submit({"n": 1}, "k", 1).id
        assert first.recover() == 0 and [j.id for j in first.claim(1)] == [job]
        with pytest.raises(VelodiffError, match=f"^another velodiff serve is using the job store {db}; "):
            second.recover()
        assert first.get(job).state == "running"  # not requeued under the first
        assert replica.submit({"n": 1}, "k", 1).state == "queued"
        try:
            code = main(["serve", "--db", str(db), "--port", "0"])
        except SystemExit as e:
            code = int(e.code or 0)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == (f"error: another velodiff serve is using the job store {db}; stop it "
                                     "or give another --db"), err
        # a port in use is refused before the model loads, in one line
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            try:
                code = main(["serve", "--db", str(tmp_path / "other.sqlite"), "--port", str(port)])
            except SystemExit as e:
                code = int(e.code or 0)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"error: cannot listen on 127.0.0.1:{port} (") and err.endswith(
            "); give another --port or stop what uses it"), err
        first.close()
        assert second.recover() == 1 and second.get(job).state == "queued"  # as after the first was killed
    finally:
        for s in (first, second, replica):
            s.close()


# --- review21: the store's state moves, the worker's events, the engine's bounds --------------------


def test_only_running_jobs_go_back_in_the_queue_and_as_never_started(tmp_path):
    """release() (a store failure, a stop) and recover() (a kill) move only the jobs still running: a job
    of the batch that was done, failed or cancelled before keeps its state and images; a job put back is
    queued as never started."""
    from velodiff.serve.queue import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        done, cancelled, running = (store.submit({"n": 1}, "k", 1).id for _ in range(3))
        assert [j.id for j in store.claim(3)] == [done, cancelled, running]
        assert store.complete(done, [b"png"], ["done.png"])
        assert store.finish(cancelled, "cancelled", "by the user")
        assert store.release([done, cancelled, running]) == 1
        assert store.get(done).state == "done" and store.get(done).filenames == ["done.png"]
        assert store.get(cancelled).state == "cancelled"
        back = store.get(running)
        assert (back.state, back.started, back.attempts) == ("queued", None, 0)
        assert [j.id for j in store.claim(1)] == [running] and store.get(running).started is not None
        assert store.recover() == 1
        back = store.get(running)
        assert (back.state, back.started, back.attempts) == ("queued", None, 1)  # a kill counts an attempt
        assert store.get(done).state == "done" and store.get(cancelled).state == "cancelled"
    finally:
        store.close()


def test_a_batch_takes_compatible_jobs_in_their_order_and_stops_at_the_first_that_does_not_fit(tmp_path):
    """Jobs run in submission order: a small job behind a large one that does not fit never overtakes
    it (it would starve large jobs under a stream of small ones)."""
    from velodiff.serve.queue import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        big1, big2, small = (store.submit({"n": n}, "k", n).id for n in (3, 3, 1))
        assert [j.id for j in store.claim(4)] == [big1]
        assert [j.id for j in store.claim(4)] == [big2, small]
    finally:
        store.close()


def test_a_finished_job_cannot_be_cancelled_and_says_so(tmp_path):
    """Cancelling a job that is done (or failed) leaves it as it is, images and all: the store refuses
    the move, the worker answers False and publishes no 'cancelled' event (a ComfyUI client or an SSE
    stream would read the finished job as interrupted)."""
    from velodiff.serve.events import Broker
    from velodiff.serve.queue import JobStore
    from velodiff.serve.worker import Worker

    store = JobStore(tmp_path / "jobs.sqlite")
    worker = Worker(store, None, Broker())
    published = []
    worker.broker.publish = published.append
    try:
        done, failed = (store.submit({"n": 1}, "k", 1).id for _ in range(2))
        store.claim(2)
        assert store.complete(done, [b"png"], ["done.png"]) and store.finish(failed, "failed", "boom")
        assert not store.finish(done, "cancelled", "too late") and not worker.cancel(done)
        assert not worker.cancel(failed)
        assert store.get(done).state == "done" and store.get(done).filenames == ["done.png"]
        assert store.get(done).error is None
        assert (store.get(failed).state, store.get(failed).error) == ("failed", "boom")
        assert published == []
    finally:
        store.close()


def test_the_store_lists_the_newest_jobs_and_counts_only_queued_images(tmp_path):
    """jobs(limit=k) is the last k jobs (oldest first), as GET /api/jobs's 'newest 200'; queued_images
    counts the queued jobs of a batch key only (what the worker waits to fill a batch with)."""
    from velodiff.serve.queue import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        ids = [store.submit({"n": 2}, "k", 2).id for _ in range(4)]
        other = store.submit({"n": 1}, "other", 1).id
        assert [j.id for j in store.jobs(("queued",), limit=3)] == [*ids[2:], other]
        assert store.queued_images("k") == 8
        first = store.claim(2)[0]
        assert store.queued_images("k") == 6
        assert store.complete(first.id, [b"a", b"b"], ["a.png", "b.png"])
        assert store.queued_images("k") == 6 and store.queued_images("other") == 1
    finally:
        store.close()


def test_a_stopped_batch_leaves_no_progress_behind(tmp_path):
    """A batch stopped between steps (the server stopping) goes back in the queue; the progress it
    published must not stay in the broker (status would report it for the queued job)."""
    from velodiff.serve.events import Broker
    from velodiff.serve.queue import JobStore
    from velodiff.serve.worker import Worker

    class Engine:
        def run(self, jobs, on_step):
            on_step(0, 10, None)
            worker._stop.set()
            assert on_step(1, 10, None)
            return [[Image.new("RGB", (8, 8))] * j.params["n"] for j in jobs]

    store = JobStore(tmp_path / "jobs.sqlite")
    worker = Worker(store, Engine(), Broker())
    try:
        job = store.submit({"n": 1, "steps": 10, "model": "m"}, "k", 1)
        worker._run(store.claim(1))
        assert store.get(job.id).state == "queued"
        assert worker.broker.progress == {}
    finally:
        store.close()


def test_each_job_of_a_batch_previews_its_own_first_image(tmp_path):
    """Images i..i+n of a batch are job k's: the preview of a job is the prediction of its own first
    image, also behind a job of several images."""
    import base64

    from velodiff.serve.events import Broker
    from velodiff.serve.queue import JobStore
    from velodiff.serve.worker import Worker

    class Engine:
        def run(self, jobs, on_step):
            on_step(0, 1, "x0")
            return [[Image.new("RGB", (8, 8))] * j.params["n"] for j in jobs]

        def preview(self, model, x0, index):
            return f"image {index}".encode()

    store = JobStore(tmp_path / "jobs.sqlite")
    worker = Worker(store, Engine(), Broker())
    published = []
    worker.broker.publish = published.append
    try:
        params = {"steps": 1, "model": "m", "preview": True}
        a, b, c = (store.submit({**params, "n": n}, "k", n).id for n in (2, 3, 1))
        worker._run(store.claim(8))
        got = {e["job"]: base64.b64decode(e["preview"].split(",", 1)[1]).decode()
               for e in published if e["type"] == "progress"}
        assert got == {a: "image 0", b: "image 2", c: "image 5"}
    finally:
        store.close()


def test_a_failed_batch_fails_its_running_jobs_and_leaves_a_cancelled_one_cancelled(tmp_path):
    """An internal error fails the jobs of its batch (one 'failed' event each); a job cancelled during
    the run stays cancelled, with no 'failed' event after its 'cancelled'."""
    from velodiff.serve.events import Broker
    from velodiff.serve.queue import JobStore
    from velodiff.serve.worker import Worker

    class Engine:
        def run(self, jobs, on_step):
            worker.cancel(jobs[0].id)
            on_step(0, 2, None)
            raise RuntimeError("boom")

    store = JobStore(tmp_path / "jobs.sqlite")
    worker = Worker(store, Engine(), Broker(), batch_wait=0.0)
    published = []
    worker.broker.publish = published.append
    try:
        a, b = (store.submit({"n": 1, "steps": 2}, "k", 1).id for _ in range(2))
        worker._next()
        assert store.get(a).state == "cancelled"
        assert store.get(b).state == "failed" and store.get(b).error == "internal error: RuntimeError: boom"
        finals = [(e["type"], e["job"]) for e in published if e["type"] in ("done", "failed", "cancelled")]
        assert finals == [("cancelled", a), ("failed", b)]
    finally:
        store.close()


def test_a_request_is_checked_against_the_servers_bounds_at_their_edges():
    """n in [1, max_n], at most max_pixels pixels, a timeout > 0, seeds seed..seed+n-1 in the CLI's range
    [-2**63, 2**64), a guidance scale in [0, 100], and a prompt of up to the model's token limit: the
    edges are accepted, one past them refused in one line."""
    from serve_fixtures import engine
    from velodiff.errors import VelodiffError
    from velodiff.serve.engine import Engine, Request

    eng = engine()
    small = Engine("default", max_n=3, max_pixels=64 * 64)
    small._models = eng._models  # the loaded model, shared
    ok = dict(prompt="a red circle", steps=2)
    assert small.check(Request(**ok, n=3))["n"] == 3
    assert small.check(Request(**ok, width=64, height=64))["width"] == 64
    assert small.check(Request(**ok, seed=-(2**63)))["seed"] == -(2**63)
    assert small.check(Request(**ok, seed=2**64 - 2, n=2))["seed"] == 2**64 - 2
    assert small.check(Request(**ok, guidance=100.0))["guidance"] == 100.0
    m, _ = eng.model(None)
    tok = m.components["tokenizer"]
    words = next(k for k in range(1, 200) if len(tok("red " * k, truncation=False).input_ids) >= m.max_tokens)
    assert len(tok("red " * words, truncation=False).input_ids) == m.max_tokens
    assert small.check(Request(prompt="red " * words, steps=2))["steps"] == 2
    for bad, needle in (
        (dict(n=4), "n must be between 1 and 3"),
        (dict(n=0), "n must be between 1 and 3"),
        (dict(width=64, height=68), "more than this server's bound of 4096 pixels"),
        (dict(timeout_s=0.0), "timeout_s must be > 0"),
        (dict(seed=2**64 - 1, n=2), "seed must be in [-2**63, 2**64) for each of the n images"),
        (dict(guidance=-1.0), "guidance must be a finite number in [0, 100]"),
        (dict(guidance=101.0), "guidance must be a finite number in [0, 100]"),
        (dict(prompt="red " * (words + 1)), "tokens long"),
    ):
        with pytest.raises(VelodiffError) as e:
            small.check(Request(**{**ok, **bad}))
        assert needle in str(e.value), (bad, str(e.value))


def test_jobs_that_sample_differently_never_share_a_batch():
    """Jobs share a network call only when everything but prompt, seed and n agrees: another guidance
    scale, negative prompt, solver options or layout is another batch (its images would be drawn with
    the first job's settings)."""
    from serve_fixtures import engine
    from velodiff.serve.engine import Request, batch_key

    eng = engine()
    base = dict(prompt="a red circle", steps=2, seed=1)
    key = batch_key(eng.check(Request(**base)))
    assert batch_key(eng.check(Request(**{**base, "prompt": "a blue square", "seed": 9, "n": 2}))) == key
    for other in (dict(guidance=5.0), dict(negative="a blue square"), dict(solver="unipc"),
                  dict(solver_options={"lower_order_final": False}), dict(width=32),
                  dict(layout="red circle: 0.1,0.1,0.5,0.5"), dict(plan="cfg:stop=0.5")):
        assert batch_key(eng.check(Request(**{**base, **other}))) != key, other


def test_a_preview_is_the_prediction_of_the_image_asked_for():
    import torch

    from serve_fixtures import engine

    eng = engine()
    m, _ = eng.model(None)
    x0 = torch.randn(m.latent_shape(3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert eng.preview(None, x0, 1) == eng.preview(None, x0[1:2], 0) != eng.preview(None, x0, 0)


def test_a_collage_job_of_n_images_draws_seeds_seed_to_seed_plus_n(server):
    import numpy as np

    from velodiff.edit.collage import collage

    url, srv = server
    job = run_job(url, prompt="two red circles", layout_mode="collage", seed=3, steps=2, n=2)
    assert job["state"] == "done" and len(job["images"]) == 2
    model, _ = srv.engine.model(None)
    want = collage(model, "two red circles", seeds=[3, 4], steps=2, guidance=job["params"]["guidance"])
    for path, im in zip(job["images"], want.images, strict=True):
        got = np.asarray(png(url, path).convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.asarray(im, dtype=np.int16)).max() <= 2


def test_listing_waiting_and_streaming_a_finished_job(server):
    """GET /api/jobs?state= lists that state only; a result wait takes a timeout in (0, 86400]; the event
    stream of a finished job is its status, once, and ends."""
    url, _ = server
    job = run_job(url, prompt="a red circle", steps=1, seed=1)
    assert job["state"] == "done"
    for state in ("done", "cancelled", "queued"):
        listed = httpx.get(f"{url}/api/jobs", params={"state": state}).json()
        assert {j["state"] for j in listed} <= {state}
        assert (job["id"] in [j["id"] for j in listed]) == (state == "done")
    r = httpx.get(f"{url}/api/jobs", params={"state": "finished"})  # a typo listed no job, as if none were
    assert r.status_code == 400
    assert "unknown state 'finished'; valid: queued, running, done" in r.json()["error"]
    r = httpx.get(f"{url}/api/jobs/{job['id']}/result", params={"timeout": 0})
    assert r.status_code == 400 and "timeout must be in (0, 86400]" in r.json()["error"]
    with httpx.stream("GET", f"{url}/api/jobs/{job['id']}/events", timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [(e["type"], e["state"]) for e in events] == [("status", "done")]


def test_a_subscriber_of_one_job_gets_its_events_only():
    import asyncio

    from velodiff.serve.events import Broker

    async def main():
        broker = Broker()
        mine, every = broker.subscribe("a"), broker.subscribe()
        for job in ("b", "a", "c"):
            broker.publish({"type": "queued", "job": job})
        await asyncio.sleep(0)
        got = [mine.get_nowait()["job"] for _ in range(mine.qsize())]
        return got, [every.get_nowait()["job"] for _ in range(every.qsize())]

    assert asyncio.run(main()) == (["a"], ["b", "a", "c"])


def test_image_names_count_from_one_as_comfyuis_saveimage():
    """prefix_<job>_00001_.png, ..._00002_.png: ComfyUI's SaveImage numbering (its clients read it)."""
    from velodiff.serve.queue import Job
    from velodiff.serve.worker import filenames

    job = Job(1, "0123456789abcdef", "done", {"n": 2}, "k", 2, {"filename_prefix": "out/cats"}, None, 0.0,
              None, None, 1, 1, None)
    assert filenames(job) == ["out_cats_0123456789ab_00001_.png", "out_cats_0123456789ab_00002_.png"]


def test_an_images_settings_come_back_as_a_job_that_makes_it_again(server):
    """POST /api/parameters reads the settings inside an image (A1111's infotext: velodiff's own, A1111's
    in a JPEG's EXIF) and gives them as job fields; a served image's fields, submitted, make it again."""
    import base64

    from velodiff.infotext import format_infotext, save_options

    url, _ = server
    job = run_job(url, prompt="a blue square", negative="a red circle", seed=21, steps=3, grid="trailing",
                  guidance=3.0, solver="euler_ancestral")
    made = httpx.get(f"{url}{job['images'][0]}").content
    r = httpx.post(f"{url}/api/parameters", json={"image": base64.b64encode(made).decode()})
    assert r.status_code == 200, r.text
    q = r.json()["request"]
    assert {k: q[k] for k in ("prompt", "negative", "seed", "steps", "grid", "guidance", "solver")} == {
        "prompt": "a blue square", "negative": "a red circle", "seed": 21, "steps": 3, "grid": "trailing",
        "guidance": 3.0, "solver": "euler_ancestral"}
    again = run_job(url, **q)  # a job body as it is
    assert png(url, again["images"][0]).tobytes() == Image.open(io.BytesIO(made)).tobytes()
    # A1111's own text, in a JPEG: its labels kept for velodiff to read; a picture without settings
    text = format_infotext("a lighthouse", None, {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7,
                                                  "Seed": 5, "Size": "512x768"})
    jpeg, plain = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG", **save_options("JPEG", text))
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    as_url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
    q = httpx.post(f"{url}/api/parameters", json={"image": as_url}).json()["request"]
    assert q == {"prompt": "a lighthouse", "solver": "DPM++ 2M Karras", "steps": 20, "guidance": 7.0,
                 "seed": 5, "width": 512, "height": 768}
    none = httpx.post(f"{url}/api/parameters", json={"image": base64.b64encode(plain.getvalue()).decode()})
    assert none.json() == {"parameters": None, "fields": {}, "request": {}, "not_job_fields": {}}
    bad = httpx.post(f"{url}/api/parameters", json={"image": base64.b64encode(b"not an image").decode()})
    assert bad.status_code == 400 and "not an image file" in bad.json()["error"]


@pytest.mark.parametrize("mode", ["guidance", "collage"])
def test_a_layout_jobs_settings_make_it_again(server, mode):
    """A job with boxes (layout guidance, or a collage) writes its boxes, mode and own plan into its PNG;
    POST /api/parameters gives them back as job fields that make the same image."""
    import base64

    url, _ = server
    job = run_job(url, prompt="a red circle above a blue square", seed=3, steps=2, layout_mode=mode,
                  layout="red circle: 0.1,0.05,0.6,0.45; blue square: 0.3,0.55,0.9,0.95")
    made = httpx.get(f"{url}{job['images'][0]}").content
    q = httpx.post(f"{url}/api/parameters", json={"image": base64.b64encode(made).decode()}).json()["request"]
    assert q["layout"] == "red circle: 0.1,0.05,0.6,0.45; blue square: 0.3,0.55,0.9,0.95"
    assert q.get("layout_mode", "guidance") == mode and q["plan"] == "none"
    again = run_job(url, **q)  # a job body as it is
    assert png(url, again["images"][0]).tobytes() == Image.open(io.BytesIO(made)).tobytes()


def test_parameters_refuses_a_bomb_in_one_line_and_a_jobs_png_holds_no_comfy_graph(server):
    """POST /api/parameters: an image whose header claims 10**10 pixels is a 400 with one line (PIL's
    DecompressionBombError, not a 500); a job of velodiff's API has A1111's parameters in its PNG but no
    ComfyUI ``prompt`` graph (only ComfyUI's API writes one)."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    bomb += chunk(b"IEND", b"")
    url, _ = server
    r = httpx.post(f"{url}/api/parameters", json={"image": base64.b64encode(bomb).decode()})
    assert r.status_code == 400 and "\n" not in r.json()["error"], r.text
    job = run_job(url, prompt="a red circle", seed=2, steps=1)
    info = png(url, job["images"][0]).info
    assert "parameters" in info and "prompt" not in info and "workflow" not in info


def test_a_jobs_noise_mode_draws_its_images_and_is_written_into_them():
    """A job's noise mode draws what text2img draws with it, is another batch, and is written as
    velodiff's Noise and A1111's RNG; an unknown one is one line."""
    from types import SimpleNamespace

    from serve_fixtures import engine
    from velodiff.errors import VelodiffError
    from velodiff.infotext import PNG_KEY, parse_infotext
    from velodiff.pipelines import text2img
    from velodiff.serve.engine import Request, batch_key

    eng = engine()
    m, _ = eng.model(None)
    base = dict(prompt="a red circle", steps=2, seed=3, n=2, solver="euler_ancestral")
    p = eng.check(Request(**base, noise="a1111-nv"))
    assert batch_key(p) != batch_key(eng.check(Request(**base)))
    images = eng.run([SimpleNamespace(params=p)])[0]
    want = text2img(m, [p["prompt"]] * 2, seeds=[3, 4], steps=2, solver=p["solver"], grid=p["grid"],
                    guidance=p["guidance"], noise="a1111-nv").images
    assert [a.tobytes() for a in images] == [b.tobytes() for b in want]
    fields = parse_infotext(images[1].info[PNG_KEY])
    assert (fields["Noise"], fields["RNG"], fields["Seed"]) == ("a1111-nv", "NV", "4")
    own = eng.run([SimpleNamespace(params=eng.check(Request(**base)))])[0]
    assert own[0].tobytes() != images[0].tobytes() and "RNG" not in parse_infotext(own[0].info[PNG_KEY])
    # torch: one generator for the job's images (ComfyUI's starting noise), so the job runs alone and its
    # files name the call (its seed and n)
    p = eng.check(Request(**base, noise="torch"))
    assert batch_key(p).startswith("alone:") and batch_key(p) != batch_key(p)
    images = eng.run([SimpleNamespace(params=p)])[0]
    want = text2img(m, [p["prompt"]] * 2, seeds=[3, 4], steps=2, solver=p["solver"], grid=p["grid"],
                    guidance=p["guidance"], noise="torch").images
    assert [a.tobytes() for a in images] == [b.tobytes() for b in want]
    fields = parse_infotext(images[1].info[PNG_KEY])
    assert (fields["Noise"], fields["Seed"], fields["Batch size"]) == ("torch", "3", "2")
    with pytest.raises(VelodiffError, match="noise mode 'numpy'"):
        eng.check(Request(**base, noise="numpy"))


def test_an_a1111_images_noise_comes_back_as_a_job_field(server):
    """POST /api/parameters: an A1111 text's noise source (its GPU default, as an NVIDIA card draws it) and
    a velodiff file's noise mode are job fields."""
    import base64

    from velodiff.infotext import format_infotext, save_options

    url, _ = server
    fields = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 5, "Size": "64x64"}
    for extra, job, rest in (({"Version": "v1.10.1"}, {"noise": "a1111-nv"}, {}),
                             ({"RNG": "CPU"}, {"noise": "a1111-cpu"}, {}),
                             ({"Noise": "torch"}, {"noise": "torch"}, {})):
        made = io.BytesIO()
        Image.new("RGB", (8, 8)).save(made, format="PNG",
                                      **save_options("PNG", format_infotext("a cat", None, fields | extra)))
        r = httpx.post(f"{url}/api/parameters", json={"image": base64.b64encode(made.getvalue()).decode()})
        got = r.json()
        assert (got["request"].get("noise"), got["not_job_fields"]) == (job.get("noise"), rest), extra


def test_an_a1111_images_ensd_is_among_the_fields_a_job_cannot_take(server):
    """POST /api/parameters: A1111's ENSD (its step noise re-seeded at seed + ENSD), which velodiff does not
    draw, is named among not_job_fields beside the job it gives."""
    import base64

    from velodiff.infotext import format_infotext, save_options

    url, _ = server
    text = format_infotext("a cat", None, {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 5,
                                           "Size": "64x64", "ENSD": 31337})
    made = io.BytesIO()
    Image.new("RGB", (8, 8)).save(made, format="PNG", **save_options("PNG", text))
    body = {"image": base64.b64encode(made.getvalue()).decode()}
    got = httpx.post(f"{url}/api/parameters", json=body).json()
    assert got["not_job_fields"] == {"ENSD": "31337"} and got["request"]["seed"] == 5


def test_options_list_what_a_job_may_name_and_each_runs(server):
    """GET /api/options (the page's pickers): every grid it lists runs, the model's calibrated grid
    among them (the shipped model carries a calibration)."""
    url, _ = server
    opts = httpx.get(f"{url}/api/options", timeout=30).json()
    assert "calibrated" in opts["grids"] and "karras" in opts["grids"] and "dpmpp_2m" in opts["solvers"]
    job = run_job(url, prompt="a red circle", steps=6, solver="unipc", grid="calibrated", guidance=2.5)
    assert job["state"] == "done", job



def test_review32_serve_closes_its_socket_when_start_up_fails_and_says_the_port_it_got(tmp_path, monkeypatch,
                                                                                      capsys):
    """review32: the socket bound before the model loads is closed when the start-up fails after it (a
    store another server holds), not left bound for the process's life; with --port 0 the banner names
    the port the system chose, and uvicorn serves on that socket."""
    import uvicorn

    import velodiff.commands.serve as serve_cmd
    import velodiff.serve.state as state
    from velodiff.cli import main
    from velodiff.serve.queue import JobStore

    bound, made, served = [], [], []
    listen = serve_cmd._listen
    monkeypatch.setattr(serve_cmd, "_listen", lambda *a: bound.append(listen(*a)) or bound[-1])

    class Recorded(state.Server):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(state, "Server", Recorded)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(sockets))

    def serve(db):
        try:
            return main(["serve", "--db", str(db), "--port", "0"])
        except SystemExit as e:
            return int(e.code or 0)

    held = JobStore(tmp_path / "held.sqlite")
    try:
        held.own()
        assert serve(tmp_path / "held.sqlite") == 2
    finally:
        held.close()
    assert len(bound) == 1 and bound[0].fileno() == -1  # closed, not waiting for the collector
    capsys.readouterr()
    try:
        assert serve(tmp_path / "free.sqlite") == 0
        port = bound[1].getsockname()[1]
        assert port > 0 and served == [[bound[1]]]
        assert f"on http://127.0.0.1:{port}/ " in capsys.readouterr().err
    finally:
        bound[1].close()
        for server in made:
            server.store.close()


def test_the_port_is_held_from_before_the_model_loads():
    """A second server on a port the first has bound (still loading its model) is refused in one line,
    not by uvicorn's log once it loaded (the first socket listens from the start); ``localhost`` binds
    as uvicorn binds it, IPv4, wherever a resolver lists ::1 first."""
    from velodiff.commands.serve import _listen
    from velodiff.errors import VelodiffError

    first = _listen("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(VelodiffError, match=f"^cannot listen on 127.0.0.1:{port} "):
            _listen("127.0.0.1", port)
    finally:
        first.close()
    local = _listen("localhost", 0)
    try:
        assert local.family == socket.AF_INET
    finally:
        local.close()
