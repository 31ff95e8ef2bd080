"""The FastAPI application: velodiff's jobs API (``/api``), the OpenAI-compatible images API (``/v1``),
ComfyUI's API (``/prompt``, ``/queue``, ``/history``, ``/view``, ``/interrupt``, ``/ws``) and the web page
(``/``), over one job store and one worker. OpenAPI docs at ``/docs``.

Every refusal is a 4xx with one line (in the shape of the API that was called); the server goes on.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..errors import VelodiffError
from . import brush_api, comfy_api, jobs_api, openai_api, stream_api
from .queue import QueueFull
from .state import ServeConfig, Server

PAGE = Path(str(resources.files("velodiff") / "serve" / "page"))


def one_line(exc: RequestValidationError) -> str:
    """A request body's first problem in one line."""
    errs = exc.errors()
    if not errs:
        return "invalid request"
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON: {e.get('ctx', {}).get('error', 'cannot parse the body')}"
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if not loc and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return "the body must be a JSON object"
    if e.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}"
    return f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}"


def error_response(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    path = request.url.path
    body: dict[str, Any]
    if path.startswith("/v1/"):
        body = openai_api.error_body(message, status)
    elif path in comfy_api.PATHS:
        body = comfy_api.error_body(message)
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


class JSONBodies:
    """ASGI middleware: a POST body is JSON whatever its Content-Type says (``curl -d`` sends
    form-urlencoded; ComfyUI's example client sends none)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class SameOrigin:
    """ASGI middleware: a request a browser sends from another site (an ``Origin`` header that is not
    this server's ``Host``) is refused with 403, as ComfyUI refuses it. A page elsewhere could otherwise
    queue, clear or interrupt work on a server on the user's machine: a cross-site ``text/plain`` or
    form POST needs no CORS preflight, and JSONBodies reads any body as JSON. Clients that are not
    browsers (curl, the ``openai`` client, ComfyUI scripts) send no Origin and are not affected."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope["headers"])
            origin, host = headers.get(b"origin"), headers.get(b"host", b"")
            if origin is not None and urlsplit(origin.decode("latin-1")).netloc != host.decode("latin-1"):
                if scope["type"] == "websocket":  # closing before accepting answers the handshake 403
                    await send({"type": "websocket.close", "code": 1008})
                    return
                message = f"cross-origin request from {origin.decode('latin-1')!r} refused"
                await error_response(Request(scope), 403, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(config: ServeConfig | None = None, server: Server | None = None) -> FastAPI:
    srv = server or Server(config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        srv.start()
        yield
        srv.stop()

    app = FastAPI(
        title="velodiff serve",
        description="velodiff's jobs API, an OpenAI-compatible images API and ComfyUI's prompt API.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN; velodiff serves it itself (below)
    )
    app.state.velodiff = srv
    app.add_middleware(JSONBodies)
    app.add_middleware(SameOrigin)  # added last: runs first

    @app.exception_handler(VelodiffError)
    async def _user_error(request: Request, exc: VelodiffError) -> JSONResponse:
        return error_response(request, 400, str(exc).splitlines()[0])

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(request, 429, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 400, one_line(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(comfy_api.ComfyRefusal)
    async def _comfy(request: Request, exc: comfy_api.ComfyRefusal) -> JSONResponse:
        return JSONResponse(exc.body, status_code=400)

    app.include_router(jobs_api.router)
    app.include_router(openai_api.router)
    app.include_router(comfy_api.router)
    app.include_router(comfy_api.router, prefix="/api", include_in_schema=False)  # ComfyUI serves both
    app.include_router(stream_api.router)
    app.include_router(brush_api.router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    app.mount("/page", StaticFiles(directory=PAGE), name="page")
    add_docs(app)
    app.openapi = lambda: documented_errors(app)  # type: ignore[method-assign]
    reports = srv.config.reports

    @app.get("/api/reports", tags=["jobs"], summary="The bench reports the server shows (--reports)")
    async def report_list() -> list[dict[str, Any]]:
        if reports is None:
            return []
        files = sorted(p for p in reports.rglob("*") if p.is_file() and p.suffix in REPORT_SUFFIXES)
        return [
            {
                "path": p.relative_to(reports).as_posix(),
                "url": "/reports/" + p.relative_to(reports).as_posix(),
                "kind": p.suffix.lstrip("."),
            }
            for p in files[:500]
        ]

    if reports is not None:
        app.mount("/reports", StaticFiles(directory=reports), name="reports")
    return app


def documented_errors(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document with the errors the server really answers: FastAPI declares a 422
    validation error on every route, but velodiff answers bad input with 400 and one line (in the
    shape of the API called), a cross-site browser request with 403, a full queue with 429."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            responses["400"] = {"description": "bad input, in one line", **error}
            responses["403"] = {"description": "a browser request from another site (Origin)", **error}
            if method == "post" and path in ("/api/jobs", "/v1/images/generations", "/prompt"):
                responses["429"] = {"description": "the queue is full; see the Retry-After header", **error}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"description": "one line; OpenAI's and ComfyUI's routes: their object"}},
        "required": ["error"],
    }
    app.openapi_schema = schema
    return schema


def add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI over ``/openapi.json`` from the files of the ``swagger-ui-bundle`` package,
    served here (no CDN at run time: the server may have no internet)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="velodiff serve - API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


#: what /api/reports lists (served as files: markdown shows as text, plots as images)
REPORT_SUFFIXES = (".md", ".png", ".json", ".svg", ".csv")
