# # sdqueue on Modal: GPU workers that exist only while the queue has work
#
# Deploy with
#
# ```bash
# modal deploy -m sdqueue.modal_app
# ```
#
# and every job that any producer puts on the Redis queue (`sdq enqueue`, the HTTP API, your own
# application) is rendered on a Modal GPU; when the queue is empty, no GPU runs and none is billed.
# The README's "Deploy on Modal" section has the one-time setup; this file explains the choices.
#
# The shape is pull, not push. Producers never call Modal: they enqueue to Redis exactly as they
# would for a worker on a laptop. A small scheduled function looks at the queue every few seconds
# and, when there is a backlog, spawns "drains": GPU containers that load the model once, run the
# ordinary sdqueue worker until the queue has been empty for a while, and return. The decision of
# how many drains to start lives in `sdqueue/scaling.py` as a pure function, tested on its own.

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import modal

from .config import Settings, load_settings
from .errors import ConfigError
from .scaling import drain, scale

MINUTES = 60
HOURS = 60 * MINUTES

# ## Settings, read once at deploy time
#
# `Settings` is sdqueue's only reader of the environment. When `modal deploy` imports this module
# on your machine, it reads the deploy-time choices from your shell (or `.env`): the GPU type, the
# scaling limits, the model and its pinned revision. Those few values are then handed to the
# containers explicitly (`DEPLOY_ENV` below), so the scaler and the workers see the very numbers
# that were deployed. Everything secret (the Redis URL, the bucket, S3 credentials) comes from a
# Modal Secret instead and never passes through this file.

settings = load_settings()

DEPLOY_FIELDS = (
    "model",
    "model_revision",
    "worker_idle_timeout_s",
    "modal_min_workers",
    "modal_max_workers",
    "modal_jobs_per_worker",
)


def deploy_env(deployed: Settings) -> dict[str, str | None]:
    """The deploy-time settings as SDQ_* variables for the containers, plus fp16 on CUDA."""
    env: dict[str, str | None] = {
        f"SDQ_{name.upper()}": str(getattr(deployed, name))
        for name in DEPLOY_FIELDS
        if getattr(deployed, name) is not None
    }
    env |= {"SDQ_DEVICE": "cuda", "SDQ_DTYPE": "float16"}
    return env


DEPLOY_ENV = deploy_env(settings)

app = modal.App(settings.modal_app_name, include_source=False)

# The Secret must hold at least these two: without a Redis URL there is no queue, and without an
# s3:// storage URL the images would land on a container disk that vanishes at scale-down. Put the
# S3 endpoint (for R2, MinIO...) and `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` there too, and
# `HF_TOKEN` if the model is gated.

secret = modal.Secret.from_name(settings.modal_secret, required_keys=["SDQ_REDIS_URL", "SDQ_STORAGE_URL"])

# ## The GPU image: pinned, with the weights inside
#
# Every version is pinned to the set the test suite runs against (see `pyproject.toml` and
# `tests/test_modal_app.py`, which checks that each pin is inside the package's own ranges).
# On Linux, PyPI's `torch` wheel is the CUDA build, so nothing else is needed for the GPU.

WORKER_PACKAGES = [
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers==5.24.0",
    "accelerate==1.15.0",  # lets diffusers load weights straight into place, not twice
    "huggingface-hub==2.4.0",
    "safetensors==0.8.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "boto3==1.44.8",
    "rq==2.12.0",
    "redis==8.1.0",
    "hiredis==3.5.0",
    "pydantic==2.14.4",
    "pydantic-settings==2.16.3",
    "prometheus-client==0.26.0",
    "typer==0.29.2",  # `sdq` itself works inside `modal shell`, for debugging
    "rich==15.0.0",
]

HF_HOME = "/hf"

# Weights are baked into the image rather than kept in a Volume. A Volume fills on first use: the
# first burst of traffic would send every new container to the Hugging Face Hub at once, racing
# to write the same files, and a Hub outage would become a failed scale-up at the worst moment.
# Baked in, the download happens once, during `modal deploy`, where a missing or mistyped
# revision fails the deploy instead of the first job; containers then start with the network
# switched off for the Hub (`HF_HUB_OFFLINE`). The cost is an image rebuild (a few minutes) when
# the model or its revision changes, which is exactly when one is wanted.


def download_weights(model: str, revision: str | None) -> None:
    """Image build step: fetch the fp16 pipeline the engine loads into the image's HF cache."""
    from diffusers import StableDiffusionPipeline

    if Path(model).is_absolute():
        raise ConfigError(f"SDQ_MODEL: a local directory ({model}) cannot be deployed; use a hub id")
    if not revision:
        raise ConfigError(
            f"SDQ_MODEL_REVISION: pin a commit of {model} for the deployed image "
            f"(python -c \"from huggingface_hub import model_info; print(model_info('{model}').sha)\")"
        )
    # The same files `DiffusersEngine.load` asks for on CUDA: the fp16 variant, no safety checker.
    StableDiffusionPipeline.download(model, revision=revision, variant="fp16", safety_checker=None)


