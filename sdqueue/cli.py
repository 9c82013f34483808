"""`sdq`: enqueue, watch, fetch and cancel jobs; run a worker; run the whole thing as a demo.

Errors become exit codes here and nowhere else: 0 success, 2 invalid input (the message names
the field), 1 anything else, always one line and no traceback. `enqueue` and `status` import
no torch so they start fast; heavy modules are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from .config import Settings, load_settings
from .errors import InvalidRequest, SdqError
from .jobs import GenerationRequest, JobView, Status

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Queue-driven Stable Diffusion.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _settings() -> Settings:
    return load_settings()


def _producer() -> Any:
    from .producer import Producer

    return Producer(_settings())


def _fail(exc: SdqError) -> NoReturn:
    err.print(f"error: {exc}", markup=False)
    raise typer.Exit(exc.exit_code)


def _request_from_options(prompt: str, options: dict[str, Any]) -> GenerationRequest:
    from .jobs import parse_request

    data = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
    return parse_request(data)


def _read_jsonl(path: Path) -> list[GenerationRequest]:
    """Every line validated before anything is enqueued; errors name the line number."""
    from .producer import parse_request_or_raise

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest("file", f"cannot read {path}: {exc.strerror}") from None
    requests = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest("file", f"line {number}: not valid JSON ({exc.msg})") from None
        requests.append(parse_request_or_raise(data, where=f"line {number}: "))
    if not requests:
        raise InvalidRequest("file", f"{path} holds no requests")
    return requests


def _print_view(view: JobView, as_json: bool) -> None:
    if as_json:
        out.print(view.model_dump_json(), markup=False)
        return
    out.print(
        f"{view.id}  {view.status.value}  step {view.progress.step}/{view.progress.total_steps}", markup=False
    )
    if view.error:
        out.print(f"error: {view.error}", markup=False)
    for warning in view.warnings:
        out.print(f"warning: {warning}", markup=False)
    for image in view.images:
        out.print(f"image {image.index} (seed {image.seed}): {image.url}", markup=False)


def _wait_with_progress(producer: Any, job_id: str) -> JobView:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("queued", total=None)

        def update(view: JobView) -> None:
            total = view.progress.total_steps or None
            bar.update(task, description=view.status.value, completed=view.progress.step, total=total)

        return producer.wait(job_id, on_update=update)  # type: ignore[no-any-return]


@app.command()
def enqueue(
    prompt: str | None = typer.Argument(None, help="What to draw (omit with --file)."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", help="What to avoid."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps, 1-150 (default 25)."),
    guidance: float | None = typer.Option(None, "--guidance", help="Guidance scale, 0-30 (default 7.5)."),
    width: int | None = typer.Option(None, "--width", help="Multiple of 8, 64-1024 (default 512)."),
    height: int | None = typer.Option(None, "--height", help="Multiple of 8, 64-1024 (default 512)."),
    seed: int | None = typer.Option(None, "--seed", help="0 to 2^32-1; random (and recorded) if omitted."),
    num_images: int | None = typer.Option(None, "--num-images", help="Images per job, 1-8 (default 1)."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="dpmpp_2m (default), dpmpp_2m_karras, euler, euler_a, ddim."
    ),
    job_id: str | None = typer.Option(None, "--job-id", help="Your own id: letters, digits, - and _."),
    file: Path | None = typer.Option(None, "--file", help="JSON Lines, one request per line."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until the job ends."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Put a request on the queue and print its job id."""
    try:
        if file is not None:
            if prompt is not None or job_id is not None or wait:
                raise InvalidRequest(
                    "file", "--file takes its requests from the file alone (no PROMPT, --job-id or --wait)"
                )
            requests = _read_jsonl(file)
            ids = _producer().enqueue_many(requests)
            out.print(json.dumps(ids) if as_json else "\n".join(ids), markup=False)
            return
        if prompt is None:
            raise InvalidRequest("prompt", "prompt is required (or use --file)")
        options = {
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance_scale": guidance,
            "width": width,
            "height": height,
            "seed": seed,
            "num_images": num_images,
            "scheduler": scheduler,
        }
        request = _request_from_options(prompt, options)
        producer = _producer()
        view = producer.enqueue(request, job_id=job_id)
        if not wait:
            out.print(view.model_dump_json() if as_json else view.id, markup=False)
            return
        if not as_json:
            err.print(f"job {view.id} queued", markup=False)
        view = _wait_with_progress(producer, view.id)
        _print_view(view, as_json)
        if view.status is not Status.FINISHED:
            raise typer.Exit(1)
    except SdqError as exc:
        _fail(exc)


