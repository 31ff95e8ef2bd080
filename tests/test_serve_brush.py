"""Region brushes through ``POST /api/brush``: a layer repaints its mask and leaves the rest of the
job's image as it was (latents exact outside the mask; pixels far from it unchanged), a new stroke on
top re-renders only itself at a fraction of the steps, and bad input is a one-line 4xx."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve_fixtures import running_server

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("brush"), max_batch=1) as (url, _):
        yield url


def mask_png(box: tuple[int, int, int, int]) -> str:
    m = np.zeros((64, 64), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    buf = io.BytesIO()
    Image.fromarray(m, "L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode(data_url: str) -> np.ndarray:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float32) / 255


def test_layers_repaint_their_mask_and_restack_at_a_fraction_of_the_steps(server):
    job = httpx.post(f"{server}/api/jobs", json={"prompt": "a red circle", "seed": 4, "steps": 10}).json()
    done = httpx.get(f"{server}/api/jobs/{job['id']}/result", timeout=120).json()
    assert done["state"] == "done"
    base = np.asarray(Image.open(io.BytesIO(httpx.get(server + done["images"][0]).content)).convert("RGB"))
    base = base.astype(np.float32) / 255
    left = {"mask": mask_png((0, 0, 32, 64)), "prompt": "a blue square", "seed": 1, "strength": 0.6}
    r = httpx.post(f"{server}/api/brush", json={"job": job["id"], "layers": []}, timeout=120).json()
    assert np.abs(decode(r["image"]) - base).max() <= 1 / 255 + 1e-6  # no layer: the job's image
    assert r["base_nfe"] == 10 and r["nfe"] == 0  # the base trajectory, cached from now on
    r = httpx.post(f"{server}/api/brush", json={"job": job["id"], "layers": [left]}, timeout=120).json()
    edited = decode(r["image"])
    assert r["layers"] == 1 and r["rendered"] == 1 and r["base_nfe"] == 0 and 0 < r["nfe"] <= 0.6 * 10 + 1
    assert np.abs(edited[:, 40:] - base[:, 40:]).max() < 0.05  # right of the mask (and its VAE halo): kept
    assert np.abs(edited[:, :32] - base[:, :32]).mean() > 0.01  # inside: repainted
    top = {"mask": mask_png((40, 0, 64, 20)), "prompt": "a green triangle", "seed": 2, "strength": 0.3}
    r2 = httpx.post(f"{server}/api/brush", json={"job": job["id"], "layers": [left, top]}, timeout=120).json()
    assert r2["layers"] == 2 and r2["rendered"] == 1 and r2["nfe"] < r["nfe"]  # only the new layer ran


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"job": "nope", "layers": []}, 404, "no job 'nope'"),  # its closing quote kept
        ({"job": "JOB", "layers": [{"mask": mask_png((0, 0, 0, 0)), "prompt": "x"}]}, 400, "covers nothing"),
        ({"job": "JOB", "layers": [{"mask": "bm90IGEgcG5n", "prompt": "x"}]}, 400, "not an image"),
        (
            {"job": "JOB", "layers": [{"mask": mask_png((0, 0, 8, 8)), "prompt": "x", "strength": 2}]},
            400,
            "strength",
        ),
        ({"job": "JOB", "index": 3, "layers": []}, 400, "has images 0..0"),
        *(
            ({"job": "JOB", "layers": [{"mask": mask_png((0, 0, 8, 8)), "prompt": "x", "seed": seed}]},
             400, "seed")
            for seed in (-(2**63) - 1, 2**64)
        ),
    ],
)
def test_bad_input_is_one_line(server, body, status, needle):
    job = httpx.post(f"{server}/api/jobs", json={"prompt": "a red circle", "seed": 5, "steps": 4}).json()
    httpx.get(f"{server}/api/jobs/{job['id']}/result", timeout=120)
    body = {**body, "job": job["id"] if body["job"] == "JOB" else body["job"]}
    r = httpx.post(f"{server}/api/brush", json=body, timeout=120)
    assert r.status_code == status and needle in r.json()["error"] and "\n" not in r.json()["error"]
    ok = httpx.post(f"{server}/api/brush", json={"job": job["id"], "layers": []}, timeout=120)
    assert ok.status_code == 200  # the canvas is usable after the refusal


def test_a_layout_job_is_refused_in_one_line(server):
    """A layout job's image is not the plain generation a brush canvas re-runs: refused."""
    body = {"prompt": "two red circles", "layout_mode": "collage", "seed": 5, "steps": 4}
    job = httpx.post(f"{server}/api/jobs", json=body).json()
    httpx.get(f"{server}/api/jobs/{job['id']}/result", timeout=120)
    r = httpx.post(f"{server}/api/brush", json={"job": job["id"], "layers": []}, timeout=120)
    assert r.status_code == 400 and "drawn with a layout (collage)" in r.json()["error"]


