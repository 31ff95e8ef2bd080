"""OpenAI-compatible ``POST /v1/images/generations``, so the official ``openai`` client works unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8188/v1", api_key="unused")
    r = client.images.generate(model="default", prompt="a red circle", n=2, size="64x64",
                               response_format="b64_json", extra_body={"seed": 1, "steps": 8})

``model`` names a served or shipped model; ``size`` is ``WxH`` (or ``auto``: the model's own); the answer
is ``{"created", "data": [{"b64_json"} | {"url"}]}``. velodiff's own fields ride along as extras (the
client's ``extra_body``): seed, steps, solver, grid, guidance, negative_prompt, plan. OpenAI's options that
have no meaning here (quality, style, user, background, moderation) are accepted and ignored. Errors come
in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; a full queue is a 429.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import VelodiffError
from .engine import Request as GenRequest
from .state import Server

router = APIRouter(prefix="/v1", tags=["openai"])


class ImagesGenerate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as declared: "2" is not 2

    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "url"
    output_format: str | None = None
    # OpenAI's options with no meaning for velodiff: accepted, ignored
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    # velodiff's extras
    seed: int | None = None
    steps: int | None = None
    solver: str | None = None
    grid: str | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    plan: str | None = Field(None, description="a velodiff step plan")
    layout: str | None = Field(None, description="object boxes (velodiff's jobs API's layout)")
    layout_mode: str = Field("guidance", description="guidance or collage (velodiff's jobs API's)")
    noise: str = Field("velodiff", description="velodiff, torch, cuda, a1111-cpu or a1111-nv (jobs API)")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "", "auto"):
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise VelodiffError(f"size {size!r} is not WIDTHxHEIGHT, e.g. 64x64")
    return int(w), int(h)


@router.post("/images/generations", summary="OpenAI-compatible image generation")
async def generations(body: ImagesGenerate, request: Request) -> dict[str, Any]:
    srv: Server = request.app.state.velodiff
    if body.response_format not in (None, "url", "b64_json"):
        raise VelodiffError(f"response_format {body.response_format!r}: use b64_json or url")
    if body.output_format not in (None, "png"):
        raise VelodiffError(f"output_format {body.output_format!r}: this server writes png")
    w, h = parse_size(body.size)
    req = GenRequest(
        prompt=body.prompt,
        model=body.model,
        n=1 if body.n is None else body.n,
        width=w,
        height=h,
        seed=body.seed,
        steps=body.steps,
        solver=body.solver,
        grid=body.grid,
        guidance=body.guidance,
        negative=body.negative_prompt,
        plan=body.plan,
        layout=body.layout,
        layout_mode=body.layout_mode,
        noise=body.noise,
    )
    job = await srv.submit(req, meta={"api": "openai"})
    job = await srv.wait(job.id)
    if job.state != "done":  # the job ran out its attempts (or was cancelled): OpenAI's clients retry a 5xx
        # or 409 twice by default, which would run it again; their non-standard header says not to
        raise HTTPException(
            500 if job.state == "failed" else 409,
            f"job {job.id} {job.state}: {job.error}",
            headers={"x-should-retry": "false"},
        )
    data: list[dict[str, Any]] = []
    for i in range(len(job.filenames)):
        if body.response_format == "b64_json":
            png = await run_in_threadpool(srv.store.image, job.id, i)
            assert png is not None
            data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": None})
        else:
            data.append({"url": f"{str(request.base_url).rstrip('/')}/api/jobs/{job.id}/images/{i}.png"})
    return {"created": int(time.time()), "data": data}


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = {429: "rate_limit_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
