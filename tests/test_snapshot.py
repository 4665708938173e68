"""`render_snapshot` against a real Prometheus scraping a real GatewayMetrics exposition."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from tests.prometheus_helpers import free_port, running_prometheus, wait_for
from toolkit.errors import ToolkitError
from toolkit.monitoring.metrics import GatewayMetrics
from toolkit.monitoring.snapshot import (
    SnapshotError,
    format_range,
    parse_range,
    render_snapshot,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
M, E = "tiny", "onnxruntime"


def drive(metrics: GatewayMetrics) -> None:
    """One round of traffic: successes, a client and a server error, tokens and a rating."""
    for status, seconds in ((200, 0.8), (200, 1.6), (404, 0.01), (500, 0.2)):
        metrics.request_finished(M, E, "chat", status, seconds)
    metrics.first_token(M, E, 0.12)
    metrics.tokens(M, E, prompt=20, generated=40, per_output_token_s=0.015)
    metrics.waiting(M, E, 1)
    metrics.running(M, E, 1)
    metrics.feedback(M, 1, "thumbs")
    metrics.feedback(M, -1, "thumbs")


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping a live GatewayMetrics every second, once samples have arrived."""
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.set_model_info(M, "onnx", "int8", E)
    drive(metrics)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    config = f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: toolkit
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""
    try:
        with running_prometheus(config, tmp_path_factory.mktemp("snapshot")) as url:
            wait_for(url, "rate(toolkit_requests_total[1m]) > 0", tick=lambda: drive(metrics))
            wait_for(url, "rate(toolkit_feedback_score_count[1m]) > 0", tick=lambda: drive(metrics))
            yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_snapshot_plots_panels_with_data(prometheus_url: str, repo_root: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "nested" / "serving.png"
    dashboard = repo_root / "monitoring/grafana/dashboards/toolkit.json"
    result = render_snapshot(prometheus_url, dashboard, out, range_s=120, step_s=1,
                             variables={"model": M})
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert out.stat().st_size > 10_000
    assert result.out == out and result.panels_with_data >= 10 and result.series > 0
    # The vLLM row has nothing under an embedded engine and is listed, not drawn.
    assert "KV cache usage" in result.empty_panels
    assert "Requests/s by status" not in result.empty_panels
    assert "End-to-end latency (chat + completions)" not in result.empty_panels
    assert f"{result.panels_with_data} panels with data" in str(result)
    assert [p.name for p in out.parent.iterdir()] == ["serving.png"]  # no temp file left


def test_variable_selecting_no_model_gives_a_clear_error(prometheus_url: str, repo_root: Path,
                                                         tmp_path: Path) -> None:
    dashboard = tmp_path / "d.json"
    dashboard.write_text(json.dumps({"title": "t", "panels": [{
        "type": "timeseries", "id": 1, "title": "requests",
        "targets": [{"refId": "A", "expr": 'toolkit_requests_total{model=~"$model"}'}],
    }]}), encoding="utf-8")
    with pytest.raises(SnapshotError, match="no panel has data"):
        render_snapshot(prometheus_url, dashboard, tmp_path / "x.png", range_s=60,
                        variables={"model": "absent"})
    assert not (tmp_path / "x.png").exists()


def test_bad_query_names_the_panel(prometheus_url: str, tmp_path: Path) -> None:
    dashboard = tmp_path / "d.json"
    dashboard.write_text(json.dumps({"panels": [{
        "type": "timeseries", "id": 1, "title": "broken",
        "targets": [{"refId": "A", "expr": "sum("}],
    }]}), encoding="utf-8")
    with pytest.raises(SnapshotError, match="panel 'broken' query A: Prometheus rejected"):
        render_snapshot(prometheus_url, dashboard, tmp_path / "x.png", range_s=60)


def test_unreachable_prometheus(repo_root: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SnapshotError, match="cannot reach Prometheus") as info:
        render_snapshot(url, repo_root / "monitoring/grafana/dashboards/toolkit.json",
                        tmp_path / "x.png")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ToolkitError)


@pytest.mark.parametrize(("url", "message"), [
    ("localhost:9090", "http://HOST:9090"),
    ("http://", "http://HOST:9090"),
    ("http://[::1", "cannot reach Prometheus"),
])
def test_not_a_url(repo_root: Path, tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(SnapshotError, match=re.escape(message)):
        render_snapshot(url, repo_root / "monitoring/grafana/dashboards/toolkit.json",
                        tmp_path / "x.png")


def test_format_range() -> None:
    assert [format_range(s) for s in (45, 900, 3600, 5400, 86400)] == [
        "45s", "15m", "1h", "1h30m", "1d"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("1d", 86400),
    ("2w", 1209600), (" 1h ", 3600),
])
def test_parse_range(text: str, seconds: int) -> None:
    assert parse_range(text) == seconds
    assert parse_range(format_range(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "-1h", "1.5h", "0", "0m", "1h foo"])
def test_parse_range_rejects(text: str) -> None:
    with pytest.raises(SnapshotError, match="--range"):
        parse_range(text)