def test_the_canvas_of_a_job_with_solver_options_is_its_image(tmp_path):
    """A job whose sampler carries options (ComfyUI's rows: uni_pc, deis, ...): the brush canvas re-runs
    the base with them, so no layer gives the job's own image (it drew another picture without them)."""
    from velodiff.serve.engine import Request

    with running_server(tmp_path, max_batch=1) as (url, srv):
        job = srv.submit_sync(Request(prompt="a red circle", seed=4, steps=6, solver="unipc",
                                      solver_options={"solver_type": "bh1", "lower_order_final": False}))
        done = httpx.get(f"{url}/api/jobs/{job.id}/result", timeout=120).json()
        stored = np.asarray(Image.open(io.BytesIO(httpx.get(url + done["images"][0]).content)).convert("RGB"))
        r = httpx.post(f"{url}/api/brush", json={"job": job.id, "layers": []}, timeout=120).json()
        assert np.abs(decode(r["image"]) - stored.astype(np.float32) / 255).max() <= 1 / 255 + 1e-6



def test_the_canvas_of_image_i_is_that_image(server):
    """Image i of a job of n is seed + i's: the brush canvas of index 1 with no layer is the job's image 1."""
    body = {"prompt": "a red circle", "seed": 4, "steps": 4, "n": 2}
    job = httpx.post(f"{server}/api/jobs", json=body).json()
    done = httpx.get(f"{server}/api/jobs/{job['id']}/result", timeout=120).json()
    stored = [np.asarray(Image.open(io.BytesIO(httpx.get(server + p).content)).convert("RGB"), np.float32)
              for p in done["images"]]
    body = {"job": job["id"], "index": 1, "layers": []}
    r = httpx.post(f"{server}/api/brush", json=body, timeout=120).json()
    assert np.abs(decode(r["image"]) - stored[1] / 255).max() <= 1 / 255 + 1e-6
    assert np.abs(stored[1] - stored[0]).max() > 10


def test_the_canvas_being_painted_is_the_last_one_dropped(monkeypatch):
    """Beyond CANVASES the least recently painted canvas goes: one painted again is kept (with its cached
    trajectories), however early it was opened."""
    from types import SimpleNamespace

    from velodiff.edit import brushes as brushes_module
    from velodiff.serve import brush_api

    class Canvas:
        def __init__(self, model, prompt, seed, **options):
            self.seed = seed

    params = dict(n=1, model="m", height=64, width=64, prompt="p", seed=0, steps=4, layout=None)
    srv = SimpleNamespace(
        store=SimpleNamespace(get=lambda job_id: SimpleNamespace(state="done", params=params)),
        engine=SimpleNamespace(model=lambda name: (SimpleNamespace(default_size=(64, 64)), {})),
    )
    monkeypatch.setattr(brushes_module, "Canvas", Canvas)
    monkeypatch.setattr(brush_api, "CANVASES", 2)
    b = brush_api.Brushes(srv)
    first = b.canvas("a", 0)
    b.canvas("b", 0)
    assert b.canvas("a", 0) is first
    b.canvas("c", 0)
    assert list(b.canvases) == [("a", 0), ("c", 0)] and b.canvas("a", 0) is first
