"""The GPU worker: an rq SimpleWorker that keeps one pipeline warm and runs only sdqueue jobs.

Why SimpleWorker: rq's default Worker forks per job, and CUDA does not survive a fork, so a
forking worker would reload the model for every job. SimpleWorker runs jobs in its own process
(and main thread, where rq's SIGALRM job timeout works).

Why a locked-down Job class: rq resolves any dotted path it finds in Redis and calls it, and it
imports callbacks by name too. Anyone who can write to Redis could run code on the GPU box.
``RenderJob`` checks the function name against the one sdqueue owns and calls the render path
directly; nothing named in Redis is ever imported.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from . import batching
from .config import Settings
from .engine import Engine
from .errors import ForeignJob, Preempted, SdqError
from .housekeeping import Heartbeat, Housekeeper, requeue_at_front
from .jobs import RENDER_FUNC
from .producer import connect
from .runner import JobRunner
from .stage import Deferred, Stage
from .storage import open_store

logger = logging.getLogger(__name__)


def render(request: dict[str, Any]) -> None:
    """The name jobs carry (RENDER_FUNC). Only an sdqueue worker can run it, with its warm engine."""
    raise ForeignJob("sdqueue jobs must be run by `sdq worker`, not a plain rq worker")


class RenderJob(Job):
    """rq's Job, locked down: runs sdqueue's render and nothing named in Redis."""

    runner: JobRunner | None = None
    batch: Callable[[], Any] | None = None
    """Set by SdqWorker when followers ride along: renders them all and returns this job's result."""

    def _execute(self) -> Any:
        if self.func_name != RENDER_FUNC:
            raise ForeignJob(f"refused job naming {self.func_name!r}: this worker runs only {RENDER_FUNC}")
        if self.runner is None:
            raise ForeignJob("no engine: RenderJob must be run by SdqWorker")
        if self.batch is not None:
            return self.batch()
        return self.runner.run(self)

    # Callbacks and rq webhooks are named in Redis: importing or calling them is what we refuse.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        return None


