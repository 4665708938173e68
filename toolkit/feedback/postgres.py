"""The shared feedback database: PostgreSQL, for gateway replicas on several machines.

`--feedback-db postgresql://USER@HOST:5432/DB` (or `$TOOLKIT_FEEDBACK_DB`, which keeps a password
out of `ps` and of the pod spec). libpq reads what the URL leaves out from its usual
environment variables and files (`PGPASSWORD`, `~/.pgpass`, `PGSSLMODE`...). The driver,
psycopg 3, is the `postgres` extra and is imported only when such a URL is given.

Every statement commits on its own (autocommit): PostgreSQL's default `synchronous_commit=on`
flushes the commit to its WAL before answering, so a rating the gateway acknowledged survives
the gateway, and the database server, being killed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from toolkit.errors import StoreError
from toolkit.feedback.migrations import Dialect

URL_SCHEMES = ("postgresql://", "postgres://")
#: `pg_advisory_xact_lock` key held while migrating, so replicas starting together take turns
MIGRATION_LOCK_KEY = 0x746F6F6C6B6974  # "toolkit"


def is_postgres_url(location: object) -> bool:
    """Whether a `--feedback-db` value names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


def redact(url: str) -> str:
    """The URL with its password replaced by `***`, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class PostgresDatabase:
    """One psycopg connection, reopened after the server dropped it.

    Not thread-safe by itself: `FeedbackStore` serialises calls with its lock. One connection
    per gateway process is enough: a rating is one short insert, and the gateway replicas,
    not the connections, are what scale.

    Args:
        url: a libpq connection URL.

    Raises:
        MissingExtraError: psycopg is not installed (`pip install 'toolkit[postgres]'`).
        StoreError: the server cannot be reached or refuses the login.
    """

    dialect: Dialect = "postgres"

    def __init__(self, url: str) -> None:
        from toolkit.extras import require

        require("psycopg", f"--feedback-db {redact(url)}")
        self.url = url
        self._conn = self._connect()

    def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                   connect_timeout=10, application_name="toolkit-gateway")
        except psycopg.Error as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(f"--feedback-db {redact(self.url)}: cannot connect ({message}); "
                             "check the URL, the server and its pg_hba.conf") from None

    def _live(self) -> Any:
        # a dropped connection (server restart, failover) fails the request that saw it drop,
        # since its insert may or may not have committed; the next request reconnects
        if self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one statement (`?` placeholders, as SQLite's); its rows as dicts."""
        cursor = self._live().execute(sql.replace("?", "%s"), tuple(params) or None)
        return list(cursor.fetchall()) if cursor.description is not None else []

    @contextlib.contextmanager
    def migration_lock(self) -> Iterator[None]:
        """A transaction holding an advisory lock: replicas starting together migrate in turn."""
        conn = self._live()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            yield

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
