"""The pipelined worker's background stage: PNG encoding, upload and the final status write of
job k run on this thread while the main thread renders job k+1.

On a GPU the main thread mostly waits for the device; encoding a 512x512 PNG (~40 ms of CPU) and
uploading it would otherwise leave the GPU idle between jobs. The stage is bounded (one job
waiting, one in progress): when storage is slow the render loop blocks instead of piling up
rendered images in memory. A job handed to the stage is still ``started`` in Redis, with its
lease renewed by the stage, and becomes ``finished`` only after its objects are stored.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Deferred:
    """What a pipelined job's execution returns instead of its result: the rest of its work.

    ``finish`` encodes and stores the job's PNGs (and settles any batch followers) and returns the
    job's result; ``leases`` are the (job, execution) pairs whose leases the stage keeps alive
    meanwhile, besides the job's own."""

    finish: Callable[[], Any]
    leases: Sequence[tuple[Any, Any]] = field(default_factory=list)


class Stage:
    """One background thread with a queue of one: submit() blocks while both are busy."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="sdq-stage", daemon=True)
        self._thread.start()

    def submit(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def busy(self) -> bool:
        return self._tasks.unfinished_tasks > 0

    def drain(self) -> None:
        """Wait until every submitted task has run."""
        self._tasks.join()

    def close(self) -> None:
        self.drain()
        self._tasks.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                task()
            except Exception:  # a task settles its own job; this only keeps the thread alive
                logger.exception("pipelined stage task failed")
            finally:
                self._tasks.task_done()
