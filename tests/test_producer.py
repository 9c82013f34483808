"""The producer against a real redis-server: ids, duplicates, cancel, bulk enqueue, outages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from sdqueue import rqhash
from sdqueue.config import Settings
from sdqueue.errors import InvalidRequest, JobConflict, JobNotFound, ServiceUnavailable
from sdqueue.jobs import GenerationRequest, Status
from sdqueue.producer import Producer, connect_async, found, redact, status_key
from sdqueue.worker import run_worker


def small(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    return GenerationRequest(**(base | kw))


def test_enqueue_returns_a_queued_view_with_a_random_id(make_settings: Callable[..., Settings]) -> None:
    producer = Producer(make_settings())
    a, b = producer.enqueue(small()), producer.enqueue(small())
    assert a.status is Status.QUEUED and a.id != b.id and len(a.id) == 32
    assert a.progress.total_steps == 2 and a.images == [] and a.error is None
    assert producer.queue.count == 2


def test_duplicate_job_id_is_refused_not_overwritten(make_settings: Callable[..., Settings]) -> None:
    producer = Producer(make_settings())
    producer.enqueue(small(prompt="first"), job_id="mine-1")
    with pytest.raises(JobConflict, match="'mine-1' already exists"):
        producer.enqueue(small(prompt="second"), job_id="mine-1")
    assert producer.status("mine-1").request["prompt"] == "first"
    assert producer.queue.count == 1


def test_bad_job_id_is_invalid(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(InvalidRequest, match="job_id must be"):
        Producer(make_settings()).enqueue(small(), job_id="../etc")


def test_unknown_job_is_not_found(make_settings: Callable[..., Settings]) -> None:
    producer = Producer(make_settings())
    for job_id in ["nope", "../../x"]:
        with pytest.raises(JobNotFound, match="not found"):
            producer.status(job_id)


def test_cancel_a_queued_job_and_it_is_never_rendered(
    make_settings: Callable[..., Settings], tiny_engine: Any
) -> None:
    settings = make_settings()
    producer = Producer(settings)
    canceled = producer.enqueue(small(), job_id="to-cancel")
    kept = producer.enqueue(small())
    assert producer.cancel("to-cancel").status is Status.CANCELED
    run_worker(settings, engine=tiny_engine, burst=True)
    view = producer.status("to-cancel")
    assert view.status is Status.CANCELED and view.images == [] and view.attempts == 0
    assert producer.status(kept.id).status is Status.FINISHED
    with pytest.raises(JobConflict, match="is finished; only queued jobs can be canceled"):
        producer.cancel(kept.id)
    with pytest.raises(JobConflict, match="canceled"):
        producer.cancel(canceled.id)


def test_enqueue_many_is_one_round_trip_and_keeps_order(make_settings: Callable[..., Settings]) -> None:
    producer = Producer(make_settings())
    producer.redis.ping()  # rq asks the server version once; warm that up too
    producer.queue.get_redis_server_version()
    single_commands: list[object] = []
    real = producer.redis.execute_command

    def counting(*args: object, **kwargs: object) -> object:
        single_commands.append(args[0])
        return real(*args, **kwargs)

    producer.redis.execute_command = counting  # type: ignore[method-assign]
    requests = [small(prompt=f"p{i}", seed=None) for i in range(50)]
    ids = producer.enqueue_many(requests)
    assert single_commands == []  # everything went through the one pipeline
    producer.redis.execute_command = real  # type: ignore[method-assign]
    assert len(set(ids)) == 50 and producer.queue.job_ids == ids
    assert [producer.status(i).request["prompt"] for i in ids[:3]] == ["p0", "p1", "p2"]
    assert all(isinstance(producer.status(i).request["seed"], int) for i in ids)


def test_unreachable_redis_is_service_unavailable_with_redacted_url() -> None:
    settings = Settings(redis_url="redis://:hunter2@127.0.0.1:1/0")
    with pytest.raises(ServiceUnavailable) as caught:
        Producer(settings).enqueue(small())
    assert "127.0.0.1:1" in str(caught.value) and "hunter2" not in str(caught.value)
    assert redact("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"


def test_the_api_s_async_pool_holds_at_most_its_cap_of_connections(
    make_settings: Callable[..., Settings],
) -> None:
    """200 status reads at once through a pool capped at 4: all answered, on at most 4 connections."""
    settings = make_settings()
    producer = Producer(settings)
    job = producer.enqueue(small())
    before = producer.redis.info("clients")["connected_clients"]

    async def read_many() -> tuple[list[str], int]:
        client = connect_async(settings, max_connections=4)
        try:
            key = status_key(job.id)
            results = await asyncio.gather(*(client.hmget(key, rqhash.RECORD_FIELDS) for _ in range(200)))
            opened = producer.redis.info("clients")["connected_clients"] - before
            return [found(job.id, values).status for values in results], opened
        finally:
            await client.aclose()

    statuses, opened = asyncio.run(read_many())
    assert statuses == ["queued"] * 200
    assert 1 <= opened <= 4
