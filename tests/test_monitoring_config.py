"""Everything under monitoring/ is valid, tested by promtool, and names only contract metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolkit.monitoring.contract import (
    PROCESS_METRICS,
    TOOLKIT_METRICS,
    VLLM_METRICS,
    exposed_series_names,
)
from toolkit.monitoring.dashboard import metric_names_in

KNOWN = exposed_series_names() | VLLM_METRICS | {"up"}
EXPECTED_ALERTS = {
    "ToolkitGatewayDown", "ToolkitHighErrorRatio", "ToolkitHighClientErrorRatio",
    "ToolkitHighLatencyP95", "ToolkitHighTTFTP95", "ToolkitQueueSaturated", "VllmKVCacheHigh",
    "ToolkitFeedbackScoreFalling",
}


@pytest.fixture(scope="module")
def monitoring(repo_root: Path) -> Path:
    return repo_root / "monitoring"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules(monitoring: Path) -> list[dict[str, Any]]:
    groups = load(monitoring / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not found; apt-get install prometheus (CI installs it)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("args", [
    ("check", "config", "prometheus/prometheus.yml"),
    ("check", "rules", "prometheus/alerts.yml"),
    ("test", "rules", "prometheus/alerts_test.yml"),
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool(monitoring: Path, args: tuple[str, ...]) -> None:
    *command, path = args
    result = promtool(*command, str(monitoring / path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [
    "prometheus/prometheus.yml", "prometheus/alerts.yml", "prometheus/alerts_test.yml",
    "grafana/provisioning/datasources/prometheus.yml",
    "grafana/provisioning/dashboards/toolkit.yml", "docker-compose.yml",
])
def test_every_yaml_parses(monitoring: Path, path: str) -> None:
    assert isinstance(load(monitoring / path), dict)


def test_prometheus_scrapes_gateway_and_engine_proxy(monitoring: Path) -> None:
    config = load(monitoring / "prometheus" / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"toolkit", "vllm"}
    assert jobs["toolkit"]["static_configs"][0]["targets"] == ["toolkit:8000"]
    assert jobs["toolkit"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["vllm"]["metrics_path"] == "/metrics/engine"
    assert jobs["vllm"]["static_configs"][0]["targets"] == ["toolkit:8000"]
    assert "localhost:8000" in (monitoring / "prometheus" / "prometheus.yml").read_text()


def test_alert_rules_are_complete(monitoring: Path) -> None:
    found = rules(monitoring)
    assert {rule["alert"] for rule in found} == EXPECTED_ALERTS
    for rule in found:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "{{ $labels." in rule["annotations"]["summary"], rule["alert"]


def test_alert_rules_name_only_contract_metrics(monitoring: Path) -> None:
    for rule in rules(monitoring):
        names = metric_names_in(rule["expr"])
        assert names and names <= KNOWN, f"{rule['alert']}: unknown {names - KNOWN}"


def test_every_alert_has_a_firing_and_a_quiet_case(monitoring: Path) -> None:
    tests = load(monitoring / "prometheus" / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fires == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_grafana_provisioning_matches_compose(monitoring: Path) -> None:
    datasource = load(monitoring / "grafana/provisioning/datasources/prometheus.yml")
    [source] = datasource["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (
        "prometheus", "prometheus", "http://prometheus:9090")
    [provider] = load(monitoring / "grafana/provisioning/dashboards/toolkit.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    grafana = load(monitoring / "docker-compose.yml")["services"]["grafana"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def test_compose_runs_vllm_on_a_gpu_next_to_prometheus(monitoring: Path) -> None:
    services = load(monitoring / "docker-compose.yml")["services"]
    assert set(services) == {"toolkit", "prometheus", "grafana"}
    toolkit = services["toolkit"]
    assert toolkit["build"]["target"] == "gpu"  # the Dockerfile's ENTRYPOINT is `toolkit`
    command = toolkit["command"]
    assert command[:2] == ["serve", "/models/export"]
    assert command[command.index("--engine") + 1] == "vllm"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"
    [device] = toolkit["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "${PROMETHEUS_BIND:-127.0.0.1}:9090:9090" in prometheus["ports"]
    assert "3000:3000" in services["grafana"]["ports"]


def test_readme_metric_table_matches_the_contract(monitoring: Path) -> None:
    readme = (monitoring / "README.md").read_text(encoding="utf-8")
    for spec in TOOLKIT_METRICS:
        name = f"{spec.name}_total" if spec.kind == "counter" else spec.name
        row = f"| `{name}` | {spec.kind} | {', '.join(spec.labels)} | {spec.documentation} |"
        assert row in readme, f"README metric table is out of date; expected:\n{row}"
    table = [line for line in readme.splitlines() if line.startswith("| `toolkit_")]
    assert len(table) == len(TOOLKIT_METRICS)
    for name in PROCESS_METRICS | VLLM_METRICS:
        assert f"`{name}`" in readme, name


def test_readme_lists_every_alert_with_its_severity(monitoring: Path) -> None:
    readme = (monitoring / "README.md").read_text(encoding="utf-8")
    for rule in rules(monitoring):
        assert f"| `{rule['alert']}` | {rule['labels']['severity']} |" in readme, rule["alert"]
