"""velodiff's own JSON API: jobs (submit, status, progress over server-sent events, cancel, images) and
what the page needs to fill its pickers (models, solvers, grids, plan rules). Documented at ``/docs``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import VelodiffError
from .engine import Request as GenRequest
from .events import FINAL_EVENTS
from .queue import ACTIVE, FINAL, Job
from .state import Server

router = APIRouter(prefix="/api", tags=["jobs"])


class JobBody(BaseModel):
    """A text-to-image job. Omitted fields take the model's defaults; ``seed`` omitted draws one (kept
    with the job, so a rerun gives the same images)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as declared: "2" is not 2

    prompt: str = Field(..., description="what to draw")
    model: str | None = Field(None, description="a served or shipped model name (default: the served one)")
    negative: str | None = Field(None, description="negative prompt")
    width: int | None = Field(None, description="pixels, a multiple of the model's latent factor")
    height: int | None = None
    n: int = Field(1, description="number of images (seeds seed .. seed+n-1)")
    seed: int | None = None
    steps: int | None = None
    solver: str | None = Field(None, description="a velodiff solver name (GET /api/options)")
    grid: str | None = Field(None, description="a time-grid name")
    guidance: float | None = Field(None, description="classifier-free guidance scale")
    plan: str | None = Field(None, description="a velodiff step plan, e.g. ag:threshold=0.99")
    layout: str | None = Field(
        None,
        description="object boxes, 'red circle: 0.1,0.1,0.45,0.45; blue square: 0.55,0.5,0.95,0.95' "
        "(fractions x0,y0,x1,y1, y down; words given again: one box per object of a counted group)",
    )
    layout_mode: str = Field(
        "guidance",
        description="guidance (layout guidance steers each object's attention into its boxes) or collage "
        "(each object drawn alone, pasted into its box, harmonised by SDEdit; without layout the boxes "
        "come from the prompt's relation, counts and lists; one job at a time)",
    )
    noise: str = Field(
        "velodiff",
        description="velodiff (each image's noise from its seed, the same on every device), torch (one CPU "
        "generator for the job's images, as ComfyUI and diffusers: the job runs alone), cuda (the same as an "
        "NVIDIA GPU draws it), a1111-cpu (A1111's "
        "'RNG: CPU', diffusers with a CPU generator per image) or a1111-nv (what an NVIDIA GPU draws: "
        "A1111's default)",
    )
    timeout_s: float | None = Field(
        None, description="fail the job if it runs longer (at most, and by default, the server's --timeout)"
    )
    preview: bool = Field(False, description="send a preview image with each progress event")


def server(request: Request) -> Server:
    return request.app.state.velodiff


def job_json(job: Job, srv: Server) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": job.id,
        "number": job.seq,
        "state": job.state,
        "params": job.params,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "attempts": job.attempts,
        "completions": job.completions,
        "runner": job.runner,
        "error": job.error,
        "images": [f"/api/jobs/{job.id}/images/{i}.png" for i in range(len(job.filenames))],
        "filenames": job.filenames,
    }
    if job.state == "running" and job.id in srv.broker.progress:
        p = srv.broker.progress[job.id]
        d["progress"] = {"step": p["step"], "steps": p["steps"]}
    return d


