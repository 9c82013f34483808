"""Faults inside the render, in an in-process worker: poison jobs, GPU out of memory, a hung
render. The engine is the real tiny pipeline; only the fault itself is injected."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdqueue.config import Settings
from sdqueue.engine import DiffusersEngine, RenderItem
from sdqueue.jobs import GenerationRequest, Status
from sdqueue.producer import Producer
from sdqueue.worker import run_worker


def small(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a tree", "steps": 2, "width": 64, "height": 64, "seed": 11}
    return GenerationRequest(**(base | kw))


class FaultyEngine:
    """The real engine, except for prompts that name a fault."""

    def __init__(self, engine: DiffusersEngine) -> None:
        self.engine = engine
        self.model_id, self.model_revision = engine.model_id, engine.model_revision
        self.calls = 0

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        return self.engine.prompt_warnings(request)

    def render(self, items: Sequence[RenderItem], on_step: Any = None) -> list[Any]:
        self.calls += 1
        prompt = items[0].request.prompt
        if "POISON" in prompt:
            raise RuntimeError("this prompt breaks the model every time")
        if "HANG" in prompt:
            time.sleep(3600)
        return self.engine.render(items, on_step)


def test_poison_job_fails_after_its_attempts_and_the_queue_moves_on(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(max_retries=2)
    producer = Producer(settings)
    poison = producer.enqueue(small(prompt="POISON pill"))
    after = [producer.enqueue(small(prompt=f"fine {i}")) for i in range(3)]
    engine = FaultyEngine(tiny_engine)
    run_worker(settings, engine=engine, burst=True)
    view = producer.status(poison.id)
    assert view.status is Status.FAILED and view.attempts == 3
    assert view.error == "RuntimeError: this prompt breaks the model every time"
    assert all(producer.status(job.id).status is Status.FINISHED for job in after)


def test_hung_render_is_stopped_at_the_job_timeout(
    make_settings: Callable[..., Settings], tiny_engine: DiffusersEngine
) -> None:
    settings = make_settings(max_retries=0, job_timeout_base_s=2, job_timeout_per_step_s=0.01)
    producer = Producer(settings)
    hung = producer.enqueue(small(prompt="HANG forever"))
    after = Producer(settings.model_copy(update={"job_timeout_base_s": 120})).enqueue(small())
    started = time.monotonic()
    run_worker(settings, engine=FaultyEngine(tiny_engine), burst=True)
    assert time.monotonic() - started < 60
    view = producer.status(hung.id)
    assert view.status is Status.FAILED
    assert "JobTimeoutException" in (view.error or "") and "3 seconds" in (view.error or "")
    assert producer.status(after.id).status is Status.FINISHED


class OomPipe:
    """The real pipeline, raising CUDA's OutOfMemoryError above a batch size, like a small GPU."""

    def __init__(self, pipe: Any, max_batch: int) -> None:
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "max_batch", max_batch)
        object.__setattr__(self, "batches", [])

    def __call__(self, **kwargs: Any) -> Any:
        self.batches.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.pipe, name, value)


def test_out_of_memory_retries_with_smaller_batches_and_keeps_the_pixels(
    make_settings: Callable[..., Settings], tiny_model_dir: Path
) -> None:
    settings = make_settings()
    engine = DiffusersEngine.load(settings)
    reference = [np.asarray(engine.render([RenderItem(small(num_images=4), i)])[0]) for i in range(4)]
    engine.pipe = OomPipe(engine.pipe, max_batch=1)
    producer = Producer(settings)
    job = producer.enqueue(small(num_images=4))
    run_worker(settings, engine=engine, burst=True)
    view = producer.status(job.id)
    assert view.status is Status.FINISHED and len(view.images) == 4
    assert engine.pipe.batches == [4, 2, 1, 1, 2, 1, 1]
    from PIL import Image

    for image, want in zip(view.images, reference, strict=True):
        got = np.asarray(Image.open(Path(image.url.removeprefix("file://"))).convert("RGB"))
        assert np.array_equal(got, want)


def test_out_of_memory_on_one_image_fails_clearly_and_the_worker_carries_on(
    make_settings: Callable[..., Settings], tiny_model_dir: Path
) -> None:
    settings = make_settings(max_retries=0)
    engine = DiffusersEngine.load(settings)
    pipe = OomPipe(engine.pipe, max_batch=1)
    engine.pipe = pipe
    producer = Producer(settings)
    object.__setattr__(pipe, "max_batch", 0)
    too_big = producer.enqueue(small(width=128, height=128))
    run_worker(settings, engine=engine, burst=True)
    view = producer.status(too_big.id)
    assert view.status is Status.FAILED
    assert view.error == "out of GPU memory rendering 1 image(s) of 128x128"
    object.__setattr__(pipe, "max_batch", 1)
    fine = producer.enqueue(small())
    run_worker(settings, engine=engine, burst=True)
    assert producer.status(fine.id).status is Status.FINISHED


def test_fp16_overflow_is_decoded_again_in_fp32_and_reported(
    make_settings: Callable[..., Settings], tiny_model_dir: Path
) -> None:
    """A real fp16 overflow: a VAE weight fp16 can hold but whose products it can't."""
    settings = make_settings(dtype="float16")
    engine = DiffusersEngine.load(settings)
    with torch.no_grad():
        engine.pipe.vae.post_quant_conv.weight.mul_(3e4)
    producer = Producer(settings)
    job = producer.enqueue(small())
    run_worker(settings, engine=engine, burst=True)
    view = producer.status(job.id)
    assert view.status is Status.FINISHED
    assert view.warnings == ["image 0 overflowed in fp16; decoded again with an fp32 VAE"]
    assert engine.pipe.vae.dtype == torch.float16  # back to fp16 for the next job
