"""Idempotency-Key: a client that retries a submission with the same key gets the same jobs back.

The first request with a key claims it in Redis with SET NX (a short "pending" claim), enqueues,
then records its job ids for IDEMPOTENCY_TTL_S. A retry with the same key and the same request
(same route, same JSON, key order aside) gets those ids back; the same key with a different
request, or while the first is still being enqueued, is a JobConflict (HTTP 409). A claim whose
request failed is released, so the retry runs for real. Keys are per queue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import redis

from .errors import InvalidRequest, JobConflict
from .jobs import IDEMPOTENCY_KEY, IDEMPOTENCY_TTL_S

KEY_MAX_CHARS = 255
PENDING_TTL_S = 60
"""A claim whose request died before recording its jobs frees the key after this long."""


def check_key(key: str) -> str:
    """1 to 255 printable ASCII characters, as the IETF draft and Stripe use."""
    if not 1 <= len(key) <= KEY_MAX_CHARS or not all(" " <= c <= "~" for c in key):
        raise InvalidRequest(
            "Idempotency-Key", f"Idempotency-Key must be 1-{KEY_MAX_CHARS} printable ASCII characters"
        )
    return key


def fingerprint(scope: str, body: object) -> str:
    """A hash of the route and the request JSON, independent of key order and spacing."""
    canonical = json.dumps([scope, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    """Remembers which jobs each Idempotency-Key created, in Redis, for a day."""

    def __init__(self, connection: redis.Redis, queue: str, ttl_s: int = IDEMPOTENCY_TTL_S) -> None:
        self.redis = connection
        self.queue = queue
        self.ttl_s = ttl_s

    def _redis_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return IDEMPOTENCY_KEY.format(queue=self.queue, key_sha256=digest)

    def run(
        self, key: str, scope: str, body: object, create: Callable[[], list[str]]
    ) -> tuple[list[str], bool]:
        """CREATE's job ids, or those of the earlier request with KEY; True when they are earlier ones."""
        redis_key = self._redis_key(check_key(key))
        request_hash = fingerprint(scope, body)
        claim = json.dumps({"fingerprint": request_hash, "ids": None})
        if self.redis.set(redis_key, claim, nx=True, ex=PENDING_TTL_S):
            try:
                ids = create()
            except BaseException:
                self.redis.delete(redis_key)  # nothing was created: let the retry try again
                raise
            self.redis.set(redis_key, json.dumps({"fingerprint": request_hash, "ids": ids}), ex=self.ttl_s)
            return ids, False

        stored = self.redis.get(redis_key)
        if stored is None:  # the earlier claim lapsed just now: start over
            return self.run(key, scope, body, create)
        earlier = json.loads(stored)
        if earlier.get("fingerprint") != request_hash:
            raise JobConflict(f"Idempotency-Key {key!r} was already used with a different request")
        if earlier.get("ids") is None:
            raise JobConflict(f"a request with Idempotency-Key {key!r} is still being processed; retry")
        return [str(job_id) for job_id in earlier["ids"]], True
