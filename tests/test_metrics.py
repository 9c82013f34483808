"""Metrics: observed by workers into Redis, rendered by any API replica, parsed as Prometheus text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sdqueue.api import create_app
from sdqueue.config import Settings
from sdqueue.jobs import METRICS_KEY, RENDER_FUNC, parse_request
from sdqueue.metrics import BUCKETS_S, HISTOGRAMS, _bucket, live_workers
from sdqueue.producer import Producer
from sdqueue.worker import SdqWorker, run_worker

REQUEST: dict[str, Any] = {"prompt": "a cup", "steps": 2, "width": 64, "height": 64, "seed": 1}


def scrape(settings: Settings) -> dict[str, list[Sample]]:
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    [found] = [s.value for s in samples if s.name == name and s.labels == labels]
    return found


def test_metrics_cover_the_queue_and_every_ended_job(
    make_settings: Callable[..., Settings], tiny_engine: Any
) -> None:
    settings = make_settings()
    producer = Producer(settings)
    with TestClient(create_app(settings)) as client:
        client.post("/jobs", json=REQUEST)
        client.post("/jobs", json={**REQUEST, "seed": 2})
    producer.queue.enqueue(RENDER_FUNC, args=({**REQUEST, "steps": 0},), job_id="bad")  # fails in the worker
    canceled = producer.enqueue(parse_request(REQUEST))
    producer.cancel(canceled.id)

    before = scrape(settings)
    assert value(before["sdqueue_queue_depth"], "sdqueue_queue_depth") == 3
    assert value(before["sdqueue_jobs"], "sdqueue_jobs", status="queued") == 3
    assert value(before["sdqueue_jobs"], "sdqueue_jobs", status="canceled") == 1

    run_worker(settings, engine=tiny_engine, burst=True)
    metrics = scrape(settings)
    assert metrics == scrape(settings)  # a second replica sees the same numbers: they live in Redis
    assert value(metrics["sdqueue_queue_depth"], "sdqueue_queue_depth") == 0
    assert value(metrics["sdqueue_workers"], "sdqueue_workers") == 0  # the burst worker has left
    jobs = metrics["sdqueue_jobs"]
    assert [value(jobs, "sdqueue_jobs", status=s) for s in ("finished", "failed", "canceled")] == [2, 1, 1]
    ended = metrics["sdqueue_jobs_ended"]
    assert value(ended, "sdqueue_jobs_ended_total", status="finished") == 2
    assert value(ended, "sdqueue_jobs_ended_total", status="failed") == 1
    for name in HISTOGRAMS:
        samples = metrics[f"sdqueue_{name}"]
        buckets = [s.value for s in samples if s.name.endswith("_bucket")]
        assert len(buckets) == len(BUCKETS_S) + 1 and buckets == sorted(buckets), name
        assert buckets[-1] == value(samples, f"sdqueue_{name}_count") == 2, name  # finished jobs only
        assert buckets[-2] == 2, name  # each job took under an hour: in the finite buckets too
        assert value(samples, f"sdqueue_{name}_sum") > 0 or name == "queue_wait_seconds", name
    e2e = metrics["sdqueue_end_to_end_seconds"]
    render = metrics["sdqueue_render_seconds"]
    assert value(e2e, "sdqueue_end_to_end_seconds_sum") >= value(render, "sdqueue_render_seconds_sum")


def test_observations_land_in_the_first_bucket_that_holds_them() -> None:
    assert _bucket(0.3) == "0.5" and _bucket(0.5) == "0.5" and _bucket(0.001) == "0.01"
    assert _bucket(BUCKETS_S[-1] + 1) is None  # only the count (+Inf) holds it


def test_live_workers_ignores_registrations_that_lapsed(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    producer = Producer(settings)
    workers = [SdqWorker([producer.queue], connection=producer.redis, name=f"w{i}") for i in range(2)]
    for worker in workers:
        worker.register_birth()
    assert live_workers(producer.redis, producer.queue) == 2
    producer.redis.delete(workers[0].key)  # as if it was SIGKILLed and its key expired
    assert live_workers(producer.redis, producer.queue) == 1
    assert value(scrape(settings)["sdqueue_workers"], "sdqueue_workers") == 1
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json()["workers"] == 1
    workers[1].register_death()
    assert live_workers(producer.redis, producer.queue) == 0


def test_metrics_key_is_per_queue(make_settings: Callable[..., Settings], tiny_engine: Any) -> None:
    settings = make_settings(queue="other")
    Producer(settings).enqueue(parse_request(REQUEST))
    run_worker(settings, engine=tiny_engine, burst=True)
    redis = Producer(settings).redis
    assert redis.hget(METRICS_KEY.format(queue="other"), "jobs_ended:finished") == b"1"
    assert not redis.exists(METRICS_KEY.format(queue="sdqueue"))


def test_metrics_without_redis_is_503(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(redis_url="redis://127.0.0.1:1/0"))) as client:
        response = client.get("/metrics")
    assert response.status_code == 503 and "cannot reach Redis" in response.json()["detail"]
