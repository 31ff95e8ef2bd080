"""`velodiff serve --model M --port P`: the HTTP server (velodiff's jobs API, OpenAI's images API,
ComfyUI's prompt API, a web page) over one model loaded once."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from ..errors import VelodiffError
from . import options as o


def serve(
    model: o.Model = None,
    config: o.Config = None,
    family: o.Family = None,
    prediction_type: o.PredictionType = None,
    host: Annotated[
        str, typer.Option(help="address to bind (loopback by default; 0.0.0.0 exposes it)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (ComfyUI's default, 8188)")] = 8188,
    db: Annotated[Path, typer.Option(help="the SQLite job store; accepted jobs survive a restart")] = Path(
        "velodiff-jobs.sqlite"
    ),
    max_queue: Annotated[int, typer.Option(min=1, help="jobs queued or running before 429")] = 64,
    max_history: Annotated[
        int, typer.Option(min=1, help="finished jobs kept with their images (older ones are deleted)")
    ] = 10_000,
    max_batch: Annotated[
        int, typer.Option(min=1, help="images per batched network call (1: no batching)")
    ] = 8,
    batch_wait: Annotated[
        float,
        typer.Option(
            min=0,
            help="most seconds to wait for compatible jobs to batch (a lone job waits a quarter of it)",
        ),
    ] = 0.2,
    max_n: Annotated[int, typer.Option(min=1, help="most images one request may ask for")] = 8,
    timeout: Annotated[
        float, typer.Option(min=0, help="a job's run-time limit in seconds (0: none)")
    ] = 600.0,
    device: o.Device = None,
    threads: o.Threads = None,
    reports: Annotated[
        Path | None,
        typer.Option(help="a folder of bench reports (e.g. bench/) the page lists: tables, JSON, plots"),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="local|ADDRESS",
            help="run as a Ray Serve deployment: 'local' starts a cluster here, HOST:PORT joins one "
            "(pip install 'velodiff[ray]')",
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Ray Serve replicas (one model each)")] = 2,
) -> None:
    """Serve the model over HTTP: velodiff's jobs API (/api, docs at /docs), OpenAI's images API (/v1),
    ComfyUI's API (/prompt, /ws) and a web page (/)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise VelodiffError(
            "velodiff serve needs FastAPI and uvicorn: pip install 'velodiff[serve]'"
        ) from None
    from ..serve.app import create_app
    from ..serve.state import ServeConfig, Server
    from ..shipped import resolve_model

    if model is not None:
        resolve_model(model)  # refused in one line before anything binds

    for name, value, most in (("--batch-wait", batch_wait, 60.0), ("--timeout", timeout, 7 * 86400.0)):
        if not 0 <= value <= most:  # NaN and inf included: the worker's waits cannot take them
            raise VelodiffError(f"{name} takes seconds from 0 to {most:g}, got {value}")
    if reports is not None and not reports.is_dir():
        raise VelodiffError(f"--reports {str(reports)!r} is not a folder")
    from ..files import make_parent

    make_parent(db, "--db")
    if db.is_dir():
        raise VelodiffError(f"--db {str(db)!r} is a folder; give a file such as jobs.sqlite")
    try:
        socket.getaddrinfo(host, port)
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise VelodiffError(f"--host {host!r}: not an address here ({why})") from None
    config = ServeConfig(
        model=model or "default",
        host=host,
        port=port,
        db=db,
        max_queue=max_queue,
        max_history=max_history,
        max_batch=max_batch,
        batch_wait=batch_wait,
        max_n=max_n,
        timeout_s=timeout or None,
        device=device,
        threads=threads,
        load_options={k: v for k, v in (("config", config), ("family", family),
                                        ("prediction_type", prediction_type)) if v is not None},
        reports=reports.resolve() if reports is not None else None,
    )
    if ray is not None:
        try:
            from ray import serve as _  # noqa: F401 (the parameter `ray` keeps its value)
        except ImportError:
            raise VelodiffError("--ray needs Ray Serve: pip install 'velodiff[ray]'") from None
        from ..serve.ray_serve import serve_with_ray

        serve_with_ray(config, ray, replicas)
        return
    sock = _listen(host, port)  # a port in use is one line before the model loads
    try:
        server = Server(config)
        server.engine.model(None)  # a model that does not load is one line here, not a server's traceback
        server.store.own()  # and so is another server on this --db
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    typer.echo(
        f"velodiff serve: {config.model} on http://{host}:{port}/ (docs /docs, jobs in {db})", err=True
    )
    app = create_app(config, server=server)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening here rather than by uvicorn after the start-up banner
    (which left a port in use to uvicorn's own log line, after the model had loaded). As uvicorn binds
    it: IPv6 only for an IPv6 address, so ``localhost`` is 127.0.0.1 where a resolver lists ::1 first;
    listening at once, so a second server on the port is refused here even while this one loads."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise VelodiffError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); give another --port or stop what uses it"
        ) from None
    return sock


EXAMPLE = o.example(
    "velodiff serve --port 8188",
    'curl -s localhost:8188/v1/images/generations -d \'{"prompt": "a red circle"}\'',
)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    short = "HTTP server: jobs, OpenAI and ComfyUI APIs, a web page."
    app.command("serve", epilog=EXAMPLE, short_help=short)(serve)