gpu_image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install(*WORKER_PACKAGES)
    .env({"HF_HOME": HF_HOME})
    .run_function(
        download_weights,
        secrets=[secret],  # for HF_TOKEN, if the model is gated
        kwargs={"model": settings.model, "revision": settings.model_revision},
    )
    .env({"HF_HUB_OFFLINE": "1"})
    .add_local_python_source("sdqueue")  # last: code changes don't rebuild the layers above
)

# The scaler needs only Redis and rq: a small image that starts in a second.

SCALER_PACKAGES = [
    "rq==2.12.0",
    "redis==8.1.0",
    "hiredis==3.5.0",
    "pydantic==2.14.4",
    "pydantic-settings==2.16.3",
]

scaler_image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install(*SCALER_PACKAGES)
    .add_local_python_source("sdqueue")
)

with gpu_image.imports():  # type: ignore[no-untyped-call]
    from .engine import DiffusersEngine


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def check_remote_settings(remote: Settings) -> None:
    """Refuse settings that cannot work in a Modal container, naming the variable."""
    if not remote.storage_url.startswith("s3://"):
        raise ConfigError(
            f"SDQ_STORAGE_URL must be s3://BUCKET/PREFIX on Modal (a container's disk is gone when it "
            f"scales down), got {remote.storage_url!r}"
        )


# ## The drain: a warm worker on a GPU
#
# `@modal.enter` loads the pipeline once per container, in fp16 on CUDA, before the container
# takes any input. `drain` then runs sdqueue's ordinary worker (an rq SimpleWorker) on the main
# thread, which matters twice: rq enforces each job's timeout with SIGALRM, and the worker
# installs its own SIGINT/SIGTERM handlers there.
#
# Those handlers are how preemption is survived. Modal preempts a container with SIGINT and a
# short grace (about 30 s): the worker stops taking jobs, finishes the running job if it fits in
# `SDQ_WORKER_GRACE_S`, otherwise puts it back at the front of the queue at a step boundary, and
# exits; Modal then restarts the drain elsewhere. Nothing here catches those signals.
#
# A drain returns when the queue has been empty for `SDQ_WORKER_IDLE_TIMEOUT_S` (60 s by default).
# Under endless load it would run into Modal's per-input `timeout`, which kills rather than
# stops, so after `DRAIN_LIFETIME_S` it stops itself the way `docker stop` does (SIGTERM: finish
# or requeue the running job) and the next scaler tick starts a fresh drain, usually in this very
# container, model still loaded, since `SCALEDOWN_WINDOW_S` outlasts a tick.

SCALER_PERIOD_S = 20
DRAIN_LIFETIME_S = 1 * HOURS
DRAIN_TIMEOUT_S = DRAIN_LIFETIME_S + 10 * MINUTES  # room for the last job and the stop grace
STARTUP_TIMEOUT_S = 10 * MINUTES  # image pull, 2 GB of weights to the GPU, one warm-up render
SCALEDOWN_WINDOW_S = 2 * SCALER_PERIOD_S


@app.cls(
    image=gpu_image,
    gpu=settings.modal_gpu,
    secrets=[secret],
    env=DEPLOY_ENV,
    min_containers=settings.modal_min_workers,
    max_containers=settings.modal_max_workers,
    scaledown_window=SCALEDOWN_WINDOW_S,
    timeout=DRAIN_TIMEOUT_S,
    startup_timeout=STARTUP_TIMEOUT_S,
)
class GpuWorker:
    @modal.enter()
    def load(self) -> None:
        self.settings = load_settings()
        configure_logging(self.settings.log_level)
        check_remote_settings(self.settings)
        self.engine = DiffusersEngine.load(self.settings)

    @modal.method()
    def drain(self, spawn_token: str | None = None) -> bool:
        """Render jobs until the queue has been idle; True if any job was processed."""
        return drain(
            self.settings,
            self.engine,
            idle_timeout_s=self.settings.worker_idle_timeout_s,
            max_lifetime_s=DRAIN_LIFETIME_S,
            spawn_token=spawn_token,
        )


# ## The scaler: every 20 seconds, start what the backlog needs
#
# It counts the backlog (queued jobs, retries that are due, jobs whose worker vanished), the live
# rq workers (a container that died without saying goodbye stops counting once its heartbeat key
# expires) and the drains spawned but still loading, and spawns the difference up to
# `SDQ_MODAL_MAX_WORKERS`. One instance at a time (`max_containers=1`), so two ticks never race
# to start the same drains. It is a fraction of a CPU for a second per tick; the GPU bill of an
# empty queue is zero.


@app.function(
    image=scaler_image,
    secrets=[secret],
    env=DEPLOY_ENV,
    schedule=modal.Period(seconds=SCALER_PERIOD_S),
    cpu=0.125,
    memory=256,
    max_containers=1,
    scaledown_window=2,  # the minimum: stay billed for a tick, not between ticks
    timeout=1 * MINUTES,
)
def autoscale() -> int:
    """One scaler tick; returns how many drains it started."""
    remote = load_settings()
    configure_logging(remote.log_level)

    def spawn(token: str) -> Any:
        return GpuWorker().drain.spawn(spawn_token=token)

    # A drain that has not loaded its model within the startup timeout is not coming.
    return scale(remote, spawn, start_grace_s=STARTUP_TIMEOUT_S + SCALER_PERIOD_S)
