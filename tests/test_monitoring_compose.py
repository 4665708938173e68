"""monitoring/docker-compose.yml ships safe defaults: built or pinned images, healthchecks,
ordered start-up, no anonymous Grafana and no secret written in the file.

The YAML is checked as data here; `docker compose config` (or Debian's `docker-compose`)
validates it against the Compose schema where such a binary exists. No image is built: the
test machines have no Docker daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

SERVICES = ("toolkit", "prometheus", "grafana")
#: variables that hold secrets: the file may only reference them, with `:?` (required)
SECRETS = ("TOOLKIT_API_KEY", "GRAFANA_ADMIN_PASSWORD")
_REQUIRED_REF = re.compile(r"^\$\{(?P<name>[A-Z_]+):\?[^}]+\}$")
_PINNED_IMAGE = re.compile(r"^[\w./-]+:(?!latest$)[\w.-]+$")


@pytest.fixture(scope="module")
def monitoring(repo_root: Path) -> Path:
    return repo_root / "monitoring"


@pytest.fixture(scope="module")
def compose(monitoring: Path) -> dict[str, Any]:
    return yaml.safe_load((monitoring / "docker-compose.yml").read_text(encoding="utf-8"))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


@pytest.mark.parametrize("name", SERVICES)
def test_image_is_built_or_pinned(compose: dict[str, Any], name: str, repo_root: Path,
                                  monitoring: Path) -> None:
    service = compose["services"][name]
    if "build" in service:
        build = service["build"]
        dockerfile = (monitoring / build["context"] / build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        assert build.get("target") in stages, f"{name}: target {build.get('target')} not in {stages}"
    else:
        assert _PINNED_IMAGE.match(service["image"]), f"{name}: image {service['image']} not pinned"


def test_dockerfile_installs_from_the_locks(repo_root: Path) -> None:
    text = (repo_root / "Dockerfile").read_text(encoding="utf-8")
    assert "sync_venv .venv locks/main.txt" in text  # the CPU image: exactly scripts/setup.sh's venv
    assert re.search(r"^FROM vllm/vllm-openai:v[\d.]+ AS gpu$", text, re.MULTILINE)
    assert "--require-hashes -r locks/gateway-gpu.txt" in text
    for lock in ("locks/main.txt", "locks/gateway-gpu.txt"):
        assert (repo_root / lock).is_file()
    for line in (repo_root / "locks/gateway-gpu.txt").read_text().splitlines():
        if "==" in line:  # the GPU image's extra packages sit at the CPU lock's versions
            assert line.split(" ")[0] in (repo_root / "locks/main.txt").read_text()


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_a_healthcheck(compose: dict[str, Any], name: str) -> None:
    check = compose["services"][name].get("healthcheck") or {}
    assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
    assert check["test"][0] == "CMD" and check.get("interval") and check.get("retries")


def test_gateway_healthcheck_probes_ready(compose: dict[str, Any]) -> None:
    probe = " ".join(compose["services"]["toolkit"]["healthcheck"]["test"])
    assert ":8000/ready" in probe


@pytest.mark.parametrize(("name", "dependency", "condition"), [
    ("prometheus", "toolkit", "service_started"),  # a gateway that never gets ready is scraped
    ("grafana", "prometheus", "service_healthy"),
])
def test_start_order_uses_conditions(compose: dict[str, Any], name: str, dependency: str,
                                     condition: str) -> None:
    depends = compose["services"][name]["depends_on"]
    assert isinstance(depends, dict), f"{name}: depends_on without conditions"
    assert depends[dependency]["condition"] == condition


def test_grafana_has_no_anonymous_access_and_no_default_password(compose: dict[str, Any]) -> None:
    env = _environment(compose["services"]["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"
    match = _REQUIRED_REF.match(env["GF_SECURITY_ADMIN_PASSWORD"])
    assert match and match["name"] == "GRAFANA_ADMIN_PASSWORD"


def test_gateway_requires_an_api_key_from_the_env_file(compose: dict[str, Any]) -> None:
    env = _environment(compose["services"]["toolkit"])
    match = _REQUIRED_REF.match(env["TOOLKIT_API_KEY"])
    assert match and match["name"] == "TOOLKIT_API_KEY"


@pytest.mark.parametrize("name", SERVICES)
def test_no_plain_secret_in_the_file(compose: dict[str, Any], name: str) -> None:
    for key, value in _environment(compose["services"][name]).items():
        if any(word in key for word in ("PASSWORD", "API_KEY", "SECRET", "TOKEN")):
            assert _REQUIRED_REF.match(value), f"{name}: {key} is written in the file"


def test_env_example_names_every_secret_without_a_value(monitoring: Path, repo_root: Path) -> None:
    lines = (monitoring / ".env.example").read_text(encoding="utf-8").splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    for secret in SECRETS:
        assert values[secret] == "", f".env.example gives {secret} a value"
    ignored = (repo_root / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".env" in ignored


def _compose_command() -> tuple[list[str], bool] | None:
    """(command, is_v2): the Compose plugin, else Debian's `docker-compose` 1.x, else None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"], True
    legacy = shutil.which("docker-compose")
    return ([legacy], False) if legacy else None


def test_compose_config_validates(compose: dict[str, Any], monitoring: Path,
                                  tmp_path: Path) -> None:
    found = _compose_command()
    if found is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    command, is_v2 = found
    compose_file = monitoring / "docker-compose.yml"
    if not is_v2:
        # Compose 1.x predates the top-level `name` key; validate everything else, in place
        # (relative paths resolve from the file's folder).
        compose_file = monitoring / f".compose-v1-{tmp_path.name}.yml"
        compose_file.write_text(yaml.safe_dump({k: v for k, v in compose.items() if k != "name"}),
                                encoding="utf-8")
    env_file = tmp_path / "test.env"
    env_file.write_text("TOOLKIT_API_KEY=test-key\nGRAFANA_ADMIN_PASSWORD=test-password\n",
                        encoding="utf-8")
    empty = tmp_path / "empty.env"
    empty.write_text("", encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    try:
        result = subprocess.run([*command, "--env-file", str(env_file), "-f", str(compose_file),
                                 "config", "--quiet"], env=clean,
                                capture_output=True, text=True, timeout=60, check=False)
        missing = subprocess.run([*command, "--env-file", str(empty), "-f", str(compose_file),
                                  "config", "--quiet"], env=clean,
                                 capture_output=True, text=True, timeout=60, check=False)
    finally:
        if not is_v2:
            compose_file.unlink()
    assert result.returncode == 0, result.stdout + result.stderr
    # without the secrets Compose refuses to start, naming the variable to set
    assert missing.returncode != 0
    assert any(f"set {name} in monitoring/.env" in missing.stderr for name in SECRETS)
