"""The worker against real Redis and storage: the render path, status, and what it refuses."""

from __future__ import annotations

import json
import os
import pickle
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import run_sdq
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from sdqueue.config import Settings
from sdqueue.images import read_recipe
from sdqueue.jobs import GenerationRequest, Status
from sdqueue.producer import Producer
from sdqueue.storage import open_store
from sdqueue.worker import run_worker


def work(settings: Settings, engine: Any) -> None:
    run_worker(settings, engine=engine, burst=True)


def small(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a small house", "steps": 2, "width": 64, "height": 64, "seed": 5}
    return GenerationRequest(**(base | kw))


def download(url: str) -> bytes:
    if url.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return Path(unquote(urlsplit(url).path)).read_bytes()
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


@pytest.mark.slow
def test_cli_enqueue_worker_process_s3_status_end_to_end(s3_settings: Settings) -> None:
    """enqueue (CLI) -> `sdq worker --burst` (process) -> PNGs in S3 -> finished status with URLs."""
    enq = run_sdq(
        [
            "enqueue",
            "a tiny lighthouse",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "96",
            "--num-images",
            "2",
            "--seed",
            "1234",
            "--negative-prompt",
            "fog",
            "--json",
        ],
        s3_settings,
    )
    assert enq.returncode == 0, enq.stderr
    queued = json.loads(enq.stdout)
    assert queued["status"] == "queued"
    worker = run_sdq(["worker", "--burst"], s3_settings, timeout=180)
    assert worker.returncode == 0, worker.stderr
    done = run_sdq(["status", queued["id"], "--json"], s3_settings)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["status"] == "finished" and view["error"] is None
    assert view["progress"] == {"step": 3, "total_steps": 3}
    assert [image["index"] for image in view["images"]] == [0, 1]
    assert [image["seed"] for image in view["images"]] == [1234, 1235]
    assert set(view["timings"]) == {"queue_wait_s", "render_s", "encode_s", "upload_s"}
    assert all(view[k] for k in ("created_at", "started_at", "finished_at"))
    store = open_store(s3_settings)
    for image in view["images"]:
        assert image["key"] == f"renders/{queued['id']}/{image['index']}.png"
        png = store.get(image["key"])
        assert download(image["url"]) == png  # the presigned URL serves the stored bytes
        with Image.open(__import__("io").BytesIO(png)) as picture:
            assert (picture.format, picture.size) == ("PNG", (64, 96))
        text = read_recipe(png)
        assert text["parameters"].splitlines()[:2] == ["a tiny lighthouse", "Negative prompt: fog"]
        assert f"Seed: {image['seed']}, Size: 64x96" in text["parameters"]
        assert "Steps: 3, Sampler: DPM++ 2M, CFG scale: 7.5" in text["parameters"]
        recipe = json.loads(text["sdqueue"])
        assert recipe["seed"] == image["seed"] and recipe["request"]["prompt"] == "a tiny lighthouse"
        assert recipe["model"] == s3_settings.model


def test_status_records_everything(make_settings: Callable[..., Settings], tiny_engine: Any) -> None:
    settings = make_settings()
    producer = Producer(settings)
    job = producer.enqueue(small(prompt="word " * 100, num_images=3))
    work(settings, tiny_engine)
    view = producer.status(job.id)
    assert view.status is Status.FINISHED and view.attempts == 1
    assert len(view.images) == 3 and view.request["seed"] == 5
    assert any("first 77" in w for w in view.warnings)
    for image in view.images:
        assert Path(download(image.url) and image.url[len("file://") :]).is_file()
    assert view.timings.render_s is not None and view.timings.render_s > 0


def test_seed_is_chosen_and_recorded_when_absent(
    make_settings: Callable[..., Settings], tiny_engine: Any
) -> None:
    settings = make_settings()
    producer = Producer(settings)
    job = producer.enqueue(small(seed=None))
    assert isinstance(job.request["seed"], int)
    work(settings, tiny_engine)
    view = producer.status(job.id)
    assert view.images[0].seed == job.request["seed"]


def test_invalid_job_in_redis_fails_with_the_message_and_is_not_retried(
    make_settings: Callable[..., Settings], tiny_engine: Any
) -> None:
    settings = make_settings(max_retries=3)
    producer = Producer(settings)
    job = producer.enqueue(small())
    # Someone with Redis access rewrites the request past the bounds.
    raw = producer.queue.enqueue(
        "sdqueue.worker.render", args=({"prompt": "x", "steps": 500},), job_id="tampered"
    )
    work(settings, tiny_engine)
    bad = producer.status(raw.id)
    assert bad.status is Status.FAILED
    assert bad.error == "steps must be between 1 and 150, got 500"
    assert bad.attempts == 1
    assert producer.status(job.id).status is Status.FINISHED  # the queue moved on


def test_a_job_naming_another_function_is_refused_and_never_runs(
    make_settings: Callable[..., Settings], tiny_engine: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    marker = tmp_path / "pwned"
    queue = Queue(
        settings.queue, connection=redis.Redis.from_url(settings.redis_url), serializer=JSONSerializer
    )
    job = queue.enqueue("os.system", args=(f"touch {marker}",), job_id="evil")
    work(settings, tiny_engine)
    assert not marker.exists()
    view = Producer(settings).status(job.id)
    assert view.status is Status.FAILED
    assert "refused job naming 'os.system'" in (view.error or "")


def test_a_pickled_payload_is_never_unpickled(
    make_settings: Callable[..., Settings], tiny_engine: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    marker = tmp_path / "pwned-by-pickle"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    conn = redis.Redis.from_url(settings.redis_url)
    producer = Producer(settings)
    good = producer.enqueue(small())
    # Overwrite a real job's payload with a pickle, exactly as rq's default serializer would store it.
    evil = producer.enqueue(small(), job_id="pickled")
    conn.hset("rq:job:pickled", "data", pickle.dumps(("os.system", None, (f"touch {marker}",), {})))
    conn.hset("rq:job:pickled", "meta", pickle.dumps(Exploit()))
    work(settings, tiny_engine)
    assert not marker.exists()
    assert conn.hget("rq:job:pickled", "status") == b"failed"
    assert producer.status(good.id).status is Status.FINISHED
    assert evil.id == "pickled"


def test_storage_failure_is_retried_then_fails_and_never_finishes(
    make_settings: Callable[..., Settings], tiny_engine: Any, tmp_path: Path
) -> None:
    store_dir = tmp_path / "readonly-store"
    store_dir.mkdir()
    settings = make_settings(storage_url=store_dir.as_uri(), max_retries=1)
    producer = Producer(settings)
    job = producer.enqueue(small(), job_id="upload-fails")
    (store_dir / "upload-fails").write_text("a file where the job's directory must go")
    work(settings, tiny_engine)
    view = producer.status(job.id)
    assert view.status is Status.FAILED
    assert view.attempts == 2  # the first try and one retry
    assert "cannot write" in (view.error or "")
    assert view.images == []
