"""The dashboard against reality: a real Prometheus scraping a live gateway on the tiny model.

Every PromQL expression of every panel is evaluated through Prometheus' HTTP API; panels
outside the vLLM row must return data, and no expression may be invalid or name a metric the
gateway does not export. The same data then renders through `toolkit monitor snapshot`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from typer.testing import CliRunner

from tests.prometheus_helpers import query, running_prometheus, wait_for
from tests.serve_helpers import running_gateway
from toolkit.cli import app
from toolkit.monitoring.contract import (
    PROCESS_METRICS,
    VLLM_METRICS,
    exposed_series_names,
)
from toolkit.monitoring.dashboard import (
    list_panels,
    load_dashboard,
    metric_names_in,
    panel_queries,
)

DASHBOARD = Path(__file__).resolve().parents[1] / "monitoring/grafana/dashboards/toolkit.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _traffic(base_url: str, rounds: int) -> None:
    """A bounded burst: successful chats and completions, and some 4xx."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for index in range(rounds):
            client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 4,
                "messages": [{"role": "user", "content": f"Hygiène des mains {index}"}]})
            client.post("/v1/completions", json={"model": model, "prompt": "SBAR", "max_tokens": 3,
                                                 "stream": index % 2 == 0})
            client.post("/v1/chat/completions", json={"model": model, "messages": []})  # 4xx
            client.post("/v1/chat/completions", content=b"{not json",
                        headers={"content-type": "application/json"})  # 4xx
        answer = client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "ok?"}]})
        client.post("/v1/feedback", json={"completion_id": answer.json()["id"], "rating": 1})


def test_every_panel_query_against_live_prometheus(tiny_model_dir: Path, tmp_path: Path) -> None:
    with running_gateway(tiny_model_dir, record_completions=True) as base_url:
        target = base_url.removeprefix("http://")
        config = (
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: toolkit\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        with running_prometheus(config, tmp_path) as prom:
            stop = threading.Event()
            rounds = iter(range(40))  # bounded: at most 40 bursts while waiting for scrapes

            def tick() -> None:
                if not stop.is_set() and next(rounds, None) is not None:
                    _traffic(base_url, 1)

            wait_for(prom, "sum(rate(toolkit_requests_total[5s])) > 0", timeout_s=40, tick=tick)
            wait_for(prom, "sum(toolkit_feedback_total) > 0", timeout_s=20, tick=tick)
            for _ in range(3):
                tick()
            stop.set()

            exported = {line.split("{")[0].split(" ")[0]
                        for line in httpx.get(f"{base_url}/metrics").text.splitlines()
                        if line and not line.startswith("#")}
            assert exported - PROCESS_METRICS <= exposed_series_names()

            dashboard = load_dashboard(DASHBOARD)
            missing, empty = [], []
            for panel, target_ in panel_queries(dashboard, {}, rate_interval="10s"):
                names = metric_names_in(target_.expr)
                unknown = names - exported - VLLM_METRICS
                if unknown:
                    missing.append(f"{panel.title}: {sorted(unknown)}")
                response = httpx.get(f"{prom}/api/v1/query", params={"query": target_.expr})
                assert response.status_code == 200, f"{panel.title}: {target_.expr}: {response.text}"
                if not (panel.row or "").lower().startswith("vllm") and not query(prom, target_.expr):
                    empty.append(f"{panel.title} [{target_.ref_id}]: {target_.expr}")
            assert not missing, missing
            assert not empty, "panels without data:\n" + "\n".join(empty)

            out = tmp_path / "snapshot.png"
            result = CliRunner().invoke(app, ["monitor", "snapshot", "--prometheus", prom,
                                              "--range", "5m", "--out", str(out)])
            assert result.exit_code == 0, result.output
            assert out.read_bytes()[:8] == PNG_MAGIC
            vllm_panels = [p for p in list_panels(dashboard)
                           if p.type != "row" and (p.row or "").lower().startswith("vllm")]
            assert vllm_panels, "the dashboard keeps a vLLM engine row"
            assert "panels with data" in result.output
