"""The one settings object. Nothing else in sdqueue reads the environment.

Every field is read from an ``SDQ_``-prefixed environment variable (``SDQ_REDIS_URL``...) or
from a ``.env`` file in the working directory. S3 credentials are the exception on purpose:
they come from boto3's own chain (``AWS_ACCESS_KEY_ID``, instance roles, ...), so sdqueue never
holds a secret it doesn't need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

DAY_S = 24 * 3600

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _default_storage_url() -> str:
    return (Path.cwd() / "sdq-output").as_uri()


class Settings(BaseSettings):
    """Configuration of producers, workers and the API, from ``SDQ_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="SDQ_", env_file=".env", extra="ignore")

    # --- queue ---
    redis_url: str = "redis://localhost:6379/0"
    """redis:// or rediss:// (TLS); a password goes in the URL: redis://:secret@host:6379/0."""
    queue: str = "sdqueue"
    """Name of the rq queue producers push to and workers take from."""

    # --- storage ---
    storage_url: str = Field(default_factory=_default_storage_url)
    """s3://BUCKET/PREFIX or file:///absolute/dir. Default: ./sdq-output as a file:// URL."""
    s3_endpoint_url: str | None = None
    """For MinIO, R2, GCS interop or any S3-compatible service; None means AWS."""
    s3_public_endpoint_url: str | None = None
    """Endpoint image URLs are signed for, when clients reach S3 by another name than workers do
    (docker compose: workers use http://minio:9000, the host http://localhost:9000)."""
    s3_region: str | None = None
    s3_create_bucket: bool = False
    """Create the bucket at start if it is missing (handy for MinIO; leave off on AWS)."""
    presign_expiry_s: int = Field(default=3600, ge=1, le=7 * DAY_S)
    """Lifetime of the presigned image URLs in job status (S3 caps it at 7 days)."""

    # --- model and engine ---
    model: str = DEFAULT_MODEL
    """Hugging Face model id or a local directory holding a diffusers pipeline."""
    model_revision: str | None = None
    """Hub revision (pin a commit hash in production); ignored for local directories."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float16", "float32"] = "auto"
    """auto = float16 on CUDA, float32 on CPU (CPU kernels for fp16 are slow or missing)."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """PyTorch's scaled-dot-product attention, or xformers when installed and asked for."""

    # --- scale to zero (Modal); read when `modal deploy` runs, then passed to the containers ---
    worker_idle_timeout_s: int = Field(default=60, ge=1)
    """A scale-to-zero worker (a Modal drain) exits once the queue has been empty this long."""
    modal_app_name: str = "sdqueue"
    """Name of the deployed Modal app; deploy twice under two names for staging and production."""
    modal_secret: str = "sdqueue-secrets"
    """Modal Secret holding SDQ_REDIS_URL, SDQ_STORAGE_URL, S3 endpoint and AWS_* credentials."""
    modal_gpu: str = "A10G"
    """Modal GPU type for the drains: T4, L4, A10G, L40S, A100, H100..."""
    modal_min_workers: int = Field(default=0, ge=0)
    """Drains kept running even with an empty queue (0 = nothing billed while idle)."""
    modal_max_workers: int = Field(default=4, ge=1)
    """Most drains (GPU containers) running at once, whatever the backlog."""
    modal_jobs_per_worker: int = Field(default=4, ge=1)
    """Queued jobs that justify one more drain; higher means fewer cold starts, more waiting."""

    # --- jobs ---
    job_timeout_base_s: int = Field(default=120, ge=1)
    """Fixed part of a job's timeout: text encoding, VAE decode, encoding, upload."""
    job_timeout_per_step_s: float = Field(default=1.0, gt=0)
    """Per denoising step of one 512x512 image; scaled by pixel count and image count."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries for transient failures (storage, crash). Invalid or foreign jobs never retry."""
    retry_interval_s: int = Field(default=10, ge=0)
    result_ttl_s: int = Field(default=7 * DAY_S, ge=1)
    """How long a finished job's status stays in Redis (the images live as long as storage keeps them)."""
    failure_ttl_s: int = Field(default=7 * DAY_S, ge=1)
    """How long a failed job stays in Redis for inspection."""
    progress_interval_s: float = Field(default=0.5, ge=0)
    """Minimum time between two progress writes to Redis from the step callback."""
    pipeline: bool = False
    """Encode, upload and write the status of job k on a background stage while job k+1 renders.
    Off by default: measured on an H200 (docs/benchmarks.md), the stage's Python competes with
    the render loop for the GIL and slowed launch-bound batch-1 renders by ~25 %, for +3 % at
    batch 4. It wins where the render leaves the CPU idle (the stand-in: 0.934 -> 1.065)."""
    max_batch: int = Field(default=4, ge=1, le=64)
    """Most images per pipeline call: a worker renders the job it took together with compatible
    jobs already waiting (same size, steps, scheduler, guidance). 1 turns batching off. A batch
    only forms from a backlog, so a lone job never waits for one; 4 SD 1.5 images at 512x512 fit
    a 24 GB GPU in fp16, and out of memory the batch is split in halves anyway."""

    # --- worker lifecycle ---
    worker_grace_s: float = Field(default=25.0, gt=0)
    """After SIGTERM/SIGINT: finish the running job if it fits in this time, else requeue it at
    the front at a step boundary; the worker exits within it (Modal preempts with ~30 s)."""
    heartbeat_ttl_s: int = Field(default=20, ge=2)
    """A running job's lease; a worker that stops renewing it (crash, kill -9) loses the job."""
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    housekeeping_interval_s: float = Field(default=5.0, gt=0)
    """How often some live worker requeues jobs with expired leases and releases due retries."""

    # --- HTTP API and webhooks ---
    api_token: SecretStr | None = None
    """Bearer token `sdq api` requires on every route but /healthz. Unset or empty: the API is
    open to anyone who can reach it, and logs so at start."""
    api_workers: int = Field(default=2, ge=1, le=64)
    """Processes `sdq api` serves from (uvicorn workers), one event loop each: one per core the API
    may use. On 2 cores, 2 processes serve 1.5x the status reads of one, with p99 20 ms, not 31
    (docs/benchmarks.md, section 6)."""
    webhook_secret: SecretStr | None = None
    """Key of the HMAC-SHA256 sent in X-Sdqueue-Signature. The API accepts a webhook_url only when
    it has one; workers need the same value to send webhooks."""
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    """Tries per webhook, the first included; a non-2xx answer or a network error is retried."""
    webhook_backoff_s: float = Field(default=2.0, ge=0, le=300)
    """Wait before the second try; it doubles with each retry, up to 5 minutes."""
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    """Timeout of one webhook POST (connect and answer)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator(
        "model_revision", "s3_endpoint_url", "s3_public_endpoint_url", "s3_region", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose and .env files pass unset variables as "", which must mean "not set"
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "s3" and parts.netloc:
            return value
        if parts.scheme == "file" and parts.path.startswith("/"):
            return value
        raise ValueError(f"must be s3://BUCKET/PREFIX or file:///absolute/dir, got {value!r}")


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a bad variable into a ConfigError that names it."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise ConfigError(f"SDQ_{field.upper()}: {first['msg']}") from None
