"""Prometheus metrics that stay right with many API replicas and many workers.

A worker observes each job once, when it ends (``SdqWorker._job_ended``), into one Redis hash per
queue (``METRICS_KEY``): counters and histogram buckets bumped with HINCRBY in one MULTI/EXEC, so a
scrape never sees half a job. Every API replica renders that hash, plus gauges read live from
rq's keys (queue depth, jobs by status, live workers), with a custom prometheus-client
collector, so any replica answers for the whole cluster. Only the API imports prometheus-client.

Histograms (seconds, finished jobs only): ``sdqueue_queue_wait_seconds``,
``sdqueue_render_seconds``, ``sdqueue_encode_seconds``, ``sdqueue_upload_seconds`` (the job's last
attempt) and ``sdqueue_end_to_end_seconds`` (creation to end, retries included).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis
from rq import worker_registration
from rq.job import Job
from rq.queue import Queue

from .jobs import METRICS_KEY, Status, status_from_rq
from .producer import Producer, redis_errors

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""Upper bounds shared by every histogram: a 10 ms upload to an hour in the queue."""

HISTOGRAMS = {
    "queue_wait_seconds": "Time from enqueue (or requeue) to the start of the job's last attempt.",
    "render_seconds": "Time the engine spent denoising and decoding a job's images.",
    "encode_seconds": "Time spent encoding a job's PNGs.",
    "upload_seconds": "Time spent storing a job's PNGs.",
    "end_to_end_seconds": "Time from a job's creation to its end, retries included.",
}
_TIMINGS = {
    "queue_wait_s": "queue_wait_seconds",
    "render_s": "render_seconds",
    "encode_s": "encode_seconds",
    "upload_s": "upload_seconds",
}


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def observations(job: Job) -> dict[str, float]:
    """The seconds a finished job adds to each histogram."""
    timings = job.meta.get("timings") or {}
    found = {name: float(timings[key]) for key, name in _TIMINGS.items() if timings.get(key) is not None}
    created, ended = _utc(job.created_at), _utc(job.ended_at) or datetime.now(UTC)
    if created is not None:
        found["end_to_end_seconds"] = max(0.0, (ended - created).total_seconds())
    return found


def _le(bound: float) -> str:
    return f"{float(bound):g}"


def _bucket(value: float) -> str | None:
    """The bucket VALUE falls in; None past the last bound, where only +Inf (the count) holds it."""
    return next((_le(bound) for bound in BUCKETS_S if value <= bound), None)


def record_job_end(connection: redis.Redis, job: Job) -> None:
    """Count a job that just ended (finished or finally failed) and observe its timings."""
    status = status_from_rq(job.get_status(refresh=False))
    key = METRICS_KEY.format(queue=job.origin)
    with connection.pipeline(transaction=True) as pipe:
        pipe.hincrby(key, f"jobs_ended:{status.value}", 1)
        if status is Status.FINISHED:
            for name, value in observations(job).items():
                bucket = _bucket(value)
                if bucket is not None:
                    pipe.hincrby(key, f"{name}:le:{bucket}", 1)
                pipe.hincrby(key, f"{name}:count", 1)
                pipe.hincrbyfloat(key, f"{name}:sum", value)
        pipe.execute()


def live_workers(connection: redis.Redis, queue: Queue) -> int:
    """Workers listening on QUEUE whose registration has not expired (a dead one's key lapses)."""
    keys = list(worker_registration.get_keys(queue=queue, connection=connection))
    if not keys:
        return 0
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        return sum(1 for alive in pipe.execute() if alive)


class QueueCollector:
    """Renders the queue's state and the workers' observations on every scrape."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        queue, connection = self.producer.queue, self.producer.redis
        registries = {
            "queued": [queue.scheduled_job_registry, queue.deferred_job_registry],
            "started": [queue.started_job_registry],
            "finished": [queue.finished_job_registry],
            "failed": [queue.failed_job_registry],
            "canceled": [queue.canceled_job_registry],
        }
        with redis_errors(self.producer.settings):
            with connection.pipeline(transaction=False) as pipe:
                pipe.llen(queue.key)
                for group in registries.values():
                    for registry in group:
                        pipe.zcard(registry.key)
                pipe.hgetall(METRICS_KEY.format(queue=queue.name))
                depth, *counts, raw = pipe.execute()
            workers = live_workers(connection, queue)
        stored = {k.decode(): float(v) for k, v in raw.items()}

        yield GaugeMetricFamily("sdqueue_queue_depth", "Jobs waiting in the queue.", value=depth)
        yield GaugeMetricFamily("sdqueue_workers", "Live workers listening on the queue.", value=workers)
        jobs = GaugeMetricFamily(
            "sdqueue_jobs", "Jobs by status (ended ones while rq keeps them).", labels=["status"]
        )
        position = iter(counts)
        for status, group in registries.items():
            extra = depth if status == "queued" else 0
            jobs.add_metric([status], extra + sum(next(position) for _ in group))
        yield jobs
        ended = CounterMetricFamily("sdqueue_jobs_ended", "Jobs that ended, by status.", labels=["status"])
        for status in (Status.FINISHED, Status.FAILED):
            ended.add_metric([status.value], stored.get(f"jobs_ended:{status.value}", 0.0))
        yield ended
        for name, documentation in HISTOGRAMS.items():
            cumulative, buckets = 0.0, []
            for le in map(_le, BUCKETS_S):
                cumulative += stored.get(f"{name}:le:{le}", 0.0)
                buckets.append((le, cumulative))
            buckets.append(("+Inf", stored.get(f"{name}:count", 0.0)))
            yield HistogramMetricFamily(
                f"sdqueue_{name}", documentation, buckets=buckets, sum_value=stored.get(f"{name}:sum", 0.0)
            )
