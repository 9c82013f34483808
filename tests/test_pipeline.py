"""The pipelined worker: encode and upload of job k overlap the render of job k+1, and still
nothing is finished before its objects are stored, and an upload error fails the right job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rq import Queue
from rq.serializers import JSONSerializer

from sdqueue.config import Settings
from sdqueue.engine import DiffusersEngine, RenderItem
from sdqueue.errors import StorageError
from sdqueue.jobs import GenerationRequest, Status
from sdqueue.producer import Producer, connect
from sdqueue.runner import JobRunner
from sdqueue.storage import Store, open_store
from sdqueue.worker import RenderJob, SdqWorker


def small(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a hill", "steps": 2, "width": 64, "height": 64, "seed": 21}
    return GenerationRequest(**(base | kw))


class Timeline:
    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()

    def add(self, what: str, job: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), what, job))

    def at(self, what: str, job: str) -> float:
        return next(t for t, w, j in self.events if w == what and j == job)


class SlowStore:
    """The real store, with a slow put that checks the job isn't finished yet, and can fail."""

    def __init__(self, store: Store, producer: Producer, timeline: Timeline, fail_for: str = "") -> None:
        self.store, self.producer, self.timeline, self.fail_for = store, producer, timeline, fail_for
        self.prefix = store.prefix
        self.finished_before_put: list[str] = []

    def put(self, key: str, data: bytes, content_type: str) -> None:
        job_id = key.split("/")[-2]
        if self.producer.status(job_id).status is Status.FINISHED:
            self.finished_before_put.append(job_id)
        self.timeline.add("put-start", job_id)
        time.sleep(0.4)
        if job_id == self.fail_for:
            raise StorageError(f"cannot upload {key}: injected outage")
        self.store.put(key, data, content_type)
        self.timeline.add("put-end", job_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class TimedEngine:
    def __init__(self, engine: DiffusersEngine, timeline: Timeline) -> None:
        self.engine, self.timeline = engine, timeline
        self.model_id, self.model_revision = engine.model_id, engine.model_revision

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        return self.engine.prompt_warnings(request)

    def render(self, items: Sequence[RenderItem], on_step: Any = None) -> list[Any]:
        job = items[0].request.prompt
        self.timeline.add("render-start", job)
        images = self.engine.render(items, on_step)
        self.timeline.add("render-end", job)
        return images


def work(settings: Settings, engine: Any, store: Any) -> None:
    connection = connect(settings, socket_timeout_s=None)
    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer, job_class=RenderJob)
    runner = JobRunner(settings, engine, store)
    SdqWorker([queue], connection=connection, runner=runner, settings=settings).work(burst=True)


def run_three(
    settings: Settings, tiny_engine: DiffusersEngine, fail_for: str = ""
) -> tuple[Producer, Timeline, SlowStore]:
    producer = Producer(settings)
    for name in ("j0", "j1", "j2"):
        producer.enqueue(small(prompt=name), job_id=name)  # the prompt names the job in the timeline
    timeline = Timeline()
    store = SlowStore(open_store(settings), producer, timeline, fail_for)
    work(settings, TimedEngine(tiny_engine, timeline), store)
    return producer, timeline, store


def test_upload_of_one_job_overlaps_the_render_of_the_next(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(pipeline=True, max_batch=1)
    producer, timeline, store = run_three(settings, tiny_engine)
    assert [producer.status(j).status for j in ("j0", "j1", "j2")] == [Status.FINISHED] * 3
    # j1 started rendering while j0's upload (400 ms) was still running
    assert timeline.at("render-start", "j1") < timeline.at("put-end", "j0")
    assert store.finished_before_put == []
    for job_id in ("j0", "j1", "j2"):
        view = producer.status(job_id)
        assert open_store(settings).exists(view.images[0].key) and view.timings.upload_s >= 0.4


def test_sequential_mode_does_not_overlap(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(pipeline=False, max_batch=1)
    producer, timeline, store = run_three(settings, tiny_engine)
    assert [producer.status(j).status for j in ("j0", "j1", "j2")] == [Status.FINISHED] * 3
    assert timeline.at("render-start", "j1") > timeline.at("put-end", "j0")
    assert store.finished_before_put == []


def test_an_upload_error_in_the_stage_fails_the_right_job(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(pipeline=True, max_batch=1, max_retries=0)
    producer, _, store = run_three(settings, tiny_engine, fail_for="j1")
    failed = producer.status("j1")
    assert failed.status is Status.FAILED and failed.images == []
    assert failed.error == "cannot upload j1/0.png: injected outage"
    assert producer.status("j0").status is Status.FINISHED
    assert producer.status("j2").status is Status.FINISHED
    assert store.finished_before_put == []
    assert producer.queue.started_job_registry.get_job_ids() == []  # no lease left behind


def test_batched_and_pipelined_together(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(pipeline=True, max_batch=4)
    producer, _, store = run_three(settings, tiny_engine)
    views = [producer.status(j) for j in ("j0", "j1", "j2")]
    assert [v.status for v in views] == [Status.FINISHED] * 3
    assert [v.images[0].key for v in views] == ["j0/0.png", "j1/0.png", "j2/0.png"]
    assert store.finished_before_put == []
    assert producer.queue.started_job_registry.get_job_ids() == []
