"""The contract between producers, workers and readers: the request, the job's status, and the
names sdqueue gives things in Redis and in storage.

This module is imported by ``sdq enqueue`` and ``sdq status``: it must never import torch.
"""

from __future__ import annotations

import math
import re
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequest

# --- Names in Redis and storage, in one place ---------------------------------------------------

RENDER_FUNC = "sdqueue.worker.render"
"""The only function name an sdqueue worker runs; any other name in the queue is refused."""

HOUSEKEEPING_LOCK_KEY = "sdqueue:lock:housekeeping:{queue}"
"""Held for one housekeeping pass so only one worker at a time requeues abandoned jobs."""

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
"""Caller-chosen job ids: letters, digits, '-' and '_' (they become storage keys and URL parts)."""

METRICS_KEY = "sdqueue:metrics:{queue}"
"""Hash of job-end counters and histogram buckets, bumped by every worker (HINCRBY) and read by
every API replica's /metrics, so the numbers are the whole cluster's, not one process's."""

IDEMPOTENCY_KEY = "sdqueue:idempotency:{queue}:{key_sha256}"
"""An Idempotency-Key's request fingerprint and job ids (JSON), claimed with SET NX. The client's
key is hashed so any key the API accepts makes a short Redis key."""

IDEMPOTENCY_TTL_S = 24 * 3600
"""How long an Idempotency-Key is remembered: a retry within a day gets the same job back."""


def image_key(prefix: str, job_id: str, index: int) -> str:
    """Storage key of a job's image: PREFIX/JOB_ID/INDEX.png, INDEX from 0."""
    return f"{prefix.strip('/')}/{job_id}/{index}.png".lstrip("/")


SCALER_STARTING_KEY = "sdqueue:scaler:starting:{queue}"
"""Sorted set of drains the Modal scaler has spawned that have not yet loaded their model
(member: a token, score: spawn time), so a cold start is not counted as missing capacity twice."""


# --- The request --------------------------------------------------------------------------------

PROMPT_MAX_CHARS = 2000
STEPS_MIN, STEPS_MAX = 1, 150
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 30.0
SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 64, 1024, 8
SEED_MAX = 2**32 - 1
NUM_IMAGES_MAX = 8


class Scheduler(StrEnum):
    """The samplers a request may name; values are what callers type."""

    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    EULER = "euler"
    EULER_A = "euler_a"
    DDIM = "ddim"

    @property
    def label(self) -> str:
        """The AUTOMATIC1111 sampler name, written into the PNG's ``parameters`` chunk."""
        return _A1111_LABELS[self]


_A1111_LABELS = {
    Scheduler.DPMPP_2M: "DPM++ 2M",
    Scheduler.DPMPP_2M_KARRAS: "DPM++ 2M Karras",
    Scheduler.EULER: "Euler",
    Scheduler.EULER_A: "Euler a",
    Scheduler.DDIM: "DDIM",
}


class GenerationRequest(BaseModel):
    """One image-generation request, validated the same way at every boundary."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "example": {
                "prompt": "a lighthouse on a cliff at dawn, oil painting",
                "negative_prompt": "blurry, low quality",
                "steps": 25,
                "guidance_scale": 7.5,
                "width": 512,
                "height": 512,
                "seed": 1234,
                "num_images": 1,
                "scheduler": "dpmpp_2m",
            }
        },
    )

    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX_CHARS)
    steps: int = Field(default=25, ge=STEPS_MIN, le=STEPS_MAX)
    guidance_scale: float = Field(default=7.5, ge=GUIDANCE_MIN, le=GUIDANCE_MAX, allow_inf_nan=False)
    width: int = Field(default=512, ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_MULTIPLE)
    height: int = Field(default=512, ge=SIZE_MIN, le=SIZE_MAX, multiple_of=SIZE_MULTIPLE)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    """Seed of image 0; image i uses seed + i. Chosen and recorded at enqueue when absent."""
    num_images: int = Field(default=1, ge=1, le=NUM_IMAGES_MAX)
    scheduler: Scheduler = Scheduler.DPMPP_2M

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("blank")
        return value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_from_text(cls, value: object) -> object:
        # Strict mode would refuse the plain string JSON carries; accept exactly the enum values.
        if isinstance(value, str) and value in Scheduler._value2member_map_:
            return Scheduler(value)
        return value

    def with_seed(self) -> GenerationRequest:
        """This request with a seed: the given one, or a fresh random one to record."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(SEED_MAX + 1)})

    def image_seeds(self) -> list[int]:
        """Per-image seeds: seed + index, wrapping inside the 32-bit range."""
        base = self.seed if self.seed is not None else 0
        return [(base + i) % (SEED_MAX + 1) for i in range(self.num_images)]

    def timeout_s(self, base_s: float, per_step_s: float) -> int:
        """A finite job timeout that grows with the work: steps x pixels x images."""
        megasteps = self.steps * self.num_images * (self.width * self.height) / (512 * 512)
        return math.ceil(base_s + per_step_s * megasteps)


_BOUNDS: dict[str, tuple[float, float]] = {
    "prompt": (1, PROMPT_MAX_CHARS),
    "negative_prompt": (0, PROMPT_MAX_CHARS),
    "steps": (STEPS_MIN, STEPS_MAX),
    "guidance_scale": (GUIDANCE_MIN, GUIDANCE_MAX),
    "width": (SIZE_MIN, SIZE_MAX),
    "height": (SIZE_MIN, SIZE_MAX),
    "seed": (0, SEED_MAX),
    "num_images": (1, NUM_IMAGES_MAX),
}


