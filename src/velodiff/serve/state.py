"""What one running server holds: its settings, the job store, the models, the event broker and the
worker; and the two things every API does with them (submit a request, wait for a job)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from .engine import Engine, Request, batch_key
from .events import FINAL_EVENTS, Broker
from .queue import Job, JobStore
from .worker import Worker

#: seconds between looks at the store while waiting for a job another process may run
POLL = 0.25


@dataclass
class ServeConfig:
    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 8188
    db: Path = Path("velodiff-jobs.sqlite")
    max_queue: int = 64
    #: finished jobs kept (with their images); older ones are deleted
    max_history: int = 10_000
    max_batch: int = 8
    batch_wait: float = 0.2
    max_n: int = 8
    timeout_s: float | None = 600.0
    device: str | None = None
    threads: int | None = None
    #: how the served model loads: ``velodiff.load``'s config / family / prediction_type
    load_options: dict[str, Any] = field(default_factory=dict)
    #: put the jobs a killed server left running back in the queue at start (off for Ray Serve replicas:
    #: the driver recovers once, before any replica runs)
    recover: bool = True
    #: a folder of bench reports (markdown, JSON, PNG plots) the page lists and serves under /reports
    reports: Path | None = None


class Server:
    def __init__(self, config: ServeConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine or Engine(
            config.model, device=config.device, threads=config.threads, max_n=config.max_n,
            load_options=config.load_options,
        )
        self.store = JobStore(config.db, max_queue=config.max_queue, max_history=config.max_history)
        self.broker = Broker()
        self.worker = Worker(
            self.store,
            self.engine,
            self.broker,
            max_batch=config.max_batch,
            batch_wait=config.batch_wait,
            timeout_s=config.timeout_s,
        )
        self.recovered = 0

    def start(self) -> None:
        self.engine.model(None)  # load the served model once, before the first request
        if self.config.recover:
            self.recovered = self.store.recover()
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.store.close()

    def submit_sync(self, req: Request, meta: dict[str, Any] | None = None) -> Job:
        """Check, persist (committed) and announce a job; VelodiffError / QueueFull otherwise."""
        params = self.engine.check(req)
        job = self.store.submit(params, batch_key(params), params["n"], timeout_s=req.timeout_s, meta=meta)
        self.broker.publish({"type": "queued", "job": job.id})
        return job

    async def submit(self, req: Request, meta: dict[str, Any] | None = None) -> Job:
        return await run_in_threadpool(self.submit_sync, req, meta)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it is done, failed or cancelled: on this process's event, or seen in the store
        (polled every ``POLL`` seconds: another process sharing the store, e.g. a Ray Serve replica,
        may run it)."""
        q = self.broker.subscribe(job_id)
        try:

            async def until_final() -> None:
                while True:
                    job = await run_in_threadpool(self.store.get, job_id)
                    if job is None or job.state in FINAL_EVENTS:
                        return
                    try:
                        ev = await asyncio.wait_for(q.get(), POLL)
                    except asyncio.TimeoutError:
                        continue
                    if ev["type"] in FINAL_EVENTS:
                        return

            await asyncio.wait_for(until_final(), timeout)
        finally:
            self.broker.unsubscribe(q)
        job = await run_in_threadpool(self.store.get, job_id)
        if job is None:  # removed meanwhile (deleted through the API, or pruned from the history)
            from fastapi import HTTPException

            raise HTTPException(404, f"no job {job_id!r} (it left the job history)")
        return job
