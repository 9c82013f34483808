"""A GPU stand-in engine: renders by sleeping, so the CPU is free while "the GPU" works.

NOT a model. It implements sdqueue's Engine protocol with a GIL-free ``time.sleep`` per render
call, the way a real GPU worker's CPU sits idle while CUDA kernels run, and returns noise
images of the requested size so PNG encoding, upload and status writes downstream cost what
they cost for real pictures (noise is the worst case for PNG size, ~790 KB at 512x512).
On a 2-core CPU machine this is the only honest way to ask "how much does the system around
the model cost a GPU worker?": the tiny CPU model competes with that system for the same cores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sdqueue.engine import RenderItem, StepCallback, batch_request
from sdqueue.jobs import GenerationRequest

if TYPE_CHECKING:
    from PIL.Image import Image

STANDIN_MODEL_ID = "gpu-standin (sleep, not a model)"
POOL = 4
"""Distinct noise images per size, picked by seed; made once so rendering costs no CPU."""


class StandinEngine:
    """Engine protocol; ``render`` sleeps RENDER_S for one image plus EXTRA_IMAGE_S per further image
    in the same call (default: no batching gain, EXTRA_IMAGE_S = RENDER_S)."""

    model_id = STANDIN_MODEL_ID
    model_revision: str | None = None

    def __init__(self, render_s: float = 0.3, extra_image_s: float | None = None) -> None:
        if render_s < 0:
            raise ValueError(f"render_s must be >= 0, got {render_s}")
        self.render_s = render_s
        self.extra_image_s = render_s if extra_image_s is None else extra_image_s
        self._pool: dict[tuple[int, int], list[Image]] = {}
        self.calls = 0

    def _images(self, width: int, height: int) -> list[Image]:
        if (width, height) not in self._pool:
            import numpy as np
            from PIL import Image as PILImage

            rng = np.random.default_rng(width * 10_000 + height)
            self._pool[(width, height)] = [
                PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                for _ in range(POOL)
            ]
        return self._pool[(width, height)]

    def render(self, items: Sequence[RenderItem], on_step: StepCallback | None = None) -> list[Image]:
        if not items:
            return []
        first = batch_request(items)
        self.calls += 1
        pool = self._images(first.width, first.height)
        total_s = self.render_s + self.extra_image_s * (len(items) - 1)
        # One sleep per step, so progress callbacks fire as often as with a real pipeline.
        step_s = total_s / first.steps
        for step in range(1, first.steps + 1):
            time.sleep(step_s)
            if on_step is not None:
                on_step(step, first.steps)
        return [pool[item.seed % POOL] for item in items]

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        return []
