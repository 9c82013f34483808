"""The warm engine on the tiny random-weight pipeline, through the production loader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdqueue.config import Settings
from sdqueue.engine import DiffusersEngine, RenderItem, resolve_device_and_dtype
from sdqueue.errors import RenderError
from sdqueue.jobs import GenerationRequest, Scheduler
from sdqueue.tinymodel import is_tiny_model


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image)


def assert_same_picture(got: Any, want: Any) -> None:
    """Equal up to float rounding: batched matmuls sum in another order on CPU, which can move a
    handful of pixels by one 8-bit level. Different seeds differ almost everywhere."""
    diff = np.abs(pixels(got).astype(int) - pixels(want).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())


def req(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"prompt": "a red fox", "steps": 3, "width": 64, "height": 64, "seed": 42}
    return GenerationRequest(**(base | kw))


def test_tiny_model_builds_and_loads_offline(tmp_path: Path) -> None:
    """Build and load in a child process that has no network access to the Hub at all."""
    code = (
        "import sys; from pathlib import Path\n"
        "from sdqueue.tinymodel import save_tiny_model\n"
        "from sdqueue.engine import DiffusersEngine\n"
        "from sdqueue.config import Settings\n"
        "d = save_tiny_model(Path(sys.argv[1]))\n"
        "e = DiffusersEngine.load(Settings(model=str(d), device='cpu'))\n"
        "print(type(e.pipe).__name__, type(e.pipe.unet).__name__, e.max_tokens)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["StableDiffusionPipeline", "UNet2DConditionModel", "77"]
    assert is_tiny_model(tmp_path / "m")
    weights = sorted(p.name for p in (tmp_path / "m").rglob("*.safetensors"))
    assert weights == [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
    ]


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_engine: DiffusersEngine) -> None:
    first = tiny_engine.render([RenderItem(req(), 0)])[0]
    again = tiny_engine.render([RenderItem(req(), 0)])[0]
    other = tiny_engine.render([RenderItem(req(seed=43), 0)])[0]
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_a_batch_reproduces_single_runs(tiny_engine: DiffusersEngine) -> None:
    request = req(num_images=2, negative_prompt="blurry")
    other = req(prompt="a blue whale", seed=7)
    batch = tiny_engine.render([RenderItem(request, 0), RenderItem(request, 1), RenderItem(other, 0)])
    singles = [
        tiny_engine.render([RenderItem(request, 0)])[0],
        tiny_engine.render([RenderItem(request, 1)])[0],
        tiny_engine.render([RenderItem(other, 0)])[0],
    ]
    for got, want in zip(batch, singles, strict=True):
        assert_same_picture(got, want)
    # image 1 uses seed + 1: it is the same picture as image 0 of a request seeded 43
    seeded_43 = tiny_engine.render([RenderItem(req(seed=43, negative_prompt="blurry"), 0)])[0]
    assert np.array_equal(pixels(singles[1]), pixels(seeded_43))
    assert (pixels(batch[0]) != pixels(batch[1])).mean() > 0.5


def test_incompatible_items_cannot_share_a_call(tiny_engine: DiffusersEngine) -> None:
    with pytest.raises(ValueError, match="must share"):
        tiny_engine.render([RenderItem(req(), 0), RenderItem(req(steps=4), 0)])


@pytest.mark.parametrize("scheduler", list(Scheduler))
def test_every_scheduler_renders_and_reports_progress(
    tiny_engine: DiffusersEngine, scheduler: Scheduler
) -> None:
    steps: list[tuple[int, int]] = []
    image = tiny_engine.render(
        [RenderItem(req(scheduler=scheduler, width=72, height=96), 0)],
        on_step=lambda s, t: steps.append((s, t)),
    )[0]
    assert image.size == (72, 96)
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_long_prompt_is_truncated_with_a_warning(tiny_engine: DiffusersEngine) -> None:
    assert tiny_engine.prompt_warnings(req(prompt="short")) == []
    warnings = tiny_engine.prompt_warnings(req(prompt="word " * 100))
    assert len(warnings) == 1 and "prompt is" in warnings[0] and "first 77" in warnings[0]
    assert tiny_engine.render([RenderItem(req(prompt="word " * 100), 0)])[0].size == (64, 64)


def test_nan_output_is_an_error_not_an_image(tiny_model_dir: Path) -> None:
    import torch

    engine = DiffusersEngine.load(Settings(model=str(tiny_model_dir), device="cpu"))
    with torch.no_grad():
        for parameter in engine.pipe.vae.decoder.conv_out.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(RenderError, match="NaN"):
        engine.render([RenderItem(req(), 0)])


def test_device_and_dtype_resolution() -> None:
    assert resolve_device_and_dtype(Settings(device="cpu")) == ("cpu", "float32")
    assert resolve_device_and_dtype(Settings(device="cpu", dtype="float16")) == ("cpu", "float16")
    import torch

    if not torch.cuda.is_available():
        assert resolve_device_and_dtype(Settings()) == ("cpu", "float32")
        with pytest.raises(RenderError, match="no CUDA device"):
            resolve_device_and_dtype(Settings(device="cuda"))


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="cannot load model"):
        DiffusersEngine.load(Settings(model=str(tmp_path / "absent-model"), device="cpu"))
