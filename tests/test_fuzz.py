"""Hypothesis throws arbitrary requests at every boundary: the validator, the CLI and the HTTP
API. Whatever comes in, the answer is a clean accept or a clean refusal naming a field, never a
traceback or a 5xx, and nothing is enqueued for an invalid request."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdqueue.config import Settings
from sdqueue.errors import InvalidRequest
from sdqueue.jobs import GenerationRequest, parse_request
from sdqueue.producer import Producer

FIELDS = [
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "seed",
    "num_images",
    "scheduler",
]
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["dpmpp_2m", "euler_a", "DDIM", ""]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
plausible = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(min_size=0, max_size=40), st.just("x" * 2001), anything),
        "negative_prompt": st.one_of(st.text(max_size=20), anything),
        "steps": st.one_of(st.integers(-5, 160), anything),
        "guidance_scale": st.one_of(st.floats(-1, 31), anything),
        "width": st.one_of(st.integers(0, 1100), anything),
        "height": st.one_of(st.integers(0, 1100), anything),
        "seed": st.one_of(st.integers(-1, 2**32), anything),
        "num_images": st.one_of(st.integers(-1, 10), anything),
        "scheduler": st.one_of(st.sampled_from(["dpmpp_2m", "euler", "nope"]), anything),
        "extra_field": anything,
    },
)
bodies = st.one_of(plausible, anything)
CASES = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@CASES
@given(bodies)
def test_validator_accepts_or_names_a_field(data: Any) -> None:
    try:
        request = parse_request(data)
    except InvalidRequest as exc:
        assert exc.field and str(exc)
        assert exc.field == "request" or exc.field.split(".")[0] in [*FIELDS, "extra_field"]
        return
    assert isinstance(request, GenerationRequest)
    assert 1 <= request.steps <= 150 and request.width % 8 == 0 and 64 <= request.height <= 1024
    assert parse_request(request.model_dump(mode="json")) == request  # what the worker will read back


@pytest.fixture
def producer(make_settings: Callable[..., Settings]) -> Producer:
    return Producer(make_settings())


cli_args = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "--steps",
                "--guidance",
                "--width",
                "--height",
                "--seed",
                "--num-images",
                "--scheduler",
                "--negative-prompt",
                "--job-id",
                "--json",
            ]
        ),
        st.text(min_size=0, max_size=12).filter(lambda s: not s.startswith("--file")),
        st.integers(-10, 2000).map(str),
    ),
    max_size=6,
)


@CASES
@given(cli_args)
def test_cli_enqueue_never_tracebacks(
    producer: Producer, make_settings: Callable[..., Settings], args: list[str]
) -> None:
    from conftest import settings_env
    from typer.testing import CliRunner

    from sdqueue.cli import app

    producer.redis.flushdb()
    env = {k: v for k, v in settings_env(make_settings()).items() if k.startswith("SDQ_")}
    result = CliRunner().invoke(app, ["enqueue", "fuzz", *args], env=env)
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        assert producer.queue.count == 0
    else:
        assert producer.queue.count == 1


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from sdqueue.api import create_app

    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as test_client:
        yield test_client


@CASES
@given(bodies)
def test_http_submit_never_5xx(client: Any, producer: Producer, data: Any) -> None:
    producer.redis.flushdb()
    response = client.post("/jobs", content=json.dumps(data, allow_nan=True))
    assert response.status_code in (202, 422), response.text
    if response.status_code == 422:
        assert response.json()["detail"][0]["msg"]
        assert producer.queue.count == 0
    else:
        assert producer.queue.count == 1
