"""Scale to zero: start workers for the queue's backlog, and let each one exit once it is idle.

Two halves, joined only by Redis:

    the scaler (every few seconds)                   a drain (one per GPU container)
    read_load(): backlog, live workers, starting     load the model once
    workers_to_start(load, limits) -> n     spawn -> mark_started(token)
    mark_starting(n tokens), spawn n drains          run_worker until the queue has been idle
                                                     for idle_timeout_s, then return

Nothing runs while the queue is empty, so nothing is billed. The decision is the pure function
``workers_to_start``; ``scale`` is one scaler tick around it; ``drain`` is the worker side. None of
them imports Modal: ``modal_app.py`` is glue around these functions, and the tests run the same
functions against a real Redis.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer
from rq.worker_registration import clean_worker_registry

from .config import Settings
from .jobs import SCALER_STARTING_KEY
from .producer import connect, redis_errors

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)

SignalHandler = Callable[[int, FrameType | None], Any] | int | None


@dataclass(frozen=True)
class Load:
    """What the scaler sees in Redis at one moment."""

    backlog: int
    """Jobs waiting for a worker: queued, retries that are due, and jobs whose worker vanished."""
    live_workers: int
    """rq workers alive on the queue, on any host (a laptop's `sdq worker` counts too)."""
    starting: int
    """Drains spawned recently that have not loaded their model yet."""


@dataclass(frozen=True)
class Limits:
    """How far the scaler may go."""

    max_workers: int
    min_workers: int = 0
    jobs_per_worker: int = 1
    """Queued jobs that justify one more worker: a cold start costs tens of seconds, during which
    one warm worker may clear several jobs."""

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {self.max_workers}")
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"min_workers must be between 0 and max_workers ({self.max_workers}), got {self.min_workers}"
            )
        if self.jobs_per_worker < 1:
            raise ValueError(f"jobs_per_worker must be at least 1, got {self.jobs_per_worker}")

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_workers=settings.modal_max_workers,
            min_workers=settings.modal_min_workers,
            jobs_per_worker=settings.modal_jobs_per_worker,
        )


def workers_to_start(load: Load, limits: Limits) -> int:
    """How many workers to start now: one per JOBS_PER_WORKER waiting jobs, at least MIN_WORKERS,
    at most MAX_WORKERS, minus those alive or already starting. Zero for an empty queue."""
    wanted = math.ceil(max(0, load.backlog) / limits.jobs_per_worker)
    wanted = max(limits.min_workers, min(limits.max_workers, wanted))
    return max(0, wanted - max(0, load.live_workers) - max(0, load.starting))


# --- The inputs, from Redis ---------------------------------------------------------------------


def _starting_key(queue_name: str) -> str:
    return SCALER_STARTING_KEY.format(queue=queue_name)


def read_load(connection: redis.Redis, queue_name: str, *, now: float, start_grace_s: float) -> Load:
    """The queue's Load at NOW; spawns older than START_GRACE_S are taken for failed starts."""
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    # A worker killed without deregistering (a reclaimed container) stays in rq's set of workers
    # until some live worker cleans it; with no live worker nobody would, and the scaler would
    # wait for a ghost. Its heartbeat key has expired, which is what this checks.
    clean_worker_registry(queue)
    live_workers = Worker.count(queue=queue)
    starting_key = _starting_key(queue_name)
    with connection.pipeline() as pipe:
        pipe.llen(queue.key)
        # Retries that are due and jobs whose lease expired only go back on the queue when a live
        # worker's housekeeping moves them: with no worker alive they are backlog too.
        pipe.zcount(queue.scheduled_job_registry.key, 0, now)
        pipe.zcount(queue.started_job_registry.key, 0, now)
        pipe.zremrangebyscore(starting_key, "-inf", now - start_grace_s)
        pipe.zcard(starting_key)
        queued, due, orphaned, _, starting = pipe.execute()
    return Load(backlog=int(queued) + int(due) + int(orphaned), live_workers=live_workers, starting=starting)


def mark_starting(connection: redis.Redis, queue_name: str, tokens: list[str], now: float) -> None:
    """Record spawned drains until they call mark_started (or the start grace passes)."""
    if tokens:
        connection.zadd(_starting_key(queue_name), dict.fromkeys(tokens, now))


def mark_started(connection: redis.Redis, queue_name: str, token: str) -> None:
    """A drain has its model loaded and is about to register as an rq worker."""
    connection.zrem(_starting_key(queue_name), token)


def scale(
    settings: Settings,
    spawn: Callable[[str], object],
    *,
    start_grace_s: float,
    now: float | None = None,
    connection: redis.Redis | None = None,
) -> int:
    """One scaler tick: read the load, decide, and SPAWN(token) each new drain. Returns how many."""
    now = time.time() if now is None else now
    connection = connection if connection is not None else connect(settings)
    limits = Limits.from_settings(settings)
    with redis_errors(settings):
        load = read_load(connection, settings.queue, now=now, start_grace_s=start_grace_s)
        tokens = [uuid.uuid4().hex for _ in range(workers_to_start(load, limits))]
        mark_starting(connection, settings.queue, tokens, now)
    logger.info(
        "backlog %d, live workers %d, starting %d: starting %d more (max %d)",
        load.backlog,
        load.live_workers,
        load.starting,
        len(tokens),
        limits.max_workers,
    )
    for index, token in enumerate(tokens):
        try:
            spawn(token)
        except Exception:
            # Unmark what never started, so the next tick tries again instead of waiting out the grace.
            with redis_errors(settings):
                connection.zrem(_starting_key(settings.queue), *tokens[index:])
            raise
    return len(tokens)


# --- The worker side ----------------------------------------------------------------------------


def drain(
    settings: Settings,
    engine: Engine,
    *,
    idle_timeout_s: int,
    max_lifetime_s: float | None = None,
    spawn_token: str | None = None,
) -> bool:
    """Run a warm worker with ENGINE until the queue has been empty for IDLE_TIMEOUT_S; after
    MAX_LIFETIME_S, stop it the way `docker stop` does (SIGTERM). True if any job was processed.

    Must run on the main thread: rq enforces job timeouts with SIGALRM, and the worker's own
    SIGINT/SIGTERM handlers (finish or requeue the running job within its grace) are installed
    there. They are left to work, then the handlers found on entry are put back."""
    from .worker import run_worker

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("drain() must run on the main thread: rq's job timeouts use SIGALRM")
    if spawn_token is not None:
        with redis_errors(settings):
            mark_started(connect(settings), settings.queue, spawn_token)
    saved: dict[int, SignalHandler] = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    finished = threading.Event()
    if max_lifetime_s is not None:
        threading.Thread(
            target=_stop_after,
            args=(max_lifetime_s, saved[signal.SIGTERM], finished),
            name="sdq-drain-lifetime",
            daemon=True,
        ).start()
    try:
        return run_worker(settings, engine=engine, idle_timeout_s=idle_timeout_s)
    finally:
        finished.set()
        # rq leaves its handlers installed after the loop ends; a signal meant for the host
        # process (Modal's SIGINT between inputs) must not land in a finished worker.
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _stop_after(lifetime_s: float, handler_before: SignalHandler, finished: threading.Event) -> None:
    """After LIFETIME_S, send this process SIGTERM, but only once the worker's own handler is in
    place: before that, SIGTERM's default action would kill the process outright."""
    if finished.wait(lifetime_s):
        return
    while not finished.is_set():
        if signal.getsignal(signal.SIGTERM) is not handler_before:
            logger.info("drain lifetime of %.0f s reached: stopping the worker", lifetime_s)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        finished.wait(1.0)
