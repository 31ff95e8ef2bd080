"""ComfyUI's HTTP + websocket API for the default text-to-image graph, so a ComfyUI API client script
(``script_examples/websockets_api_example.py``) runs against velodiff unchanged.

The graph (API format: ``{node_id: {"class_type", "inputs"}}``) must be ComfyUI's default workflow:
``CheckpointLoaderSimple -> CLIPTextEncode (x2) -> EmptyLatentImage -> KSampler -> VAEDecode ->
SaveImage``. It becomes one velodiff job (prompt id = job id). Any other node, or a value velodiff cannot
honour, is refused with ComfyUI's ``{"error", "node_errors"}`` shape (HTTP 400).

Routes: ``POST /prompt``, ``GET /prompt``, ``GET /queue``, ``POST /queue`` (clear / delete),
``GET /history[/{id}]``, ``GET /view``, ``POST /interrupt``, ``GET /object_info``, ``GET /system_stats``,
and the websocket ``/ws?clientId=`` with ``status``, ``execution_start``, ``executing``, ``progress``,
``executed``, ``execution_success`` / ``execution_error`` / ``execution_interrupted`` messages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..errors import VelodiffError
from .engine import Request as GenRequest
from .events import FINAL_EVENTS
from .queue import Job, QueueFull
from .state import Server

router = APIRouter(tags=["comfyui"])

#: paths whose errors take ComfyUI's shape (also under /api/, where ComfyUI's own frontend calls them)
PATHS = tuple(f"{prefix}{p}" for prefix in ("", "/api") for p in ("/prompt", "/queue", "/interrupt", "/view"))

SUPPORTED = (
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "SaveImage",
)


def comfy_sampling(sampler_name: str, scheduler: str) -> tuple[str, dict[str, Any], str]:
    """ComfyUI's KSampler ``sampler_name`` and ``scheduler`` as (velodiff solver, its options, grid name)
    from velodiff's alias table's ComfyUI rows (``velodiff.aliases``: each maps to the velodiff solver,
    grid and options that reproduce it; the row, not velodiff's own solver of the same name, so ComfyUI's
    ``deis`` or ``dpmpp_2m`` run as ComfyUI runs them); a KeyError names what has no counterpart."""
    from ..aliases import SAMPLER, SCHEDULER, find

    def comfy(a: Any) -> bool:
        return a is not None and a.name in comfy_names(a.kind)

    for kind, name, label in ((SAMPLER, sampler_name, "sampler_name"), (SCHEDULER, scheduler, "scheduler")):
        if not comfy(find(name, kind)):
            raise KeyError((label, name, comfy_names(kind)))
    row = find(sampler_name, SAMPLER)
    return row.solver, dict(row.solver_options), scheduler


def comfy_names(kind: str) -> list[str]:
    """ComfyUI's KSampler names of ``kind`` (sampler / scheduler) velodiff runs: the alias table's
    ComfyUI rows (not gits: velodiff's is the model's own calibrated grid, not ComfyUI's table)."""
    from ..aliases import COMFY, KD_COMFY, table

    return sorted(a.name for a in table(kind) if a.source in (COMFY, KD_COMFY) and a.grid != "calibrated")


class ComfyRefusal(Exception):
    """A graph refused, with ComfyUI's answer body."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


def error_body(message: str, kind: str = "invalid_prompt", details: str = "") -> dict[str, Any]:
    return {
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    }


class Graph:
    """Reads the default text-to-image graph, collecting ComfyUI-style errors per node."""

    def __init__(self, graph: dict[str, Any]) -> None:
        self.graph = graph
        self.errors: dict[str, list[dict[str, Any]]] = {}
        self.outputs = [
            k for k, v in graph.items() if isinstance(v, dict) and v.get("class_type") == "SaveImage"
        ]

    def error(self, node: str, kind: str, message: str, details: str) -> None:
        self.errors.setdefault(node, []).append(
            {"type": kind, "message": message, "details": details, "extra_info": {}}
        )

    def node(self, link: Any, want: str, at: str, name: str) -> tuple[str, dict[str, Any]] | None:
        """The node ``link`` ([node_id, slot]) points to, if it is a ``want``."""
        if not (isinstance(link, list) and len(link) == 2 and str(link[0]) in self.graph):
            self.error(
                at, "required_input_missing", "Required input is missing", f"{name}: not linked to a node"
            )
            return None
        nid = str(link[0])
        node = self.graph[nid]
        if node.get("class_type") != want:
            self.error(
                at,
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}: needs a {want}, got {node.get('class_type')}",
            )
            return None
        return nid, node.get("inputs", {})

    def value(self, nid: str, inputs: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
        v = inputs.get(name, default)
        if v is None:
            self.error(nid, "required_input_missing", "Required input is missing", name)
            return None
        if isinstance(v, list):
            self.error(
                nid,
                "exception_during_inner_validation",
                "Linked inputs are not supported here",
                f"{name}: give a value, not a link (only the default text-to-image graph runs)",
            )
            return None
        try:
            return kind(v)
        except (TypeError, ValueError):
            self.error(nid, "invalid_input_type", "Failed to convert an input value", f"{name}: {v!r}")
            return None


def read_graph(graph: Any, models: list[str]) -> tuple[GenRequest, dict[str, Any]]:
    """The velodiff request and job meta of a ComfyUI API graph, or ComfyRefusal."""
    if not isinstance(graph, dict) or not graph:
        raise ComfyRefusal(error_body("the prompt must be a graph: {node_id: {class_type, inputs}}"))
    g = Graph(graph)
    for nid, node in graph.items():
        ct = node.get("class_type") if isinstance(node, dict) else None
        if ct not in SUPPORTED:
            g.error(
                nid,
                "node_not_supported",
                f"Node type {ct!r} is not supported by velodiff serve",
                f"supported: {', '.join(SUPPORTED)}",
            )
        elif not isinstance(node.get("inputs", {}), dict):
            g.error(nid, "invalid_prompt", "A node's inputs must be an object", "inputs: {name: value}")
    if g.errors:  # a node velodiff cannot read (PreviewImage, inputs that are not an object): named
        raise ComfyRefusal(refusal(graph, g, g.outputs[:1]))
    if not g.outputs:
        raise ComfyRefusal(error_body("Prompt has no outputs", "prompt_no_outputs"))
    if len(g.outputs) > 1:
        for nid in g.outputs[1:]:
            g.error(nid, "node_not_supported", "Only one SaveImage output per prompt is supported", "")
    save = g.outputs[0]
    sin = graph[save].get("inputs", {})
    prefix = sin.get("filename_prefix", "ComfyUI")
    req = None
    dec = g.node(sin.get("images"), "VAEDecode", save, "images")
    ks = dec and g.node(dec[1].get("samples"), "KSampler", dec[0], "samples")
    if ks:
        kid, k = ks
        pos = g.node(k.get("positive"), "CLIPTextEncode", kid, "positive")
        neg = g.node(k.get("negative"), "CLIPTextEncode", kid, "negative")
        lat = g.node(k.get("latent_image"), "EmptyLatentImage", kid, "latent_image")
        ck = g.node(k.get("model"), "CheckpointLoaderSimple", kid, "model")
        seed = g.value(kid, k, "seed", int)
        steps = g.value(kid, k, "steps", int)
        cfg = g.value(kid, k, "cfg", float)
        sampler = g.value(kid, k, "sampler_name", str)
        sched = g.value(kid, k, "scheduler", str)
        denoise = g.value(kid, k, "denoise", float, 1.0)
        if denoise is not None and denoise != 1.0:
            g.error(
                kid, "value_not_supported", "denoise < 1 is not supported", f"denoise: {denoise} (use 1.0)"
            )
        solver = grid = options = None
        if sampler is not None and sched is not None:
            try:
                solver, options, grid = comfy_sampling(sampler, sched)
            except KeyError as e:
                name, v, valid = e.args[0]
                g.error(kid, "value_not_in_list", "Value not in list", f"{name}: {v!r} not in {valid}")
        text = pos and g.value(pos[0], pos[1], "text", str)
        negative = neg and g.value(neg[0], neg[1], "text", str)
        w = lat and g.value(lat[0], lat[1], "width", int)
        h = lat and g.value(lat[0], lat[1], "height", int)
        n = lat and g.value(lat[0], lat[1], "batch_size", int, 1)
        model = None
        if ck:
            ckpt = g.value(ck[0], ck[1], "ckpt_name", str)
            if ckpt is not None:  # as /object_info lists it, its file name, or a name with ComfyUI's suffix
                by_name = {**{Path(m).name: m for m in models}, **{m: m for m in models}}
                model = by_name.get(ckpt, by_name.get(ckpt.removesuffix(".safetensors"), ckpt))
                if model not in models:
                    g.error(
                        ck[0],
                        "value_not_in_list",
                        "Value not in list",
                        f"ckpt_name: {ckpt!r} not in {models}",
                    )
        if not g.errors:
            req = GenRequest(
                prompt=text or "",
                model=model,
                negative=negative or None,
                width=w,
                height=h,
                n=n or 1,
                seed=seed,
                steps=steps,
                solver=solver,
                solver_options=options or None,
                grid=grid,
                guidance=cfg,
                noise="torch",  # ComfyUI's starting noise: one CPU generator seeded by the KSampler's seed
            )
    if g.errors or req is None:
        raise ComfyRefusal(refusal(graph, g, [save]))
    meta = {
        "api": "comfy",
        "prompt": graph,
        "save_node": save,
        "sampler_node": ks[0] if ks else None,
        "filename_prefix": prefix,
    }
    return req, meta


def refusal(graph: dict[str, Any], g: Graph, outputs: list[str]) -> dict[str, Any]:
    """ComfyUI's answer to a graph that failed validation: the errors per node."""
    body = error_body("Prompt outputs failed validation", "prompt_outputs_failed_validation")
    body["node_errors"] = {
        nid: {
            "errors": errs,
            "dependent_outputs": outputs,
            "class_type": graph[nid].get("class_type") if isinstance(graph[nid], dict) else None,
        }
        for nid, errs in g.errors.items()
    }
    body["error"]["details"] = "; ".join(
        f"#{n} {e['message']}: {e['details']}" for n, es in g.errors.items() for e in es
    )
    return body


def comfy(jobs: list[Job]) -> list[Job]:
    """The jobs queued through this API (the jobs and OpenAI APIs' are not ComfyUI prompts)."""
    return [j for j in jobs if j.meta.get("api") == "comfy"]


def server(request: Request | WebSocket) -> Server:
    return request.app.state.velodiff


@router.post("/prompt", summary="Queue a ComfyUI API graph (default text-to-image workflow)")
async def post_prompt(request: Request) -> dict[str, Any]:
    srv = server(request)
    try:
        body = await request.json()
    except ValueError as e:
        raise ComfyRefusal(error_body(f"malformed JSON: {e}")) from None
    if not isinstance(body, dict) or "prompt" not in body:
        raise ComfyRefusal(error_body("no prompt provided", "no_prompt"))
    req, meta = read_graph(body["prompt"], srv.engine.names())
    meta["client_id"] = body.get("client_id")
    meta["extra_data"] = body.get("extra_data", {})
    try:
        job = await srv.submit(req, meta)
    except VelodiffError as e:
        nid = meta["sampler_node"]
        b = error_body("Prompt outputs failed validation", "prompt_outputs_failed_validation", str(e))
        b["node_errors"] = {
            nid: {
                "errors": [
                    {"type": "value_not_supported", "message": str(e), "details": str(e), "extra_info": {}}
                ],
                "dependent_outputs": [meta["save_node"]],
                "class_type": "KSampler",
            }
        }
        raise ComfyRefusal(b) from None
    except QueueFull:
        raise
    return {"prompt_id": job.id, "number": job.seq, "node_errors": {}}


@router.get("/prompt", summary="ComfyUI queue status")
async def get_prompt(request: Request) -> dict[str, Any]:
    n = await run_in_threadpool(server(request).store.count)
    return {"exec_info": {"queue_remaining": n}}


def queue_item(job: Job) -> list[Any]:
    return [
        job.seq,
        job.id,
        job.meta.get("prompt", {}),
        {"client_id": job.meta.get("client_id")},
        [job.meta.get("save_node")],
    ]


@router.get("/queue", summary="ComfyUI queue: running and pending prompts")
async def get_queue(request: Request) -> dict[str, Any]:
    store = server(request).store
    running = await run_in_threadpool(store.jobs, ("running",))
    pending = await run_in_threadpool(store.jobs, ("queued",))
    return {
        "queue_running": [queue_item(j) for j in comfy(running)],
        "queue_pending": [queue_item(j) for j in comfy(pending)],
    }


@router.post("/queue", summary="ComfyUI queue edits: {clear: true} or {delete: [ids]}")
async def post_queue(request: Request) -> dict[str, Any]:
    srv = server(request)
    try:
        body = await request.json()
    except ValueError:
        body = None
    delete = body.get("delete", []) if isinstance(body, dict) else None
    if not isinstance(delete, list) or not all(isinstance(p, str) for p in delete):
        raise VelodiffError('a queue edit is {"clear": true} or {"delete": ["prompt id", ...]}')
    if body.get("clear"):  # ComfyUI's prompts only: the other APIs' clients did not ask
        for job in comfy(await run_in_threadpool(srv.store.jobs, ("queued",))):
            await run_in_threadpool(srv.worker.cancel, job.id, "cleared")
    for pid in delete:
        job = await run_in_threadpool(srv.store.get, pid)
        if job is not None and job.state == "queued" and comfy([job]):
            await run_in_threadpool(srv.worker.cancel, pid, "deleted from the queue")
    return {}


@router.post("/interrupt", summary="Interrupt the running prompt(s) (ComfyUI)")
async def interrupt(request: Request) -> dict[str, Any]:
    srv = server(request)
    try:
        body = await request.json()
    except ValueError:
        body = {}
    want = body.get("prompt_id") if isinstance(body, dict) else None
    for jid in list(srv.worker.running):  # the running ComfyUI prompt(s), not a batch-mate of another API
        job = await run_in_threadpool(srv.store.get, jid)
        if job is not None and comfy([job]) and want in (None, jid):
            await run_in_threadpool(srv.worker.cancel, jid, "interrupted")
    return {}


def history_item(job: Job) -> dict[str, Any]:
    images = [{"filename": f, "subfolder": "", "type": "output"} for f in job.filenames]
    ok = job.state == "done"
    ends = {"done": "execution_success", "cancelled": "execution_interrupted"}
    end = ends.get(job.state, "execution_error")
    return {
        "prompt": queue_item(job),
        "outputs": {job.meta.get("save_node"): {"images": images}} if ok else {},
        "status": {
            "status_str": "success" if ok else "error",
            "completed": ok,
            "messages": [
                ["execution_start", {"prompt_id": job.id, "timestamp": int((job.started or 0) * 1000)}],
                [
                    end,
                    {"prompt_id": job.id, "timestamp": int((job.finished or 0) * 1000)}
                    | ({} if ok else {"exception_message": job.error}),
                ],
            ],
        },
        "meta": {
            job.meta.get("save_node"): {
                "node_id": job.meta.get("save_node"),
                "display_node": job.meta.get("save_node"),
            }
        }
        if ok
        else {},
    }


@router.get("/history", summary="ComfyUI history of finished prompts")
async def history_all(request: Request, max_items: int = 200) -> dict[str, Any]:
    jobs = await run_in_threadpool(server(request).store.jobs, FINAL_EVENTS, max_items)
    return {j.id: history_item(j) for j in comfy(jobs)}


@router.get("/history/{prompt_id}", summary="ComfyUI history of one prompt ({} until it finishes)")
async def history(prompt_id: str, request: Request) -> dict[str, Any]:
    job = await run_in_threadpool(server(request).store.get, prompt_id)
    if job is None or job.state not in FINAL_EVENTS or not comfy([job]):
        return {}
    return {job.id: history_item(job)}


@router.get("/view", summary="An output image by file name (ComfyUI)")
async def view(request: Request, filename: str, subfolder: str = "", type: str = "output") -> Response:  # noqa: A002
    png = await run_in_threadpool(server(request).store.image_named, filename)
    if png is None or subfolder not in ("", None):
        raise HTTPException(404, f"no image {filename!r}")
    return Response(png, media_type="image/png")


@router.get("/object_info", summary="The nodes velodiff accepts, with KSampler's names")
async def object_info(request: Request) -> dict[str, Any]:
    from ..aliases import SAMPLER, SCHEDULER

    samplers, schedulers = comfy_names(SAMPLER), comfy_names(SCHEDULER)
    models = server(request).engine.names()
    req = {
        "CheckpointLoaderSimple": {"ckpt_name": [models]},
        "CLIPTextEncode": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]},
        "EmptyLatentImage": {
            "width": ["INT", {"default": 64}],
            "height": ["INT", {"default": 64}],
            "batch_size": ["INT", {"default": 1}],
        },
        "KSampler": {
            "model": ["MODEL"],
            "seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1}],
            "steps": ["INT"],
            "cfg": ["FLOAT"],
            "sampler_name": [samplers],
            "scheduler": [schedulers],
            "positive": ["CONDITIONING"],
            "negative": ["CONDITIONING"],
            "latent_image": ["LATENT"],
            "denoise": ["FLOAT", {"default": 1.0}],
        },
        "VAEDecode": {"samples": ["LATENT"], "vae": ["VAE"]},
        "SaveImage": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
    }
    return {
        k: {
            "input": {"required": v},
            "input_order": {"required": list(v)},
            "output": list(NODE_OUTPUTS[k][0]),
            "output_is_list": [False] * len(NODE_OUTPUTS[k][0]),
            "output_name": list(NODE_OUTPUTS[k][0]),
            "name": k,
            "display_name": k,
            "description": "",
            "category": NODE_OUTPUTS[k][1],
            "output_node": k == "SaveImage",
        }
        for k, v in req.items()
    }


