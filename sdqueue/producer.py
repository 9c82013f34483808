"""The producer side: put requests on the queue, read their status, cancel them.

Used by the CLI and the HTTP API. Imports no torch: enqueueing is a Redis round trip.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from . import rqhash
from .config import Settings
from .errors import InvalidRequest, JobConflict, JobNotFound, ServiceUnavailable
from .jobs import (
    RENDER_FUNC,
    GenerationRequest,
    ImageRef,
    JobView,
    Progress,
    Status,
    Timings,
    WebhookDelivery,
    check_job_id,
    check_webhook_url,
    status_from_rq,
)

POLL_INTERVAL_S = 0.2


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _client_options(socket_timeout_s: float | None) -> dict[str, Any]:
    """How every sdqueue Redis client connects, sync or async."""
    return {
        "socket_connect_timeout": 5,
        "socket_timeout": socket_timeout_s,
        "health_check_interval": 30,
        "retry_on_timeout": True,
    }


def connect(settings: Settings, *, socket_timeout_s: float | None = 10.0) -> redis.Redis:
    """A Redis client for SDQ_REDIS_URL (rediss:// means TLS). Connects lazily."""
    return redis.Redis.from_url(settings.redis_url, **_client_options(socket_timeout_s))


ASYNC_MAX_CONNECTIONS = 64
"""Redis connections one API process may open for status reads. Reads beyond that wait for a free
one (up to 5 s, then a 503), so a flood of polling clients can't use up Redis's maxclients."""


def connect_async(settings: Settings, max_connections: int = ASYNC_MAX_CONNECTIONS) -> redis.asyncio.Redis:
    """connect()'s asyncio twin, for the API's status reads; use it from the event loop it serves."""
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=max_connections, timeout=5, **_client_options(10.0)
    )
    return redis.asyncio.Redis.from_pool(pool)


