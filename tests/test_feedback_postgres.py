"""The feedback store on PostgreSQL: same schema and privacy as SQLite, shared by gateway replicas.

A real server from Debian's `postgresql` package is started once for the module (see
`postgres_helpers`); the tests skip with one line where its binaries or psycopg are missing.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import REPO_ROOT
from tests.postgres_helpers import PostgresServer, postgres_server
from tests.serve_helpers import wait_ready
from toolkit.cli import app as cli_app
from toolkit.data.schema import validate_file
from toolkit.errors import StoreError
from toolkit.feedback import FeedbackStore
from toolkit.feedback.migrations import SCHEMA_VERSION
from toolkit.feedback.postgres import redact
from toolkit.serve import ServeSettings

_names = itertools.count()


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A fresh, empty store of each kind."""
    if request.param == "sqlite":
        return tmp_path / "fb.db"
    server = request.getfixturevalue("pg")
    return server.create_database(f"store_{next(_names)}")


def test_same_privacy_on_both_databases(location):
    store = FeedbackStore(location)
    store.record_completion("c-private", "m", metadata=None, prompt=None, answer=None)
    store.record_completion("c-recorded", "m", metadata={"category": "incident"},
                            prompt=[{"role": "user", "content": "Chute du patient ?"}],
                            answer="Alerter l'infirmière.")
    assert store.add_feedback("c-private", 1, "thumbs", 1.0, comment="c", correction="x").text_stored is False
    assert store.add_feedback("c-recorded", 5, "stars", 1.0, correction="Alerter.").text_stored
    assert store.add_feedback("c-unknown", 1, "thumbs", 1.0) is None
    private = store.completion_row("c-private")
    assert private["prompt"] is None and private["answer"] is None and private["metadata"] is None
    rows = store.feedback_rows()
    assert [(r["completion_id"], r["comment"], r["correction"]) for r in rows] == [
        ("c-private", None, None), ("c-recorded", None, "Alerter.")]
    (rated,) = store.rated_completions(min_score01=0)
    assert rated.completion_id == "c-recorded" and rated.metadata == {"category": "incident"}
    assert isinstance(rated.created, float) and rated.rated_at > 1.7e9  # double precision
    store.close()


def test_migrations_apply_once_and_refuse_a_newer_schema(location):
    FeedbackStore(location).close()
    store = FeedbackStore(location)  # reopening applies nothing twice
    rows = store.database.execute("SELECT version FROM schema_version")
    assert [r["version"] for r in rows] == [SCHEMA_VERSION]
    store.database.execute("INSERT INTO schema_version (version, description, applied) "
                           "VALUES (?, ?, ?)", (SCHEMA_VERSION + 1, "from the future", 0.0))
    store.close()
    with pytest.raises(StoreError, match="newer than this toolkit"):
        FeedbackStore(location)


def test_sqlite_store_from_before_schema_version_is_adopted(tmp_path):
    import sqlite3

    from toolkit.feedback.migrations import MIGRATIONS

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # what toolkit wrote before migrations existed
        for statement in MIGRATIONS[0].sql("sqlite"):
            conn.execute(statement)
        conn.execute("INSERT INTO completions VALUES ('c1', 'm', 'chat', 1.0, NULL, NULL, NULL)")
        conn.execute("PRAGMA user_version=1")
    store = FeedbackStore(db)
    assert store.has_completion("c1") and store.count("completions") == 1
    assert store.database.execute("SELECT version FROM schema_version") == [{"version": 1}]


def test_url_password_never_shows(pg):
    url = pg.url("nope")
    assert redact(url) == f"postgresql://toolkit:***@127.0.0.1:{pg.port}/nope"
    with pytest.raises(StoreError) as caught:
        FeedbackStore(url)
    assert pg.password not in str(caught.value) and "***" in str(caught.value)


def test_settings_keep_urls_and_make_paths():
    url = "postgresql://toolkit@db.internal:5432/feedback"
    assert ServeSettings(model="m", feedback_db=url).feedback_db == url
    assert ServeSettings(model="m", feedback_db="x/fb.db").feedback_db == Path("x/fb.db")


def _start_gateway(url: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_gateway", url, "--record-completions"],
                            stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"gateway did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line.split()[1]}"



def test_two_gateways_share_the_store_and_lose_nothing_when_killed(pg, tmp_path):
    url = pg.create_database("durability")
    gateways = []
    try:
        for _ in range(2):  # both migrate the empty database at once: the advisory lock orders them
            gateways.append(_start_gateway(url))
        urls = [base for _, base in gateways]
        for base in urls:
            wait_ready(f"{base}/ready", 60.0)
        completions = []
        for i in range(20):  # made on one replica, rated on either: the store is shared
            resp = httpx.post(f"{urls[i % 2]}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"Question {i} sur le protocole"}],
                "metadata": {"category": "protocol"}}, timeout=30)
            assert resp.status_code == 200, resp.text
            completions.append(resp.json()["id"])

        def post(i: int) -> tuple[int, int | None]:
            resp = httpx.post(f"{urls[i % 2]}/v1/feedback", json={
                "completion_id": completions[(i * 7) % 20], "rating": i % 5 + 1,
                "scale": "stars", "correction": f"Réponse corrigée numéro {i}."}, timeout=60)
            return resp.status_code, resp.json().get("id") if resp.status_code == 200 else None

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(post, range(200)))
        acknowledged = {feedback_id for status, feedback_id in results if status == 200}
        assert [status for status, _ in results] == [200] * 200
        for proc, _ in gateways:
            proc.send_signal(signal.SIGKILL)
        for proc, _ in gateways:
            proc.wait(timeout=30)
    finally:
        for proc, _ in gateways:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    store = FeedbackStore(url)
    assert {r["id"] for r in store.feedback_rows()} == acknowledged and len(acknowledged) == 200
    assert store.count("completions") == 20
    store.close()
    out = tmp_path / "feedback.jsonl"
    result = CliRunner().invoke(cli_app, ["feedback", "export", "--db", url, "--min-rating", "0",
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "20 example(s)" in result.output and pg.password not in result.output
    examples, issues = validate_file(out)
    assert issues == [] and len(examples) == 20
    assert all(e.output.startswith("Réponse corrigée") for e in examples)
