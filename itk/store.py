"""The durable job store of one output folder: every job's state, attempts and times, in SQLite (WAL mode).

`itk batch`, `itk serve` and a Ray cluster's head all keep their queue here; workers never touch it (whoever
feeds a worker records what it reports). SQLite is the embedded default: a file in the output folder, nothing
to start, readers (`itk batch --status`, the web page) never block the one writer, and every state change is
one transaction made durable before the call returns (synchronous=FULL), so a SIGKILL at any moment leaves
the last committed state.

States: queued -> running (on a worker) -> done (its mp4 verified) | failed (error + fix) | cancelled; a
running job whose runner died is queued again by `itk.batch.recover_finished` (or found done), and resumes from
its last finished clip. Only a running job can end (a job cancelled while its worker finished it stays
cancelled); an ended job stays until `delete` forgets it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

STORE_FILE = "itk-jobs.sqlite"
STATES = ("queued", "running", "done", "failed", "cancelled")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,      -- the job's name: its video is <name>.mp4 in the output folder
    position INTEGER NOT NULL,  -- the order jobs are taken in (the job file's line, or arrival)
    spec TEXT NOT NULL,         -- the job as submitted (JSON)
    fingerprint TEXT NOT NULL,  -- a hash of the spec: a job changed under the same name is made again
    state TEXT NOT NULL,
    worker TEXT,                -- who runs it (e.g. "GPU 0"), while running
    attempts INTEGER NOT NULL DEFAULT 0,
    output TEXT,                -- the finished mp4 (done)
    video_s REAL,
    error TEXT,
    fix TEXT,
    exit_code INTEGER,
    note TEXT,                  -- what happened besides the state (resumed, requeued after a lost worker, ...)
    clip INTEGER, clips INTEGER, step INTEGER, steps INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    busy_s REAL NOT NULL DEFAULT 0,  -- seconds spent running, over all attempts
    setup_s REAL                     -- seconds of the last attempt before its first denoising step
);
"""


@dataclass(frozen=True)
class JobRecord:
    """One row of the store, as read."""

    name: str
    position: int
    spec: str
    fingerprint: str
    state: str
    worker: str | None
    attempts: int
    output: str | None
    video_s: float | None
    error: str | None
    fix: str | None
    exit_code: int | None
    note: str | None
    clip: int | None
    clips: int | None
    step: int | None
    steps: int | None
    created: float
    started: float | None
    finished: float | None
    busy_s: float
    setup_s: float | None

    @property
    def spec_data(self) -> dict[str, Any]:
        return json.loads(self.spec)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("spec", "fingerprint")}
        data["job"] = self.spec_data
        return data


COLUMNS = tuple(f.name for f in fields(JobRecord))


class StoreError(Exception):
    """The store file cannot be opened or is not an itk job store."""


