"""The request contract: every bound, on both sides, with a message naming field and value."""

from __future__ import annotations

import pytest

from sdqueue.errors import InvalidRequest
from sdqueue.jobs import (
    SEED_MAX,
    GenerationRequest,
    Scheduler,
    Status,
    check_job_id,
    image_key,
    parse_request,
    status_from_rq,
)

VALID_EDGES = [
    ("prompt", "x"),
    ("prompt", "é" * 2000),
    ("prompt", "一只猫 🐱"),
    ("negative_prompt", ""),
    ("negative_prompt", "n" * 2000),
    ("steps", 1),
    ("steps", 150),
    ("guidance_scale", 0),
    ("guidance_scale", 30.0),
    ("width", 64),
    ("width", 1024),
    ("height", 64),
    ("height", 1024),
    ("seed", 0),
    ("seed", SEED_MAX),
    ("num_images", 1),
    ("num_images", 8),
    ("scheduler", "euler_a"),
]


@pytest.mark.parametrize(("field", "value"), VALID_EDGES)
def test_values_at_the_bounds_are_accepted(field: str, value: object) -> None:
    data = {"prompt": "a cat", field: value}
    assert getattr(parse_request(data), field) == value


INVALID = [
    ({"steps": 0}, "steps", "steps must be between 1 and 150, got 0"),
    ({"steps": 151}, "steps", "steps must be between 1 and 150, got 151"),
    ({"steps": "20"}, "steps", "steps must be an integer, got '20'"),
    ({"steps": 2.5}, "steps", "steps must be an integer, got 2.5"),
    ({"steps": True}, "steps", "steps must be an integer, got True"),
    ({"guidance_scale": -0.5}, "guidance_scale", "guidance_scale must be between 0 and 30, got -0.5"),
    ({"guidance_scale": 30.5}, "guidance_scale", "guidance_scale must be between 0 and 30, got 30.5"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "guidance_scale must be a finite number, got nan"),
    ({"width": 56}, "width", "width must be between 64 and 1024, got 56"),
    ({"width": 1032}, "width", "width must be between 64 and 1024, got 1032"),
    ({"width": 500}, "width", "width must be a multiple of 8 between 64 and 1024, got 500"),
    ({"height": 2048}, "height", "height must be between 64 and 1024, got 2048"),
    ({"seed": -1}, "seed", "seed must be between 0 and 4294967295, got -1"),
    ({"seed": 2**32}, "seed", "seed must be between 0 and 4294967295, got 4294967296"),
    ({"num_images": 0}, "num_images", "num_images must be between 1 and 8, got 0"),
    ({"num_images": 9}, "num_images", "num_images must be between 1 and 8, got 9"),
    (
        {"scheduler": "plms"},
        "scheduler",
        "scheduler must be one of dpmpp_2m, dpmpp_2m_karras, euler, euler_a, ddim, got 'plms'",
    ),
    ({"prompt": ""}, "prompt", "prompt must be 1 to 2000 characters, got 0"),
    ({"prompt": "   "}, "prompt", "prompt must not be blank"),
    ({"prompt": "p" * 2001}, "prompt", "prompt must be 1 to 2000 characters, got 2001"),
    (
        {"negative_prompt": "n" * 2001},
        "negative_prompt",
        "negative_prompt must be 0 to 2000 characters, got 2001",
    ),
    ({"prompt": 5}, "prompt", "prompt must be a string, got 5"),
    ({"stepz": 5}, "stepz", "unknown field 'stepz'"),
]


@pytest.mark.parametrize(("update", "field", "message"), INVALID)
def test_bad_values_name_the_field_and_the_value(update: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "a cat", **update})
    assert caught.value.field == field
    assert str(caught.value) == message


def test_missing_prompt_and_non_object_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="prompt is required"):
        parse_request({"steps": 3})
    with pytest.raises(InvalidRequest, match="request must be a JSON object, got"):
        parse_request(["a cat"])


def test_defaults_and_seed_recording() -> None:
    request = parse_request({"prompt": "a cat"})
    assert (request.steps, request.guidance_scale, request.width, request.height) == (25, 7.5, 512, 512)
    assert request.num_images == 1 and request.scheduler is Scheduler.DPMPP_2M and request.seed is None
    seeded = request.with_seed()
    assert seeded.seed is not None and 0 <= seeded.seed <= SEED_MAX
    assert seeded.with_seed() is seeded  # a given seed is kept


def test_image_seeds_are_consecutive_and_wrap() -> None:
    request = GenerationRequest(prompt="a", seed=SEED_MAX - 1, num_images=3)
    assert request.image_seeds() == [SEED_MAX - 1, SEED_MAX, 0]


def test_timeout_grows_with_the_work() -> None:
    small = GenerationRequest(prompt="a", steps=10, width=256, height=256)
    large = GenerationRequest(prompt="a", steps=50, width=1024, height=1024, num_images=4)
    assert small.timeout_s(60, 1.0) == 60 + 3  # 10 steps x 1/4 of 512x512, rounded up
    assert large.timeout_s(60, 1.0) == 60 + 50 * 4 * 4


def test_job_ids_and_keys() -> None:
    assert check_job_id("my-job_01") == "my-job_01"
    for bad in ["", "a/b", "../x", "a b", "x" * 129]:
        with pytest.raises(InvalidRequest, match="job_id must be"):
            check_job_id(bad)
    assert image_key("renders/", "abc", 2) == "renders/abc/2.png"
    assert image_key("", "abc", 0) == "abc/0.png"


def test_rq_statuses_map_to_ours() -> None:
    from rq.job import JobStatus

    assert status_from_rq(JobStatus.FINISHED) is Status.FINISHED
    assert status_from_rq("scheduled") is Status.QUEUED
    assert status_from_rq(JobStatus.STOPPED) is Status.FAILED
    assert Status.CANCELED.is_terminal() and not Status.STARTED.is_terminal()
