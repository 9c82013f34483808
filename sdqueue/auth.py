"""Bearer-token auth for the HTTP API.

With SDQ_API_TOKEN set, every route but /healthz needs ``Authorization: Bearer TOKEN``, compared
in constant time, else 401. A browser can't add that header to a page or an ``<img>``, so GET
(and HEAD) also take ``?access_token=TOKEN`` (RFC 6750, section 2.3); the job page passes it on,
and uvicorn's access log shows ``access_token=***``. Without a token the API is open, and says so
in its log at start.
"""

from __future__ import annotations

import hmac
import logging
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz"})
"""Load balancers and orchestrators probe these without credentials."""

_TOKEN_IN_QUERY = re.compile(r"(access_token=)[^&\s]*")


def authorized(request: Request, token: str) -> bool:
    """Whether REQUEST carries TOKEN, in its Authorization header or, on GET, its query."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(credentials.strip().encode(), token.encode())
    query = request.query_params.get("access_token")
    if query is None or request.method not in ("GET", "HEAD"):
        return False
    return hmac.compare_digest(query.encode(), token.encode())


class RedactAccessToken(logging.Filter):
    """Keeps ``?access_token=...`` out of uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


class RequireToken:
    """ASGI middleware: 401 for any request to a route but PUBLIC_PATHS without TOKEN.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each
    request through a task group and memory streams, which cut status reads from ~2,000 to ~900
    a second on one process (docs/benchmarks.md, section 6)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path not in PUBLIC_PATHS and not authorized(Request(scope), self.token):
                response = JSONResponse(
                    {"detail": "a valid bearer token is required"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def protect(app: FastAPI, token: str) -> None:
    """Require TOKEN on every route of APP but PUBLIC_PATHS; an empty TOKEN leaves it open."""
    if not token:
        logger.warning("SDQ_API_TOKEN is not set: the API is open to anyone who can reach it")
        return
    app.add_middleware(RequireToken, token=token)
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactAccessToken) for f in access_log.filters):
        access_log.addFilter(RedactAccessToken())
