"""Servers for the tests of ``velodiff serve``: in this process (uvicorn in a thread, sharing one loaded
engine across test files) or as a real ``velodiff serve`` subprocess (for SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from velodiff.serve.app import create_app  # noqa: E402
from velodiff.serve.engine import Engine  # noqa: E402
from velodiff.serve.state import ServeConfig, Server  # noqa: E402

_ENGINE: Engine | None = None


def engine() -> Engine:
    """One engine (the default model, loaded once) for every in-process server of the session."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine("default", device="cpu", max_n=8)
        _ENGINE.model(None)
    return _ENGINE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(tmp: Path, **config: Any):
    """A server on 127.0.0.1 in a thread; yields (base_url, Server)."""
    port = free_port()
    cfg = ServeConfig(port=port, db=tmp / f"jobs-{port}.sqlite", **config)
    srv = Server(cfg, engine=engine())
    app = create_app(cfg, server=srv)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio")
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    wait_up(url)
    try:
        yield url, srv
    finally:
        server.should_exit = True
        t.join(timeout=30)


def wait_up(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


@contextmanager
def server_process(db: Path, port: int, *args: str):
    """``velodiff serve`` as a subprocess (the real command); stopped with SIGTERM on exit."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "velodiff.cli",
        "serve",
        "--port",
        str(port),
        "--db",
        str(db),
        "--threads",
        "1",
        *args,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # a Ray Serve start (a local cluster, two replicas loading the model) takes minutes on 2 busy cores
        wait_up(f"http://127.0.0.1:{port}", timeout=300 if "--ray" in args else 120, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:  # a clean stop (a Ray cluster it started goes down with it), else SIGKILL
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
