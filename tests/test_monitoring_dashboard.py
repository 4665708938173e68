"""The Grafana dashboard as a contract: structure, units, and only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from toolkit.monitoring.contract import VLLM_METRICS, exposed_series_names
from toolkit.monitoring.dashboard import (
    DashboardError,
    Panel,
    list_panels,
    load_dashboard,
    metric_names_in,
    panel_queries,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
KNOWN = exposed_series_names() | VLLM_METRICS
ROWS = {"Served model", "Traffic", "Latency", "Throughput", "Saturation", "Errors", "Feedback",
        "Process", "vLLM engine"}


@pytest.fixture(scope="module")
def dashboard(repo_root: Path) -> dict[str, Any]:
    return load_dashboard(repo_root / "monitoring" / "grafana" / "dashboards" / "toolkit.json")


@pytest.fixture(scope="module")
def panels(dashboard: dict[str, Any]) -> list[Panel]:
    return [panel for panel in list_panels(dashboard) if panel.type != "row"]


def test_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "toolkit-serving"
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"] == "label_values(toolkit_model_info, model)"
    assert variables["model"]["multi"] and variables["model"]["includeAll"]
    assert variables["engine"]["query"] == "label_values(toolkit_model_info, engine)"


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel.id for panel in list_panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_every_panel_has_datasource_query_and_unit(panels: list[Panel]) -> None:
    for panel in panels:
        assert panel.datasource == DATASOURCE, panel.title
        assert panel.targets, panel.title
        assert all(t.expr and t.ref_id for t in panel.targets), panel.title
        assert panel.unit, panel.title
        assert len({t.ref_id for t in panel.targets}) == len(panel.targets), panel.title


def test_every_target_has_the_datasource_too(dashboard: dict[str, Any]) -> None:
    def raw_panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [p for item in items for p in [item, *item.get("panels", [])]]

    for raw in raw_panels(dashboard["panels"]):
        for target in raw.get("targets", []):
            assert target["datasource"] == DATASOURCE, raw["title"]


def test_latency_panels_are_in_seconds(panels: list[Panel]) -> None:
    latency = [p for p in panels if p.row == "Latency"
               or any("_seconds_bucket" in t.expr for t in p.targets)]
    assert len(latency) >= 4
    for panel in latency:
        assert panel.unit == "s", panel.title


def test_every_panel_sits_in_a_known_row(dashboard: dict[str, Any], panels: list[Panel]) -> None:
    rows = [p.title for p in list_panels(dashboard) if p.type == "row"]
    assert set(rows) == ROWS and len(rows) == len(ROWS)
    assert all(panel.row in ROWS for panel in panels)
    for row in ROWS:
        assert any(panel.row == row for panel in panels), f"row {row} is empty"


def test_queries_name_only_contract_metrics(panels: list[Panel]) -> None:
    for panel in panels:
        for target in panel.targets:
            names = metric_names_in(target.expr)
            assert names, f"{panel.title}: no metric in {target.expr}"
            assert names <= KNOWN, f"{panel.title}: unknown {names - KNOWN}"


def test_variable_queries_name_contract_metrics(dashboard: dict[str, Any]) -> None:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"])
            assert metric and metric.group(1) in KNOWN


def test_vllm_row_reads_vllm_metrics_and_every_vllm_metric_is_shown(panels: list[Panel]) -> None:
    vllm = [p for p in panels if p.row == "vLLM engine"]
    used = {name for p in vllm for t in p.targets for name in metric_names_in(t.expr)}
    assert used == VLLM_METRICS
    outside = {name for p in panels if p.row != "vLLM engine"
               for t in p.targets for name in metric_names_in(t.expr)}
    assert not outside & VLLM_METRICS


def test_vllm_panels_filter_on_the_model_variable(panels: list[Panel]) -> None:
    for panel in (p for p in panels if p.row == "vLLM engine"):
        for target in panel.targets:
            assert 'model_name=~"${model}(-base)?"' in target.expr, (panel.title, target.expr)


def test_process_panels_read_the_gateway_job_only(panels: list[Panel]) -> None:
    process = [p for p in panels if p.row == "Process"]
    assert process
    for panel in process:
        for target in panel.targets:
            assert 'job="toolkit"' in target.expr, (panel.title, target.expr)


def test_token_panels_use_a_token_unit(panels: list[Panel]) -> None:
    """Token counts in tokens; the share of draft tokens kept is a ratio of two of them."""
    units = {p.title: p.unit for p in panels if p.row == "Throughput"}
    assert units == {"Tokens/s": "suffix:tokens/s", "Generated tokens per request": "suffix:tokens",
                     "Draft tokens kept": "percentunit"}


def test_feedback_counts_are_split_by_scale(panels: list[Panel]) -> None:
    exprs = [t.expr for p in panels for t in p.targets if "toolkit_feedback_total" in t.expr]
    assert exprs and all("by (scale, rating)" in e for e in exprs)


def test_panel_queries_substitute_every_variable(dashboard: dict[str, Any]) -> None:
    queries = panel_queries(dashboard, {"model": "tiny"}, rate_interval="2m")
    assert queries
    for panel, target in queries:
        assert "$" not in target.expr, (panel.title, target.expr)
    exprs = [target.expr for _, target in queries]
    assert any('model=~"tiny"' in e and 'engine=~".*"' in e and "[2m]" in e for e in exprs)


def test_unknown_variable_names_the_flag() -> None:
    dashboard = {"panels": [{"type": "timeseries", "id": 1, "title": "x",
                             "targets": [{"refId": "A", "expr": "up{job=~\"$job\"}"}]}]}
    with pytest.raises(DashboardError, match=r"--var job=VALUE"):
        panel_queries(dashboard, {})


def test_all_substitution_forms() -> None:
    dashboard = {
        "templating": {"list": [{"name": "model", "type": "query"},
                                {"name": "datasource", "type": "datasource"}]},
        "panels": [{"type": "timeseries", "id": 1, "title": "x", "targets": [{
            "refId": "A",
            "expr": 'rate(a{m="$model",n="${model}",o="${model:regex}"}[$__rate_interval]) '
                    '+ b[$__interval] + c{d="$datasource"}',
        }]}],
    }
    [(_, target)] = panel_queries(dashboard, {}, rate_interval="3m", interval="30s")
    assert target.expr == ('rate(a{m=".*",n=".*",o=".*"}[3m]) + b[30s] '
                           '+ c{d="prometheus"}')


def test_collapsed_and_expanded_rows_both_flatten() -> None:
    dashboard = {"panels": [
        {"type": "stat", "id": 1, "title": "top"},
        {"type": "row", "id": 2, "title": "Open", "collapsed": False, "panels": []},
        {"type": "timeseries", "id": 3, "title": "under open"},
        {"type": "row", "id": 4, "title": "Closed", "collapsed": True, "panels": [
            {"type": "timeseries", "id": 5, "title": "inside closed"}]},
    ]}
    placed = {p.title: p.row for p in list_panels(dashboard)}
    assert placed == {"top": None, "Open": None, "under open": "Open", "Closed": None,
                      "inside closed": "Closed"}


@pytest.mark.parametrize(("expr", "names"), [
    ("up", {"up"}),
    ('sum by (status) (rate(toolkit_requests_total{model=~"$model"}[$__rate_interval]))',
     {"toolkit_requests_total"}),
    ("histogram_quantile(0.95, sum(rate(x_bucket[5m])) by (le))", {"x_bucket"}),
    ("a / on (model) group_left (format) b > bool 0.5", {"a", "b"}),
    ("max_over_time(vllm:kv_cache_usage_perc[1h:1m] offset 5m)", {"vllm:kv_cache_usage_perc"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)") or vector(1e3)', {"up"}),
    ("time() - process_start_time_seconds", {"process_start_time_seconds"}),
    ("sum without (instance) (a) unless ignoring (job) b", {"a", "b"}),
])
def test_metric_names_in(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names


def test_load_dashboard_errors(tmp_path: Path) -> None:
    with pytest.raises(DashboardError, match="not found"):
        load_dashboard(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(DashboardError, match="not valid JSON"):
        load_dashboard(bad)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"dashboard": {"panels": []}}), encoding="utf-8")
    with pytest.raises(DashboardError, match="no 'panels' list"):
        load_dashboard(wrapped)