def _num(bound: float | None) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _show(value: object) -> str:
    if isinstance(value, str) and len(value) > 40:
        return f"a string of {len(value)} characters"
    return repr(value)


def _explain(error: Any) -> InvalidRequest:
    """Turn one pydantic error into a message that names the field and the value."""
    field = ".".join(str(part) for part in error["loc"]) or "request"
    kind, value = error["type"], error.get("input")
    low, high = _BOUNDS.get(field, (None, None))
    if kind == "missing":
        message = f"{field} is required"
    elif kind == "extra_forbidden":
        message = f"unknown field {field!r}"
    elif kind in ("string_too_short", "string_too_long"):
        count = len(value) if isinstance(value, str) else value
        message = f"{field} must be {_num(low)} to {_num(high)} characters, got {count}"
    elif kind == "value_error" and field == "prompt":
        message = "prompt must not be blank"
    elif kind == "multiple_of":
        bounds = f"between {_num(low)} and {_num(high)}"
        message = f"{field} must be a multiple of {SIZE_MULTIPLE} {bounds}, got {_show(value)}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        message = f"{field} must be between {_num(low)} and {_num(high)}, got {_show(value)}"
    elif kind == "finite_number":
        message = f"{field} must be a finite number, got {_show(value)}"
    elif kind.startswith("int_"):
        message = f"{field} must be an integer, got {_show(value)}"
    elif kind.startswith("float_"):
        message = f"{field} must be a number, got {_show(value)}"
    elif kind.startswith("string_"):
        message = f"{field} must be a string, got {_show(value)}"
    elif kind == "enum" or field == "scheduler":
        names = ", ".join(s.value for s in Scheduler)
        message = f"{field} must be one of {names}, got {_show(value)}"
    elif kind == "model_type" or kind == "dict_type":
        message = f"request must be a JSON object, got {_show(value)}"
    else:
        message = f"{field}: {error['msg']}, got {_show(value)}"
    return InvalidRequest(field, message)


def parse_request(data: object) -> GenerationRequest:
    """Validate untrusted data (CLI, HTTP body, a job read from Redis) into a request."""
    if not isinstance(data, dict):
        raise InvalidRequest("request", f"request must be a JSON object, got {_show(data)}")
    try:
        return GenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc.errors()[0]) from None


def check_job_id(job_id: str) -> str:
    """A caller-chosen job id, or an InvalidRequest naming it."""
    if not JOB_ID_PATTERN.match(job_id):
        raise InvalidRequest(
            "job_id", f"job_id must be 1-128 letters, digits, '-' or '_', got {_show(job_id)}"
        )
    return job_id


WEBHOOK_URL_MAX_CHARS = 2048


def check_webhook_url(url: object) -> str:
    """A job's webhook URL: http(s) with a host, no spaces, at most 2,048 characters."""
    if not isinstance(url, str):
        raise InvalidRequest("webhook_url", f"webhook_url must be a string, got {_show(url)}")
    if len(url) > WEBHOOK_URL_MAX_CHARS:
        raise InvalidRequest(
            "webhook_url", f"webhook_url must be at most {WEBHOOK_URL_MAX_CHARS} characters, got {len(url)}"
        )
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a malformed port or IPv6 address
        valid = False
    if not valid or any(c.isspace() or not c.isprintable() for c in url):
        raise InvalidRequest(
            "webhook_url", f"webhook_url must be an http:// or https:// URL with a host, got {_show(url)}"
        )
    return url


# --- The status ---------------------------------------------------------------------------------


class Status(StrEnum):
    """What readers see; rq's finer states (scheduled for retry, deferred) read as queued."""

    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (Status.FINISHED, Status.FAILED, Status.CANCELED)


_FROM_RQ = {
    "queued": Status.QUEUED,
    "deferred": Status.QUEUED,
    "scheduled": Status.QUEUED,
    "started": Status.STARTED,
    "finished": Status.FINISHED,
    "failed": Status.FAILED,
    "stopped": Status.FAILED,
    "canceled": Status.CANCELED,
}


def status_from_rq(rq_status: object) -> Status:
    """Our status for rq's (a JobStatus enum or its plain string value)."""
    name = getattr(rq_status, "value", rq_status) or "queued"
    return _FROM_RQ.get(str(name), Status.QUEUED)


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0


class ImageRef(BaseModel):
    index: int
    key: str
    url: str
    seed: int


class Timings(BaseModel):
    """Seconds spent in each stage of the job's last attempt."""

    queue_wait_s: float | None = None
    render_s: float | None = None
    encode_s: float | None = None
    upload_s: float | None = None


class WebhookDelivery(BaseModel):
    """Where a job's status is POSTed when it ends, and how that has gone so far."""

    url: str
    attempts: int = 0
    last_status_code: int | None = None
    """The receiver's last HTTP status; None before the first try or when it could not be reached."""
    delivered: bool = False
    error: str | None = None


class JobView(BaseModel):
    """A job as `sdq status --json` and `GET /jobs/{id}` show it."""

    id: str
    status: Status
    progress: Progress
    request: dict[str, Any]
    images: list[ImageRef]
    error: str | None
    warnings: list[str]
    attempts: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    timings: Timings
    webhook: WebhookDelivery | None = None
