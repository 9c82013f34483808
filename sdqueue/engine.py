"""The warm diffusers pipeline: loaded once per worker, then asked to render batches.

The engine is batch-shaped: it renders a list of (request, image index) items in one pipeline
call, one ``torch.Generator`` per image seeded ``seed + index``, so a batch reproduces single
runs pixel for pixel and a seed means the same picture every time on the same machine.
Items in one call must agree on everything that shapes the computation (``batch_key``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .config import Settings
from .errors import OutOfMemory, RenderError
from .jobs import GenerationRequest, Scheduler

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, total steps)."""


@dataclass(frozen=True)
class RenderItem:
    """One image to render: image ``index`` of ``request``, with seed ``request.seed + index``."""

    request: GenerationRequest
    index: int

    @property
    def seed(self) -> int:
        return self.request.image_seeds()[self.index]


def batch_key(request: GenerationRequest) -> tuple[object, ...]:
    """Requests with equal keys can share one pipeline call."""
    return (request.width, request.height, request.steps, request.scheduler, request.guidance_scale)


def batch_request(items: Sequence[RenderItem]) -> GenerationRequest:
    """The request that shapes a render call of ITEMS; ValueError unless they share a batch_key."""
    first = items[0].request
    if any(batch_key(item.request) != batch_key(first) for item in items):
        raise ValueError("items in one render call must share size, steps, scheduler and guidance")
    return first


class Engine(Protocol):
    """What the worker needs from a renderer (tests and benchmarks pass stand-ins)."""

    model_id: str
    model_revision: str | None

    def render(self, items: Sequence[RenderItem], on_step: StepCallback | None = None) -> list[Image]: ...

    def prompt_warnings(self, request: GenerationRequest) -> list[str]: ...


def resolve_device_and_dtype(settings: Settings) -> tuple[str, str]:
    """('cuda' | 'cpu', 'float16' | 'float32') from the settings' auto choices."""
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RenderError("SDQ_DEVICE=cuda but no CUDA device is available")
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, dtype


def _make_scheduler(name: Scheduler, config: Any) -> Any:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name is Scheduler.DPMPP_2M:
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name is Scheduler.DPMPP_2M_KARRAS:
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", use_karras_sigmas=True
        )
    if name is Scheduler.EULER:
        return EulerDiscreteScheduler.from_config(config)
    if name is Scheduler.EULER_A:
        return EulerAncestralDiscreteScheduler.from_config(config)
    return DDIMScheduler.from_config(config)


