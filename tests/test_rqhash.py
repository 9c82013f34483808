"""rqhash against rq itself: stamped hashes are the ones rq writes, records the ones rq reads."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from sdqueue import rqhash
from sdqueue.config import Settings
from sdqueue.jobs import RENDER_FUNC, GenerationRequest
from sdqueue.producer import Producer, view_of

TIMESTAMPS = {b"created_at", b"enqueued_at"}


def varied_requests() -> list[tuple[GenerationRequest, str | None]]:
    """Requests whose per-job fields all differ: steps (so timeouts), prompts, seeds, webhooks."""
    return [
        (GenerationRequest(prompt="a fox", steps=2, seed=1), None),
        (
            GenerationRequest(prompt="ünïcode, and a much longer prompt " * 4, steps=40),
            "https://example.com/hook",
        ),
        (GenerationRequest(prompt="a boat", steps=150, width=64, height=64, num_images=4, seed=7), None),
    ]


def new_jobs() -> list[rqhash.NewJob]:
    """Jobs whose per-job fields all differ: arguments, timeouts, descriptions and meta."""
    return [
        rqhash.NewJob("job-a", ({"prompt": "a fox", "steps": 2},), 90, "a fox", {"progress": {"step": 0}}),
        rqhash.NewJob("job-b", ({"prompt": "ünïcode"},), 1260, "ünïcode", {"webhook": {"url": "https://x"}}),
        rqhash.NewJob("job-c", ({"prompt": "a boat", "seed": 7},), 4560, "a boat", {}),
    ]


@pytest.mark.parametrize("max_retries", [0, 2])
def test_stamped_hashes_are_the_ones_rq_writes_for_the_same_jobs(redis_url: str, max_retries: int) -> None:
    shared: dict[str, Any] = {"result_ttl": 600, "failure_ttl": 3600, "retry": None}
    if max_retries:
        shared["retry"] = Retry(max=max_retries, interval=[1, 5])
    ours = redis.Redis.from_url(redis_url)
    with ours.pipeline() as pipe:
        rqhash.write_jobs(
            pipe, Queue("q", connection=ours, serializer=JSONSerializer), RENDER_FUNC, new_jobs(), **shared
        )
        pipe.execute()

    # rq's own bulk path, for the very same jobs, in another database of the same server.
    reference = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/1")
    reference.flushdb()
    queue = Queue("q", connection=reference, serializer=JSONSerializer)
    with reference.pipeline() as pipe:
        rqhash.write_jobs_with_rq(pipe, queue, RENDER_FUNC, new_jobs(), **shared)
        pipe.execute()

    for job in new_jobs():
        key = Job.key_for(job.id)
        mine = {k: v for k, v in ours.hgetall(key).items() if k not in TIMESTAMPS}
        theirs = {k: v for k, v in reference.hgetall(key).items() if k not in TIMESTAMPS}
        assert mine == theirs
        assert ours.hexists(key, "created_at") and ours.hexists(key, "enqueued_at")
    assert (
        ours.lrange(queue.key, 0, -1) == reference.lrange(queue.key, 0, -1) == [b"job-a", b"job-b", b"job-c"]
    )
    assert ours.smembers(Queue.redis_queues_keys) == reference.smembers(Queue.redis_queues_keys)


def test_rq_reads_the_stamped_jobs_back(make_settings: Callable[..., Settings]) -> None:
    producer = Producer(make_settings(max_retries=3, webhook_secret="s"))
    items = varied_requests()
    ids = producer.enqueue_many([r for r, _ in items], [u for _, u in items])
    assert producer.queue.job_ids == ids
    for job_id, (request, url) in zip(ids, items, strict=True):
        job = Job.fetch(job_id, connection=producer.redis, serializer=JSONSerializer)
        assert job.func_name == RENDER_FUNC and job.kwargs == {}
        assert job.args[0]["prompt"] == request.prompt and job.args[0]["seed"] is not None
        assert job.timeout == request.timeout_s(producer.settings.job_timeout_base_s, 30.0)
        assert job.meta["progress"] == {"step": 0, "total_steps": request.steps}
        assert job.meta.get("webhook") == ({"url": url} if url else None)
        assert job.get_status() == JobStatus.QUEUED and job.origin == producer.queue.name
        assert job.retries_left == 3 and job.result_ttl == producer.settings.result_ttl_s


def job_in_state(producer: Producer, state: str) -> Job:
    """A job moved into STATE the way a worker leaves it (dates and meta included)."""
    view = producer.enqueue(GenerationRequest(prompt=f"a {state} job", steps=3, seed=5))
    job = Job.fetch(view.id, connection=producer.redis, serializer=JSONSerializer)
    now = datetime.now(UTC)
    if state != "queued":
        job.started_at = now - timedelta(seconds=2)
        job.meta |= {"progress": {"step": 2, "total_steps": 3}, "attempts": 1, "warnings": ["long"]}
    if state in ("finished", "failed", "canceled"):
        job.ended_at = now
    if state == "finished":
        job.meta["images"] = [{"index": 0, "key": "k/0.png", "url": "file:///k/0.png", "seed": 5}]
        job.meta["timings"] = {"render_s": 1.5, "encode_s": 0.1}
    if state == "failed":
        job.meta["error"] = "out of memory"
    job.save()
    if state != "queued":
        job.set_status(JobStatus(state))
    return job


@pytest.mark.parametrize("state", ["queued", "started", "finished", "failed", "canceled", "scheduled"])
def test_a_record_reads_what_rq_reads(make_settings: Callable[..., Settings], state: str) -> None:
    producer = Producer(make_settings())
    job = job_in_state(producer, state)
    fetched = Job.fetch(job.id, connection=producer.redis, serializer=JSONSerializer)
    record = producer.record(job.id)
    assert record.status == state
    assert view_of(record) == view_of(rqhash.JobRecord.of(fetched))
    assert producer.status(job.id) == view_of(rqhash.JobRecord.of(fetched))


def test_no_hash_is_no_record_and_unreadable_data_no_args(make_settings: Callable[..., Settings]) -> None:
    producer = Producer(make_settings())
    assert rqhash.read_record("gone", producer.redis.hmget("rq:job:gone", rqhash.RECORD_FIELDS)) is None
    for data in (b"not zlib", zlib.compress(b"\xff not json"), zlib.compress(b'{"a": 1}')):
        record = rqhash.read_record("x", [b"queued", b"{}", data, b"", b"", b""])
        assert record is not None and record.args == () and view_of(record).request == {}
    record = rqhash.read_record(
        "x", [b"started", b"\xff", zlib.compress(b"[]"), b"2026-11-26T12:00:00.5Z", b"bad", None]
    )
    assert record is not None and record.meta == {} and record.started_at is None
    assert record.created_at == datetime(2026, 11, 26, 12, 0, 0, 500000, tzinfo=UTC)


def test_no_jobs_write_nothing_and_an_empty_description_is_refused(
    make_settings: Callable[..., Settings],
) -> None:
    producer = Producer(make_settings())
    assert producer.enqueue_many([]) == []
    with producer.redis.pipeline() as pipe, pytest.raises(ValueError, match="needs a description"):
        rqhash.write_jobs(pipe, producer.queue, RENDER_FUNC, [rqhash.NewJob("j", (), 60, "", {})])
    assert producer.redis.dbsize() == 0


@pytest.mark.parametrize("status", [JobStatus.FINISHED, "finished"])
def test_a_record_of_a_job_takes_its_status_as_enum_or_string(
    make_settings: Callable[..., Settings], status: JobStatus | str
) -> None:
    producer = Producer(make_settings())
    view = producer.enqueue(GenerationRequest(prompt="a fox"))
    job = Job.fetch(view.id, connection=producer.redis, serializer=JSONSerializer)
    job.set_status(status)  # type: ignore[arg-type]  # rq keeps whichever it is given
    assert rqhash.JobRecord.of(job).status == "finished"
