"""The embedded feedback database: one SQLite file next to the gateway (the default).

WAL mode: readers never block the writer, and a killed gateway loses no committed row. The
database and its WAL/shared-memory files are readable by their owner only (0600): they may
hold medical text.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from toolkit.feedback.migrations import Dialect


def _owner_only(path: Path) -> None:
    """Create the database 0600, or tighten an older one, before SQLite opens it.

    SQLite gives the -wal and -shm files it creates the database file's permissions, so
    fixing the main file covers them; ones left by an earlier, looser run are tightened too.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for item in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if item.exists() and item.stat().st_mode & 0o077:
            item.chmod(0o600)


class SqliteDatabase:
    """One SQLite connection in autocommit mode (each statement commits on its own).

    Not thread-safe by itself: `FeedbackStore` serialises calls with its lock.

    Args:
        path: the database file (created 0600, with its folder).
    """

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _owner_only(self.path)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0,
                                     isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute("PRAGMA foreign_keys=ON")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one statement; its rows as dicts."""
        return [dict(row) for row in self._conn.execute(sql, tuple(params)).fetchall()]

    @contextlib.contextmanager
    def migration_lock(self) -> Iterator[None]:
        """`BEGIN IMMEDIATE`: the write lock, so two processes never migrate the file at once."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def journal_mode(self) -> str:
        """The SQLite journal mode ("wal")."""
        return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        self._conn.close()