async def get_job(srv: Server, job_id: str) -> Job:
    job = await run_in_threadpool(srv.store.get, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


@router.post("/jobs", status_code=202, summary="Submit a job (persisted before this answers)")
async def submit(body: JobBody, request: Request) -> dict[str, Any]:
    srv = server(request)
    job = await srv.submit(GenRequest(**body.model_dump()))
    return job_json(job, srv)


@router.get("/jobs", summary="List jobs (newest 200), optionally of one state")
async def list_jobs(request: Request, state: str | None = None) -> list[dict[str, Any]]:
    srv = server(request)
    if state is not None and state not in ACTIVE + FINAL:  # a typo listed every job as none
        raise HTTPException(400, f"unknown state {state!r}; valid: {', '.join(ACTIVE + FINAL)}")
    states = (state,) if state else ACTIVE + FINAL
    return [job_json(j, srv) for j in await run_in_threadpool(srv.store.jobs, states)]


@router.get("/jobs/{job_id}", summary="A job's state, parameters, progress and image URLs")
async def status(job_id: str, request: Request) -> dict[str, Any]:
    srv = server(request)
    return job_json(await get_job(srv, job_id), srv)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a queued or running job (frees its slot)")
async def cancel(job_id: str, request: Request) -> dict[str, Any]:
    srv = server(request)
    await get_job(srv, job_id)
    await run_in_threadpool(srv.worker.cancel, job_id)
    return job_json(await get_job(srv, job_id), srv)


@router.delete("/jobs/{job_id}", summary="Cancel a job (as POST /cancel)")
async def delete(job_id: str, request: Request) -> dict[str, Any]:
    return await cancel(job_id, request)


@router.get("/jobs/{job_id}/result", summary="Wait for the job to finish; its final state")
async def result(job_id: str, request: Request, timeout: float = 600) -> dict[str, Any]:
    srv = server(request)
    if not 0 < timeout <= 86_400:  # a wait, in seconds (a day at most)
        raise VelodiffError(f"timeout must be in (0, 86400] seconds, got {timeout:g}")
    await get_job(srv, job_id)
    try:
        job = await srv.wait(job_id, timeout)
    except asyncio.TimeoutError:
        raise HTTPException(504, f"job {job_id} did not finish within {timeout:g} s") from None
    return job_json(job, srv)


@router.get("/jobs/{job_id}/images/{idx}.png", summary="One image of a finished job")
async def image(job_id: str, idx: int, request: Request) -> Response:
    png = await run_in_threadpool(server(request).store.image, job_id, idx)
    if png is None:
        raise HTTPException(404, f"job {job_id!r} has no image {idx}")
    return Response(png, media_type="image/png")


@router.get("/jobs/{job_id}/events", summary="Progress as server-sent events (JSON per event)")
async def events(job_id: str, request: Request) -> StreamingResponse:
    srv = server(request)
    await get_job(srv, job_id)

    async def stream():  # noqa: ANN202
        q = srv.broker.subscribe(job_id)
        try:
            job = await get_job(srv, job_id)  # after subscribing: nothing published later is missed
            yield f"data: {json.dumps({'type': 'status', **job_json(job, srv)})}\n\n"
            if job.state in FINAL_EVENTS:
                return
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), 1.0)
                except asyncio.TimeoutError:  # another process may run it (Ray Serve replicas)
                    job = await get_job(srv, job_id)
                    if job.state not in FINAL_EVENTS:
                        yield ": keep-alive\n\n"
                        continue
                    ev = {"type": job.state, "job": job_id}
                if ev["type"] in FINAL_EVENTS:
                    job = await get_job(srv, job_id)
                    ev = {**ev, **job_json(job, srv), "type": ev["type"]}
                yield f"data: {json.dumps(ev)}\n\n"
                if ev["type"] in FINAL_EVENTS:
                    return
        finally:
            srv.broker.unsubscribe(q)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/options", summary="Models, solvers, grids and plan rules the server accepts")
async def options(request: Request) -> dict[str, Any]:
    from ..grids import GRIDS
    from ..plan import rule_table
    from ..solvers import SOLVERS

    srv = server(request)
    m, defaults = srv.engine.model(None)
    return {
        "models": srv.engine.names(),
        "solvers": list(SOLVERS),
        "grids": [*GRIDS, "calibrated"],  # (the model's fitted grid: a model without one is a 4xx line)
        "plans": [{"name": r["name"], "summary": r["summary"], "cost": r["cost"]} for r in rule_table()],
        "defaults": {
            "width": m.default_size[1],
            "height": m.default_size[0],
            "steps": defaults.get("steps", m.default_steps),
            "solver": defaults.get("solver", m.default_solver),
            "guidance": defaults.get("guidance", m.default_guidance),
        },
        "max_n": srv.engine.max_n,
        "latent_factor": m.size_factor,
    }


class ParametersBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(..., description="an image file (PNG, JPEG, WebP) as a data URL or base64")


@router.post("/parameters", summary="The generation settings inside an image, as a job's fields")
async def parameters(body: ParametersBody) -> dict[str, Any]:
    """An image's A1111 infotext (what velodiff, A1111 and most UIs write into their images): the text,
    its fields, the job they make (``request``, a body for POST /api/jobs: prompt, negative, steps,
    solver, grid, guidance, seed, n, width, height, plan, model, layout, layout_mode) and the settings a
    job cannot take (``not_job_fields``: e.g. an img2img strength, A1111's ENSD or variation seed, which
    change its noise and velodiff does not draw). An image without one answers ``parameters: null``."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ..images import data_url_bytes
    from ..infotext import generation_request, image_infotext, not_drawn, parse_infotext

    try:
        image = Image.open(io.BytesIO(data_url_bytes(body.image)))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise VelodiffError("the image is not an image file PIL can read (PNG, JPEG, WebP)") from None
    text = image_infotext(image)
    fields = parse_infotext(text) if text else {}
    asked = generation_request(fields)
    job = {k: v for k, v in asked.items() if k in JobBody.model_fields}
    rest = {k: v for k, v in asked.items() if k not in job} | not_drawn(fields)
    return {"parameters": text, "fields": fields, "request": job, "not_job_fields": rest}


@router.get("/health", summary="Queue depth and the worker's batches")
async def health(request: Request) -> dict[str, Any]:
    srv = server(request)
    return {
        "ok": srv.worker.store_error is None,
        "store_error": srv.worker.store_error,  # why the worker cannot record jobs now (a full disk)
        "model": srv.engine.served,
        "active": await run_in_threadpool(srv.store.count),
        "max_queue": srv.store.max_queue,
        "max_batch": srv.worker.max_batch,
        "recovered": srv.recovered,
        "batches": list(srv.worker.batches),
    }
