"""The Kubernetes layout (deploy/): every overlay renders offline and holds what production needs.

`kubectl kustomize` renders each overlay from a copy of the tree whose secret env files are the
committed `*.env.example` placeholders; the test skips with one line where kubectl is missing.
The rendered gateway args are then parsed by the real `toolkit serve` CLI and turned into the
vLLM child's flags, and deploy/README.md must show exactly those command lines.
"""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tests.artifact_builders import make_export
from tests.conftest import REPO_ROOT
from toolkit.cli import app as cli_app
from toolkit.monitoring.contract import TOOLKIT_METRICS
from toolkit.serve.engines.vllm_flags import vllm_args, vllm_env
from toolkit.serve.select import resolve_served_model

DEPLOY = REPO_ROOT / "deploy"
PLACEHOLDER = "CHANGE-ME"
#: overlay -> (GPUs per pod, tensor parallel, pipeline parallel, pods holding one model)
LAYOUTS = {"cpu": (0, None, None, 1), "gpu": (1, None, None, 1), "gpu-tp4": (4, 4, None, 1),
           "gpu-pp2-ray": (4, 4, 2, 2)}


def render(overlay: str, tmp_path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found; the deploy/ manifests are rendered with `kubectl kustomize`")
    tree = tmp_path / "tree"
    shutil.copytree(DEPLOY, tree / "deploy")
    shutil.copytree(REPO_ROOT / "monitoring" / "grafana" / "dashboards",
                    tree / "monitoring" / "grafana" / "dashboards")
    for example in (tree / "deploy").rglob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    out = subprocess.run([kubectl, "kustomize", str(tree / "deploy" / "overlays" / overlay)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = find(objects, "Deployment", "toolkit-gateway")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def secret_values(objects: list[dict[str, Any]]) -> dict[str, str]:
    values = {}
    for secret in find(objects, "Secret"):
        for key, value in (secret.get("data") or {}).items():
            values[key] = base64.b64decode(value).decode()
        values.update(secret.get("stringData") or {})
    return values


@pytest.mark.parametrize("overlay", list(LAYOUTS))
def test_overlay_renders_what_production_needs(overlay, tmp_path):
    objects = render(overlay, tmp_path)
    gpus, _, _, pods_per_model = LAYOUTS[overlay]
    pods = [d["spec"]["template"]["spec"] for d in find(objects, "Deployment")]
    assert len(pods) == pods_per_model
    for pod in pods:
        for container in pod["containers"]:
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (name and tag and tag != "latest" and "/" not in tag), image
            assert "livenessProbe" in container, container["name"]
            limits = container["resources"]["limits"]
            assert int(limits.get("nvidia.com/gpu", 0)) == gpus
            assert container["resources"]["requests"].get("nvidia.com/gpu", "0") == str(gpus)

    gateway = gateway_container(objects)
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    secrets = {s["metadata"]["name"] for s in find(objects, "Secret")}
    env = {e["name"]: e for e in gateway["env"]}
    for var in ("TOOLKIT_API_KEY", "TOOLKIT_FEEDBACK_DB"):
        assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["name"] in secrets
    # the only secret values in the rendering are the committed placeholders
    values = secret_values(objects)
    assert set(values) == {"TOOLKIT_API_KEY", "TOOLKIT_FEEDBACK_DB"}
    assert all(PLACEHOLDER in value for value in values.values()), values
    everything_else = yaml.safe_dump([o for o in objects if o["kind"] != "Secret"])
    assert "postgresql://" not in everything_else and PLACEHOLDER not in everything_else

    (budget,) = find(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "toolkit-gateway"}
    (monitor,) = find(objects, "ServiceMonitor")
    paths = {e["path"]: e["relabelings"][0]["replacement"] for e in monitor["spec"]["endpoints"]}
    assert paths == ({"/metrics": "toolkit"} if overlay == "cpu"
                     else {"/metrics": "toolkit", "/metrics/engine": "vllm"})
    (dashboards,) = find(objects, "ConfigMap", "toolkit-grafana-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = REPO_ROOT / "monitoring" / "grafana" / "dashboards" / "toolkit.json"
    assert json.loads(dashboards["data"]["toolkit.json"]) == json.loads(shipped.read_text())


def test_autoscaling_reads_a_gauge_of_the_metric_contract(tmp_path):
    gauges = {spec.name for spec in TOOLKIT_METRICS if spec.kind == "gauge"}
    (hpa,) = find(render("gpu", tmp_path), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "toolkit-gateway"
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert names == {"toolkit_requests_waiting"} and names <= gauges
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] in names and rule["seriesQuery"].startswith(rule["name"]["as"] + "{")


def test_multi_node_layout_has_one_gateway_and_no_autoscaler(tmp_path):
    objects = render("gpu-pp2-ray", tmp_path)
    assert find(objects, "HorizontalPodAutoscaler") == []
    (gateway,) = find(objects, "Deployment", "toolkit-gateway")
    assert gateway["spec"]["replicas"] == 1
    (worker,) = find(objects, "Deployment", "toolkit-ray-worker")
    command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    (head,) = find(objects, "Service", "toolkit-ray-head")
    assert f"--address={head['metadata']['name']}:{head['spec']['ports'][0]['port']}" in command


def test_no_secret_values_are_committed():
    tracked = subprocess.run(["git", "ls-files", "deploy"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert not [p for p in tracked if p.endswith(".env")], "commit only *.env.example"
    for path in tracked:
        text = (REPO_ROOT / path).read_text()
        if path.endswith(".env.example"):
            values = [line.split("=", 1)[1] for line in text.splitlines()
                      if line and not line.startswith("#")]
            assert values and all(PLACEHOLDER in v for v in values), path
        if path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                assert not (doc and doc.get("kind") == "Secret"), f"{path}: use the secretGenerator"
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/base/postgres.env"],
                             check=False, cwd=REPO_ROOT)
    assert ignored.returncode == 0, "deploy/base/*.env must be git-ignored"


@pytest.mark.parametrize("overlay", [o for o in LAYOUTS if o != "cpu"])
def test_readme_shows_the_rendered_commands_and_vllm_gets_their_flags(overlay, tmp_path, monkeypatch):
    objects = render(overlay, tmp_path)
    gpus, tp, pp, _ = LAYOUTS[overlay]
    container = gateway_container(objects)
    command = " ".join(["toolkit", *(shlex.quote(a) for a in container["args"])])
    assert f"{command}\n" in (DEPLOY / "README.md").read_text(), f"deploy/README.md: {command}"

    seen = {}
    monkeypatch.setattr("toolkit.serve.run_server", lambda settings: seen.update(settings=settings))
    env = secret_values(objects)
    result = CliRunner().invoke(cli_app, container["args"], env=env)
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert settings.feedback_db == env["TOOLKIT_FEEDBACK_DB"] and settings.api_key == env["TOOLKIT_API_KEY"]
    folder = make_export(tmp_path, "merged", {"dtype": "bf16"})
    settings = settings.model_copy(update={"model": str(folder)})
    args = vllm_args(settings, resolve_served_model(str(folder), None), 12345)
    # every GPU of the pods holding the model is one tensor-parallel shard of one pipeline stage
    assert (tp or 1) * (pp or 1) == gpus * LAYOUTS[overlay][3]
    for name, value in (("--tensor-parallel-size", tp), ("--pipeline-parallel-size", pp)):
        assert (args[args.index(name) + 1] if name in args else None) == (str(value) if value else None)
    ray = pp is not None
    assert ("--distributed-executor-backend" in args) == ray
    assert ("RAY_ADDRESS" in vllm_env({}, settings.ray_address)) == ray