class JobStore:
    """The queue of one output folder. Thread-safe: one connection, used under a lock (a batch's worker
    threads report through it)."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, *, create: bool = True) -> JobStore:
        """The store in `folder` (made, with the folder, when `create`); StoreError when there is none to read
        or the file is not a store."""
        path = folder / STORE_FILE
        if not create and not path.is_file():
            raise StoreError(f"{folder} holds no itk job store ({STORE_FILE})")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if create:
                db.executescript(SCHEMA)
            db.execute("SELECT name FROM jobs LIMIT 1")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is not a readable itk job store ({exc})") from None
        return cls(path, db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, where: str = "", args: Iterable[Any] = ()) -> list[JobRecord]:
        with self._lock:
            cursor = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs {where} ORDER BY position", tuple(args))
            return [JobRecord(*row) for row in cursor.fetchall()]

    # --- reading ------------------------------------------------------------------------------------------
    def jobs(self, states: Iterable[str] | None = None, names: Iterable[str] | None = None) -> list[JobRecord]:
        """The jobs, in queue order, optionally only those in `states` and/or named in `names`."""
        clauses, args = [], []
        if states is not None:
            states = list(states)
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if names is not None:
            names = list(names)
            clauses.append(f"name IN ({', '.join('?' * len(names))})")
            args += names
        return self._rows(("WHERE " + " AND ".join(clauses)) if clauses else "", args)

    def get(self, name: str) -> JobRecord | None:
        found = self._rows("WHERE name = ?", [name])
        return found[0] if found else None

    def counts(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """Jobs per state (every state present, 0 when none), counted by the database."""
        names = None if names is None else list(names)
        where = "" if names is None else f"WHERE name IN ({', '.join('?' * len(names))})"
        with self._lock:
            rows = self._db.execute(f"SELECT state, COUNT(*) FROM jobs {where} GROUP BY state",
                                    tuple(names or ())).fetchall()
        return {**dict.fromkeys(STATES, 0), **dict(rows)}

    # --- writing ------------------------------------------------------------------------------------------
    def add(self, name: str, spec: Mapping[str, Any], fingerprint: str, position: int | None = None) -> str:
        """Put a job in the queue, or find it there. Returns what happened: "new"; "changed" (a job of that name
        with another spec: queued again with the new one, whatever its state); "retry" (it had failed: queued
        again); or its unchanged state ("queued", "running", "done", "cancelled")."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT state, fingerprint FROM jobs WHERE name = ?", (name,)).fetchone()
            if position is None:
                position = db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]
            text = json.dumps(dict(spec), sort_keys=True, ensure_ascii=False)
            if row is None:
                db.execute("INSERT INTO jobs (name, position, spec, fingerprint, state, created) "
                           "VALUES (?, ?, ?, ?, 'queued', ?)", (name, position, text, fingerprint, now))
                return "new"
            state, old = row
            if old != fingerprint:
                db.execute("UPDATE jobs SET spec = ?, fingerprint = ?, position = ?, state = 'queued', worker = NULL, "
                           "output = NULL, error = NULL, fix = NULL, exit_code = NULL, clip = NULL, step = NULL, "
                           "note = 'the job changed since it was last run: made again' WHERE name = ?",
                           (text, fingerprint, position, name))
                return "changed"
            db.execute("UPDATE jobs SET position = ? WHERE name = ?", (position, name))
            if state == "failed":
                db.execute("UPDATE jobs SET state = 'queued', worker = NULL, note = 'tried again after failing: ' "
                           "|| COALESCE(error, '') WHERE name = ?", (name,))
                return "retry"
            return state

    def claim(self, worker: str, names: Iterable[str] | None = None) -> JobRecord | None:
        """The first queued job (of `names`, if given), now running on `worker`; None when none is queued."""
        names = None if names is None else list(names)
        with self._transaction() as db:
            where = "state = 'queued'" + (f" AND name IN ({', '.join('?' * len(names))})" if names is not None else "")
            row = db.execute(f"SELECT name FROM jobs WHERE {where} ORDER BY position LIMIT 1",
                             tuple(names or ())).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', worker = ?, attempts = attempts + 1, started = ?, "
                       "clip = NULL, clips = NULL, step = NULL, steps = NULL, setup_s = NULL, error = NULL, "
                       "fix = NULL, exit_code = NULL WHERE name = ?", (worker, time.time(), row[0]))
        return self.get(row[0])

    def progress(self, name: str, **values: Any) -> None:
        """Where a running job is: clip, clips, step, steps, setup_s (other keys are ignored)."""
        known = {k: v for k, v in values.items() if k in ("clip", "clips", "step", "steps", "setup_s")}
        if not known:
            return
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in known)} WHERE name = ? AND state = 'running'",
                       (*known.values(), name))

    def _end(self, name: str, state: str, **values: Any) -> bool:
        """A running job ends in `state`; False (nothing changed) when it was not running: a job cancelled
        while its worker was finishing it stays cancelled."""
        now = time.time()
        with self._transaction() as db:
            sets = ", ".join(f"{k} = ?" for k in values)
            return bool(db.execute(
                f"UPDATE jobs SET state = ?, worker = NULL, finished = ?, "
                f"busy_s = busy_s + MAX(0, ? - COALESCE(started, ?)){', ' + sets if sets else ''} "
                "WHERE name = ? AND state = 'running'", (state, now, now, now, *values.values(), name)).rowcount)

    def finish(self, name: str, output: Path, video_s: float | None, note: str | None = None) -> bool:
        """The job is done: its mp4 (verified by the caller) is in place. False when it was not running."""
        return self._end(name, "done", output=str(output), video_s=video_s, note=note)

    def note(self, name: str, text: str) -> None:
        """Add `text` to a job's note (what happened besides its state)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET note = CASE WHEN note IS NULL OR note = '' THEN ? ELSE note || '; ' || ? END "
                       "WHERE name = ?", (text, text, name))

    def fail(self, name: str, error: str, fix: str, exit_code: int) -> bool:
        return self._end(name, "failed", error=error, fix=fix, exit_code=exit_code)

    def requeue(self, name: str, note: str) -> bool:
        """Back to the queue (its runner stopped or died); the next attempt resumes from its last finished clip."""
        return self._end(name, "queued", note=note)

    def cancel(self, name: str) -> bool:
        """Cancel a queued or running job (the caller stops its worker; a running one's time so far is counted);
        False when it had already ended."""
        now = time.time()
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET busy_s = busy_s + CASE WHEN state = 'running' THEN MAX(0, ? - COALESCE(started, ?)) "
                "ELSE 0 END, state = 'cancelled', worker = NULL, finished = ? "
                "WHERE name = ? AND state IN ('queued', 'running')", (now, now, now, name)).rowcount
        return bool(changed)

    def delete(self, name: str) -> bool:
        """Forget a job that has ended (done, failed or cancelled); False when it is unknown, queued or running."""
        with self._transaction() as db:
            return bool(db.execute("DELETE FROM jobs WHERE name = ? AND state IN ('done', 'failed', 'cancelled')",
                                   (name,)).rowcount)