@contextmanager
def redis_errors(settings: Settings) -> Iterator[None]:
    """Turn a Redis outage into ServiceUnavailable naming the (redacted) URL."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {redact(settings.redis_url)}: {exc}") from None


class Producer:
    """Enqueue requests and read jobs back, on one Redis connection."""

    def __init__(self, settings: Settings, connection: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = connection if connection is not None else connect(settings)
        self.queue = Queue(settings.queue, connection=self.redis, serializer=JSONSerializer)

    def _shared_options(self) -> dict[str, Any]:
        """The rq options every job gets, whatever its request."""
        s = self.settings
        return {
            "result_ttl": s.result_ttl_s,
            "failure_ttl": s.failure_ttl_s,
            "retry": Retry(max=s.max_retries, interval=s.retry_interval_s) if s.max_retries else None,
        }

    def _new_job(
        self, request: GenerationRequest, job_id: str | None, webhook_url: str | None
    ) -> rqhash.NewJob:
        """REQUEST (with its seed chosen) as the job that will carry it."""
        s = self.settings
        request = request.with_seed()
        meta: dict[str, Any] = {"progress": {"step": 0, "total_steps": request.steps}}
        if webhook_url is not None:
            meta["webhook"] = {"url": check_webhook_url(webhook_url)}
        return rqhash.NewJob(
            id=check_job_id(job_id) if job_id is not None else uuid.uuid4().hex,
            args=(request.model_dump(mode="json"),),
            timeout=request.timeout_s(s.job_timeout_base_s, s.job_timeout_per_step_s),
            description=request.prompt[:80],
            meta=meta,
        )

    def enqueue(
        self, request: GenerationRequest, job_id: str | None = None, webhook_url: str | None = None
    ) -> JobView:
        """Queue one request; a caller-chosen id that already exists is refused, never overwritten.
        With WEBHOOK_URL, the worker POSTs the job's status there when it ends."""
        new = self._new_job(request, job_id, webhook_url)
        with redis_errors(self.settings):
            try:
                job = self.queue.enqueue(
                    RENDER_FUNC,
                    args=new.args,
                    job_id=new.id,
                    unique=True,
                    job_timeout=new.timeout,
                    description=new.description,
                    meta=new.meta,
                    **self._shared_options(),
                )
            except DuplicateJobError:
                raise JobConflict(f"job id {new.id!r} already exists") from None
        return view_of(rqhash.JobRecord.of(job))

    def enqueue_many(
        self, requests: Sequence[GenerationRequest], webhook_urls: Sequence[str | None] | None = None
    ) -> list[str]:
        """Queue many requests in one MULTI/EXEC round trip (no worker sees half a batch); returns
        their ids in order. WEBHOOK_URLS, when given, holds one URL (or None) per request."""
        urls = list(webhook_urls) if webhook_urls is not None else [None] * len(requests)
        if len(urls) != len(requests):
            raise ValueError(f"{len(urls)} webhook URLs for {len(requests)} requests")
        jobs = [self._new_job(request, None, url) for request, url in zip(requests, urls, strict=True)]
        with redis_errors(self.settings), self.redis.pipeline() as pipe:
            rqhash.write_jobs(pipe, self.queue, RENDER_FUNC, jobs, **self._shared_options())
            pipe.execute()
        return [job.id for job in jobs]

    def fetch_job(self, job_id: str) -> Job:
        if not _looks_like_id(job_id):
            raise JobNotFound(job_id)
        with redis_errors(self.settings):
            try:
                return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
            except NoSuchJobError:
                raise JobNotFound(job_id) from None

    def record(self, job_id: str) -> rqhash.JobRecord:
        """What a status read needs of the job, in one HMGET; JobNotFound for unknown or expired ids."""
        key = status_key(job_id)
        with redis_errors(self.settings):
            values = self.redis.hmget(key, rqhash.RECORD_FIELDS)
        return found(job_id, values)

    def status(self, job_id: str) -> JobView:
        """The job as readers see it; JobNotFound for unknown or expired ids."""
        record = self.record(job_id)
        if not needs_last_failure(record):
            return view_of(record)
        job = self.fetch_job(job_id)
        with redis_errors(self.settings):
            return view_of(record, _last_line_of_failure(job))

    def cancel(self, job_id: str) -> JobView:
        """Cancel a queued job so it is never rendered; JobConflict once a worker has it."""
        job = self.fetch_job(job_id)
        with redis_errors(self.settings):
            status = job.get_status()
            if status in ("queued", "scheduled", "deferred"):
                # LREM decides the race with a worker: whoever removes the id from the list owns it.
                removed = self.redis.lrem(self.queue.key, 1, job.id) if status == "queued" else 1
                if removed:
                    job.cancel()
                    return self.status(job_id)
                status = job.get_status()
            raise JobConflict(
                f"job {job_id!r} is {status_from_rq(status).value}; only queued jobs can be canceled"
            )

    def wait(
        self,
        job_id: str,
        on_update: Callable[[JobView], None] | None = None,
        timeout_s: float | None = None,
    ) -> JobView:
        """Poll until the job ends (or TIMEOUT_S passes); ON_UPDATE sees every poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            view = self.status(job_id)
            if on_update is not None:
                on_update(view)
            if view.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
                return view
            time.sleep(POLL_INTERVAL_S)


def status_key(job_id: str) -> str:
    """The hash a status read HMGETs (rqhash.RECORD_FIELDS); JobNotFound for ids no job can have."""
    if not _looks_like_id(job_id):
        raise JobNotFound(job_id)
    return Job.key_for(job_id)


def found(job_id: str, values: Sequence[bytes | str | None]) -> rqhash.JobRecord:
    """The record in VALUES, read from status_key(JOB_ID); JobNotFound when the hash isn't there."""
    record = rqhash.read_record(job_id, values)
    if record is None:
        raise JobNotFound(job_id)
    return record


def needs_last_failure(record: rqhash.JobRecord) -> bool:
    """Whether the job failed without saying why in its meta (a crash, a timeout, a poison job):
    then the reason is the last line of rq's own record of the failure, a second read."""
    return status_from_rq(record.status) is Status.FAILED and not record.meta.get("error")


def view_of(record: rqhash.JobRecord, last_failure: str | None = None) -> JobView:
    """The job as readers see it; LAST_FAILURE explains a failure its meta doesn't."""
    meta = record.meta
    status = status_from_rq(record.status)
    request = record.args[0] if record.args and isinstance(record.args[0], dict) else {}
    error = meta.get("error") or last_failure
    return JobView(
        id=record.id,
        status=status,
        progress=Progress(**meta.get("progress", {})),
        request=request,
        images=[ImageRef(**image) for image in meta.get("images", [])] if status is Status.FINISHED else [],
        error=error if status is Status.FAILED else None,
        warnings=list(meta.get("warnings", [])),
        attempts=int(meta.get("attempts", 0)),
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.ended_at if status.is_terminal() else None,
        timings=Timings(**meta.get("timings", {})),
        webhook=WebhookDelivery(**meta["webhook"]) if meta.get("webhook") else None,
    )


def parse_request_or_raise(data: object, where: str = "") -> GenerationRequest:
    """parse_request with WHERE ("line 3: ") in front of the message."""
    from .jobs import parse_request

    try:
        return parse_request(data)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.field, f"{where}{exc}") from None


def _looks_like_id(job_id: str) -> bool:
    try:
        check_job_id(job_id)
    except InvalidRequest:
        return False
    return True


def _last_line_of_failure(job: Job) -> str | None:
    result = job.latest_result()
    text = (result.exc_string or "").strip() if result is not None else ""
    return text.splitlines()[-1] if text else None
