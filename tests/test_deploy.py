"""The local stack without a Docker engine: docker-compose.yml is valid, and its services,
variables and ports agree with sdqueue's Settings, .env.example and the README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import ROOT

from sdqueue.config import Settings

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
README = ROOT / "README.md"
APP_SERVICES = ("api", "worker", "worker-gpu")
SDQ_VAR = re.compile(r"\bSDQ_[A-Z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def strings(node: Any) -> list[str]:
    """Every key and string value in the parsed compose file (comments excluded)."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in [str(key), *strings(value)]]
    if isinstance(node, list):
        return [text for item in node for text in strings(item)]
    return [node] if isinstance(node, str) else []


def compose_text() -> str:
    return "\n".join(strings(compose()))


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active, commented) NAME=value lines of .env.example."""
    active, commented = {}, {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            active[match[1]] = match[2]
        elif match := re.fullmatch(r"# ([A-Z][A-Z0-9_]*)=(.*)", line):
            commented[match[1]] = match[2]
    return active, commented


def settings_vars() -> set[str]:
    return {f"SDQ_{name.upper()}" for name in Settings.model_fields}


def default(field: str) -> Any:
    """A setting's default, whatever .env or SDQ_* this machine has."""
    return Settings.model_fields[field].get_default(call_default_factory=True)


def published(service: str) -> dict[int, int]:
    """{host port: container port}, checking each is bound to the loopback address only."""
    ports = {}
    for spec in services()[service].get("ports", []):
        address, host, container = spec.split(":")
        assert address == "127.0.0.1", f"{service} publishes {spec} beyond this machine"
        ports[int(host)] = int(container)
    return ports


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


