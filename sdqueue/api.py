"""The HTTP API: what the CLI does, over HTTP, for applications and for people with a browser.

    POST   /jobs                     a request (+ optional webhook_url) -> 202 {id, status, status_url}
    POST   /jobs/batch               a list of them, validated all-or-nothing -> 202 [ids]
    GET    /jobs/{id}                the JSON of `sdq status --json`; a live page for browsers
    GET    /jobs/{id}/images/{index} 307 to a freshly presigned URL (S3), or the PNG (local storage)
    DELETE /jobs/{id}                cancel a queued job -> its status JSON; 409 once it started
    GET    /healthz                  Redis and storage reachable, live workers (never needs auth)
    GET    /metrics                  Prometheus text for the whole cluster (see metrics.py)

Errors: sdqueue's error tree is translated here, in one handler, to ``{"detail": "message"}``
with the error's ``http_status``. An invalid request is a 422 in FastAPI's own shape, naming the
field: ``{"detail": [{"loc": ["body", "steps"], "msg": "steps must be between 1 and 150, got 0",
"type": "invalid_request"}]}``; in a batch the loc holds the item's index (``["body", 2, "steps"]``).
Bodies are validated by ``jobs.parse_request``, not by FastAPI, so the messages are the CLI's.

Auth (auth.py): with SDQ_API_TOKEN set, every route but /healthz needs the bearer token.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from . import __version__, rqhash
from .auth import protect
from .config import Settings
from .errors import InvalidRequest, JobConflict, SdqError
from .idempotency import IdempotencyStore
from .jobs import WEBHOOK_URL_MAX_CHARS, GenerationRequest, JobView, Status, check_webhook_url, parse_request
from .metrics import QueueCollector, live_workers
from .page import job_page, prefers_html
from .producer import Producer, connect_async, found, needs_last_failure, redis_errors, status_key, view_of
from .storage import open_store

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_BATCH = 100


class JobCreated(BaseModel):
    id: str
    status: Status
    status_url: str


class Health(BaseModel):
    status: str
    redis: str
    storage: str
    workers: int | None


def parse_submission(data: object, webhooks_enabled: bool) -> tuple[GenerationRequest, str | None]:
    """A POST /jobs body: the request's fields, plus an optional webhook_url that belongs to the job."""
    url = None
    if isinstance(data, dict) and "webhook_url" in data:
        data = dict(data)  # the caller's copy still feeds the Idempotency-Key fingerprint
        url = data.pop("webhook_url")
    request = parse_request(data)
    if url is not None and not webhooks_enabled:
        raise InvalidRequest("webhook_url", "webhook_url needs SDQ_WEBHOOK_SECRET set on the server")
    return request, check_webhook_url(url) if url is not None else None


def parse_batch(data: object, webhooks_enabled: bool) -> list[tuple[GenerationRequest, str | None]]:
    """A POST /jobs/batch body: every item valid, or an error naming the first bad one."""
    if not isinstance(data, list) or not 1 <= len(data) <= MAX_BATCH:
        got = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
        raise InvalidRequest(
            "request", f"a batch must be a JSON array of 1 to {MAX_BATCH} requests, got {got}"
        )
    items = []
    for index, item in enumerate(data):
        try:
            items.append(parse_submission(item, webhooks_enabled))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{index}.{exc.field}", f"item {index}: {exc}") from None
    return items


