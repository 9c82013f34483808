"""PNG encoding with the image's full recipe inside, readable by existing tools.

Two text chunks: ``parameters`` in the AUTOMATIC1111 format (what most Stable Diffusion tools
read) and ``sdqueue``, JSON of the request, the image's own seed, and the model.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

from .jobs import GenerationRequest

if TYPE_CHECKING:
    from PIL.Image import Image

PNG_CONTENT_TYPE = "image/png"
PNG_COMPRESS_LEVEL = 1
"""zlib level 1: ~40 % less CPU than the default 6 on photo-like images for ~13 % more bytes."""


def a1111_parameters(request: GenerationRequest, seed: int, model: str) -> str:
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(
        f"Steps: {request.steps}, Sampler: {request.scheduler.label}, CFG scale: {request.guidance_scale:g}, "
        f"Seed: {seed}, Size: {request.width}x{request.height}, Model: {model}"
    )
    return "\n".join(lines)


def recipe(
    request: GenerationRequest, index: int, seed: int, model: str, revision: str | None
) -> dict[str, Any]:
    return {
        "request": request.model_dump(mode="json"),
        "index": index,
        "seed": seed,
        "model": model,
        "model_revision": revision,
    }


def encode_png(
    image: Image, request: GenerationRequest, index: int, seed: int, model: str, revision: str | None
) -> bytes:
    """The image as PNG bytes with its recipe in text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("parameters", a1111_parameters(request, seed, model))
    info.add_itxt("sdqueue", json.dumps(recipe(request, index, seed, model, revision), ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def read_recipe(png: bytes) -> dict[str, str]:
    """The text chunks of a PNG (``parameters`` and ``sdqueue``)."""
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(png)) as image:
        return {key: str(value) for key, value in image.text.items()}  # type: ignore[attr-defined]
