"""The trigger service's memory, in SQLite so that a restart forgets nothing.

* ``deliveries``: every accepted delivery id (a replayed delivery is answered, not acted on);
* ``submissions``: every run submitted for a (model, version, profile), written *before* the
  backend is called (``run_id`` NULL) and completed after, so a crash between submitting and
  tagging the parent version is repaired by the reconcile pass instead of submitting twice; it is
  what enforces "once per (version, profile)", whatever the version's tags say later;
* ``run_states``: the last state seen on the version's tags for each submitted run, so that a run
  whose tags were since taken over by another profile's run is still known as failed or not.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    event TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    profile TEXT NOT NULL,
    backend TEXT NOT NULL,
    run_id TEXT,
    source TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS submissions_by_version ON submissions (model, version, profile);
CREATE TABLE IF NOT EXISTS run_states (
    run_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    seen_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Submission:
    id: int
    model: str
    version: str
    profile: str
    backend: str
    run_id: str | None
    source: str
    created_at: float


class TriggerStore:
    """Thread-safe access to the SQLite state file (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ deliveries

    def remember_delivery(self, delivery_id: str, event: str) -> bool:
        """Record a delivery id; False when it was already seen (a replay)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO deliveries (delivery_id, received_at, event) VALUES (?, ?, ?)",
                (delivery_id, time.time(), event),
            )
            return cur.rowcount == 1

    def forget_delivery(self, delivery_id: str) -> None:
        """Drop a delivery id whose processing failed, so MLflow's retry of it is processed."""
        with self._tx() as db:
            db.execute("DELETE FROM deliveries WHERE delivery_id = ?", (delivery_id,))

    def prune_deliveries(self, older_than_s: float) -> int:
        """Forget delivery ids older than the timestamp window (they would be rejected as stale)."""
        with self._tx() as db:
            return db.execute(
                "DELETE FROM deliveries WHERE received_at < ?", (time.time() - older_than_s,)
            ).rowcount

    def delivery_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])

    # ------------------------------------------------------------------ submissions

    def begin_submission(self, model: str, version: str, profile: str, backend: str, source: str) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO submissions (model, version, profile, backend, run_id, source, created_at) "
                "VALUES (?, ?, ?, ?, NULL, ?, ?)",
                (model, version, profile, backend, source, time.time()),
            )
            if cur.lastrowid is None:
                raise RuntimeError("INSERT INTO submissions returned no row id")
            return int(cur.lastrowid)

    def complete_submission(self, submission_id: int, run_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE submissions SET run_id = ? WHERE id = ?", (run_id, submission_id))

    def abandon_submission(self, submission_id: int) -> None:
        """The backend refused the run: nothing was submitted."""
        with self._tx() as db:
            db.execute("DELETE FROM submissions WHERE id = ?", (submission_id,))

    def latest_submission(self, model: str, version: str, profile: str) -> Submission | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, model, version, profile, backend, run_id, source, created_at FROM submissions "
                "WHERE model = ? AND version = ? AND profile = ? ORDER BY id DESC LIMIT 1",
                (model, version, profile),
            ).fetchone()
        return Submission(*row) if row else None

    def record_state(self, run_id: str, state: str) -> None:
        """Remember the state the version's tags show for ``run_id``."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO run_states (run_id, state, seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT(run_id) DO UPDATE SET state = excluded.state, seen_at = excluded.seen_at",
                (run_id, state, time.time()),
            )

    def run_state(self, run_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM run_states WHERE run_id = ?", (run_id,)).fetchone()
        return str(row[0]) if row else None

    def submissions(self) -> list[Submission]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, model, version, profile, backend, run_id, source, created_at "
                "FROM submissions ORDER BY id"
            ).fetchall()
        return [Submission(*row) for row in rows]
