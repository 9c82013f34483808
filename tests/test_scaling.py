"""Scale to zero: the pure decision, its inputs read from a real redis-server, one scaler tick,
and the drain (the worker side) run locally with the tiny model against Redis and S3."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from sdqueue.config import Settings
from sdqueue.errors import ServiceUnavailable
from sdqueue.jobs import SCALER_STARTING_KEY, GenerationRequest, Status
from sdqueue.producer import Producer
from sdqueue.scaling import (
    Limits,
    Load,
    drain,
    mark_started,
    mark_starting,
    read_load,
    scale,
    workers_to_start,
)
from sdqueue.storage import open_store

GRACE_S = 600.0
NOW = 1_900_000_000.0
"""A fixed clock for the scaler ticks that need no real time."""


def small(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a lamp", "steps": 2, "width": 64, "height": 64, "seed": 3}
    return GenerationRequest(**(base | kw))


# --- The decision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backlog", "live", "starting", "limits", "expected"),
    [
        (0, 0, 0, Limits(max_workers=4), 0),  # empty queue: nothing runs, nothing is billed
        (1, 0, 0, Limits(max_workers=4), 1),
        (3, 0, 0, Limits(max_workers=4), 3),
        (50, 0, 0, Limits(max_workers=4), 4),  # never past the maximum
        (9, 0, 0, Limits(max_workers=4, jobs_per_worker=4), 3),  # ceil(9 / 4)
        (4, 0, 0, Limits(max_workers=4, jobs_per_worker=4), 1),
        (3, 2, 0, Limits(max_workers=4), 1),  # live workers are capacity
        (3, 0, 2, Limits(max_workers=4), 1),  # so are drains still loading their model
        (3, 5, 0, Limits(max_workers=4), 0),  # more alive than wanted (a laptop worker too)
        (50, 3, 1, Limits(max_workers=4), 0),
        (0, 0, 0, Limits(max_workers=4, min_workers=1), 1),  # a warm floor, even when idle
        (0, 1, 0, Limits(max_workers=4, min_workers=1), 0),
        (10, 0, 0, Limits(max_workers=2, min_workers=2, jobs_per_worker=8), 2),
    ],
)
def test_workers_to_start(backlog: int, live: int, starting: int, limits: Limits, expected: int) -> None:
    assert workers_to_start(Load(backlog, live, starting), limits) == expected


@given(
    backlog=st.integers(0, 10_000),
    live=st.integers(0, 50),
    starting=st.integers(0, 50),
    max_workers=st.integers(1, 50),
    min_frac=st.floats(0, 1),
    per_worker=st.integers(1, 20),
)
def test_workers_to_start_invariants(
    backlog: int, live: int, starting: int, max_workers: int, min_frac: float, per_worker: int
) -> None:
    limits = Limits(max_workers, int(min_frac * max_workers), per_worker)
    started = workers_to_start(Load(backlog, live, starting), limits)
    assert started >= 0
    if started:
        # What it starts never takes the total past the maximum, and covers the backlog or floor.
        assert live + starting + started <= max_workers
        wanted = max(limits.min_workers, min(max_workers, -(-backlog // per_worker)))
        assert live + starting + started == wanted
    if backlog == 0 and limits.min_workers == 0:
        assert started == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_workers": 0}, "max_workers must be at least 1, got 0"),
        ({"max_workers": 2, "min_workers": 3}, "min_workers must be between 0 and max_workers"),
        ({"max_workers": 2, "jobs_per_worker": 0}, "jobs_per_worker must be at least 1, got 0"),
    ],
)
def test_limits_refuse_nonsense(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)


def test_limits_come_from_settings() -> None:
    settings = Settings(modal_min_workers=1, modal_max_workers=6, modal_jobs_per_worker=3)
    assert Limits.from_settings(settings) == Limits(max_workers=6, min_workers=1, jobs_per_worker=3)


# --- The inputs, from a real Redis --------------------------------------------------------------


def _worker(settings: Settings, conn: redis.Redis) -> Worker:
    queue = Queue(settings.queue, connection=conn, serializer=JSONSerializer)
    return Worker([queue], connection=conn, serializer=JSONSerializer)


def test_read_load_counts_backlog_workers_and_starting(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    conn = redis.Redis.from_url(settings.redis_url)
    producer = Producer(settings, conn)
    now = time.time()
    assert read_load(conn, settings.queue, now=now, start_grace_s=GRACE_S) == Load(0, 0, 0)

    for _ in range(3):
        producer.enqueue(small())
    # A retry that is due counts; one scheduled for later does not.
    for delay_s in (-5, 3600):
        view = producer.enqueue(small())
        conn.lrem(producer.queue.key, 1, view.id)
        when = datetime.fromtimestamp(now + delay_s, UTC)
        producer.queue.scheduled_job_registry.schedule(producer.fetch_job(view.id), when)

    alive = _worker(settings, conn)
    alive.register_birth()
    ghost = _worker(settings, conn)
    ghost.register_birth()
    conn.delete(ghost.key)  # its heartbeat key expired: the container was reclaimed

    mark_starting(conn, settings.queue, ["fresh"], now=now)
    mark_starting(conn, settings.queue, ["stale"], now=now - GRACE_S - 1)  # never came up

    assert read_load(conn, settings.queue, now=now, start_grace_s=GRACE_S) == Load(4, 1, 1)
    assert conn.zrange(SCALER_STARTING_KEY.format(queue=settings.queue), 0, -1) == [b"fresh"]

    mark_started(conn, settings.queue, "fresh")
    assert read_load(conn, settings.queue, now=now, start_grace_s=GRACE_S).starting == 0
    alive.register_death()


# --- One scaler tick ----------------------------------------------------------------------------


def test_scale_spawns_for_the_backlog_once_then_waits_for_them(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(modal_max_workers=4, modal_jobs_per_worker=4)
    conn = redis.Redis.from_url(settings.redis_url)
    producer = Producer(settings, conn)
    spawned: list[str] = []

    assert scale(settings, spawned.append, start_grace_s=GRACE_S, now=NOW) == 0  # idle: zero cost

    producer.enqueue_many([small(seed=i) for i in range(10)])
    assert scale(settings, spawned.append, start_grace_s=GRACE_S, now=NOW) == 3
    assert len(set(spawned)) == 3
    # The next tick sees them starting and starts nothing more, though none has registered yet.
    assert scale(settings, spawned.append, start_grace_s=GRACE_S, now=NOW + 20) == 0

    # Two came up and registered as rq workers; one never did. Within the grace nothing changes;
    # after it, the missing one is replaced.
    workers = [_worker(settings, conn) for _ in range(2)]
    for token, worker in zip(spawned[:2], workers, strict=True):
        mark_started(conn, settings.queue, token)
        worker.register_birth()
    assert scale(settings, spawned.append, start_grace_s=GRACE_S, now=NOW + 40) == 0
    assert scale(settings, spawned.append, start_grace_s=GRACE_S, now=NOW + GRACE_S + 1) == 1
    assert len(spawned) == 4
    for worker in workers:
        worker.register_death()


def test_a_failed_spawn_is_unmarked_so_the_next_tick_retries(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(modal_max_workers=2, modal_jobs_per_worker=1)
    Producer(settings).enqueue_many([small(), small()])

    def broken(token: str) -> None:
        raise RuntimeError("modal is down")

    with pytest.raises(RuntimeError, match="modal is down"):
        scale(settings, broken, start_grace_s=GRACE_S, now=NOW)
    spawned: list[str] = []
    assert scale(settings, spawned.append, start_grace_s=GRACE_S, now=NOW + 20) == 2


def test_scale_reports_an_unreachable_redis(make_settings: Callable[..., Settings]) -> None:
    from conftest import free_port

    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ServiceUnavailable, match="cannot reach Redis"):
        scale(settings, lambda token: None, start_grace_s=GRACE_S)


# --- The drain: the function the Modal method calls, run here with the tiny model ---------------


@pytest.mark.slow
def test_drain_renders_the_backlog_to_s3_then_returns_when_idle(
    s3_settings: Settings, tiny_engine: Any
) -> None:
    conn = redis.Redis.from_url(s3_settings.redis_url)
    producer = Producer(s3_settings, conn)
    views = [producer.enqueue(small(seed=s)) for s in (1, 2)]
    mark_starting(conn, s3_settings.queue, ["tok"], now=NOW)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    assert drain(s3_settings, tiny_engine, idle_timeout_s=1, spawn_token="tok") is True

    store = open_store(s3_settings)
    for view in views:
        done = producer.status(view.id)
        assert done.status is Status.FINISHED, done.error
        assert [store.exists(image.key) for image in done.images] == [True]
    assert conn.zcard(SCALER_STARTING_KEY.format(queue=s3_settings.queue)) == 0
    assert Worker.count(queue=producer.queue) == 0  # deregistered on the way out
    # The worker's signal handlers do not outlive it.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    # Idle from the start: it returns after the idle timeout, having done nothing.
    assert drain(s3_settings, tiny_engine, idle_timeout_s=1) is False


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_drain_stops_itself_after_its_lifetime(
    make_settings: Callable[..., Settings], tiny_engine: Any
) -> None:
    """With an idle timeout far beyond the test's own timeout, only the lifetime stop ends it."""
    settings = make_settings()
    handler = signal.getsignal(signal.SIGTERM)
    assert drain(settings, tiny_engine, idle_timeout_s=3600, max_lifetime_s=0.5) is False
    assert signal.getsignal(signal.SIGTERM) == handler


def test_drain_refuses_to_run_off_the_main_thread(
    make_settings: Callable[..., Settings], tiny_engine: Any
) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            drain(make_settings(), tiny_engine, idle_timeout_s=1)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert len(errors) == 1 and "main thread" in str(errors[0])
