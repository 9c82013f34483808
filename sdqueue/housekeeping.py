"""Background threads of a worker that keep the queue honest when processes die.

Out of the box rq notices a SIGKILLed SimpleWorker's job only after ``job_timeout + 60 s`` AND a
maintenance pass (every 600 s): up to ~14 minutes, and its retries with an interval wait for a
scheduler process that a SimpleWorker doesn't start. Two threads fix that:

- ``Heartbeat`` extends the running job's lease in rq's StartedJobRegistry every
  ``heartbeat_interval_s``, with a short TTL (``heartbeat_ttl_s``). The lease dies with the process.
- ``Housekeeper`` runs every ``housekeeping_interval_s`` on every worker, under a Redis lock so one
  worker at a time does it: it requeues (at the front) jobs whose lease expired, fails them once
  their retries are spent, and moves due retries from the ScheduledJobRegistry back to the queue.

So a crashed worker's job is running again within heartbeat_ttl_s + housekeeping_interval_s
(25 s with the defaults) on any live worker. Both threads log Redis errors and keep going: a
Redis restart must not kill them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp

from .jobs import HOUSEKEEPING_LOCK_KEY

logger = logging.getLogger(__name__)


class _Ticker(threading.Thread):
    """Calls ``tick`` every ``interval_s`` until stopped; survives errors in a tick."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self._tick = tick
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self._tick()
            except redis.RedisError as exc:
                logger.warning("%s: Redis unavailable (%s); will retry", self.name, exc)
            except Exception:
                logger.exception("%s failed; will retry", self.name)

    def stop(self) -> None:
        self._stopped.set()


class Heartbeat(_Ticker):
    """Keeps one running job's lease alive while its process lives."""

    def __init__(self, beat: Callable[[], None], interval_s: float) -> None:
        super().__init__("sdq-heartbeat", interval_s, beat)


class Housekeeper(_Ticker):
    """Requeues abandoned jobs and releases due retries, for every worker of one queue."""

    def __init__(self, queue: Queue, interval_s: float, job_class: type[Job]) -> None:
        super().__init__("sdq-housekeeper", interval_s, self.run_once)
        self.queue = queue
        self.job_class = job_class
        self.connection: redis.Redis = queue.connection

    def run_once(self) -> None:
        # One worker at a time; the lock expires by itself if its holder dies.
        lock = HOUSEKEEPING_LOCK_KEY.format(queue=self.queue.name)
        if not self.connection.set(lock, "1", nx=True, ex=max(1, int(self.interval_s))):
            return
        self.requeue_abandoned()
        self.release_due_retries()

    def requeue_abandoned(self) -> list[str]:
        """Jobs whose worker stopped heartbeating: back to the front of the queue, or failed."""
        started = StartedJobRegistry(queue=self.queue, job_class=self.job_class, serializer=JSONSerializer)
        score = current_timestamp()
        requeued = []
        for job_id in dict.fromkeys(started.get_expired_job_ids(score)):
            try:
                job = self.job_class.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            except Exception:  # gone, or unreadable: nothing to requeue
                started.remove(job_id)
                continue
            if job.get_status(refresh=False) != JobStatus.STARTED:
                continue  # finished or failed in the meantime: status never goes backwards
            with self.connection.pipeline() as pipe:
                if job.retries_left:
                    job.retries_left -= 1
                    requeue_at_front(job, self.queue, pipe)
                    requeued.append(job.id)
                    logger.warning("job %s lost its worker; requeued at the front", job.id)
                else:
                    reason = "the worker rendering this job died and no retries are left"
                    job.meta["error"] = reason
                    job.set_status(JobStatus.FAILED, pipeline=pipe)
                    job.save(pipeline=pipe)
                    FailedJobRegistry(queue=self.queue).add(
                        job, ttl=job.failure_ttl, exc_string=reason, pipeline=pipe
                    )
                    logger.error("job %s lost its worker and has no retries left: failed", job.id)
                pipe.zremrangebyscore(started.key, 0, score)
                pipe.execute()
        return requeued

    def release_due_retries(self) -> int:
        """Retries scheduled with an interval: into the queue once due (rq's scheduler, in a thread)."""
        registry = ScheduledJobRegistry(queue=self.queue, serializer=JSONSerializer)
        job_ids = registry.get_jobs_to_schedule(current_timestamp())
        if not job_ids:
            return 0
        with self.connection.pipeline() as pipe:
            for job in Job.fetch_many(job_ids, connection=self.connection, serializer=JSONSerializer):
                if job is not None:
                    self.queue._enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
            for job_id in job_ids:
                registry.remove(job_id, pipeline=pipe)
            pipe.execute()
        return len(job_ids)


def requeue_at_front(job: Job, queue: Queue, pipe: Any) -> None:
    """Back to the head of the queue as if never started (its execution must be cleaned up by
    the caller): status queued, progress from zero, no stale error."""
    job.meta.pop("error", None)
    total = job.meta.get("progress", {}).get("total_steps", 0)
    job.meta["progress"] = {"step": 0, "total_steps": total}
    job.set_status(JobStatus.QUEUED, pipeline=pipe)
    job.save(pipeline=pipe)
    queue.push_job_id(job.id, pipeline=pipe, at_front=True)


def stop_all(*tickers: Any) -> None:
    for ticker in tickers:
        if ticker is not None:
            ticker.stop()
