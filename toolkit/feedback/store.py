"""The feedback store: completion ids the gateway returned, and the ratings clients sent.

Two databases behind one class, chosen by `--feedback-db`: a SQLite file (the default,
`$TOOLKIT_HOME/feedback.db`; `sqlite.py`) for one gateway, or a `postgresql://` URL
(`postgres.py`) that several gateway replicas share. Both get the same schema from the same
migrations (`migrations.py`) and the same SQL below; one connection per store, guarded by a
lock, so the gateway's worker threads can share it.

Privacy: the gateway serves medical content. A completion's prompt and answer are stored only
when the server runs with `--record-completions`, and so is the request metadata (e.g.
`{"category": "protocol"}`: free text a client may fill with patient details); otherwise a
completion row holds only its id, model and time, and feedback on it keeps only the rating and
ids: a comment or correction, being free text, is dropped too.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.feedback.migrations import Database, migrate
from toolkit.feedback.postgres import is_postgres_url, redact


def open_database(location: Path | str) -> Database:
    """The connection for a `--feedback-db` value: a PostgreSQL URL, else a SQLite file path.

    Raises:
        MissingExtraError: a PostgreSQL URL without the `postgres` extra installed.
        StoreError: the PostgreSQL server cannot be reached.
    """
    if is_postgres_url(location):
        from toolkit.feedback.postgres import PostgresDatabase

        return PostgresDatabase(str(location))
    from toolkit.feedback.sqlite import SqliteDatabase

    return SqliteDatabase(Path(location))


def describe_location(location: Path | str) -> str:
    """The store as logs and errors may show it (a URL's password hidden)."""
    return redact(location) if is_postgres_url(location) else str(location)


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


class FeedbackStore:
    """Thread-safe store of completions and feedback, on SQLite or PostgreSQL.

    Opening it applies the migrations the database lacks.

    Args:
        location: a SQLite file (created 0600, with its folder) or a `postgresql://` URL.

    Raises:
        MissingExtraError: a PostgreSQL URL without the `postgres` extra installed.
        StoreError: the database cannot be reached, or was migrated by a newer toolkit.
    """

    def __init__(self, location: Path | str) -> None:
        self.location: Path | str = location if is_postgres_url(location) else Path(location)
        self._lock = threading.RLock()
        self.database = open_database(self.location)
        try:
            migrate(self.database, describe_location(self.location))
        except BaseException:
            self.database.close()
            raise

    def close(self) -> None:
        """Close the connection (SQLite checkpoints its WAL)."""
        with self._lock:
            self.database.close()

    def record_completion(self, completion_id: str, model: str, endpoint: str = "chat", *,
                          created: float | None = None, metadata: dict[str, str] | None = None,
                          prompt: Any = None, answer: str | None = None) -> None:
        """Remember a returned completion; pass `prompt`/`answer` only when recording is on."""
        with self._lock:
            self.database.execute(
                "INSERT INTO completions (id, model, endpoint, created, metadata, prompt, answer) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (completion_id, model, endpoint, time.time() if created is None else created,
                 json.dumps(metadata) if metadata else None,
                 json.dumps(prompt, ensure_ascii=False) if prompt is not None else None, answer),
            )

    def has_completion(self, completion_id: str) -> bool:
        """Whether the gateway returned this id."""
        with self._lock:
            rows = self.database.execute("SELECT 1 FROM completions WHERE id = ?", (completion_id,))
        return bool(rows)

    def add_feedback(self, completion_id: str, rating: int, scale: str, score01: float,
                     comment: str | None = None, correction: str | None = None) -> FeedbackResult | None:
        """Store one rating; None when the completion id is unknown.

        The comment and correction are kept only for completions whose text was recorded.
        """
        with self._lock:
            rows = self.database.execute("SELECT model, answer IS NOT NULL AS recorded FROM "
                                         "completions WHERE id = ?", (completion_id,))
            if not rows:
                return None
            keep_text = bool(rows[0]["recorded"])
            (inserted,) = self.database.execute(
                "INSERT INTO feedback (completion_id, rating, scale, score01, comment, correction, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (completion_id, rating, scale, score01, comment if keep_text else None,
                 correction if keep_text else None, time.time()),
            )
            return FeedbackResult(int(inserted["id"]), str(rows[0]["model"]), keep_text)

    def count(self, table: str) -> int:
        """Rows in `completions` or `feedback`."""
        if table not in ("completions", "feedback"):
            raise ValueError(f"unknown table {table!r}")
        with self._lock:
            return int(self.database.execute(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])

    def feedback_rows(self) -> list[dict[str, Any]]:
        """Every feedback row, oldest first (tests, inspection)."""
        with self._lock:
            return self.database.execute("SELECT * FROM feedback ORDER BY id")

    def completion_row(self, completion_id: str) -> dict[str, Any] | None:
        """One completion row as stored (tests, inspection: what privacy settings kept)."""
        with self._lock:
            rows = self.database.execute("SELECT * FROM completions WHERE id = ?", (completion_id,))
        return rows[0] if rows else None

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
            rows = self.database.execute(query + " ORDER BY f.created, f.id", params)
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