@app.command()
def status(
    job_id: str,
    as_json: bool = typer.Option(False, "--json", help="Print the full status as JSON."),
) -> None:
    """Show a job's status, progress, images and timings."""
    try:
        _print_view(_producer().status(job_id), as_json)
    except SdqError as exc:
        _fail(exc)


@app.command()
def fetch(
    job_id: str,
    out_dir: Path = typer.Option(Path("."), "--out", help="Directory to write the PNGs to."),
) -> None:
    """Download a finished job's PNGs."""
    from .errors import JobConflict
    from .storage import open_store

    try:
        view = _producer().status(job_id)
        if view.status is not Status.FINISHED:
            raise JobConflict(f"job {job_id!r} is {view.status.value}; only finished jobs have images")
        store = open_store(_settings())
        out_dir.mkdir(parents=True, exist_ok=True)
        for image in view.images:
            path = out_dir / f"{job_id}-{image.index}.png"
            path.write_bytes(store.get(image.key))
            out.print(str(path), markup=False)
    except SdqError as exc:
        _fail(exc)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued job; it will never be rendered."""
    try:
        view = _producer().cancel(job_id)
        out.print(f"{view.id} {view.status.value}", markup=False)
    except SdqError as exc:
        _fail(exc)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@app.command()
def worker(
    burst: bool = typer.Option(False, "--burst", help="Exit once the queue is empty."),
    model: str | None = typer.Option(None, "--model", help="Model id or directory (default SDQ_MODEL)."),
) -> None:
    """Run a warm worker: load the model once, then render jobs from the queue."""
    from .worker import run_worker

    try:
        settings = _settings()
        _configure_logging(settings.log_level)
        run_worker(settings, model=model, burst=burst)
    except SdqError as exc:
        _fail(exc)


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, max=64, help="Processes to serve from [default: SDQ_API_WORKERS]."
    ),
) -> None:
    """Serve the HTTP API (needs the `api` extra: pip install 'sdqueue[api]')."""
    try:
        import uvicorn

        from .api import serve_app
    except ImportError as exc:
        err.print(f"error: `sdq api` needs the api extra (pip install 'sdqueue[api]'): {exc}", markup=False)
        raise typer.Exit(1) from None
    try:
        settings = _settings()  # a bad setting is reported here, once, not by each worker process
        _configure_logging(settings.log_level)
        uvicorn.run(
            f"{serve_app.__module__}:{serve_app.__name__}",  # each worker process builds its app
            factory=True,
            host=host,
            port=port,
            workers=workers or settings.api_workers,
            log_level=settings.log_level.lower(),
        )
    except SdqError as exc:
        _fail(exc)


@app.command("make-tiny-model")
def make_tiny_model(directory: Path) -> None:
    """Write a tiny random-weight Stable Diffusion pipeline (offline; its images are noise)."""
    from .tinymodel import save_tiny_model

    out.print(str(save_tiny_model(directory)), markup=False)


@app.command()
def demo(
    prompt: str = typer.Argument("a lighthouse on a cliff at dawn, oil painting"),
    model: str | None = typer.Option(
        None, "--model", help="Model id or directory (default: the tiny model)."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps."),
    size: int | None = typer.Option(None, "--size", help="Width and height in pixels."),
    num_images: int = typer.Option(2, "--num-images", help="Images to render."),
) -> None:
    """Run the whole system once: embedded Redis, a worker, one job, PNGs on disk."""
    from .demo import run_demo

    try:
        paths = run_demo(
            _settings(), prompt, model=model, steps=steps, size=size, num_images=num_images, console=err
        )
    except SdqError as exc:
        _fail(exc)
    for path in paths:
        out.print(str(path), markup=False)


def main() -> None:
    """Console entry point; settings errors are reported like any other SdqError."""
    try:
        app()
    except SdqError as exc:  # raised outside a command body (rare)
        err.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)
