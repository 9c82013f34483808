"""The HTTP API against real Redis and storage: every route, its errors, auth and idempotency."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, settings_env
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from sdqueue.api import MAX_BATCH, MAX_BODY_BYTES, create_app
from sdqueue.auth import RedactAccessToken
from sdqueue.config import Settings
from sdqueue.idempotency import IdempotencyStore, fingerprint
from sdqueue.jobs import IDEMPOTENCY_KEY, GenerationRequest, Status
from sdqueue.producer import Producer
from sdqueue.worker import run_worker

TOKEN = "s3cret-token"
REQUEST: dict[str, Any] = {"prompt": "a small boat", "steps": 2, "width": 64, "height": 64, "seed": 7}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(webhook_secret="hook-secret")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def submit(client: TestClient, body: object = REQUEST, **kwargs: Any) -> httpx.Response:
    return client.post("/jobs", json=body, **kwargs)


def detail(response: httpx.Response) -> Any:
    return response.json()["detail"]


# --- POST /jobs -------------------------------------------------------------------------------


def test_submit_returns_202_with_a_status_url(client: TestClient, settings: Settings) -> None:
    response = submit(client)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and len(body["id"]) == 32
    assert body["status_url"] == f"http://testserver/jobs/{body['id']}" == response.headers["location"]
    view = Producer(settings).status(body["id"])
    assert view.request == {**view.request, **REQUEST} and view.webhook is None


@pytest.mark.parametrize(
    ("body", "loc", "msg"),
    [
        ({**REQUEST, "steps": 0}, ["body", "steps"], "steps must be between 1 and 150, got 0"),
        ({"steps": 2}, ["body", "prompt"], "prompt is required"),
        ({**REQUEST, "colour": "red"}, ["body", "colour"], "unknown field 'colour'"),
        ({**REQUEST, "scheduler": "plms"}, ["body", "scheduler"], "scheduler must be one of"),
        (["not", "an", "object"], ["body"], "request must be a JSON object"),
        (
            {**REQUEST, "webhook_url": "ftp://example.com/x"},
            ["body", "webhook_url"],
            "webhook_url must be an http:// or https:// URL",
        ),
        (
            {**REQUEST, "webhook_url": "http://h/" + "x" * 2048},
            ["body", "webhook_url"],
            "webhook_url must be at most 2048",
        ),
        ({**REQUEST, "webhook_url": 5}, ["body", "webhook_url"], "webhook_url must be a string"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(
    client: TestClient, settings: Settings, body: object, loc: list[str], msg: str
) -> None:
    response = submit(client, body)
    assert response.status_code == 422
    [error] = detail(response)
    assert error["loc"] == loc and error["type"] == "invalid_request"
    assert error["msg"].startswith(msg)
    assert Producer(settings).queue.count == 0


def test_a_body_that_is_not_json_or_too_big_is_refused(client: TestClient) -> None:
    response = client.post("/jobs", content=b"{prompt: 1}")
    assert response.status_code == 422 and detail(response)[0]["msg"].startswith("the body must be JSON")
    huge = client.post("/jobs", content=b" " * (MAX_BODY_BYTES + 1))
    assert huge.status_code == 413


def test_webhook_url_is_stored_on_the_job_not_in_the_request(client: TestClient, settings: Settings) -> None:
    response = submit(client, {**REQUEST, "webhook_url": "https://example.com/hook?x=1"})
    assert response.status_code == 202
    view = Producer(settings).status(response.json()["id"])
    assert "webhook_url" not in view.request
    assert view.webhook is not None and view.webhook.url == "https://example.com/hook?x=1"
    assert view.webhook.attempts == 0 and not view.webhook.delivered


def test_webhook_url_needs_a_webhook_secret(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as client:
        response = submit(client, {**REQUEST, "webhook_url": "https://example.com/hook"})
    assert response.status_code == 422
    assert detail(response)[0]["msg"] == "webhook_url needs SDQ_WEBHOOK_SECRET set on the server"


# --- Idempotency-Key --------------------------------------------------------------------------


def test_same_key_and_body_returns_the_same_job(client: TestClient, settings: Settings) -> None:
    first = submit(client, headers={"Idempotency-Key": "order-1"})
    reordered = dict(reversed(list(REQUEST.items())))
    again = submit(client, reordered, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    other = submit(client, headers={"Idempotency-Key": "order-2"})
    assert other.json()["id"] != first.json()["id"]
    assert Producer(settings).queue.count == 2


def test_same_key_with_another_body_is_409(client: TestClient) -> None:
    assert submit(client, headers={"Idempotency-Key": "k"}).status_code == 202
    clash = submit(client, {**REQUEST, "steps": 3}, headers={"Idempotency-Key": "k"})
    assert clash.status_code == 409
    assert detail(clash) == "Idempotency-Key 'k' was already used with a different request"
    other_route = client.post("/jobs/batch", json=[REQUEST], headers={"Idempotency-Key": "k"})
    assert other_route.status_code == 409


def test_an_invalid_body_does_not_use_up_the_key(client: TestClient) -> None:
    assert submit(client, {**REQUEST, "steps": 0}, headers={"Idempotency-Key": "k"}).status_code == 422
    assert submit(client, headers={"Idempotency-Key": "k"}).status_code == 202


def test_a_key_still_being_processed_is_409_and_a_bad_key_422(client: TestClient, settings: Settings) -> None:
    store = IdempotencyStore(Producer(settings).redis, settings.queue)
    claim = {"fingerprint": fingerprint("POST /jobs", REQUEST), "ids": None}  # as a request mid-enqueue
    store.redis.set(store._redis_key("busy"), json.dumps(claim))
    busy = submit(client, headers={"Idempotency-Key": "busy"})
    assert busy.status_code == 409 and "still being processed" in detail(busy)
    bad = submit(client, headers={"Idempotency-Key": "x" * 256})
    assert bad.status_code == 422 and detail(bad)[0]["loc"] == ["header", "Idempotency-Key"]


def test_a_failed_create_releases_the_key(settings: Settings) -> None:
    producer = Producer(settings)
    store = IdempotencyStore(producer.redis, settings.queue)

    def boom() -> list[str]:
        raise RuntimeError("enqueue failed")

    with pytest.raises(RuntimeError):
        store.run("k", "scope", {"a": 1}, boom)
    assert store.run("k", "scope", {"a": 1}, lambda: ["job-1"]) == (["job-1"], False)
    assert store.run("k", "scope", {"a": 1}, lambda: ["job-2"]) == (["job-1"], True)
    redis_key = store._redis_key("k")
    assert redis_key.startswith(IDEMPOTENCY_KEY.split("{")[0]) and 0 < producer.redis.ttl(redis_key) <= 86400


# --- POST /jobs/batch -------------------------------------------------------------------------


def test_batch_enqueues_all_in_order(client: TestClient, settings: Settings) -> None:
    hook = "https://example.com/h"
    body = [{**REQUEST, "prompt": "one"}, {**REQUEST, "prompt": "two", "webhook_url": hook}]
    response = client.post("/jobs/batch", json=body)
    assert response.status_code == 202
    ids = response.json()
    producer = Producer(settings)
    assert producer.queue.job_ids == ids
    first, second = (producer.status(job_id) for job_id in ids)
    assert (first.request["prompt"], second.request["prompt"]) == ("one", "two")
    assert first.webhook is None and second.webhook is not None and second.webhook.url == hook
    again = client.post("/jobs/batch", json=body, headers={"Idempotency-Key": "b"})
    assert client.post("/jobs/batch", json=body, headers={"Idempotency-Key": "b"}).json() == again.json()
    assert producer.queue.count == 4


@pytest.mark.parametrize(
    ("body", "loc", "msg"),
    [
        ([REQUEST, {**REQUEST, "width": 7}], ["body", 1, "width"], "item 1: width must be a multiple of 8"),
        ([REQUEST, "text"], ["body", 1], "item 1: request must be a JSON object"),
        ([], ["body"], f"a batch must be a JSON array of 1 to {MAX_BATCH} requests, got 0 items"),
        ([REQUEST] * (MAX_BATCH + 1), ["body"], f"a batch must be a JSON array of 1 to {MAX_BATCH}"),
        (REQUEST, ["body"], "a batch must be a JSON array of 1 to 100 requests, got dict"),
    ],
)
def test_batch_is_all_or_nothing(
    client: TestClient, settings: Settings, body: object, loc: list[object], msg: str
) -> None:
    response = client.post("/jobs/batch", json=body)
    assert response.status_code == 422
    [error] = detail(response)
    assert error["loc"] == loc and error["msg"].startswith(msg)
    assert Producer(settings).queue.count == 0


# --- GET /jobs/{id}, images, DELETE -----------------------------------------------------------


def test_status_is_the_cli_json_and_images_are_served(
    client: TestClient, settings: Settings, tiny_engine: Any
) -> None:
    job_id = submit(client, {**REQUEST, "num_images": 2}).json()["id"]
    queued = client.get(f"/jobs/{job_id}")
    assert queued.status_code == 200 and queued.json()["status"] == "queued"
    assert client.get(f"/jobs/{job_id}/images/0").status_code == 409  # not rendered yet
    run_worker(settings, engine=tiny_engine, burst=True)

    response = client.get(f"/jobs/{job_id}")
    assert response.headers["content-type"] == "application/json"
    assert response.text == Producer(settings).status(job_id).model_dump_json()  # `sdq status --json`
    view = response.json()
    assert view["status"] == "finished" and [image["index"] for image in view["images"]] == [0, 1]
    image = client.get(f"/jobs/{job_id}/images/1")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    stored = Path(settings.storage_url.removeprefix("file://")) / view["images"][1]["key"]
    assert image.content == stored.read_bytes() and image.content.startswith(b"\x89PNG")
    assert client.get(f"/jobs/{job_id}/images/2").status_code == 404
    assert client.get(f"/jobs/{job_id}/images/-1").status_code == 422
    stored.unlink()
    gone = client.get(f"/jobs/{job_id}/images/1")
    assert gone.status_code == 404 and "no longer in storage" in detail(gone)
    assert client.delete(f"/jobs/{job_id}").status_code == 409  # finished


def test_images_in_s3_redirect_to_a_fresh_presigned_url(s3_settings: Settings, tiny_engine: Any) -> None:
    with TestClient(create_app(s3_settings)) as client:
        job_id = submit(client).json()["id"]
        run_worker(s3_settings, engine=tiny_engine, burst=True)
        response = client.get(f"/jobs/{job_id}/images/0", follow_redirects=False)
    assert response.status_code == 307 and response.headers["cache-control"] == "no-store"
    location = response.headers["location"]
    assert location.startswith(str(s3_settings.s3_endpoint_url)) and "Signature=" in location
    png = httpx.get(location)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_unknown_jobs_are_404(client: TestClient) -> None:
    for path in ["/jobs/nope", "/jobs/nope/images/0", "/jobs/..%2F..%2Fetc"]:
        response = client.get(path)
        assert response.status_code == 404, path
    assert detail(client.get("/jobs/nope")) == "job 'nope' not found"
    assert client.delete("/jobs/nope").status_code == 404


def test_a_failure_without_a_reason_in_meta_reads_rq_s_record_of_it(
    client: TestClient, settings: Settings
) -> None:
    """A crash or a timeout leaves no error in the job's meta: the fast status read falls back to
    the last line of the failure rq recorded."""
    producer = Producer(settings)
    view = producer.enqueue(GenerationRequest(prompt="a crash", seed=1))
    job = Job.fetch(view.id, connection=producer.redis, serializer=JSONSerializer)
    Result.create_failure(
        job, ttl=60, exc_string="Traceback (most recent call last):\nJobTimeoutException: 3 s"
    )
    job.set_status(JobStatus.FAILED)
    body = client.get(f"/jobs/{view.id}").json()
    assert body["status"] == "failed" and body["error"] == "JobTimeoutException: 3 s"


def test_delete_cancels_a_queued_job_once(client: TestClient, settings: Settings, tiny_engine: Any) -> None:
    job_id = submit(client).json()["id"]
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    again = client.delete(f"/jobs/{job_id}")
    assert again.status_code == 409 and "is canceled" in detail(again)
    run_worker(settings, engine=tiny_engine, burst=True)
    assert Producer(settings).status(job_id).status is Status.CANCELED


def test_browsers_get_a_page_that_follows_the_job(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    page = client.get(f"/jobs/{job_id}", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f"<code>{job_id}</code>" in page.text and "fetch(location.href" in page.text
    csp = page.headers["content-security-policy"]
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in page.text and "unsafe-inline" not in csp
    assert client.get("/jobs/nope", headers={"Accept": "text/html"}).status_code == 404
    for accept in ["*/*", "application/json", "application/json, text/html;q=0.5", "text/html;q=x, */*"]:
        assert client.get(f"/jobs/{job_id}", headers={"Accept": accept}).json()["id"] == job_id, accept


# --- /healthz, OpenAPI, auth ------------------------------------------------------------------


def test_healthz_reports_redis_storage_and_workers(
    client: TestClient, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "redis": "ok", "storage": "ok", "workers": 0}
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    broken = make_settings(redis_url="redis://127.0.0.1:1/0", storage_url=(blocker / "store").as_uri())
    with TestClient(create_app(broken)) as down:
        response = down.get("/healthz")
        assert response.status_code == 503
        assert response.json() == {
            "status": "unavailable",
            "redis": "unreachable",
            "storage": "unreachable",
            "workers": None,
        }
        assert down.get("/jobs/x").status_code == 503  # ServiceUnavailable, through the one handler
        assert "127.0.0.1:1" in detail(down.get("/jobs/x"))


def test_openapi_shows_the_request_model_with_bounds_and_an_example(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    submission = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    steps = submission["properties"]["steps"]
    assert (steps["minimum"], steps["maximum"]) == (1, 150)
    assert submission["properties"]["width"]["multipleOf"] == 8
    assert "webhook_url" in submission["properties"] and submission["example"]["prompt"]
    assert schema["components"]["schemas"]["Scheduler"]["enum"][0] == "dpmpp_2m"
    batch = schema["paths"]["/jobs/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["items"] == body and batch["maxItems"] == MAX_BATCH
    assert client.get("/docs").status_code == 200


def test_without_a_token_the_api_is_open_and_says_so(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sdqueue.auth"):
        create_app(make_settings(api_token=""))
    assert "SDQ_API_TOKEN is not set: the API is open" in caplog.text


def test_with_a_token_every_route_but_healthz_needs_it(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sdqueue.auth"):
        app = create_app(make_settings(api_token=TOKEN))
    assert "open" not in caplog.text
    good = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        for method, path in [
            ("POST", "/jobs"),
            ("POST", "/jobs/batch"),
            ("GET", "/jobs/x"),
            ("GET", "/jobs/x/images/0"),
            ("DELETE", "/jobs/x"),
            ("GET", "/metrics"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/no-such-route"),
        ]:
            for headers in [{}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}]:
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        job_id = submit(client, headers=good).json()["id"]
        assert client.get(f"/jobs/{job_id}", headers=good).status_code == 200
        assert client.get(f"/jobs/{job_id}?access_token={TOKEN}").status_code == 200  # for browsers
        assert client.delete(f"/jobs/{job_id}?access_token={TOKEN}").status_code == 401  # GET only
        assert client.get("/metrics", headers=good).status_code == 200
        docs = client.get(f"/docs?access_token={TOKEN}")  # the page, and the schema it loads
        assert docs.status_code == 200 and f"/openapi.json?access_token={TOKEN}" in docs.text
        schema = client.get(f"/openapi.json?access_token={TOKEN}").json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_access_log_never_shows_a_token() -> None:
    args = ("127.0.0.1:5", "GET", f"/jobs/a?access_token={TOKEN}&x=1", "1.1", 200)
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None)
    assert RedactAccessToken().filter(record)
    assert TOKEN not in record.getMessage() and "access_token=***&x=1" in record.getMessage()


# --- `sdq api` as a real server, and the page in a real browser --------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def sdq_api(env: dict[str, str], log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`sdq api` in its own process, once /healthz answers; yields its URL and the process."""
    port = free_port()
    command = [sys.executable, "-m", "sdqueue", "api", "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("w") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        try:
            yield url, server
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture
def api_server(s3_settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`sdq api` in its own process with a token and S3 storage; yields its URL and log file."""
    log = tmp_path / "api.log"
    with sdq_api(settings_env(s3_settings) | {"SDQ_API_TOKEN": TOKEN}, log) as (url, _):
        yield url, log


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of PID (uvicorn's worker processes)."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            children.append(int(entry.name))
    return children


def test_sdq_api_serves_from_as_many_processes_as_sdq_api_workers(settings: Settings, tmp_path: Path) -> None:
    view = Producer(settings).enqueue(GenerationRequest(prompt="read me", seed=3))
    env = settings_env(settings) | {"SDQ_API_WORKERS": "2"}
    with sdq_api(env, tmp_path / "api.log") as (url, server):
        assert len(spawned_children(server.pid)) == 2
        for _ in range(20):  # a new connection each, so both processes answer some
            body = httpx.get(f"{url}/jobs/{view.id}").json()
            assert body["id"] == view.id and body["status"] == "queued"
        workers = spawned_children(server.pid)
    assert server.returncode == 0 and not any(Path(f"/proc/{pid}").exists() for pid in workers)


def browse(url: str, profile: Path) -> str:
    """The page's DOM after its scripts have run (virtual time: its timers fire without waiting)."""
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    result = subprocess.run(
        [CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` package (apt-get install chromium)")
def test_a_person_watches_a_job_finish_in_a_browser(
    api_server: tuple[str, Path], s3_settings: Settings, tiny_engine: Any, tmp_path: Path
) -> None:
    url, log = api_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    created = httpx.post(f"{url}/jobs", json={**REQUEST, "num_images": 2}, headers=auth)
    assert created.status_code == 202, created.text
    page = f"{created.json()['status_url']}?access_token={TOKEN}"

    queued = browse(page, tmp_path / "profile")
    assert 'data-status="queued"' in queued and "step 0 of 2" in queued and "<img" not in queued

    run_worker(s3_settings, engine=tiny_engine, burst=True)
    finished = browse(page, tmp_path / "profile")
    assert 'data-status="finished"' in finished and "a small boat" in finished
    images = re.findall(r"<img [^>]*>", finished)
    assert len(images) == 2 and all('data-state="loaded"' in image for image in images), images
    assert 'id="error" class="error" hidden' in finished

    server_log = log.read_text()
    assert TOKEN not in server_log and "access_token=***" in server_log  # redacted access log
    assert "the API is open" not in server_log