class DiffusersEngine:
    """A StableDiffusionPipeline kept warm on one device."""

    def __init__(self, pipe: Any, *, model_id: str, model_revision: str | None, device: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.model_revision = model_revision
        self.device = device
        base = pipe.scheduler.config
        # Schedulers are cheap and stateful: one per name, swapped in per call (one call at a time).
        self._schedulers = {name: _make_scheduler(name, base) for name in Scheduler}
        self.max_tokens: int = pipe.tokenizer.model_max_length

    @classmethod
    def load(cls, settings: Settings, model: str | None = None) -> DiffusersEngine:
        """Load the pipeline once, straight into the target dtype and device, and warm it up."""
        import torch
        from diffusers import StableDiffusionPipeline

        model_id = model or settings.model
        device, dtype_name = resolve_device_and_dtype(settings)
        dtype = getattr(torch, dtype_name)
        local = Path(model_id).is_dir()
        revision = None if local else settings.model_revision
        started = time.perf_counter()
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "safety_checker": None,
            "requires_safety_checker": False,
        }
        if not local:
            kwargs["revision"] = revision
            if dtype_name == "float16":
                kwargs["variant"] = "fp16"  # half the download, same weights
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model_id, **kwargs)
        except (OSError, ValueError) as exc:  # missing directory, bad repo id, Hub unreachable
            raise RenderError(f"cannot load model {model_id!r}: {exc}") from exc
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if settings.attention == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        engine = cls(pipe, model_id=model_id, model_revision=revision, device=device)
        loaded = time.perf_counter()
        engine.warm_up()
        logger.info(
            "model %s loaded on %s (%s) in %.2f s, warmed up in %.2f s",
            model_id,
            device,
            dtype_name,
            loaded - started,
            time.perf_counter() - loaded,
        )
        return engine

    def warm_up(self) -> None:
        """One render before the first job, so it doesn't pay for lazy initialisation.

        On CUDA at the default 512x512: a 64x64 warm-up left the first real job +0.5 s slower on
        an H200 (cuDNN algorithm choice and allocator growth are per shape; docs/benchmarks.md).
        On CPU at 64x64, where one 512x512 step takes seconds."""
        size = 512 if self.device == "cuda" else 64
        request = GenerationRequest(prompt="warm-up", steps=2, width=size, height=size, seed=0)
        self.render([RenderItem(request, 0)])

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        """Warnings to record on the job, e.g. a prompt the text encoder will truncate."""
        warnings = []
        for field in ("prompt", "negative_prompt"):
            text = getattr(request, field)
            if not text:
                continue
            count = len(self.pipe.tokenizer(text, truncation=False)["input_ids"])
            if count > self.max_tokens:
                warnings.append(
                    f"{field} is {count} tokens; the text encoder reads the first {self.max_tokens}, "
                    "the rest was ignored"
                )
        return warnings

    def render(self, items: Sequence[RenderItem], on_step: StepCallback | None = None) -> list[Image]:
        """Render ITEMS in one pipeline call; returns one PIL image per item, in order."""
        import torch
        from PIL import Image as PILImage

        if not items:
            return []
        first = batch_request(items)
        self.pipe.scheduler = self._schedulers[first.scheduler]
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, first.steps)
            return kwargs

        try:
            with torch.inference_mode():
                latents = self.pipe(
                    prompt=[item.request.prompt for item in items],
                    negative_prompt=[item.request.negative_prompt or "" for item in items],
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance_scale,
                    width=first.width,
                    height=first.height,
                    generator=generators,
                    output_type="latent",
                    callback_on_step_end=step_end,
                ).images
                pixels, warnings = self._decode_checked(latents)
        except torch.cuda.OutOfMemoryError as exc:  # the class exists on CPU builds too
            del exc
            self._free_memory()
            raise OutOfMemory(
                f"out of GPU memory rendering {len(items)} image(s) of {first.width}x{first.height}"
            ) from None
        images = []
        for image, image_warnings in zip(pixels, warnings, strict=True):
            picture = PILImage.fromarray((image * 255).round().astype("uint8"))
            picture.info["warnings"] = image_warnings  # read by the runner into the job's warnings
            images.append(picture)
        return images

    def _decode(self, latents: Any) -> Any:
        """Latents to float pixels in [0, 1], shape (batch, height, width, 3), as diffusers does."""
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np")

    def _decode_checked(self, latents: Any) -> tuple[Any, list[list[str]]]:
        """Decode, and never hand back NaN or all-black images silently.

        fp16 VAEs can overflow on some latents: NaN or black pictures. Those images are decoded
        again with the VAE in fp32; what is still broken is an error, what is still black is
        reported on the job."""
        import numpy as np
        import torch

        pixels = self._decode(latents)
        warnings: list[list[str]] = [[] for _ in range(len(pixels))]
        bad = [i for i, image in enumerate(pixels) if not np.isfinite(image).all() or image.max() <= 0]
        if bad and self.pipe.vae.dtype != torch.float32:
            original = self.pipe.vae.dtype
            self.pipe.vae.to(torch.float32)
            try:
                redone = self._decode(latents[bad].float())
            finally:
                self.pipe.vae.to(original)
            for i, image in zip(bad, redone, strict=True):
                pixels[i] = image
                warnings[i].append(f"image {i} overflowed in fp16; decoded again with an fp32 VAE")
        for i, image in enumerate(pixels):
            if not np.isfinite(image).all():
                raise RenderError("the model produced NaN pixels; nothing was stored")
            if image.max() <= 0:
                warnings[i].append(f"image {i} is entirely black")
        return pixels, warnings

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
