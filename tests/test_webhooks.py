"""Webhooks, received by a real local HTTP server that checks the signature like a customer would."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rq import Queue
from rq.serializers import JSONSerializer

from sdqueue.api import create_app
from sdqueue.config import Settings
from sdqueue.jobs import RENDER_FUNC, GenerationRequest, Status, WebhookDelivery, parse_request
from sdqueue.producer import Producer
from sdqueue.webhooks import SIGNATURE_HEADER, deliver, sign
from sdqueue.worker import run_worker

SECRET = "whsec-test"
REQUEST: dict[str, Any] = {"prompt": "a lamp", "steps": 2, "width": 64, "height": 64, "seed": 3}


def _request() -> GenerationRequest:
    return parse_request(REQUEST)


@dataclass
class Receiver:
    """An HTTP server that answers each POST with the next scripted code (then 200)."""

    codes: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    def verified_bodies(self) -> list[dict[str, Any]]:
        """Each received body, after checking its signature as a receiver must."""
        bodies = []
        for headers, raw in self.received:
            expected = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(expected, headers[SIGNATURE_HEADER])
            bodies.append(json.loads(raw))
        return bodies


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((dict(self.headers.items()), raw))
            code = state.codes.pop(0) if state.codes else 200
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", state.url + "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(webhook_secret=SECRET, webhook_backoff_s=0.01, webhook_max_attempts=3)


def wait_for_webhook(producer: Producer, job_id: str, attempts: int) -> WebhookDelivery:
    """The job's delivery record once it is delivered or has used ATTEMPTS tries (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        webhook = producer.status(job_id).webhook
        assert webhook is not None
        if webhook.delivered or webhook.attempts >= attempts or time.monotonic() > deadline:
            return webhook
        time.sleep(0.05)


def test_a_finished_job_posts_its_signed_status_and_retries_until_accepted(
    settings: Settings, receiver: Receiver, tiny_engine: Any
) -> None:
    receiver.codes = [500]  # the first try fails; the retry is accepted
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/jobs", json={**REQUEST, "webhook_url": receiver.url}).json()["id"]
    run_worker(settings, engine=tiny_engine, burst=True)
    producer = Producer(settings)
    webhook = wait_for_webhook(producer, job_id, attempts=3)
    assert webhook.delivered and webhook.attempts == 2 and webhook.last_status_code == 200
    assert webhook.error is None
    first, second = receiver.verified_bodies()
    assert first == second  # the same bytes each try, so receivers can deduplicate
    assert first["id"] == job_id and first["status"] == "finished" and len(first["images"]) == 1
    headers = receiver.received[0][0]
    assert headers["Content-Type"] == "application/json" and headers["X-Sdqueue-Job-Id"] == job_id


def test_a_failed_job_posts_its_error(settings: Settings, receiver: Receiver, tiny_engine: Any) -> None:
    # A request past the bounds can't come through the API; it can be written straight into Redis.
    queue = Queue(settings.queue, connection=Producer(settings).redis, serializer=JSONSerializer)
    queue.enqueue(
        RENDER_FUNC, args=({**REQUEST, "steps": 500},), job_id="bad", meta={"webhook": {"url": receiver.url}}
    )
    run_worker(settings, engine=tiny_engine, burst=True)
    webhook = wait_for_webhook(Producer(settings), "bad", attempts=3)
    assert webhook.delivered and webhook.attempts == 1
    [body] = receiver.verified_bodies()
    assert body["status"] == "failed" and body["error"] == "steps must be between 1 and 150, got 500"


def test_gives_up_after_max_attempts_with_backoff(settings: Settings, receiver: Receiver) -> None:
    receiver.codes = [503, 503, 503]
    job_id = Producer(settings).enqueue(_request(), webhook_url=receiver.url).id
    sleeps: list[float] = []
    state = deliver(settings, job_id, sleep=sleeps.append)
    assert sleeps == [0.01, 0.02]  # doubling between the 3 tries
    webhook = Producer(settings).status(job_id).webhook
    assert webhook is not None and webhook.model_dump() == state
    assert (webhook.attempts, webhook.last_status_code, webhook.delivered) == (3, 503, False)
    assert webhook.error == "HTTP 503" and len(receiver.received) == 3


def test_redirects_are_not_followed(settings: Settings, receiver: Receiver) -> None:
    receiver.codes = [307, 307, 307]
    job_id = Producer(settings).enqueue(_request(), webhook_url=receiver.url).id
    state = deliver(settings, job_id, sleep=lambda _: None)
    assert (state["last_status_code"], state["delivered"]) == (307, False)
    assert len(receiver.received) == 3  # never the redirect target


def test_an_unreachable_receiver_is_recorded(settings: Settings) -> None:
    job_id = Producer(settings).enqueue(_request(), webhook_url="http://127.0.0.1:1/hook").id
    state = deliver(settings, job_id, sleep=lambda _: None)
    assert state["attempts"] == 3 and state["last_status_code"] is None and not state["delivered"]
    assert state["error"].startswith("cannot reach the receiver")


def test_a_worker_without_the_secret_sends_nothing(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    settings = make_settings()
    job_id = Producer(settings).enqueue(_request(), webhook_url=receiver.url).id
    state = deliver(settings, job_id)
    assert state["error"] == "not sent: SDQ_WEBHOOK_SECRET is not set on the worker"
    assert receiver.received == [] and Producer(settings).status(job_id).status is Status.QUEUED


def test_a_tampered_url_in_redis_is_refused(settings: Settings, receiver: Receiver) -> None:
    producer = Producer(settings)
    job = producer.fetch_job(producer.enqueue(_request(), webhook_url=receiver.url).id)
    job.meta["webhook"] = {"url": "file:///etc/passwd"}
    job.save_meta()
    state = deliver(settings, job.id)
    assert "webhook_url must be an http:// or https:// URL" in state["error"] and receiver.received == []


def test_signature_is_hex_hmac_sha256() -> None:
    assert sign(b"{}", "key") == hmac.new(b"key", b"{}", hashlib.sha256).hexdigest()
