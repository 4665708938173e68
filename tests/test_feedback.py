"""Feedback: the live round trip, validation, durability, concurrency, and the training export."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from tests.serve_helpers import FakeEngine, sample, serve_app
from toolkit.cli import app as cli_app
from toolkit.data.schema import validate_file
from toolkit.feedback import FeedbackStore, detect_language, export_feedback
from toolkit.monitoring.metrics import GatewayMetrics
from toolkit.serve import ServeSettings
from toolkit.serve.app import build_app


def gateway_on(db: Path, record: bool = True):
    config = ServeSettings(model="fake", feedback_db=db, record_completions=record)
    return serve_app(build_app(config, FakeEngine(), GatewayMetrics(CollectorRegistry()),
                               FeedbackStore(db)))


def chat(url: str, content: str, **extra) -> dict:
    resp = httpx.post(f"{url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": content}], **extra})
    assert resp.status_code == 200
    return resp.json()


def test_round_trip_and_metrics(tmp_path):
    db = tmp_path / "fb.db"
    with gateway_on(db) as live:
        url = live.base_url
        cid = chat(url, "Quelle est la dose de paracétamol ?", metadata={"category": "protocol"})["id"]
        resp = httpx.post(f"{url}/v1/feedback", json={
            "completion_id": cid, "rating": 5, "comment": "parfait",
            "correction": "La dose est de 1 g toutes les 6 heures."})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["scale"] == "stars" and body["score"] == 1.0 and body["text_stored"]
        assert sample(url, "toolkit_feedback_total", model="fake-model", rating="5") == 1
        assert sample(url, "toolkit_feedback_score_count", model="fake-model") == 1
        assert sample(url, "toolkit_requests_total", endpoint="feedback", status="200") == 1
        rows = live.app.state.gateway.store.feedback_rows()
    assert len(rows) == 1 and rows[0]["correction"].startswith("La dose")
    assert FeedbackStore(db).database.journal_mode() == "wal"


def test_streamed_completion_ids_are_recorded(tmp_path):
    with gateway_on(tmp_path / "fb.db") as live:
        with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "stream": True}) as resp:
            first = json.loads(resp.read().decode().split("\n\n")[0][len("data: "):])
        resp = httpx.post(f"{live.base_url}/v1/feedback",
                          json={"completion_id": first["id"], "rating": -1})
        assert resp.status_code == 200 and resp.json()["score"] == 0.0


@pytest.mark.parametrize("rating,scale,score", [
    (-1, None, 0.0), (1, None, 1.0), (1, "thumbs", 1.0), (1, "stars", 0.0), (2, None, 0.25),
    (3, None, 0.5), (5, "stars", 1.0),
])
def test_rating_scales(tmp_path, rating, scale, score):
    with gateway_on(tmp_path / "fb.db") as live:
        cid = chat(live.base_url, "hello")["id"]
        payload = {"completion_id": cid, "rating": rating}
        if scale:
            payload["scale"] = scale
        body = httpx.post(f"{live.base_url}/v1/feedback", json=payload).json()
        assert body["score"] == score


def test_bad_payloads_get_4xx(tmp_path):
    with gateway_on(tmp_path / "fb.db") as live:
        url = live.base_url
        cid = chat(url, "hello")["id"]
        bad = [
            {"completion_id": cid, "rating": 0}, {"completion_id": cid, "rating": 6},
            {"completion_id": cid, "rating": -2}, {"completion_id": cid, "rating": "1"},
            {"completion_id": cid, "rating": 1.5}, {"completion_id": cid, "rating": True},
            {"rating": 1}, {"completion_id": cid}, {"completion_id": "", "rating": 1},
            {"completion_id": cid, "rating": 3, "scale": "thumbs"},
            {"completion_id": cid, "rating": -1, "scale": "stars"},
            {"completion_id": cid, "rating": 1, "scale": "emoji"},
            {"completion_id": cid, "rating": 1, "extra": "field"},
        ]
        for payload in bad:
            resp = httpx.post(f"{url}/v1/feedback", json=payload)
            assert resp.status_code == 400, payload
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        resp = httpx.post(f"{url}/v1/feedback", content=b"{oops",
                          headers={"content-type": "application/json"})
        assert resp.status_code == 400
        resp = httpx.post(f"{url}/v1/feedback", json={"completion_id": "chatcmpl-nope", "rating": 1})
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "completion_not_found"
        assert sample(url, "toolkit_feedback_total", model="fake-model", rating="1") == 0


def test_without_recording_only_ids_and_ratings_are_kept(tmp_path):
    db = tmp_path / "fb.db"
    with gateway_on(db, record=False) as live:
        cid = chat(live.base_url, "patient data", metadata={"category": "incident"})["id"]
        body = httpx.post(f"{live.base_url}/v1/feedback", json={
            "completion_id": cid, "rating": 1, "comment": "c", "correction": "x"}).json()
        assert body["text_stored"] is False
    store = FeedbackStore(db)
    row = store.completion_row(cid)
    assert row["prompt"] is None and row["answer"] is None
    assert row["metadata"] is None  # free client text: stored only with --record-completions
    (fb,) = store.feedback_rows()
    assert fb["comment"] is None and fb["correction"] is None and fb["rating"] == 1
    assert store.rated_completions(min_score01=0) == []


def test_metadata_is_stored_with_recording(tmp_path):
    db = tmp_path / "fb.db"
    with gateway_on(db, record=True) as live:
        cid = chat(live.base_url, "protocol", metadata={"category": "incident"})["id"]
    row = FeedbackStore(db).completion_row(cid)
    assert json.loads(row["metadata"]) == {"category": "incident"}


def test_store_files_are_owner_only(tmp_path):
    db = tmp_path / "fb.db"
    store = FeedbackStore(db)
    store.record_completion("chatcmpl-1", "m", metadata={"k": "v"})
    for name in ("fb.db", "fb.db-wal", "fb.db-shm"):
        assert (tmp_path / name).exists(), name
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    store.close()


def test_older_loose_store_is_tightened(tmp_path):
    db = tmp_path / "fb.db"
    FeedbackStore(db).close()
    db.chmod(0o644)
    FeedbackStore(db).close()
    assert db.stat().st_mode & 0o777 == 0o600


def test_persists_across_restart(tmp_path):
    db = tmp_path / "fb.db"
    with gateway_on(db) as live:
        cid = chat(live.base_url, "hello")["id"]
        assert httpx.post(f"{live.base_url}/v1/feedback",
                          json={"completion_id": cid, "rating": 1}).status_code == 200
    with gateway_on(db) as live:  # a new store and app on the same file
        resp = httpx.post(f"{live.base_url}/v1/feedback", json={"completion_id": cid, "rating": 4})
        assert resp.status_code == 200
        assert live.app.state.gateway.store.count("feedback") == 2


def test_fifty_concurrent_posts_lose_none(tmp_path):
    with gateway_on(tmp_path / "fb.db") as live:
        url = live.base_url
        ids = [chat(url, f"question {i}")["id"] for i in range(5)]

        def post(i: int) -> int:
            return httpx.post(f"{url}/v1/feedback", json={
                "completion_id": ids[i % 5], "rating": (i % 5) + 1, "scale": "stars"},
                timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(post, range(50)))
        assert statuses == [200] * 50
        assert live.app.state.gateway.store.count("feedback") == 50
        total = sum(sample(url, "toolkit_feedback_total", model="fake-model", rating=str(r))
                    for r in range(1, 6))
        assert total == 50


def test_language_heuristic():
    assert detect_language("Quelle est la conduite à tenir en cas de chute du patient ?") == "fr"
    assert detect_language("What should the nurse do when the patient falls?") == "en"
    assert detect_language("Lavage des mains avant et après chaque soin.") == "fr"


def _seed_store(db: Path) -> list[str]:
    store = FeedbackStore(db)
    rows = [
        ("c1", [{"role": "system", "content": "Tu es un assistant."},
                {"role": "user", "content": "Quelle est la procédure en cas d'incendie ?"}],
         "Évacuer les patients.", {"category": "protocol"}, 1, "thumbs", 1.0, "Donner l'alerte, puis évacuer."),
        ("c2", [{"role": "user", "content": "How do I report a medication error?"}],
         "Use the incident form in the intranet.", {"category": "incident"}, 5, "stars", 1.0, None),
        ("c3", [{"role": "user", "content": "What is the shift handover checklist?"}],
         "I don't know.", {}, 2, "stars", 0.25, None),
        ("c4", "Explain hand hygiene", "Wash hands for 30 seconds.", {"category": "other"},
         4, "stars", 0.75, None),
    ]
    for cid, prompt, answer, meta, rating, scale, score, correction in rows:
        store.record_completion(cid, "m", "chat", metadata=meta, prompt=prompt, answer=answer)
        store.add_feedback(cid, rating, scale, score, correction=correction)
    store.record_completion("c5", "m", "chat")  # not recorded: no text, cannot be exported
    store.add_feedback("c5", 1, "thumbs", 1.0)
    store.close()
    return [r[0] for r in rows]


def test_export_validates(tmp_path):
    db, out = tmp_path / "fb.db", tmp_path / "data" / "feedback.jsonl"
    _seed_store(db)
    assert export_feedback(db, min_rating=1, since=None, out=out) == 2
    examples, issues = validate_file(out)
    assert issues == []
    by_id = {e.id: e for e in examples}
    fire = by_id["feedback-c1"]
    assert fire.language == "fr" and fire.category == "protocol"
    assert fire.instruction == "Quelle est la procédure en cas d'incendie ?"
    assert fire.output == "Donner l'alerte, puis évacuer."  # the correction wins
    assert by_id["feedback-c2"].language == "en" and by_id["feedback-c2"].category == "incident"
    # 4 stars = 0.75: a star threshold of 4 keeps it, and an unknown category becomes training
    assert export_feedback(db, min_rating=4, since=None, out=out) == 3
    examples, issues = validate_file(out)
    assert issues == [] and {e.category for e in examples if e.id == "feedback-c4"} == {"training"}
    assert export_feedback(db, min_rating=0, since="2999-01-01", out=out) == 0


def test_export_cli_output_passes_data_validate(tmp_path):
    db, out = tmp_path / "fb.db", tmp_path / "feedback.jsonl"
    _seed_store(db)
    runner = CliRunner()
    result = runner.invoke(cli_app, ["feedback", "export", "--db", str(db), "--min-rating", "0.75",
                                     "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 example(s)" in result.output
    result = runner.invoke(cli_app, ["data", "validate", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_app, ["feedback", "export", "--db", str(tmp_path / "none.db"),
                                     "--out", str(out)])
    assert result.exit_code == 1 and "no feedback store" in result.output
    result = runner.invoke(cli_app, ["feedback", "export", "--db", str(db), "--since", "yesterday",
                                     "--out", str(out)])
    assert result.exit_code == 1 and "--since" in result.output
