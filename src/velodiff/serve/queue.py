"""The durable, bounded job queue: one SQLite file (WAL, synchronous=FULL).

A job is written and committed before the server acknowledges it, so an accepted job survives a
SIGKILL. A job moves queued -> running -> done | failed | cancelled; every move is one conditional
UPDATE (``WHERE state = ...``), so a job completes at most once, and its images are written in the same
transaction as its ``done``. On start-up :meth:`JobStore.recover` puts the jobs a killed server was
running back in the queue (oldest first, as before); they run again from their seeds, which gives the
same images.

The bound counts the jobs queued or running: a submission beyond it raises :class:`QueueFull` (the
HTTP layer answers 429 with ``Retry-After``). A cancelled or finished job leaves the count at once.
The history is bounded too: beyond ``max_history`` finished jobs (ComfyUI keeps 10 000), the oldest are
deleted with their images in the transaction that finishes another, so a long-running server's file
stops growing.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VelodiffError

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  state TEXT NOT NULL,
  params TEXT NOT NULL,
  batch_key TEXT NOT NULL,
  images INTEGER NOT NULL,
  meta TEXT NOT NULL DEFAULT '{}',
  timeout_s REAL,
  created REAL NOT NULL,
  started REAL,
  finished REAL,
  attempts INTEGER NOT NULL DEFAULT 0,
  completions INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  runner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS images (
  job_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  filename TEXT UNIQUE NOT NULL,
  png BLOB NOT NULL,
  PRIMARY KEY (job_id, idx)
);
"""


class QueueFull(Exception):
    """The queue holds its bound of active jobs; try again after ``retry_after`` seconds."""

    def __init__(self, bound: int, retry_after: int) -> None:
        jobs = "job" if bound == 1 else "jobs"
        super().__init__(f"the queue is full ({bound} {jobs} queued or running); retry after {retry_after} s")
        self.bound = bound
        self.retry_after = retry_after


@dataclass
class Job:
    seq: int
    id: str
    state: str
    params: dict[str, Any]
    batch_key: str
    images: int
    meta: dict[str, Any]
    timeout_s: float | None
    created: float
    started: float | None
    finished: float | None
    attempts: int
    completions: int
    error: str | None
    runner: str | None = None
    filenames: list[str] = field(default_factory=list)

    @classmethod
    def of_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["meta"] = json.loads(d["meta"])
        return cls(**d)


#: runs of a job a dying server may leave unfinished before recover() fails it
MAX_ATTEMPTS = 3


