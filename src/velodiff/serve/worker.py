"""The worker: one thread that takes batches of compatible jobs from the store and runs them.

Batching: when a job is waiting, the worker waits up to ``batch_wait`` seconds for more queued jobs with
the same batch key (same model, size, steps, solver, grid, guidance, negative prompt and plan), until
their images reach ``max_batch`` or none came for a quarter of ``batch_wait``; then it claims them and
runs one pipeline call. Jobs that arrive while
a batch runs are claimed together right after it, so under load batches fill without any wait.

Per step it publishes progress (and a preview of the predicted image to jobs that asked for one), and
drops from the batch the jobs that were cancelled or ran past their timeout; the run stops when no job
of the batch is left. A dropped job's images are discarded (the store refuses to complete it).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any

from ..errors import VelodiffError
from ..images import png_bytes
from .engine import Engine
from .events import Broker
from .queue import Job, JobStore

log = logging.getLogger("velodiff.serve")

#: who runs a job (stored with it): this process, e.g. one of several Ray Serve replicas
RUNNER = f"{socket.gethostname()}:{os.getpid()}"
#: how many of the last batch sizes a worker keeps
BATCH_HISTORY = 100


#: seconds the worker waits before trying a failed job store again
STORE_RETRY_S = 1.0


def filenames(job: Job) -> list[str]:
    """The job's image names (ComfyUI's SaveImage style: ``prefix_<job>_00001_.png``)."""
    prefix = str(job.meta.get("filename_prefix") or "velodiff").replace("/", "_")
    return [f"{prefix}_{job.id[:12]}_{i + 1:05}_.png" for i in range(job.params["n"])]


class Worker:
    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        broker: Broker,
        *,
        max_batch: int = 8,
        batch_wait: float = 0.2,
        timeout_s: float | None = None,
    ) -> None:
        self.store, self.engine, self.broker = store, engine, broker
        self.max_batch = max(1, int(max_batch))
        self.batch_wait = float(batch_wait)
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="velodiff-worker", daemon=True)
        #: sizes of the last batches run (the bench, tests and /api/health read it); bounded, so a
        #: long-running server does not grow
        self.batches: deque[int] = deque(maxlen=BATCH_HISTORY)
        self.running: list[str] = []
        #: why the job store last failed (a full disk), until it works again; /api/health says it
        self.store_error: str | None = None
        #: the jobs of the batch in hand (put back in the queue if the store fails before they finish)
        self.claimed: list[str] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.store.changed:
            self.store.changed.notify_all()
        self._thread.join(timeout=30)

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Cancel a queued or running job (its slot is free at once; a running one leaves its batch at
        the next step, when the worker reads its state); False if it had finished."""
        if not self.store.finish(job_id, "cancelled", reason):
            return False
        self.broker.publish({"type": "cancelled", "job": job_id, "error": reason})
        return True

    # --- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.store_error is not None:  # the jobs the failure left running go back in the queue
                    self.store.release(self.claimed)  # (not an attempt: the store failed, not the job)
                    self.claimed, self.store_error = [], None
                self._next()
            except Exception as e:  # noqa: BLE001 - the job store failed (a full disk): wait, try again
                self.store_error = f"{type(e).__name__}: {e}"
                log.exception("the job store failed; trying again in %g s", STORE_RETRY_S)
                self._stop.wait(STORE_RETRY_S)

    def _next(self) -> None:
        """Run the next batch of queued jobs, or wait a moment for one."""
        first = self.store.oldest_queued()
        if first is None:
            with self.store.changed:
                self.store.changed.wait(0.5)
            return
        self._gather(first.batch_key)
        jobs = self.store.claim(self.max_batch, RUNNER)
        self.claimed = [j.id for j in jobs]
        if jobs:
            try:
                self._run(jobs)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its jobs, the server goes on
                log.exception("batch failed")
                for j in jobs:
                    self._fail(j, f"internal error: {type(e).__name__}: {e}")
        self.claimed = []

    def _gather(self, key: str) -> None:
        """Wait for compatible jobs: until their images fill ``max_batch``, no new one came for a
        quarter of ``batch_wait`` (a lone request waits only that), or ``batch_wait`` is over."""
        now = time.monotonic()
        deadline, quiet = now + self.batch_wait, self.batch_wait / 4
        have, last = self.store.queued_images(key), now
        while have < self.max_batch and not self._stop.is_set():
            now = time.monotonic()
            left = min(deadline, last + quiet) - now
            if left <= 0:
                return
            with self.store.changed:
                self.store.changed.wait(left)
            more = self.store.queued_images(key)
            if more > have:
                have, last = more, time.monotonic()

    def _fail(self, job: Job, message: str) -> None:
        if self.store.finish(job.id, "failed", message):
            self.broker.publish({"type": "failed", "job": job.id, "error": message})

    def _run(self, jobs: list[Job]) -> None:
        self.batches.append(sum(j.params["n"] for j in jobs))
        alive = {j.id: j for j in jobs}
        starts = {j.id: time.monotonic() for j in jobs}
        for jid in self.store.not_running(list(alive)):  # cancelled since the claim: no 'started' after
            del alive[jid]  # its 'cancelled' (ComfyUI clients saw execution_start after the interrupt)
        self.running = list(alive)
        for j in jobs:
            if j.id in alive:
                self.broker.publish(
                    {"type": "started", "job": j.id, "steps": j.params["steps"], "batch": len(jobs)}
                )
        offsets, i = {}, 0
        for j in jobs:
            offsets[j.id] = i
            i += j.params["n"]

        def on_step(i: int, steps: int, x0: Any) -> bool | None:
            now = time.monotonic()
            gone = self.store.not_running(list(alive))  # cancelled here or by another process
            for jid, j in list(alive.items()):
                limits = [t for t in (j.timeout_s, self.timeout_s) if t]
                timeout = min(limits) if limits else None  # a job may ask for less than the server's
                if jid in gone:
                    del alive[jid]
                    self.broker.progress.pop(jid, None)  # cancelled elsewhere: no final event comes here
                elif timeout and now - starts[jid] > timeout:
                    del alive[jid]
                    whose = "its timeout_s" if timeout == j.timeout_s else "the server's --timeout"
                    self._fail(j, f"timed out after {timeout:g} s ({whose})")
            for jid, j in alive.items():
                ev: dict[str, Any] = {"type": "progress", "job": jid, "step": i + 1, "steps": steps}
                if j.params.get("preview"):
                    png = self.engine.preview(j.params["model"], x0, offsets[jid])
                    ev["preview"] = "data:image/png;base64," + base64.b64encode(png).decode()
                self.broker.publish(ev)
            return True if not alive or self._stop.is_set() else None

        try:
            results = self.engine.run(jobs, on_step)
        except VelodiffError as e:
            for j in alive.values():
                self._fail(j, str(e))
            return
        finally:
            self.running = []
            for j in jobs:  # a progress event may have raced a cancel's removal of the entry
                self.broker.progress.pop(j.id, None)
        if self._stop.is_set():  # the server stops (Ctrl-C): the batch stopped between steps; run again
            self.store.release(list(alive))  # at the next start, not as a crash's attempt
            return
        for j, images in zip(jobs, results, strict=True):
            if j.id not in alive:
                continue
            names = filenames(j)
            for im in images:
                im.info.update(comfy_chunks(j))
            if self.store.complete(j.id, [png_bytes(im) for im in images], names):
                self.broker.publish({"type": "done", "job": j.id, "filenames": names})


def comfy_chunks(job: Job) -> dict[str, str]:
    """What ComfyUI's SaveImage writes into its PNGs, for a job of ComfyUI's API: the graph (``prompt``)
    and each ``extra_data.extra_pnginfo`` entry (the UI sends its ``workflow``), as JSON, so that the
    image dropped on ComfyUI loads the graph that made it; nothing for other jobs."""
    if job.meta.get("api") != "comfy":
        return {}
    extra = job.meta.get("extra_data", {}).get("extra_pnginfo", {})
    pairs = {"prompt": job.meta.get("prompt"), **(extra if isinstance(extra, dict) else {})}
    return {str(k): json.dumps(v) for k, v in pairs.items()}
