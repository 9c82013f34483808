"""Cross-job batching: a worker renders the job it dequeued (the lead) together with compatible
jobs still waiting in the queue (followers), in one pipeline call.

A batch only forms when jobs are already waiting, so a lone job is never delayed by it; under a
backlog, one call for B images keeps a GPU busier than B calls of one.

Claiming is safe against other workers: a follower is taken out of the queue and marked started
(status, lease in the StartedJobRegistry, rq Execution) in ONE transaction, watched on the queue
and the job, so either this worker owns it with a lease, or it is untouched and still queued.
From then on the follower lives like any started job: the lead's heartbeat renews its lease, and
if this worker dies the housekeeper requeues it when the lease expires. Each follower gets its
own progress, seeds, PNGs and meta, and is finished or failed on its own, with rq's retry rules.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now

from .engine import RenderItem, batch_key
from .errors import Preempted
from .housekeeping import requeue_at_front
from .jobs import RENDER_FUNC, GenerationRequest, parse_request
from .stage import Deferred

if TYPE_CHECKING:
    from redis.client import Pipeline

    from .runner import JobRunner
    from .worker import SdqWorker

logger = logging.getLogger(__name__)

CLAIM_TRIES = 3
"""Transactions tried per follower before leaving it to others (the queue changed under us)."""


def window_size(max_batch: int) -> int:
    """Queued jobs looked at for followers: enough to skip a few incompatible ones, few round trips."""
    return max(8, 2 * max_batch)


@dataclass
class Follower:
    """A job claimed from the queue to ride along in the lead's pipeline call."""

    job: Job
    request: GenerationRequest
    execution: Execution


def _candidate(
    job_id: str, worker: SdqWorker, lead_key: tuple[object, ...]
) -> tuple[Job, GenerationRequest] | None:
    """The queued job and its request if it can join the batch; None leaves it to a normal dequeue
    (an invalid or unreadable job then fails alone there)."""
    try:
        job = worker.job_class.fetch(job_id, connection=worker.connection, serializer=JSONSerializer)
        if job.func_name != RENDER_FUNC or len(job.args) != 1 or job.kwargs:
            return None
        request = parse_request(job.args[0])
    except Exception:  # unreadable, foreign or invalid: not ours to judge here
        return None
    return (job, request) if batch_key(request) == lead_key else None


def claim_followers(worker: SdqWorker, lead: Job, queue: Queue, max_images: int) -> list[Follower]:
    """Take compatible jobs from the head of QUEUE until the batch holds MAX_IMAGES images."""
    try:
        lead_request = parse_request(lead.args[0]) if len(lead.args) == 1 else None
    except Exception:
        return []  # an invalid lead fails alone
    if lead_request is None:
        return []
    budget = max_images - lead_request.num_images
    followers: list[Follower] = []
    if budget <= 0:
        return followers
    for raw in worker.connection.lrange(queue.key, 0, window_size(max_images) - 1):
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        found = _candidate(job_id, worker, batch_key(lead_request))
        if found is None or found[1].num_images > budget:
            continue
        execution = _claim(worker, queue, found[0])
        if execution is not None:
            followers.append(Follower(found[0], found[1], execution))
            budget -= found[1].num_images
        if budget <= 0:
            break
    return followers


def _claim(worker: SdqWorker, queue: Queue, job: Job) -> Execution | None:
    """Move JOB from queued to started under this worker, atomically; None if someone else got it."""
    ttl = worker.get_heartbeat_ttl(job)
    with worker.connection.pipeline() as pipe:
        for _ in range(CLAIM_TRIES):
            try:
                # A dequeue by another worker touches the queue; a claim by one touches the job.
                pipe.watch(queue.key, job.key)  # type: ignore[no-untyped-call]
                if pipe.lpos(queue.key, job.id) is None:
                    return None
                pipe.multi()
                pipe.lrem(queue.key, 1, job.id)
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
                job.prepare_for_execution(worker.name, pipeline=pipe)
                removed = pipe.execute()[0]
            except redis.WatchError:
                continue
            if removed == 1:
                return execution
            return None  # unreachable while the watch holds; never keep what we didn't remove
    return None


def heartbeat(worker: SdqWorker, followers: Sequence[Follower]) -> None:
    """Renew the followers' leases, as rq's maintain_heartbeats does for the lead."""
    renew(worker, [(f.job, f.execution) for f in followers])


def renew(worker: SdqWorker, leases: Sequence[tuple[Job, Execution]]) -> None:
    """Renew the leases of started jobs this worker holds outside rq's own bookkeeping."""
    if not leases:
        return
    with worker.connection.pipeline() as pipe:
        for job, execution in leases:
            ttl = worker.get_heartbeat_ttl(job)
            execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
        pipe.execute()