# --- The file is valid ---------------------------------------------------------------------------


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose") or shutil.which("docker")
    if binary is None:
        pytest.skip("neither docker-compose nor docker is installed (.ci/run installs docker-compose)")
    command = [binary] if binary.endswith("docker-compose") else [binary, "compose"]
    result = subprocess.run(
        [*command, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if binary.endswith("docker") and "is not a docker command" in result.stderr:
        pytest.skip("docker is installed without the compose plugin")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == set(services())
    env = resolved["services"]["worker"]["environment"]
    assert env["SDQ_MODEL"] == "/models/tiny" and env["SDQ_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_services_and_their_health_dependencies() -> None:
    found = services()
    assert set(found) == {"redis", "minio", "createbucket", "api", "worker", "worker-gpu", "rq-dashboard"}
    for name, service in found.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert isinstance(rule, dict), f"{name} depends on {dependency} without a condition"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in found[dependency], f"{dependency} has no healthcheck"
            else:
                assert rule["condition"] == "service_completed_successfully"
                assert found[dependency]["restart"] == "no"
    for name in APP_SERVICES:
        assert found[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert found[name]["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"
    assert found["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "healthcheck" in found["api"]


def test_redis_keeps_the_queue_across_restarts() -> None:
    redis = services()["redis"]
    assert redis["command"][:1] == ["redis-server"]
    assert "--appendonly yes" in " ".join(redis["command"])
    assert "--appendfsync everysec" in " ".join(redis["command"])
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_worker_is_stopped_gently_and_gpu_profile_reserves_a_device() -> None:
    found = services()
    longest_default_job_s = default("job_timeout_base_s") + 25 * default("job_timeout_per_step_s")
    for name in ("worker", "worker-gpu"):
        worker = found[name]
        assert worker["command"] == ["sdq", "worker"]
        assert worker["init"] is True  # so SIGTERM reaches sdq, not a PID 1 that ignores it
        grace = re.fullmatch(r"(\d+)m", worker["stop_grace_period"])
        assert grace is not None
        assert int(grace[1]) * 60 > max(longest_default_job_s, default("worker_grace_s"))
    assert "profiles" not in found["worker"] and found["worker"]["environment"]["SDQ_DEVICE"] == "cpu"
    gpu = found["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["SDQ_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_api_and_dashboard_commands() -> None:
    found = services()
    assert found["api"]["command"] == ["sdq", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert published("api") == {8000: 8000}
    dashboard = found["rq-dashboard"]["command"]
    assert "--json" in dashboard  # sdqueue's jobs are JSON; the pickle default cannot read them
    assert dashboard[dashboard.index("--redis-url") + 1] == "redis://redis:6379/0"


# --- Variables agree with Settings and .env.example -----------------------------------------------


def test_every_sdq_variable_in_compose_and_env_example_is_a_setting() -> None:
    known = settings_vars()
    active, commented = env_example()
    used = set(SDQ_VAR.findall(compose_text())) | set(active) | set(commented)
    unknown = {name for name in used if name.startswith("SDQ_")} - known
    assert not unknown, f"not Settings fields: {sorted(unknown)}"


def test_env_example_documents_every_setting_and_every_compose_variable() -> None:
    active, commented = env_example()
    documented = set(active) | set(commented)
    assert settings_vars() <= documented, f"undocumented: {sorted(settings_vars() - documented)}"
    interpolated = set(INTERPOLATION.findall(compose_text()))
    assert interpolated <= documented, f"undocumented: {sorted(interpolated - documented)}"


def test_env_example_values_are_valid_and_defaults_are_true(tmp_path: Path) -> None:
    active, commented = env_example()
    # The active lines are what the host's `sdq` reads from .env: they must load.
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text())
    host = Settings(_env_file=tmp_path / ".env")  # type: ignore[call-arg]
    assert host.redis_url == active["SDQ_REDIS_URL"] and host.storage_url == active["SDQ_STORAGE_URL"]
    for name, value in commented.items():
        if not name.startswith("SDQ_"):
            continue
        field = name.removeprefix("SDQ_").lower()
        expected = default(field)
        if value == "":
            assert expected is None, f"{name}: .env.example says no default, Settings has {expected!r}"
        else:
            assert getattr(Settings(**{field: value}), field) == expected, (
                f"{name}={value} is not the default"
            )


def test_host_settings_point_at_the_published_ports() -> None:
    active, _ = env_example()
    redis_url = urlsplit(active["SDQ_REDIS_URL"])
    s3_url = urlsplit(active["SDQ_S3_ENDPOINT_URL"])
    assert redis_url.hostname == s3_url.hostname == "localhost"
    assert published("redis")[redis_url.port or 6379] == 6379
    assert published("minio")[s3_url.port or 80] == 9000
    env = services()["api"]["environment"]
    # Host and containers name the same bucket and prefix, which createbucket creates.
    assert env["SDQ_STORAGE_URL"] == active["SDQ_STORAGE_URL"]
    bucket = urlsplit(env["SDQ_STORAGE_URL"]).netloc
    assert f"local/{bucket}" in " ".join(services()["createbucket"]["command"])
    # Image URLs are signed for the host's name of MinIO, not the network's.
    assert env["SDQ_S3_PUBLIC_ENDPOINT_URL"].endswith(active["SDQ_S3_ENDPOINT_URL"] + "}")
    assert services()["minio"]["environment"]["MINIO_ROOT_USER"] == "${AWS_ACCESS_KEY_ID:-sdqueue}"
    assert active["AWS_ACCESS_KEY_ID"] == "sdqueue" and active["AWS_SECRET_ACCESS_KEY"] == "sdqueue-secret"


def test_readme_documents_the_published_ports_and_host_environment() -> None:
    section = readme_section("Local stack: docker compose")
    ports = {port for name in services() for port in published(name)}
    documented = {int(port) for port in re.findall(r"localhost:(\d+)", section)}
    assert ports == documented, f"published {sorted(ports)}, README names {sorted(documented)}"
    active, _ = env_example()
    for name in ("SDQ_REDIS_URL", "SDQ_STORAGE_URL", "SDQ_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        assert f"{name}={active[name]}" in section, name