async def json_body(request: Request) -> Any:
    """The body as JSON, read here rather than by FastAPI so parse_request words the errors."""
    too_big = HTTPException(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("request", f"the body must be JSON ({exc})") from None


def _error_location(field: str) -> list[str | int]:
    if field == "Idempotency-Key":
        return ["header", field]
    return [
        "body",
        *(int(part) if part.isdigit() else part for part in field.split(".") if part != "request"),
    ]


async def _sdq_error(request: Request, exc: Exception) -> Response:
    """The one place sdqueue's errors become HTTP answers."""
    if not isinstance(exc, SdqError):
        raise exc
    if isinstance(exc, InvalidRequest):
        detail = [{"loc": _error_location(exc.field), "msg": str(exc), "type": "invalid_request"}]
        return JSONResponse({"detail": detail}, status_code=exc.http_status)
    if exc.http_status >= 500:
        logger.error("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)


def _schemas() -> dict[str, Any]:
    """OpenAPI components for the POST bodies (docs only: parse_request does the validating)."""
    submission = GenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = submission.pop("$defs", {})
    submission["title"] = "JobSubmission"
    submission["properties"]["webhook_url"] = {
        "anyOf": [{"type": "string", "format": "uri", "maxLength": WEBHOOK_URL_MAX_CHARS}, {"type": "null"}],
        "default": None,
        "description": "http(s) URL the job's status is POSTed to, signed, when it ends.",
    }
    return {**components, "JobSubmission": submission}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_SUBMISSION = {"$ref": "#/components/schemas/JobSubmission"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "SDQ_API_TOKEN is set and the request lacks it"},
    404: {"description": "No such job (or it expired)"},
    409: {"description": "The job is not in a state that allows this, or an Idempotency-Key clash"},
    503: {"description": "Redis or storage unreachable"},
}
IdempotencyKey = Annotated[
    str | None, Header(description="Retries with the same key and body get the same job(s) back, for 24 h.")
]
JsonBody = Annotated[Any, Depends(json_body)]


def create_app(settings: Settings) -> FastAPI:
    """The API for SETTINGS' queue and storage."""
    producer = Producer(settings)
    store = open_store(settings)
    idempotency = IdempotencyStore(producer.redis, settings.queue)
    collector = QueueCollector(producer)
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    webhooks_enabled = bool(settings.webhook_secret and settings.webhook_secret.get_secret_value())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.status_redis = connect_async(settings)  # bound to this event loop, so made in it
        yield
        await app.state.status_redis.aclose()

    app = FastAPI(
        lifespan=lifespan,
        title="sdqueue",
        version=__version__,
        description="Queue-driven Stable Diffusion.",
        docs_url=None,  # served below, so that ?access_token= opens it too
        redoc_url=None,
    )
    app.add_exception_handler(SdqError, _sdq_error)
    protect(app, token)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = default_openapi()  # FastAPI caches it; adding the components again is harmless
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(_schemas())
        if token:  # the Authorize button on /docs
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        query = f"?{request.url.query}" if request.url.query else ""  # carries an access_token on
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}{query}", title="sdqueue API")

    def once(
        key: str | None, scope: str, body: object, create: Callable[[], list[str]]
    ) -> tuple[list[str], bool]:
        if key is None:
            return create(), False
        with redis_errors(settings):
            return idempotency.run(key, scope, body, create)

    def created_headers(url: str | None, replayed: bool) -> dict[str, str]:
        headers = {"Location": url} if url else {}
        return headers | ({"Idempotent-Replayed": "true"} if replayed else {})

    @app.post(
        "/jobs",
        status_code=202,
        response_model=JobCreated,
        openapi_extra=_body(_SUBMISSION),
        responses=_ERRORS,
    )
    def create_job(request: Request, body: JsonBody, idempotency_key: IdempotencyKey = None) -> Response:
        """Queue one request; its webhook_url, if any, gets the job's status when it ends."""
        submission, webhook_url = parse_submission(body, webhooks_enabled)
        views: list[JobView] = []

        def create() -> list[str]:
            views.append(producer.enqueue(submission, webhook_url=webhook_url))
            return [views[0].id]

        ids, replayed = once(idempotency_key, "POST /jobs", body, create)
        view = views[0] if views else producer.status(ids[0])
        url = str(request.url_for("get_job", job_id=view.id))
        created = JobCreated(id=view.id, status=view.status, status_url=url)
        return JSONResponse(created.model_dump(mode="json"), 202, headers=created_headers(url, replayed))

    @app.post(
        "/jobs/batch",
        status_code=202,
        response_model=list[str],
        openapi_extra=_body({"type": "array", "items": _SUBMISSION, "minItems": 1, "maxItems": MAX_BATCH}),
        responses=_ERRORS,
    )
    def create_jobs(body: JsonBody, idempotency_key: IdempotencyKey = None) -> Response:
        """Queue many requests in one round trip, all or none; returns their ids in order."""
        items = parse_batch(body, webhooks_enabled)

        def create() -> list[str]:
            return producer.enqueue_many([request for request, _ in items], [url for _, url in items])

        ids, replayed = once(idempotency_key, "POST /jobs/batch", body, create)
        return JSONResponse(ids, 202, headers=created_headers(None, replayed))

    async def status(job_id: str) -> JobView:
        """producer.status on the event loop: the most frequent request of all (clients poll it) is
        one HMGET with no thread hop. A failure its meta doesn't explain takes the sync path."""
        key = status_key(job_id)
        with redis_errors(settings):
            values = await app.state.status_redis.hmget(key, rqhash.RECORD_FIELDS)
        record = found(job_id, values)
        if needs_last_failure(record):
            return await run_in_threadpool(producer.status, job_id)
        return view_of(record)

    @app.get(
        "/jobs/{job_id}",
        name="get_job",
        response_model=JobView,
        responses={
            200: {"content": {"text/html": {}}, "description": "JSON, or a page for browsers"},
            **_ERRORS,
        },
    )
    async def get_job(job_id: str, request: Request) -> Response:
        """The job's status, progress, images and timings; a page that follows it with Accept: text/html."""
        view = await status(job_id)
        if prefers_html(request.headers.get("accept", "")):
            page, headers = job_page(view.id)
            return HTMLResponse(page, headers=headers)
        return Response(
            view.model_dump_json(), media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    @app.get(
        "/jobs/{job_id}/images/{index}",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}},
            307: {"description": "To a presigned URL"},
            **_ERRORS,
        },
    )
    def get_image(job_id: str, index: Annotated[int, Path(ge=0)]) -> Response:
        """A finished job's image: a redirect to a fresh presigned URL, or the PNG from local storage."""
        view = producer.status(job_id)
        if view.status is not Status.FINISHED:
            raise JobConflict(f"job {job_id!r} is {view.status.value}; only finished jobs have images")
        image = next((image for image in view.images if image.index == index), None)
        if image is None:
            raise HTTPException(404, f"job {job_id!r} has no image {index}")
        url = store.url(image.key)
        if url.startswith(("https://", "http://")):
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
        if not store.exists(image.key):
            raise HTTPException(404, f"image {index} of job {job_id!r} is no longer in storage")
        return Response(
            store.get(image.key), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    @app.delete("/jobs/{job_id}", response_model=JobView, responses=_ERRORS)
    def cancel_job(job_id: str) -> Response:
        """Cancel a queued job: it will never be rendered. 409 once a worker has started it."""
        view = producer.cancel(job_id)
        return Response(view.model_dump_json(), media_type="application/json")

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    def healthz() -> JSONResponse:
        """Redis and storage reachable (200, else 503), and how many workers are alive."""
        health = Health(status="ok", redis="ok", storage="ok", workers=None)
        try:
            producer.redis.ping()
            health.workers = live_workers(producer.redis, producer.queue)
        except redis.RedisError as exc:
            logger.warning("healthz: Redis unreachable: %s", exc)
            health.redis = "unreachable"
        try:
            store.check()
        except SdqError as exc:
            logger.warning("healthz: storage unreachable: %s", exc)
            health.storage = "unreachable"
        ok = health.redis == health.storage == "ok"
        health.status = "ok" if ok else "unavailable"
        return JSONResponse(health.model_dump(), status_code=200 if ok else 503)

    @app.get(
        "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {}}}}
    )
    def metrics() -> Response:
        """Prometheus text: queue depth, jobs by status, live workers, stage-time histograms."""
        return Response(generate_latest(collector), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return app


def serve_app() -> FastAPI:
    """The app `sdq api` serves, from the environment's settings, in each uvicorn worker process."""
    from .config import load_settings

    app = create_app(load_settings())
    # What exists now (imports, the app) lives as long as the process. Frozen, it is out of the
    # collector's sight: full collections stop walking ~60k objects, which was the status read's
    # p99 (63 -> 28 ms, docs/benchmarks.md section 6).
    gc.collect()
    gc.freeze()
    return app
