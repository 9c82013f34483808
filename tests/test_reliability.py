"""Nothing lost: each promise of docs/reliability.md, with the real fault injected into real
processes (redis-server, moto's S3 server behind a cuttable TCP proxy, `sdq worker` processes)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisProcess, free_port
from faults import StatusRecorder, TcpProxy, WorkerProcess, wait_until

from sdqueue import rqhash
from sdqueue.config import Settings
from sdqueue.jobs import GenerationRequest, Status
from sdqueue.producer import Producer, connect_async, found, status_key
from sdqueue.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Long enough on the tiny model (~10 s on an idle 2-core box) to be killed or stopped mid-render.
LONG = {"prompt": "a long render", "steps": 150, "width": 256, "height": 256, "seed": 9}
MEDIUM = LONG | {"steps": 60}
SHORT = {"prompt": "a short render", "steps": 2, "width": 64, "height": 64, "seed": 3}
FAST_LEASES = {"heartbeat_ttl_s": 4, "heartbeat_interval_s": 1, "housekeeping_interval_s": 1}


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(settings: Settings, *args: str) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def rendering(producer: Producer, job_id: str) -> bool:
    view = producer.status(job_id)
    return view.status is Status.STARTED and view.progress.step >= 1


def test_sigkilled_worker_job_is_rendered_again_by_another(
    make_settings: Callable[..., Settings], workers: Callable[..., WorkerProcess]
) -> None:
    settings = make_settings(**FAST_LEASES)
    producer = Producer(settings)
    job = producer.enqueue(GenerationRequest(**MEDIUM))
    recorder = StatusRecorder(producer, job.id)
    recorder.start()
    first = workers(settings)
    wait_until(lambda: rendering(producer, job.id), 120, "the first worker to start rendering")
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    first.wait(10)
    second = workers(settings)
    wait_until(lambda: producer.status(job.id).attempts == 2, 60, "another worker to take the job over")
    takeover_s = time.monotonic() - killed_at
    view = wait_until(
        lambda: (v := producer.status(job.id)).status.is_terminal() and v, 400, "the job to end", interval=0.3
    )
    seen = recorder.stop()
    assert view.status is Status.FINISHED, second.text()
    assert view.attempts == 2 and [i.key for i in view.images] == [f"{job.id}/0.png"]
    assert open_store(settings).exists(view.images[0].key)
    # lease (4 s) + housekeeping (1 s) + the second worker's start-up; defaults give 20 s + 5 s
    assert takeover_s < 60
    assert seen[-1] == "finished" and seen.count("finished") == 1, seen
    assert set(seen) <= {"queued", "started", "finished"}, seen


def test_sigterm_finishes_a_job_that_fits_in_the_grace(
    make_settings: Callable[..., Settings], workers: Callable[..., WorkerProcess]
) -> None:
    settings = make_settings(worker_grace_s=240)
    producer = Producer(settings)
    job = producer.enqueue(GenerationRequest(**(SHORT | {"steps": 20, "width": 128, "height": 128})))
    worker = workers(settings)
    wait_until(lambda: rendering(producer, job.id), 120, "the render to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(240) == 0, worker.text()
    view = producer.status(job.id)
    assert view.status is Status.FINISHED and view.attempts == 1
    assert producer.queue.count == 0


def test_sigint_requeues_a_job_too_long_for_the_grace_at_the_front(
    make_settings: Callable[..., Settings], workers: Callable[..., WorkerProcess]
) -> None:
    settings = make_settings(worker_grace_s=1)
    producer = Producer(settings)
    job = producer.enqueue(GenerationRequest(**MEDIUM), job_id="long")
    later = producer.enqueue(GenerationRequest(**SHORT), job_id="later")
    worker = workers(settings)
    wait_until(lambda: rendering(producer, job.id), 120, "the render to start")
    worker.signal(signal.SIGINT)  # what Modal sends on preemption
    stopped = time.monotonic()
    worker.wait(30)
    assert time.monotonic() - stopped < 1 + 2, worker.text()  # the grace, plus process exit
    view = producer.status(job.id)
    assert view.status is Status.QUEUED, worker.text()
    assert producer.queue.job_ids[0] == "long"  # at the front, ahead of the job queued later
    assert producer.status(later.id).status is Status.QUEUED
    registry_ids = producer.queue.started_job_registry.get_job_ids()
    assert registry_ids == []  # nothing stuck in `started`
    again = workers(settings.model_copy(update={"worker_grace_s": 60.0}), "--burst")
    assert again.wait(600) == 0, again.text()
    assert producer.status(job.id).status is Status.FINISHED
    assert producer.status(later.id).status is Status.FINISHED


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, "--appendonly", "yes", "--appendfsync", "everysec")
    server.start()
    yield server
    server.stop()


def test_redis_restart_keeps_jobs_and_everyone_reconnects(
    aof_redis: RedisProcess, make_settings: Callable[..., Settings], workers: Callable[..., WorkerProcess]
) -> None:
    settings = make_settings(redis_url=aof_redis.url)
    producer = Producer(settings)
    parked = Producer(settings.model_copy(update={"queue": "parked"}))
    waiting = parked.enqueue(GenerationRequest(**SHORT))  # on a queue no worker serves
    worker = workers(settings)
    done = producer.enqueue(GenerationRequest(**SHORT))
    producer.wait(done.id, timeout_s=120)
    assert producer.status(done.id).status is Status.FINISHED, worker.text()

    aof_redis.stop()  # a clean restart
    aof_redis.start()
    assert producer.status(done.id).status is Status.FINISHED
    assert parked.status(waiting.id).status is Status.QUEUED and parked.queue.job_ids == [waiting.id]
    after = producer.enqueue(GenerationRequest(**SHORT))  # the same producer reconnects
    assert producer.wait(after.id, timeout_s=120).status is Status.FINISHED, worker.text()

    time.sleep(1.5)  # appendfsync everysec: older than a second is on disk
    aof_redis.stop(signal.SIGKILL)  # power loss
    aof_redis.start()
    assert producer.status(after.id).status is Status.FINISHED
    assert worker.proc.poll() is None  # the worker rode out both restarts


@pytest.fixture
def flaky_s3(
    s3_endpoint: str, s3_storage_url: str, make_settings: Callable[..., Settings]
) -> Iterator[tuple[TcpProxy, Settings]]:
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]), free_port())
    proxy.start()
    settings = make_settings(
        storage_url=s3_storage_url, s3_endpoint_url=f"http://127.0.0.1:{proxy.port}", s3_create_bucket=True
    )
    yield proxy, settings
    proxy.cut()


def test_storage_outage_fails_the_job_clearly_and_never_finishes_it(
    flaky_s3: tuple[TcpProxy, Settings], workers: Callable[..., WorkerProcess]
) -> None:
    proxy, settings = flaky_s3
    settings = settings.model_copy(update={"max_retries": 1, "retry_interval_s": 0})
    producer = Producer(settings)
    job = producer.enqueue(GenerationRequest(**MEDIUM))
    worker = workers(settings, "--burst")
    wait_until(lambda: rendering(producer, job.id), 120, "the render to start")
    proxy.cut()
    assert worker.wait(600) == 0, worker.text()
    view = producer.status(job.id)
    assert view.status is Status.FAILED and view.images == []
    assert view.attempts == 2
    assert "cannot upload" in (view.error or "")


def test_storage_back_within_the_retries_finishes_the_job(
    flaky_s3: tuple[TcpProxy, Settings], workers: Callable[..., WorkerProcess]
) -> None:
    proxy, settings = flaky_s3
    settings = settings.model_copy(update={"max_retries": 3, "retry_interval_s": 4, **FAST_LEASES})
    producer = Producer(settings)
    job = producer.enqueue(GenerationRequest(**MEDIUM))
    worker = workers(settings)
    wait_until(lambda: rendering(producer, job.id), 120, "the render to start")
    proxy.cut()
    wait_until(
        lambda: producer.status(job.id).error is not None or producer.status(job.id).attempts > 1,
        400,
        "the upload to fail",
    )
    proxy.start()
    view = wait_until(
        lambda: (v := producer.status(job.id)).status.is_terminal() and v,
        400,
        "the retry to finish",
        interval=0.3,
    )
    assert view.status is Status.FINISHED, worker.text()
    assert view.attempts >= 2 and open_store(settings).exists(view.images[0].key)


def test_password_protected_redis(
    tmp_path: Path, make_settings: Callable[..., Settings], workers: Callable[..., WorkerProcess]
) -> None:
    server = RedisProcess(tmp_path, "--requirepass", "s3cret-pw")
    server.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        renders_and_reads_back(
            make_settings(redis_url=f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"), workers
        )
    finally:
        server.stop()


def renders_and_reads_back(settings: Settings, workers: Callable[..., WorkerProcess]) -> None:
    """A job goes through a burst worker on SETTINGS' Redis, and both status reads see it finish:
    the CLI's (sync) and the API's (connect_async's pool)."""
    producer = Producer(settings)
    job = producer.enqueue(GenerationRequest(**SHORT))
    worker = workers(settings, "--burst")
    assert worker.wait(120) == 0, worker.text()
    assert producer.status(job.id).status is Status.FINISHED
    assert read_async(settings, job.id) == "finished"


def read_async(settings: Settings, job_id: str) -> str:
    """The job's status as the API reads it: connect_async's pool, one HMGET."""

    async def read() -> str:
        client = connect_async(settings)
        try:
            return found(job_id, await client.hmget(status_key(job_id), rqhash.RECORD_FIELDS)).status
        finally:
            await client.aclose()

    return asyncio.run(read())


def _tls_files(directory: Path) -> tuple[Path, Path]:
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_redis(
    tmp_path: Path, make_settings: Callable[..., Settings], workers: Callable[..., WorkerProcess]
) -> None:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = _tls_files(tmp_path)
    port = free_port()
    server = RedisProcess(
        tmp_path,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    server.port = port
    try:
        server.start_tls(cert)
    except RuntimeError as exc:
        pytest.skip(f"this redis-server has no TLS support: {exc}")
    try:
        renders_and_reads_back(
            make_settings(redis_url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"), workers
        )
        with pytest.raises(redis.ConnectionError):  # plain text is refused on the TLS port
            redis.Redis(port=port, socket_connect_timeout=2, socket_timeout=2).ping()
    finally:
        server.stop()