class SdqWorker(SimpleWorker):
    """A SimpleWorker that hands each job the warm JobRunner, keeps its lease alive while it
    renders, records one-line errors, and on SIGTERM/SIGINT finishes or requeues within a grace."""

    job_class = RenderJob

    def __init__(
        self, *args: Any, runner: JobRunner | None = None, settings: Settings | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("job_class", RenderJob)
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.settings = settings or (runner.settings if runner else Settings())
        self._stop_deadline: float | None = None
        self._abort_now = False
        self._preempted_job_id: str | None = None
        self._stage: Stage | None = None
        self.push_exc_handler(self._record_failure)  # type: ignore[no-untyped-call]

    # --- leases: a short TTL renewed by a thread, instead of rq's job_timeout + 60 s ---

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.settings.heartbeat_ttl_s

    def perform_job(self, job: Job, queue: Queue) -> bool:
        job.runner = self.runner  # type: ignore[attr-defined]
        if self.runner is not None:
            self.runner.should_abort = self._should_abort
        followers = self._claim_followers(job, queue)
        job.batch = None  # type: ignore[attr-defined]
        if followers and self.runner is not None:
            runner = self.runner
            job.batch = lambda: batching.run_batch(runner, job, followers, self, queue)  # type: ignore[attr-defined]
            # rq times the batch against the lead's own timeout, so a hung render is stopped when
            # its lead's time is up (timeouts carry a wide margin: 1 s per 512x512 step); the
            # followers then go back to the front of the queue, uncharged (batching.run_batch).

        def beat() -> None:
            self.maintain_heartbeats(job)
            batching.heartbeat(self, followers)

        heartbeat = Heartbeat(beat, self.settings.heartbeat_interval_s)
        heartbeat.start()
        try:
            return bool(super().perform_job(job, queue))
        finally:
            heartbeat.stop()
            job.batch = None  # type: ignore[attr-defined]

    def _claim_followers(self, job: Job, queue: Queue) -> list[batching.Follower]:
        if self.settings.max_batch <= 1 or self._stop_deadline is not None:
            return []
        try:
            return batching.claim_followers(self, job, queue, self.settings.max_batch)
        except Exception:  # batching is an optimisation: the lead runs alone rather than not at all
            logger.warning("could not claim followers for job %s", job.id, exc_info=True)
            return []

    # --- shutdown: stop taking jobs; finish the running one if it fits in the grace, else requeue ---

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_deadline is not None:  # a second signal: abort at the next step boundary
            self.log.warning("second stop signal: aborting the running job at the next step")
            self._abort_now = True
            return
        self._stop_deadline = time.monotonic() + self.settings.worker_grace_s
        self.log.info("stop requested (signal %s): %.0f s grace", signum, self.settings.worker_grace_s)
        if self.get_state() == WorkerStatus.BUSY:
            self._start_watchdog()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]
        # rq re-points the signals at a cold shutdown that would raise SystemExit mid-render.
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)

    def _should_abort(self, step: int, total: int, elapsed_s: float) -> bool:
        """At a step boundary during shutdown: would the rest of the job overrun the grace?"""
        if self._stop_deadline is None:
            return False
        if self._abort_now:
            return True
        per_step = elapsed_s / max(step, 1)
        finish_estimate = (total - step) * per_step + per_step + 1.0  # + decode, encode, upload
        return time.monotonic() + finish_estimate > self._stop_deadline

    def _start_watchdog(self) -> None:
        """Backstop for a single step longer than the grace: requeue the job and exit hard."""

        def expire() -> None:
            job = self.get_current_job()
            if job is not None and self.get_state() == WorkerStatus.BUSY:
                self.log.error("grace over mid-step: requeueing job %s and exiting", job.id)
                self._requeue_front(
                    job, Queue(job.origin, connection=self.connection, serializer=JSONSerializer)
                )
            os._exit(1)

        remaining = max(0.5, (self._stop_deadline or time.monotonic()) - time.monotonic() - 0.5)
        timer = threading.Timer(remaining, expire)
        timer.daemon = True
        timer.start()

    def _requeue_front(self, job: Job, queue: Queue) -> None:
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe)
            requeue_at_front(job, queue, pipe)
            pipe.execute()

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any) -> None:
        deferred = job._result
        if isinstance(deferred, Deferred):
            # Pipelined: rendered, not stored. The stage stores and settles it with this
            # execution while the main thread goes on to the next job.
            execution, self.execution = self.execution, None
            self.set_current_job_id(None)
            self.stage.submit(partial(self._settle, job, queue, execution, deferred))
            return
        super().handle_job_success(job, queue, started_job_registry)
        self._job_ended(job)

    @property
    def stage(self) -> Stage:
        if self._stage is None:  # lazily: rq also builds worker objects just to look them up
            self._stage = Stage()
        return self._stage

    def _settle(self, job: Job, queue: Queue, execution: Any, deferred: Deferred) -> None:
        """On the stage: store the job's PNGs under a renewed lease, then finish or fail it."""
        leases = [(job, execution), *deferred.leases]
        heartbeat = Heartbeat(lambda: batching.renew(self, leases), self.settings.heartbeat_interval_s)
        heartbeat.start()
        try:
            result = deferred.finish()
        except Exception:
            batching.fail(self, job, queue, execution, sys.exc_info())
        else:
            batching.complete(self, job, queue, execution, result)
        finally:
            heartbeat.stop()

    def teardown(self) -> None:
        if self._stage is not None:  # every rendered job is stored before the worker says goodbye
            self._stage.close()
            self._stage = None
        super().teardown()  # type: ignore[no-untyped-call]

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = ""
    ) -> None:
        if self._preempted_job_id == job.id:
            self._preempted_job_id = None
            self._requeue_front(job, queue)
            self.log.info("job %s requeued at the front: the worker is shutting down", job.id)
            return
        will_retry = job.should_retry and self._stopped_job_id != job.id
        super().handle_job_failure(job, queue, started_job_registry, exc_string)
        if not will_retry:
            self._job_ended(job)

    def _job_ended(self, job: Job) -> None:
        """Job-end hooks (metrics, webhooks), after the final status is written. Never raises."""
        try:
            from .metrics import record_job_end

            record_job_end(self.connection, job)  # one MULTI/EXEC round trip
        except Exception:  # lost metrics must not fail the job or stop the worker
            logger.exception("could not record metrics for job %s", job.id)
        try:
            from .webhooks import deliver_later

            deliver_later(self.settings, job)  # sent by daemon threads: the GPU never waits on it
        except Exception:
            logger.exception("could not queue the webhook of job %s", job.id)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # rq quits its loop when a job in the queue can't even be loaded; a poison entry must not
        # take the worker down with it, so fail that entry and keep listening.
        while True:
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                if result is None and self._stage is not None and self._stage.busy():
                    # About to stop (burst, idle): the stage may still requeue a retry; look again.
                    self._stage.drain()
                    continue
                return result
            except Exception as exc:
                job_id = getattr(exc, "job_id", None)
                queue = getattr(exc, "queue", None)
                if job_id is None or queue is None:
                    raise
                logger.error("refusing unreadable job %s: %s", job_id, exc)
                with self.connection.pipeline() as pipe:
                    pipe.hset(Job.key_for(job_id), "status", "failed")
                    pipe.lrem(queue.intermediate_queue_key, 1, job_id)
                    pipe.execute()

    def _record_failure(self, job: Job, exc_type: type, exc: BaseException, tb: Any) -> bool:
        """Keep a one-line reason on the job; errors that would fail again are not retried."""
        if isinstance(exc, Preempted):
            self._preempted_job_id = job.id
            return False
        retryable = (
            exc.retryable if isinstance(exc, SdqError) else exc_type.__name__ != "DeserializationError"
        )
        if not retryable:
            job.retries_left = 0
        try:
            job.meta["error"] = f"{exc}" if isinstance(exc, SdqError) else f"{exc_type.__name__}: {exc}"
            job.save_meta()
        except Exception:  # the job's data may be unreadable; its status still says failed
            logger.debug("could not record the error on job %s", job.id, exc_info=True)
        return True


def run_worker(
    settings: Settings,
    *,
    model: str | None = None,
    burst: bool = False,
    idle_timeout_s: int | None = None,
    engine: Engine | None = None,
) -> bool:
    """Load the engine once, then take jobs until stopped: with BURST until the queue is empty,
    with IDLE_TIMEOUT_S once no job has come for that long. True if any job was processed."""
    from .engine import DiffusersEngine

    store = open_store(settings)
    store.check()
    if engine is None:
        engine = DiffusersEngine.load(settings, model)
    connection = connect(settings, socket_timeout_s=None)
    # RenderJob here too: rq's registry maintenance loads jobs through the queue's job class.
    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer, job_class=RenderJob)
    worker = SdqWorker(
        [queue], connection=connection, runner=JobRunner(settings, engine, store), settings=settings
    )
    housekeeper = Housekeeper(queue, settings.housekeeping_interval_s, RenderJob)
    housekeeper.run_once()  # jobs orphaned while no worker was alive
    housekeeper.start()
    try:
        return bool(worker.work(burst=burst, max_idle_time=idle_timeout_s, logging_level=settings.log_level))
    finally:
        housekeeper.stop()
