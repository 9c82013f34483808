"""Webhooks: when a job with a ``webhook_url`` ends (finished or failed), POST its status there.

The body is the job's status JSON, as ``GET /jobs/{id}`` returns it. The header
``X-Sdqueue-Signature`` holds the hex HMAC-SHA256 of those raw bytes under SDQ_WEBHOOK_SECRET, so
a receiver can check that the body came from sdqueue unchanged::

    expected = hmac.new(secret, raw_body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, request.headers["X-Sdqueue-Signature"])

Delivery runs on a few daemon threads, never on the worker's main thread: a slow or dead receiver
must not hold up the GPU. A non-2xx answer, a timeout or a connection error is retried with
exponential backoff (SDQ_WEBHOOK_BACKOFF_S, doubling) up to SDQ_WEBHOOK_MAX_ATTEMPTS tries; the
same bytes are sent each time, so receivers can deduplicate on the job id. Redirects are not
followed. After every try the job records ``webhook.attempts``, ``last_status_code``,
``delivered`` and ``error``. Deliveries still pending when the worker process exits are lost;
the job shows how far they got.

Standard library only: a worker needs no HTTP client package.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from rq.job import Job

from . import __version__
from .config import Settings
from .errors import InvalidRequest, JobNotFound
from .jobs import check_webhook_url
from .producer import Producer

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sdqueue-Signature"
BACKOFF_CAP_S = 300.0
DELIVERY_THREADS = 4
BACKLOG_MAX = 10_000
"""Deliveries waiting for a thread; past this (receivers down for long) new ones are dropped."""


def sign(body: bytes, secret: str) -> str:
    """Hex HMAC-SHA256 of BODY under SECRET: the X-Sdqueue-Signature value."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer like any other non-2xx: urllib would turn the POST into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int | None, str | None]:
    """One POST: (HTTP status or None if there was no answer, error or None when it was 2xx)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout_s) as response:
            return int(response.status), None
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return None, f"cannot reach the receiver: {exc.reason}"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return None, f"cannot reach the receiver: {exc.__class__.__name__}: {exc}"


def deliver(settings: Settings, job_id: str, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Deliver one job's webhook now, with retries; returns what was recorded on the job."""
    producer = Producer(settings)
    try:
        job = producer.fetch_job(job_id)
        state: dict[str, Any] = dict(job.meta.get("webhook") or {})
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        try:
            url = check_webhook_url(state.get("url"))  # read back from Redis: a trust boundary
        except InvalidRequest as exc:
            state["error"] = str(exc)
            return _record(producer, job, state)
        if not secret:
            state["error"] = "not sent: SDQ_WEBHOOK_SECRET is not set on the worker"
            return _record(producer, job, state)
        body = producer.status(job_id).model_dump_json().encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"sdqueue/{__version__}",
            "X-Sdqueue-Job-Id": job_id,
            SIGNATURE_HEADER: sign(body, secret),
        }
        for attempt in range(1, settings.webhook_max_attempts + 1):
            code, error = post(url, body, headers, settings.webhook_timeout_s)
            state.update(attempts=attempt, last_status_code=code, delivered=error is None, error=error)
            _record(producer, job, state)
            if error is None:
                return state
            if attempt < settings.webhook_max_attempts:
                sleep(min(settings.webhook_backoff_s * 2 ** (attempt - 1), BACKOFF_CAP_S))
        logger.warning("webhook for job %s gave up after %d tries: %s", job_id, attempt, error)
        return state
    finally:
        producer.redis.close()


def _record(producer: Producer, job: Job, state: dict[str, Any]) -> dict[str, Any]:
    # save_meta on an expired job would leave a stray hash without a TTL behind.
    if producer.redis.exists(job.key):
        job.meta["webhook"] = state
        job.save_meta()
    return state


_backlog: queue.Queue[tuple[Settings, str]] = queue.Queue(maxsize=BACKLOG_MAX)
_threads: list[threading.Thread] = []
_threads_lock = threading.Lock()


def deliver_later(settings: Settings, job: Job) -> bool:
    """Hand the job's webhook to the delivery threads; False when it has none or it was dropped."""
    if not job.meta.get("webhook"):
        return False
    with _threads_lock:
        while len(_threads) < DELIVERY_THREADS:
            thread = threading.Thread(target=_drain, name=f"sdq-webhook-{len(_threads)}", daemon=True)
            thread.start()
            _threads.append(thread)
    try:
        _backlog.put_nowait((settings, job.id))
    except queue.Full:
        logger.error("webhook backlog is full (%d): dropping job %s's webhook", BACKLOG_MAX, job.id)
        return False
    return True


def _drain() -> None:
    while True:
        settings, job_id = _backlog.get()
        try:
            deliver(settings, job_id)
        except JobNotFound:
            logger.warning("webhook for job %s not sent: the job expired first", job_id)
        except Exception:  # a thread that dies would silently stop all deliveries
            logger.exception("webhook for job %s failed", job_id)
        finally:
            _backlog.task_done()
