"""One job's trip through the warm worker: validate, render, encode, store, report.

The JobRunner knows nothing of rq's loop; the worker hands it a job and a way to ask whether it
must stop. The job becomes ``finished`` (in rq, after ``run`` returns) only once every PNG is
stored, so a reader never sees a finished job whose images are missing.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from rq.job import Job

from .config import Settings
from .engine import Engine, RenderItem
from .errors import InvalidRequest, OutOfMemory, Preempted
from .images import PNG_CONTENT_TYPE, encode_png
from .jobs import GenerationRequest, image_key, parse_request
from .stage import Deferred
from .storage import Store

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

AbortCheck = Callable[[int, int, float], bool]
"""(steps done, total steps, seconds rendering so far) -> must the render stop now?"""


@dataclass(frozen=True)
class Prepared:
    """A validated job, ready to render: its request and when it started and was enqueued."""

    request: GenerationRequest
    started: float
    enqueued: float


class JobRunner:
    """Renders one job with the warm engine, stores its PNGs, and writes progress and results."""

    def __init__(self, settings: Settings, engine: Engine, store: Store) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.should_abort: AbortCheck = lambda step, total, elapsed: False
        self.defer = settings.pipeline
        """Return the encode-and-store work as a Deferred for the worker's stage, not run it."""

    def run(self, job: Job) -> dict[str, Any] | Deferred:
        prepared = self.prepare(job)
        items = [RenderItem(prepared.request, index) for index in range(prepared.request.num_images)]
        images = self.render(items, self.on_step(job))
        rendered_at = time.time()
        if self.defer:
            return Deferred(lambda: self.finish(job, prepared, images, rendered_at))
        return self.finish(job, prepared, images, rendered_at)

    def prepare(self, job: Job) -> Prepared:
        """Validate the job's request (Redis is a trust boundary too) and mark the attempt."""
        meta = job.meta
        meta["attempts"] = int(meta.get("attempts", 0)) + 1
        meta.pop("error", None)
        started = time.time()
        enqueued = job.enqueued_at.timestamp() if job.enqueued_at else started
        if len(job.args) != 1 or job.kwargs:
            raise InvalidRequest("request", "a render job takes exactly one request object")
        request = parse_request(job.args[0])
        meta["warnings"] = self.engine.prompt_warnings(request)
        meta["progress"] = {"step": 0, "total_steps": request.steps}
        job.save_meta()
        return Prepared(request, started, enqueued)

    def finish(
        self, job: Job, prepared: Prepared, images: Sequence[Image], rendered_at: float | None = None
    ) -> dict[str, Any]:
        """Encode and store the job's PNGs, then write the results into its meta."""
        request, meta = prepared.request, job.meta
        items = [RenderItem(request, index) for index in range(request.num_images)]
        rendered = rendered_at or time.time()
        for image in images:
            meta["warnings"].extend(image.info.get("warnings", []))

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
            self.store.put(key, png, PNG_CONTENT_TYPE)  # the same key on a re-render: idempotent
            refs.append({"index": item.index, "key": key, "url": self.store.url(key), "seed": item.seed})
        uploaded = time.time()

        meta["images"] = refs
        meta["progress"] = {"step": request.steps, "total_steps": request.steps}
        meta["timings"] = {
            "queue_wait_s": round(max(0.0, prepared.started - prepared.enqueued), 4),
            "render_s": round(rendered - prepared.started, 4),
            "encode_s": round(encoded - rendered, 4),
            "upload_s": round(uploaded - encoded, 4),
        }
        job.save_meta()
        return {"images": refs}

    def render(self, items: Sequence[RenderItem], on_step: Callable[[int, int], None]) -> list[Image]:
        """Render ITEMS; out of GPU memory, halve the batch and try again down to one image."""
        try:
            return self.engine.render(items, on_step)
        except OutOfMemory:
            gc.collect()
            if len(items) == 1:
                raise
            half = len(items) // 2
            logger.warning(
                "out of GPU memory for %d images; retrying as %d + %d", len(items), half, len(items) - half
            )
            return self.render(items[:half], on_step) + self.render(items[half:], on_step)

    def on_step(self, job: Job) -> Callable[[int, int], None]:
        """Progress writer for JOB's render, which also stops it when the worker must shut down."""
        render_started = time.monotonic()
        interval = self.settings.progress_interval_s
        last = [0.0]

        def on_step(step: int, total: int) -> None:
            if self.should_abort(step, total, time.monotonic() - render_started):
                raise Preempted(f"worker shutting down at step {step}/{total}; job requeued")
            now = time.monotonic()
            if step < total and now - last[0] < interval:
                return
            last[0] = now
            job.meta["progress"] = {"step": step, "total_steps": total}
            try:
                job.save_meta()
            except redis.RedisError as exc:  # progress is best effort; the render goes on
                logger.warning("could not write progress of job %s: %s", job.id, exc)

        return on_step
