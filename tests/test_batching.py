"""Cross-job batching in a real in-process worker: real Redis, real files, the real tiny pipeline
wrapped only to count (or break) engine calls."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from PIL import Image
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from test_engine import assert_same_picture

from sdqueue import batching
from sdqueue.config import Settings
from sdqueue.engine import DiffusersEngine, RenderItem
from sdqueue.housekeeping import Housekeeper
from sdqueue.jobs import GenerationRequest, Status
from sdqueue.producer import Producer
from sdqueue.storage import open_store
from sdqueue.worker import RenderJob, SdqWorker, run_worker


def small(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64, "seed": 7}
    return GenerationRequest(**(base | kw))


class CountingEngine:
    """The real tiny engine, recording the prompts of each call; a prompt with BOOM breaks a call."""

    def __init__(self, engine: DiffusersEngine) -> None:
        self.engine = engine
        self.model_id, self.model_revision = engine.model_id, engine.model_revision
        self.calls: list[list[str]] = []

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        return self.engine.prompt_warnings(request)

    def render(self, items: Sequence[RenderItem], on_step: Any = None) -> list[Any]:
        self.calls.append([item.request.prompt for item in items])
        if any("BOOM" in item.request.prompt for item in items):
            raise RuntimeError("BOOM breaks any call it is in")
        return self.engine.render(items, on_step)


def pictures(settings: Settings, producer: Producer, job_id: str) -> list[Image.Image]:
    store = open_store(settings)
    return [Image.open(io.BytesIO(store.get(ref.key))) for ref in producer.status(job_id).images]


def test_compatible_jobs_render_in_one_call_each_with_its_own_status_seeds_and_keys(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(max_batch=4)
    producer = Producer(settings)
    jobs = [
        producer.enqueue(small(prompt="a boat", seed=1)),
        producer.enqueue(small(prompt="a car", seed=2, num_images=2)),
        producer.enqueue(small(prompt="a cat", seed=3)),
    ]
    engine = CountingEngine(tiny_engine)
    run_worker(settings, engine=engine, burst=True)
    assert engine.calls == [["a boat", "a car", "a car", "a cat"]]
    for job, seeds in zip(jobs, ([1], [2, 3], [3]), strict=True):
        view = producer.status(job.id)
        assert view.status is Status.FINISHED and view.error is None and view.attempts == 1
        assert [image.seed for image in view.images] == seeds
        assert [image.key for image in view.images] == [f"{job.id}/{i}.png" for i in range(len(seeds))]
        assert view.progress.step == view.progress.total_steps == 2
        assert view.started_at and view.finished_at
    conn = redis.Redis.from_url(settings.redis_url)
    assert conn.zcard(f"rq:wip:{settings.queue}") == 0  # no lease left behind


def test_batched_pixels_equal_single_run_pixels(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine, tmp_path: Any
) -> None:
    requests = [small(prompt="a boat", seed=1), small(prompt="a red house", seed=9, num_images=2)]
    batched = make_settings(max_batch=4, storage_url=(tmp_path / "batched").as_uri())
    single = make_settings(max_batch=1, storage_url=(tmp_path / "single").as_uri())
    views: dict[str, list[list[Image.Image]]] = {}
    for name, settings in (("batched", batched), ("single", single)):
        redis.Redis.from_url(settings.redis_url).flushall()
        producer = Producer(settings)
        ids = [producer.enqueue(request).id for request in requests]
        engine = CountingEngine(tiny_engine)
        run_worker(settings, engine=engine, burst=True)
        assert len(engine.calls) == (1 if name == "batched" else 2)
        views[name] = [pictures(settings, producer, job_id) for job_id in ids]
    for got_job, want_job in zip(views["batched"], views["single"], strict=True):
        assert len(got_job) == len(want_job)
        for got, want in zip(got_job, want_job, strict=True):
            assert_same_picture(got, want)


def test_a_bad_job_in_a_batch_fails_alone(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(max_batch=4, max_retries=0)
    producer = Producer(settings)
    good1 = producer.enqueue(small(prompt="fine one"))
    bad = producer.enqueue(small(prompt="BOOM"))
    good2 = producer.enqueue(small(prompt="fine two"))
    engine = CountingEngine(tiny_engine)
    run_worker(settings, engine=engine, burst=True)
    assert engine.calls[0] == ["fine one", "BOOM", "fine two"]  # one batch, then one by one
    assert sorted(map(tuple, engine.calls[1:])) == [("BOOM",), ("fine one",), ("fine two",)]
    assert producer.status(good1.id).status is Status.FINISHED
    assert producer.status(good2.id).status is Status.FINISHED
    failed = producer.status(bad.id)
    assert failed.status is Status.FAILED and failed.error == "RuntimeError: BOOM breaks any call it is in"
    assert failed.images == []


def test_a_failing_follower_is_retried_by_rq_rules(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(max_batch=4, max_retries=1)
    producer = Producer(settings)
    lead = producer.enqueue(small(prompt="fine"))
    bad = producer.enqueue(small(prompt="BOOM follower"))
    run_worker(settings, engine=CountingEngine(tiny_engine), burst=True)
    assert producer.status(lead.id).status is Status.FINISHED
    failed = producer.status(bad.id)
    assert failed.status is Status.FAILED and failed.attempts == 2  # the batch try and one retry


def test_an_invalid_follower_fails_alone_and_is_not_batched(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(max_batch=4, max_retries=3)
    producer = Producer(settings)
    first = producer.enqueue(small(prompt="first"))
    tampered = producer.queue.enqueue(
        "sdqueue.worker.render", args=({"prompt": "x", "steps": 500},), job_id="tampered"
    )
    last = producer.enqueue(small(prompt="last"))
    engine = CountingEngine(tiny_engine)
    run_worker(settings, engine=engine, burst=True)
    assert engine.calls == [["first", "last"]]
    assert producer.status(first.id).status is Status.FINISHED
    assert producer.status(last.id).status is Status.FINISHED
    bad = producer.status(tampered.id)
    assert bad.status is Status.FAILED and bad.error == "steps must be between 1 and 150, got 500"


def test_incompatible_jobs_are_not_batched_and_b_limits_images(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(max_batch=2)
    producer = Producer(settings)
    producer.enqueue(small(prompt="a"))
    producer.enqueue(small(prompt="b", steps=3))  # other steps
    producer.enqueue(small(prompt="c", width=72))  # other size
    producer.enqueue(small(prompt="d", guidance_scale=3.0))  # other guidance
    producer.enqueue(small(prompt="e", scheduler="euler"))  # other scheduler
    producer.enqueue(small(prompt="f", num_images=2))  # would make 3 images with "a"
    producer.enqueue(small(prompt="g"))
    producer.enqueue(small(prompt="h"))
    engine = CountingEngine(tiny_engine)
    run_worker(settings, engine=engine, burst=True)
    assert engine.calls == [["a", "g"], ["b"], ["c"], ["d"], ["e"], ["f", "f"], ["h"]]


def test_two_workers_never_claim_the_same_follower(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(max_batch=64)
    producer = Producer(settings)
    ids = [producer.enqueue(small(prompt=f"p{i}")).id for i in range(40)]
    lead = producer.enqueue(small(prompt="lead"))
    conn = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue, connection=conn, serializer=JSONSerializer, job_class=RenderJob)
    lead_job = RenderJob.fetch(lead.id, connection=conn, serializer=JSONSerializer)
    claimed: list[list[str]] = []
    barrier = threading.Barrier(3)

    def claim() -> None:
        own = redis.Redis.from_url(settings.redis_url)
        worker = SdqWorker(
            [Queue(settings.queue, connection=own, serializer=JSONSerializer)],
            connection=own,
            settings=settings,
        )
        barrier.wait()
        got: list[str] = []
        for _ in range(10):  # each pass takes up to a window of the queue head
            got += [f.job.id for f in batching.claim_followers(worker, lead_job, queue, 5)]
        claimed.append(got)

    threads = [threading.Thread(target=claim) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [job_id for got in claimed for job_id in got]
    assert len(every) == len(set(every))  # nobody owns a job twice
    left = [raw.decode() for raw in conn.lrange(queue.key, 0, -1)]
    assert sorted(every + left) == sorted([*ids, lead.id])  # and nothing fell between the two
    started = StartedJobRegistry(queue=queue).get_job_ids()
    assert sorted(started) == sorted(every)
    assert all(producer.status(job_id).status is Status.STARTED for job_id in every)


def test_a_follower_of_a_dead_worker_is_requeued_when_its_lease_expires(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(max_batch=4, heartbeat_ttl_s=2)
    producer = Producer(settings)
    lead = producer.enqueue(small(prompt="lead"))
    follower = producer.enqueue(small(prompt="follower"))
    conn = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue, connection=conn, serializer=JSONSerializer, job_class=RenderJob)
    worker = SdqWorker([queue], connection=conn, settings=settings)
    lead_job = RenderJob.fetch(lead.id, connection=conn, serializer=JSONSerializer)
    conn.lrem(queue.key, 1, lead.id)  # as a dequeue would
    claimed = batching.claim_followers(worker, lead_job, queue, 4)
    assert [f.job.id for f in claimed] == [follower.id]
    assert producer.status(follower.id).status is Status.STARTED
    # The worker dies here: no heartbeat. Once the lease is over, any housekeeper requeues it.
    time.sleep(3.1)
    requeued = Housekeeper(queue, 1, RenderJob).requeue_abandoned()
    assert requeued == [follower.id]
    assert producer.status(follower.id).status is Status.QUEUED
    assert conn.lrange(queue.key, 0, -1) == [follower.id.encode()]