class JobStore:
    """The queue in ``path`` (one connection, serialized by a lock; callers are threads)."""

    def __init__(self, path: str | Path, max_queue: int = 64, max_history: int = 10_000) -> None:
        self.path = Path(path)
        self.max_queue = int(max_queue)
        self.max_history = int(max_history)
        self._lock = threading.RLock()
        #: notified on every submission and state change (the worker waits on it)
        self.changed = threading.Condition(self._lock)
        self._owner: Any = None  # the lock of the process that recovered the store (recover())
        if self.path.is_dir():
            raise VelodiffError(f"job store {str(self.path)!r} is a folder; give a database file")
        try:
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:  # a file that is not SQLite (or not velodiff's) is left as it is
            raise VelodiffError(
                f"job store {str(self.path)!r} cannot be used: {e}; give a new file or velodiff's job store"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._owner is not None:
                self._owner.close()
                self._owner = None

    # --- writes: each one transaction -------------------------------------------------------------

    def _tx(self, fn: Any) -> Any:
        """``fn(db)`` inside BEGIN IMMEDIATE ... COMMIT under the lock; waiters are woken after."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.changed.notify_all()
            return out

    def submit(
        self,
        params: dict[str, Any],
        batch_key: str,
        images: int,
        *,
        timeout_s: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Job:
        """Persist a queued job (committed when this returns) or raise :class:`QueueFull`."""
        job_id = uuid.uuid4().hex

        def add(db: sqlite3.Connection) -> None:
            active = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")
            active = active.fetchone()[0]
            if active >= self.max_queue:
                raise QueueFull(self.max_queue, self._retry_after(db, active))
            db.execute(
                "INSERT INTO jobs (id, state, params, batch_key, images, meta, timeout_s, created) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    json.dumps(params),
                    batch_key,
                    int(images),
                    json.dumps(meta or {}),
                    timeout_s,
                    time.time(),
                ),
            )

        self._tx(add)
        job = self.get(job_id)
        assert job is not None
        return job

    def _retry_after(self, db: sqlite3.Connection, active: int) -> int:
        """Seconds until a slot is likely free, a rough guess: the mean run time of the last 32 jobs
        (1 s without any) times the active jobs, over 4 (jobs run in batches), at least 1."""
        row = db.execute(
            "SELECT AVG(finished - started) FROM (SELECT finished, started FROM jobs WHERE state = 'done' "
            "ORDER BY seq DESC LIMIT 32)"
        ).fetchone()
        mean = row[0] or 1.0
        return max(1, math.ceil(mean * max(1, active) / 4))

    def own(self) -> None:
        """Make the store this process's until it closes it: the process that recovers it at start owns
        it, and another one that would (a second ``velodiff serve`` on the same --db, whose recovery
        would requeue the jobs this one is running) is refused in one line. Processes sharing the store
        without recovering it (Ray Serve replicas under their driver) do not own it."""
        if self._owner is None:
            from ..files import lock_file

            self._owner = lock_file(
                f"{self.path}.lock",
                f"another velodiff serve is using the job store {self.path}; stop it or give another --db",
            )

    def recover(self) -> int:
        """Put the jobs left running by a killed server back in the queue; returns how many. A job the
        server was running ``MAX_ATTEMPTS`` times when it died fails instead: one that kills the server
        (out of memory) would otherwise run again, and kill it again, at every restart. The store
        becomes this process's first (:meth:`own`)."""
        self.own()

        def requeue(db: sqlite3.Connection) -> int:
            db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ? "
                "WHERE state = 'running' AND attempts >= ?",
                (time.time(), f"the server stopped {MAX_ATTEMPTS} times while running this job "
                 "(out of memory?); it is not run again", MAX_ATTEMPTS),
            )
            return db.execute(
                "UPDATE jobs SET state = 'queued', started = NULL WHERE state = 'running'"
            ).rowcount

        return self._tx(requeue)

    def release(self, ids: list[str]) -> int:
        """Put running jobs back in the queue as if never started (a server stopping on purpose stops
        them between steps: not an attempt); returns how many."""
        marks = ",".join("?" * len(ids))

        def back(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE jobs SET state = 'queued', started = NULL, attempts = MAX(attempts - 1, 0) "
                f"WHERE state = 'running' AND id IN ({marks})",
                ids,
            ).rowcount

        return self._tx(back) if ids else 0

    def claim(self, max_images: int, runner: str | None = None) -> list[Job]:
        """Take the oldest queued job and, behind it, the queued jobs with the same batch key while their
        images fit in ``max_images`` (the first job is taken whatever its size); mark them running."""

        def take(db: sqlite3.Connection) -> list[str]:
            first = db.execute(
                "SELECT id, batch_key, images FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if first is None:
                return []
            ids, total = [first["id"]], first["images"]
            for row in db.execute(
                "SELECT id, images FROM jobs WHERE state = 'queued' AND batch_key = ? AND id != ? "
                "ORDER BY seq",
                (first["batch_key"], first["id"]),
            ):
                if total + row["images"] > max_images:
                    break
                ids.append(row["id"])
                total += row["images"]
            now = time.time()
            db.executemany(
                "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, runner = ? "
                "WHERE id = ?",
                [(now, runner, i) for i in ids],
            )
            return ids

        ids = self._tx(take)
        return [j for j in (self.get(i) for i in ids) if j is not None]

    def complete(self, job_id: str, pngs: list[bytes], filenames: list[str]) -> bool:
        """Store the images and mark the job done, if it is still running (False: it was cancelled or
        timed out meanwhile, and nothing is stored)."""

        def done(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE jobs SET state = 'done', finished = ?, completions = completions + 1 "
                "WHERE id = ? AND state = 'running'",
                (time.time(), job_id),
            )
            if cur.rowcount != 1:
                return False
            db.executemany(
                "INSERT INTO images (job_id, idx, filename, png) VALUES (?, ?, ?, ?)",
                [
                    (job_id, i, f, sqlite3.Binary(p))
                    for i, (f, p) in enumerate(zip(filenames, pngs, strict=True))
                ],
            )
            self._prune(db)
            return True

        return self._tx(done)

    def finish(self, job_id: str, state: str, error: str | None = None) -> bool:
        """Move an active job to ``failed`` or ``cancelled`` (False if it had already finished)."""
        assert state in ("failed", "cancelled")

        def end(db: sqlite3.Connection) -> bool:
            ended = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = ? "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (state, time.time(), error, job_id),
            ).rowcount == 1
            self._prune(db)
            return ended

        return self._tx(end)

    def _prune(self, db: sqlite3.Connection) -> None:
        """Delete the finished jobs but the ``max_history`` last finished, with their images. By finish
        time, not submission: ranked by submission, an old job finishing after newer ones was deleted in
        the transaction that completed it, and its waiting request lost its result."""
        old = ("SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') "
               "ORDER BY finished DESC, seq DESC LIMIT -1 OFFSET ?")
        db.execute(f"DELETE FROM images WHERE job_id IN ({old})", (self.max_history,))
        db.execute(f"DELETE FROM jobs WHERE id IN ({old})", (self.max_history,))

    # --- reads ------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = Job.of_row(row)
            job.filenames = self._filenames(job_id)
            return job

    def _filenames(self, job_id: str) -> list[str]:
        rows = self._db.execute("SELECT filename FROM images WHERE job_id = ? ORDER BY idx", (job_id,))
        return [r[0] for r in rows]

    def jobs(self, states: tuple[str, ...] = ACTIVE + FINAL, limit: int = 200) -> list[Job]:
        """Jobs in ``states``, oldest first (the last ``limit`` of them)."""
        marks = ", ".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM (SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq DESC LIMIT ?) "
                "ORDER BY seq",
                (*states, limit),
            ).fetchall()
            jobs = [Job.of_row(r) for r in rows]
            for job in jobs:
                job.filenames = self._filenames(job.id)
        return jobs

    def count(self, states: tuple[str, ...] = ACTIVE) -> int:
        marks = ", ".join("?" * len(states))
        with self._lock:
            cur = self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", states)
            return int(cur.fetchone()[0])

    def queued_images(self, batch_key: str) -> int:
        """Images of the queued jobs with ``batch_key``."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(images), 0) FROM jobs WHERE state = 'queued' AND batch_key = ?",
                (batch_key,),
            ).fetchone()
            return int(row[0])

    def not_running(self, ids: list[str]) -> set[str]:
        """Those of ``ids`` that are no longer running (cancelled by any process sharing the store)."""
        if not ids:
            return set()
        marks = ", ".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM jobs WHERE id IN ({marks}) AND state != 'running'", ids)
            return {r[0] for r in rows}

    def oldest_queued(self) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            return None if row is None else Job.of_row(row)

    def image(self, job_id: str, idx: int) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT png FROM images WHERE job_id = ? AND idx = ?", (job_id, idx)
            ).fetchone()
            return None if row is None else bytes(row[0])

    def image_named(self, filename: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT png FROM images WHERE filename = ?", (filename,)).fetchone()
            return None if row is None else bytes(row[0])