@router.get("/object_info/{node_class}", summary="One node's entry of /object_info (ComfyUI)")
async def object_info_one(node_class: str, request: Request) -> dict[str, Any]:
    info = await object_info(request)
    return {node_class: info[node_class]} if node_class in info else {}


#: each supported node's outputs and category, as ComfyUI declares them
NODE_OUTPUTS = {
    "CheckpointLoaderSimple": (("MODEL", "CLIP", "VAE"), "loaders"),
    "CLIPTextEncode": (("CONDITIONING",), "conditioning"),
    "EmptyLatentImage": (("LATENT",), "latent"),
    "KSampler": (("LATENT",), "sampling"),
    "VAEDecode": (("IMAGE",), "latent"),
    "SaveImage": ((), "image"),
}


@router.get("/system_stats", summary="ComfyUI system stats (minimal)")
async def system_stats(request: Request) -> dict[str, Any]:
    import torch

    from .. import __version__

    return {
        "system": {
            "os": "posix",
            "comfyui_version": f"velodiff-{__version__}",
            "pytorch_version": torch.__version__,
            "embedded_python": False,
        },
        "devices": [],
    }


@router.websocket("/ws")
async def ws(socket: WebSocket) -> None:
    """ComfyUI's progress messages for the prompts this client (``clientId``) queued."""
    srv = server(socket)
    client = socket.query_params.get("clientId")
    sid = client or uuid.uuid4().hex  # ComfyUI makes one up; clients read it as their client_id
    await socket.accept()
    q = srv.broker.subscribe()
    owners: dict[str, bool] = {}

    async def status() -> dict[str, Any]:
        n = await run_in_threadpool(srv.store.count)
        return {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": n}}, "sid": sid}}

    async def mine(jid: str) -> Job | None:
        job = await run_in_threadpool(srv.store.get, jid)
        if job is not None:
            # as ComfyUI sends them: to the client that queued the prompt, to every socket when the
            # prompt named none (a socket without clientId does not see the other clients' prompts)
            owners[jid] = job.meta.get("api") == "comfy" and job.meta.get("client_id") in (None, sid)
        return job

    try:
        await socket.send_json(await status())
        closed = asyncio.ensure_future(socket.receive())
        while True:
            getter = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                try:
                    message = closed.result()
                except (WebSocketDisconnect, RuntimeError):
                    message = {"type": "websocket.disconnect"}
                if message["type"] == "websocket.disconnect":
                    getter.cancel()
                    return
                closed = asyncio.ensure_future(socket.receive())  # clients may send (text or bytes); ignored
                if getter not in done:
                    getter.cancel()
                    continue
            ev = getter.result()
            jid = ev["job"]
            final, job = ev["type"] in FINAL_EVENTS, None
            if jid not in owners or final:
                job = await mine(jid)
            owned = owners.pop(jid, False) if final else owners.get(jid)  # a finished job is forgotten
            if not owned:
                if ev["type"] in ("queued", "done", "failed", "cancelled"):
                    await socket.send_json(await status())
                continue
            for msg in await messages(ev, job, srv):
                await socket.send_json(msg)
    except WebSocketDisconnect:
        return
    finally:
        srv.broker.unsubscribe(q)


async def messages(ev: dict[str, Any], job: Job | None, srv: Server) -> list[dict[str, Any]]:
    """ComfyUI's websocket messages for one velodiff job event."""
    jid, kind = ev["job"], ev["type"]
    if job is None:
        job = await run_in_threadpool(srv.store.get, jid)
    assert job is not None
    ks, save = job.meta.get("sampler_node"), job.meta.get("save_node")
    ts = int(time.time() * 1000)
    if kind == "queued":
        return []
    if kind == "started":
        return [
            {"type": "execution_start", "data": {"prompt_id": jid, "timestamp": ts}},
            {"type": "execution_cached", "data": {"nodes": [], "prompt_id": jid, "timestamp": ts}},
            {"type": "executing", "data": {"node": ks, "display_node": ks, "prompt_id": jid}},
        ]
    if kind == "progress":
        return [
            {
                "type": "progress",
                "data": {"value": ev["step"], "max": ev["steps"], "prompt_id": jid, "node": ks},
            }
        ]
    if kind == "done":
        images = [{"filename": f, "subfolder": "", "type": "output"} for f in job.filenames]
        return [
            {"type": "executing", "data": {"node": save, "display_node": save, "prompt_id": jid}},
            {
                "type": "executed",
                "data": {"node": save, "display_node": save, "output": {"images": images}, "prompt_id": jid},
            },
            {"type": "execution_success", "data": {"prompt_id": jid, "timestamp": ts}},
            {"type": "executing", "data": {"node": None, "prompt_id": jid}},
        ]
    if kind == "cancelled":
        return [
            {
                "type": "execution_interrupted",
                "data": {
                    "prompt_id": jid,
                    "node_id": ks,
                    "node_type": "KSampler",
                    "executed": [],
                    "timestamp": ts,
                },
            },
            {"type": "executing", "data": {"node": None, "prompt_id": jid}},
        ]
    if kind == "failed":
        return [
            {
                "type": "execution_error",
                "data": {
                    "prompt_id": jid,
                    "node_id": ks,
                    "node_type": "KSampler",
                    "exception_message": job.error,
                    "exception_type": "VelodiffError",
                    "traceback": [],
                    "timestamp": ts,
                },
            },
            {"type": "executing", "data": {"node": None, "prompt_id": jid}},
        ]
    return []