def complete(worker: SdqWorker, job: Job, queue: Queue, execution: Execution, result: Any) -> None:
    """rq's handle_job_success for a job this worker ran outside rq's loop, with its own execution."""
    job.ended_at = now()
    job._result = result
    with worker.connection.pipeline() as pipe:
        worker.increment_successful_job_count(pipeline=pipe)
        if job.started_at:
            worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
        result_ttl = job.get_result_ttl(worker.default_result_ttl)
        if result_ttl != 0:
            job._handle_success(
                result_ttl,
                pipeline=pipe,
                worker_name=worker.name,
                execution_id=execution.id,
                execution_started_at=execution.created_at,
                execution_ended_at=job.ended_at,
            )
        # sdqueue jobs have no dependents (the producer never sets depends_on): nothing to enqueue.
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        execution.delete(job=job, pipeline=pipe)
        pipe.execute()
    worker._job_ended(job)


def fail(worker: SdqWorker, job: Job, queue: Queue, execution: Execution, exc_info: Any) -> None:
    """rq's exception handlers and handle_job_failure for one job, with its own execution."""
    job.ended_at = now()
    worker.handle_exception(job, *exc_info)  # our _record_failure: one-line error, retryable or not
    exc_string = "".join(traceback.format_exception(*exc_info))
    retry = job.should_retry
    with worker.connection.pipeline() as pipe:
        _fail_in(pipe, worker, job, queue, execution, exc_string, retry)
        pipe.execute()
    if not retry:
        worker._job_ended(job)


def _fail_in(
    pipe: Pipeline, worker: SdqWorker, job: Job, queue: Queue, execution: Execution, exc: str, retry: bool
) -> None:
    execution_ended_at = job.ended_at
    execution.delete(job=job, pipeline=pipe)
    worker.increment_failed_job_count(pipe)
    if retry:
        job.retry(queue, pipe)
        return
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    job._handle_failure(
        exc,
        pipeline=pipe,
        worker_name=worker.name,
        execution_id=execution.id,
        execution_started_at=execution.created_at,
        execution_ended_at=execution_ended_at,
    )


def requeue_front(worker: SdqWorker, followers: Sequence[Follower], queue: Queue) -> None:
    """Shutdown mid-batch: the followers go back to the head of the queue, untouched by the try."""
    with worker.connection.pipeline() as pipe:
        for follower in reversed(followers):  # pushed at the front one by one: keep their order
            follower.execution.delete(job=follower.job, pipeline=pipe)
            requeue_at_front(follower.job, queue, pipe)
        pipe.execute()


def run_batch(
    runner: JobRunner, lead: Job, followers: Sequence[Follower], worker: SdqWorker, queue: Queue
) -> Any:
    """Render LEAD and FOLLOWERS in one engine call; settle every follower; return the lead's result.

    If the batched call raises, each job is rendered again alone, so a bad job fails by itself."""
    jobs: list[Job] = [lead, *(f.job for f in followers)]
    try:
        prepared = [runner.prepare(job) for job in jobs]
    except Exception:
        # The lead was invalid after all (or Redis failed): settle nothing here, the followers
        # were validated at claim time and go back to the queue for another batch.
        requeue_front(worker, followers, queue)
        raise
    items = [[RenderItem(p.request, i) for i in range(p.request.num_images)] for p in prepared]
    on_steps = [runner.on_step(job) for job in jobs]

    def on_step(step: int, total: int) -> None:
        for callback in on_steps:
            callback(step, total)

    images: list[list[Any]] | None
    try:
        flat = runner.render([item for group in items for item in group], on_step)
        images, at = [], 0
        for group in items:
            images.append(flat[at : at + len(group)])
            at += len(group)
    except (Preempted, JobTimeoutException):
        # Shutdown, or the lead's time is up: nothing of the followers' is stored yet, so they go
        # back to the head of the queue and the lead alone takes the failure (or requeue).
        requeue_front(worker, followers, queue)
        raise
    except Exception:
        logger.warning(
            "batched render of %d jobs failed; rendering them one by one", len(jobs), exc_info=True
        )
        images = None

    if images is not None and runner.defer:
        rendered_at = time.time()
        done = images

        def finish_all() -> Any:  # on the stage: the followers settle, then the lead's result
            for index, follower in enumerate(followers, start=1):
                try:
                    result = runner.finish(follower.job, prepared[index], done[index], rendered_at)
                except Exception:
                    fail(worker, follower.job, queue, follower.execution, sys.exc_info())
                else:
                    complete(worker, follower.job, queue, follower.execution, result)
            return runner.finish(lead, prepared[0], done[0], rendered_at)

        return Deferred(finish_all, [(f.job, f.execution) for f in followers])

    for index, follower in enumerate(followers, start=1):
        try:
            rendered = images[index] if images is not None else runner.render(items[index], on_steps[index])
            result = runner.finish(follower.job, prepared[index], rendered)
        except (Preempted, JobTimeoutException):
            requeue_front(worker, followers[index - 1 :], queue)
            raise
        except Exception:
            fail(worker, follower.job, queue, follower.execution, sys.exc_info())
        else:
            complete(worker, follower.job, queue, follower.execution, result)
    lead_images = images[0] if images is not None else runner.render(items[0], on_steps[0])
    return runner.finish(lead, prepared[0], lead_images)
