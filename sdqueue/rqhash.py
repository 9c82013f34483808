"""rq's job hash, written and read directly on the two paths that handle thousands of jobs a second.

rq builds a ``Job`` object for every job it writes or reads, and on these paths that object costs
more than the Redis work itself:

- **bulk enqueue** (``Producer.enqueue_many``: ``sdq enqueue --file``, ``POST /jobs/batch``):
  ``write_jobs`` lets rq build and serialize the first job, then stamps the others from its hash,
  changing only the fields that differ per job (``_per_job_fields``). Each job is one HSET and the
  whole batch one RPUSH, in one MULTI/EXEC, where rq sends three commands per job.
- **status reads** (``GET /jobs/{id}``, ``sdq status``): ``read_record`` turns one HMGET of
  ``RECORD_FIELDS`` into a ``JobRecord``, dates parsed with ``fromisoformat`` instead of rq's
  ``strptime``.

The hash layout is rq 2.12's (rq is pinned below 3). Nothing here invents it: the constant fields
come from rq's own ``Job.to_dict``, and tests/test_rqhash.py checks every stamped hash against the
one rq writes for the same job, and every record against ``Job.fetch``, so an rq upgrade that
changes the layout fails there first.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from redis.client import Pipeline
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

RECORD_FIELDS = ("status", "meta", "data", "created_at", "started_at", "ended_at")
"""The fields of a job's hash that a status read needs, in ``read_record``'s order."""


class NewJob(NamedTuple):
    """The part of a job that ``write_jobs`` writes for each job of a batch."""

    id: str
    args: tuple[Any, ...]
    timeout: int
    description: str
    meta: dict[str, Any]

    def rq_options(self) -> dict[str, Any]:
        """These fields as the keyword arguments of rq's ``Queue.create_job``/``prepare_data``."""
        return {
            "args": self.args,
            "job_id": self.id,
            "timeout": self.timeout,
            "description": self.description,
            "meta": self.meta,
        }


def write_jobs(pipe: Pipeline, queue: Queue, func: str, jobs: Sequence[NewJob], **shared: Any) -> None:
    """Queue JOBS, in order, on PIPE (a MULTI/EXEC pipeline the caller executes). SHARED holds the
    ``Queue.create_job`` options common to all of them (result_ttl, failure_ttl, retry)."""
    if not jobs:
        return
    if any(not job.description for job in jobs):
        raise ValueError("every job needs a description: rq would write one of its own for an empty one")
    template = queue.create_job(func, status=JobStatus.QUEUED, **jobs[0].rq_options(), **shared)
    template.origin = queue.name  # what Queue._prepare_for_queue adds before rq saves a job
    template.enqueued_at = template.created_at
    base = template.to_dict()
    pipe.sadd(queue.redis_queues_keys, queue.key)
    for job in jobs:
        fields = base | _per_job_fields(func, job)
        if not job.meta:
            del fields["meta"]  # as rq does: no meta field rather than an empty one
        pipe.hset(Job.key_for(job.id), mapping=fields)
    pipe.rpush(queue.key, *(job.id for job in jobs))


def write_jobs_with_rq(
    pipe: Pipeline, queue: Queue, func: str, jobs: Sequence[NewJob], **shared: Any
) -> None:
    """What write_jobs does, the way rq does it (a Job per job, three commands each): the reference
    tests/test_rqhash.py holds write_jobs to, and the baseline bench/bulk_enqueue.py measures."""
    datas = [Queue.prepare_data(func, **job.rq_options(), **shared) for job in jobs]
    queue.enqueue_many(datas, pipeline=pipe)


def _per_job_fields(func: str, job: NewJob) -> dict[str, Any]:
    # What differs per job; every other field is the first job's, as rq built it. Job.data is the
    # serialized (func_name, instance, args, kwargs), zlib-compressed by to_dict.
    return {
        "data": zlib.compress(JSONSerializer.dumps((func, None, job.args, {}))),
        "description": job.description,
        "meta": JSONSerializer.dumps(job.meta),
        "timeout": job.timeout,
    }


@dataclass(frozen=True)
class JobRecord:
    """What a status read needs of a job, whether it came from its hash or from an rq Job."""

    id: str
    status: str
    meta: Mapping[str, Any]
    args: Sequence[Any]
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        """The record of a Job rq has already loaded or just enqueued."""
        return cls(
            id=job.id,
            status=_status_name(job.get_status(refresh=False)),
            meta=job.meta or {},
            args=_args_of(job),
            created_at=_utc(job.created_at),
            started_at=_utc(job.started_at),
            ended_at=_utc(job.ended_at),
        )


def _status_name(status: object) -> str:
    """rq's status as its plain name, whether rq holds it as a JobStatus or a string."""
    return str(getattr(status, "value", status) or "queued")


def read_record(job_id: str, values: Sequence[bytes | str | None]) -> JobRecord | None:
    """The record from an HMGET of RECORD_FIELDS on the job's key; None when there is no such job."""
    status, meta, data, created_at, started_at, ended_at = (
        value.encode() if isinstance(value, str) else value for value in values
    )
    if data is None:  # every job rq writes has data: the key is gone (expired, deleted, never was)
        return None
    return JobRecord(
        id=job_id,
        status=status.decode() if status else "queued",
        meta=_loads(meta) if meta else {},
        args=_decode_args(data),
        created_at=_date(created_at),
        started_at=_date(started_at),
        ended_at=_date(ended_at),
    )


def _decode_args(data: bytes) -> Sequence[Any]:
    """The job's args, or none when its data can't be read (a foreign or corrupt job)."""
    try:
        decoded = _loads(zlib.decompress(data))
    except zlib.error:
        return ()
    if isinstance(decoded, list) and len(decoded) == 4 and isinstance(decoded[2], list):
        return decoded[2]
    return ()


def _loads(raw: bytes) -> Any:
    try:
        return JSONSerializer.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return {}


def _date(raw: bytes | None) -> datetime | None:
    """rq writes '%Y-%m-%dT%H:%M:%S.%fZ' in UTC (or '' for not yet)."""
    if not raw:
        return None
    try:
        return _utc(datetime.fromisoformat(raw.decode()))
    except ValueError:
        return None


def _args_of(job: Job) -> Sequence[Any]:
    try:
        return tuple(job.args)
    except Exception:  # rq raises DeserializationError, wrapping whatever the serializer raised
        return ()


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
