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
import time
from typing import Any

from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer

from .config import Settings
from .engine import Engine, RenderItem
from .errors import ForeignJob, InvalidRequest, SdqError
from .images import PNG_CONTENT_TYPE, encode_png
from .jobs import RENDER_FUNC, image_key, parse_request
from .producer import connect
from .storage import Store, open_store

logger = logging.getLogger(__name__)


def render(request: dict[str, Any]) -> None:
    """The name jobs carry (RENDER_FUNC). Only an sdqueue worker can run it, with its warm engine."""
    raise ForeignJob("sdqueue jobs must be run by `sdq worker`, not a plain rq worker")


class JobRunner:
    """Renders one job with the warm engine, stores its PNGs, and writes progress and results."""

    def __init__(self, settings: Settings, engine: Engine, store: Store) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store

    def run(self, job: Job) -> dict[str, Any]:
        meta = job.meta
        meta["attempts"] = int(meta.get("attempts", 0)) + 1
        meta.pop("error", None)
        started = time.time()
        enqueued = job.enqueued_at.timestamp() if job.enqueued_at else started
        if len(job.args) != 1 or job.kwargs:
            raise InvalidRequest("request", "a render job takes exactly one request object")
        request = parse_request(job.args[0])  # Redis is a trust boundary too
        meta["warnings"] = self.engine.prompt_warnings(request)
        meta["progress"] = {"step": 0, "total_steps": request.steps}
        job.save_meta()

        items = [RenderItem(request, index) for index in range(request.num_images)]
        images = self.engine.render(items, on_step=self._progress_writer(job))
        rendered = time.time()

        pngs = [
            encode_png(
                image, request, item.index, item.seed, self.engine.model_id, self.engine.model_revision
            )
            for image, item in zip(images, items, strict=True)
        ]
        encoded = time.time()

        refs = []
        for item, png in zip(items, pngs, strict=True):
            key = image_key(self.store.prefix, job.id, item.index)
            self.store.put(key, png, PNG_CONTENT_TYPE)
            refs.append({"index": item.index, "key": key, "url": self.store.url(key), "seed": item.seed})
        uploaded = time.time()

        # Only now, with every object stored, may the job become `finished`.
        meta["images"] = refs
        meta["progress"] = {"step": request.steps, "total_steps": request.steps}
        meta["timings"] = {
            "queue_wait_s": round(max(0.0, started - enqueued), 4),
            "render_s": round(rendered - started, 4),
            "encode_s": round(encoded - rendered, 4),
            "upload_s": round(uploaded - encoded, 4),
        }
        job.save_meta()
        return {"images": refs}

    def _progress_writer(self, job: Job) -> Any:
        interval = self.settings.progress_interval_s
        last = [0.0]

        def write(step: int, total: int) -> None:
            now = time.monotonic()
            if step < total and now - last[0] < interval:
                return
            last[0] = now
            job.meta["progress"] = {"step": step, "total_steps": total}
            job.save_meta()

        return write


class RenderJob(Job):
    """rq's Job, locked down: runs sdqueue's render and nothing named in Redis."""

    runner: JobRunner | None = None

    def _execute(self) -> Any:
        if self.func_name != RENDER_FUNC:
            raise ForeignJob(f"refused job naming {self.func_name!r}: this worker runs only {RENDER_FUNC}")
        if self.runner is None:
            raise ForeignJob("no engine: RenderJob must be run by SdqWorker")
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
    """A SimpleWorker that hands each job the warm JobRunner and records one-line errors."""

    job_class = RenderJob

    def __init__(self, *args: Any, runner: JobRunner | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("job_class", RenderJob)
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.push_exc_handler(self._record_failure)  # type: ignore[no-untyped-call]

    def perform_job(self, job: Job, queue: Queue) -> bool:
        job.runner = self.runner  # type: ignore[attr-defined]
        return bool(super().perform_job(job, queue))

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any) -> None:
        super().handle_job_success(job, queue, started_job_registry)
        self._job_ended(job)

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = ""
    ) -> None:
        will_retry = job.should_retry and self._stopped_job_id != job.id
        super().handle_job_failure(job, queue, started_job_registry, exc_string)
        if not will_retry:
            self._job_ended(job)

    def _job_ended(self, job: Job) -> None:
        """Job-end hooks (metrics, webhooks), after the final status is written. Never raises."""

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # rq quits its loop when a job in the queue can't even be loaded; a poison entry must not
        # take the worker down with it, so fail that entry and keep listening.
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
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
    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer)
    worker = SdqWorker([queue], connection=connection, runner=JobRunner(settings, engine, store))
    return bool(worker.work(burst=burst, max_idle_time=idle_timeout_s, logging_level=settings.log_level))
