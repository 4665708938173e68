"""The feedback store: completion ids the gateway returned, and the ratings clients sent.

SQLite in WAL mode (readers never block the writer; a crash loses no committed row), one
connection guarded by a lock, so the gateway's worker threads can share one store.

Privacy: the gateway serves medical content. A completion's prompt and answer are stored only
when the server runs with `--record-completions`, and so is the request metadata (e.g.
`{"category": "protocol"}`: free text a client may fill with patient details); otherwise a
completion row holds only its id, model and time, and feedback on it keeps only the rating and
ids: a comment or correction, being free text, is dropped too. The database and its WAL/shared
memory files are readable by their owner only (0600).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id        TEXT PRIMARY KEY,
    model     TEXT NOT NULL,
    endpoint  TEXT NOT NULL,
    created   REAL NOT NULL,
    metadata  TEXT,              -- JSON object or NULL
    prompt    TEXT,              -- JSON (messages list or prompt string); NULL unless recorded
    answer    TEXT               -- NULL unless recorded
);
CREATE TABLE IF NOT EXISTS feedback (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    completion_id  TEXT NOT NULL REFERENCES completions(id),
    rating         INTEGER NOT NULL,
    scale          TEXT NOT NULL CHECK (scale IN ('thumbs', 'stars')),
    score01        REAL NOT NULL CHECK (score01 BETWEEN 0 AND 1),
    comment        TEXT,
    correction     TEXT,
    created        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_completion ON feedback(completion_id);
CREATE INDEX IF NOT EXISTS feedback_created ON feedback(created);
"""


@dataclass(frozen=True)
class RatedCompletion:
    """A recorded completion with its latest rating."""

    completion_id: str
    model: str
    endpoint: str
    created: float
    metadata: dict[str, str]
    prompt: Any  # list of {role, content} for chat, a string for text completions
    answer: str
    rating: int
    scale: str
    score01: float
    correction: str | None
    comment: str | None
    rated_at: float


@dataclass(frozen=True)
class FeedbackResult:
    """What `add_feedback` stored."""

    feedback_id: int
    model: str
    text_stored: bool


def _owner_only(path: Path) -> None:
    """Create the database 0600, or tighten an older one, before SQLite opens it.

    SQLite gives the -wal and -shm files it creates the database file's permissions, so
    fixing the main file covers them; ones left by an earlier, looser run are tightened too.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for item in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if item.exists() and item.stat().st_mode & 0o077:
            item.chmod(0o600)


class FeedbackStore:
    """Thread-safe SQLite store of completions and feedback.

    Args:
        path: the database file (created with its folder).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _owner_only(self.path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0,
                                     isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._conn.close()

    def journal_mode(self) -> str:
        """The SQLite journal mode ("wal")."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    def record_completion(self, completion_id: str, model: str, endpoint: str = "chat", *,
                          created: float | None = None, metadata: dict[str, str] | None = None,
                          prompt: Any = None, answer: str | None = None) -> None:
        """Remember a returned completion; pass `prompt`/`answer` only when recording is on."""
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO completions (id, model, endpoint, created, metadata, "
                "prompt, answer) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (completion_id, model, endpoint, time.time() if created is None else created,
                 json.dumps(metadata) if metadata else None,
                 json.dumps(prompt, ensure_ascii=False) if prompt is not None else None, answer),
            )

    def has_completion(self, completion_id: str) -> bool:
        """Whether the gateway returned this id."""
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM completions WHERE id = ?",
                                     (completion_id,)).fetchone()
        return row is not None

    def add_feedback(self, completion_id: str, rating: int, scale: str, score01: float,
                     comment: str | None = None, correction: str | None = None) -> FeedbackResult | None:
        """Store one rating; None when the completion id is unknown.

        The comment and correction are kept only for completions whose text was recorded.
        """
        with self._lock:
            row = self._conn.execute("SELECT model, answer IS NOT NULL AS recorded FROM "
                                     "completions WHERE id = ?", (completion_id,)).fetchone()
            if row is None:
                return None
            keep_text = bool(row["recorded"])
            cursor = self._conn.execute(
                "INSERT INTO feedback (completion_id, rating, scale, score01, comment, correction, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (completion_id, rating, scale, score01, comment if keep_text else None,
                 correction if keep_text else None, time.time()),
            )
            return FeedbackResult(int(cursor.lastrowid or 0), str(row["model"]), keep_text)

    def count(self, table: str) -> int:
        """Rows in `completions` or `feedback`."""
        if table not in ("completions", "feedback"):
            raise ValueError(f"unknown table {table!r}")
        with self._lock:
            return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def feedback_rows(self) -> list[dict[str, Any]]:
        """Every feedback row, oldest first (tests, inspection)."""
        with self._lock:
            return [dict(r) for r in self._conn.execute("SELECT * FROM feedback ORDER BY id")]

    def rated_completions(self, min_score01: float | None = None, min_rating: int | None = None,
                          since: float | None = None) -> list[RatedCompletion]:
        """Recorded completions (text stored) with their latest rating, oldest first.

        Args:
            min_score01: keep ratings whose normalised score is at least this (0..1).
            min_rating: keep ratings whose raw value is at least this (either scale).
            since: keep ratings given at or after this UNIX time.
        """
        query = (
            "SELECT c.*, f.rating, f.scale, f.score01, f.correction, f.comment, f.created AS rated_at "
            "FROM feedback f JOIN completions c ON c.id = f.completion_id "
            "WHERE f.id = (SELECT MAX(id) FROM feedback WHERE completion_id = c.id) "
            "AND c.answer IS NOT NULL"
        )
        params: list[Any] = []
        if min_score01 is not None:
            query += " AND f.score01 >= ?"
            params.append(min_score01 - 1e-9)
        if min_rating is not None:
            query += " AND f.rating >= ?"
            params.append(min_rating)
        if since is not None:
            query += " AND f.created >= ?"
            params.append(since)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY f.created, f.id", params).fetchall()
        return [
            RatedCompletion(
                completion_id=r["id"], model=r["model"], endpoint=r["endpoint"],
                created=r["created"], metadata=json.loads(r["metadata"]) if r["metadata"] else {},
                prompt=json.loads(r["prompt"]) if r["prompt"] else None, answer=r["answer"],
                rating=r["rating"], scale=r["scale"], score01=r["score01"],
                correction=r["correction"], comment=r["comment"], rated_at=r["rated_at"],
            )
            for r in rows
        ]
