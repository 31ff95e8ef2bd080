"""Generating a set on Ray: one actor per worker holds a model replica and renders shards (the set's
batch-aligned chunks); the driver is the set folder's only writer, so the manifest and the files are
exactly the single-process run's.

A worker that dies mid-shard is restarted by Ray (``max_restarts``) and its shard retried
(``max_task_retries``, then again by the driver on a live worker); an index already written is skipped
(``SetWriter.write``), so no image is written twice. Ray is optional: ``pip install 'velodiff[ray]'``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import VelodiffError, first_line
from .items import Item
from .store import SetWriter

#: seconds to wait for a Ray address to answer before giving up
CONNECT_TIMEOUT_S = 5.0
#: shards in flight per worker (one rendering, one queued)
IN_FLIGHT = 2
#: tries of one shard (Ray's own retries of a dead worker's task come on top)
MAX_SHARD_TRIES = 3
ACTOR_RESTARTS = 3


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise VelodiffError("--ray needs Ray, which is not installed: pip install 'velodiff[ray]'") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for 'auto'."""
    if address == "auto":
        return None
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise VelodiffError(f"Ray address {address!r} is not host:port (or ray://host:port, auto, local)")
    return host.strip("[]"), int(port)


def check_address(address: str) -> None:
    """Fail early, before anything is written: Ray missing, or an address that does not answer."""
    import_ray()
    hp = None if address == "local" else _host_port(address)
    if hp is not None:
        try:
            socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise VelodiffError(
                f"Ray address {address} is unreachable ({e.strerror or e}); start a cluster with "
                "`ray start --head` or use --ray local"
            ) from None


def connect(address: str, workers: int | None) -> tuple[Any, int]:
    """ray.init: ``local`` starts a private local cluster with one CPU per worker (2 by default); any
    other address must answer within CONNECT_TIMEOUT_S. Returns (ray, number of workers)."""
    ray = import_ray()
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  ignore_reinit_error=True)
    if address == "local":
        n = int(workers or 2)
        try:
            ray.init(num_cpus=n, object_store_memory=256 * 2**20, **common)
        except Exception as e:  # noqa: BLE001 - any start failure is one line for the user
            raise VelodiffError(f"cannot start a local Ray cluster: {first_line(e)}") from None
        return ray, n
    check_address(address)
    try:
        ray.init(address=address, **common)
    except Exception as e:  # noqa: BLE001
        raise VelodiffError(f"cannot connect to Ray at {address}: {first_line(e)}") from None
    n = int(workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
    return ray, n


class ShardWorker:
    """A Ray actor: one model replica, rendering shards. Load errors are kept and raised on the first
    shard as one VelodiffError line (an exception in an actor's __init__ would only say it died)."""

    def __init__(self, model_path: str, fingerprint: str, config: dict[str, Any]) -> None:
        from ..commands.generate import quiet_libraries
        from .render import load_model_checked

        quiet_libraries()
        self.config, self.error, self.model = config, None, None
        try:
            self.model = load_model_checked(model_path, fingerprint, config)
        except VelodiffError as e:
            self.error = str(e)

    def render(self, chunk: list[Item]) -> list[tuple[int, bytes]]:
        from .render import render_chunk

        if self.error is not None:
            raise VelodiffError(f"on a Ray worker ({socket.gethostname()}): {self.error}")
        return render_chunk(self.model, chunk, self.config)

    def pid(self) -> int:
        return os.getpid()


def run_on_ray(
    todo: Sequence[list[Item]],
    writer: SetWriter,
    model_path: str | os.PathLike[str],
    fingerprint: str,
    config: dict[str, Any],
    *,
    address: str,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    total: int = 0,
) -> None:
    """Render the shards ``todo`` on Ray workers and write them through ``writer`` (the driver)."""
    ray = import_ray()
    from ray.exceptions import RayActorError, RayTaskError

    started_here = not ray.is_initialized()
    ray, n = connect(address, workers)
    try:
        if not todo:
            return
        n = max(1, min(n, len(todo)))
        remote = ray.remote(num_cpus=1, max_restarts=ACTOR_RESTARTS,
                            max_task_retries=ACTOR_RESTARTS)(ShardWorker)
        path = str(Path(model_path).expanduser().resolve())
        actors = [remote.remote(path, fingerprint, config) for _ in range(n)]
        pending = deque(todo)
        tries: dict[int, int] = {}
        inflight: dict[Any, tuple[Any, list[Item]]] = {}

        def fill() -> None:
            for a in actors:
                while pending and sum(1 for x, _ in inflight.values() if x is a) < IN_FLIGHT:
                    chunk = pending.popleft()
                    inflight[a.render.remote(chunk)] = (a, chunk)

        fill()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                actor, chunk = inflight.pop(ref)
                try:
                    results = ray.get(ref)
                except RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, VelodiffError):
                        raise VelodiffError(str(cause)) from None
                    results = _retry(chunk, tries, pending, e)
                except RayActorError as e:
                    if actor in actors:  # Ray gave up restarting it: a fresh replica
                        actors[actors.index(actor)] = remote.remote(path, fingerprint, config)
                    results = _retry(chunk, tries, pending, e)
                for index, data in results or []:
                    writer.write(index, data)  # skips an index already written (a retried shard)
                if progress and results:
                    progress(len(writer.done), total)
            fill()
        for a in actors:
            ray.kill(a)
    finally:
        if started_here:
            ray.shutdown()


def _retry(chunk: list[Item], tries: dict[int, int], pending: deque, e: BaseException) -> None:
    key = chunk[0].index
    tries[key] = tries.get(key, 0) + 1
    if tries[key] >= MAX_SHARD_TRIES:
        raise VelodiffError(
            f"shard of images {chunk[0].index}-{chunk[-1].index} failed {tries[key]} times on Ray workers: "
            f"{first_line(e)}; images finished so far are kept, run again to resume"
        )
    pending.appendleft(chunk)
    return None
