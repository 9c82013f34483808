"""sdqueue's one error tree. The edges translate it: exit codes in the CLI, HTTP codes in the API.

SdqError                      exit 1
├── InvalidRequest            exit 2, HTTP 422: a field is out of bounds (names field and value)
├── ConfigError               exit 2: an SDQ_* variable is malformed
├── JobNotFound               exit 1, HTTP 404
├── JobConflict               exit 1, HTTP 409: duplicate job id, cancel of an ended job
├── ServiceUnavailable        exit 1, HTTP 503: Redis or storage unreachable
├── StorageError              exit 1: an object could not be written or read
├── RenderError               the engine failed for this job (NaN output, model error)
└── ForeignJob                a job in the queue names a function that is not sdqueue's
"""

from __future__ import annotations


class SdqError(Exception):
    """Base of every error sdqueue raises on purpose."""

    exit_code = 1
    http_status = 500
    retryable = True
    """Whether the worker may retry a job that failed with this error."""


class InvalidRequest(SdqError):
    """A request field is missing, of the wrong type, or out of bounds."""

    exit_code = 2
    http_status = 422
    retryable = False

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(SdqError):
    exit_code = 2
    retryable = False


class JobNotFound(SdqError):
    http_status = 404
    retryable = False

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class JobConflict(SdqError):
    http_status = 409
    retryable = False


class ServiceUnavailable(SdqError):
    http_status = 503


class StorageError(SdqError):
    http_status = 503


class RenderError(SdqError):
    pass


class OutOfMemory(RenderError):
    """Raised by the engine after freeing memory, so the caller can retry with a smaller batch."""


class Preempted(SdqError):
    """Raised at a step boundary when the worker must stop before the job could finish."""


class ForeignJob(SdqError):
    """Raised in the worker instead of importing or running a function it doesn't own."""

    retryable = False
