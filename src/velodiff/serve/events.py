"""Job events from the worker thread to the asyncio side (SSE streams, ComfyUI's /ws, waiting requests).

An event is a dict with ``type`` (queued, started, progress, done, failed, cancelled) and ``job``.
:meth:`Broker.publish` may be called from any thread; each subscriber is an ``asyncio.Queue`` fed on its
own loop. Events are published after the job store commits, so a subscriber that reads the store after
subscribing misses nothing.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

FINAL_EVENTS = ("done", "failed", "cancelled")


class Broker:
    def __init__(self) -> None:
        self._subs: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]], str | None]] = []
        self._lock = threading.Lock()
        #: the last progress event of each running job (status reads it)
        self.progress: dict[str, dict[str, Any]] = {}

    def subscribe(self, job_id: str | None = None) -> asyncio.Queue[dict[str, Any]]:
        """A queue of the events of ``job_id`` (None: of every job); call from a running loop."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        with self._lock:
            self._subs.append((asyncio.get_running_loop(), q, job_id))
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s[1] is not q]

    def publish(self, event: dict[str, Any]) -> None:
        job = event.get("job")
        if event["type"] == "progress" and job:
            self.progress[job] = {k: v for k, v in event.items() if k != "preview"}
        elif event["type"] in FINAL_EVENTS:
            self.progress.pop(job, None)
        with self._lock:
            subs = list(self._subs)
        dead = []
        for loop, q, want in subs:
            if want is not None and want != job:
                continue
            try:
                loop.call_soon_threadsafe(q.put_nowait, event)
            except RuntimeError:  # the subscriber's loop is closed
                dead.append(q)
        for q in dead:
            self.unsubscribe(q)
