"""Request ids: every request gets one, or keeps the client's `X-Request-Id` when it is safe to log and
echo (at most 128 characters of `A-Z a-z 0-9 . _ : -`).

Ray Serve's proxy already takes the client's `x-request-id` as the request's id, returns it in the
response's `x-request-id` header and carries it, through the handles, into every stage's request
context, so that every line Serve's `ray.serve` logger writes during the request names it. It checks
nothing, though: `ProxyRequestIdMiddleware` runs in the proxy, in front of Serve's own
`RequestIdMiddleware`, and replaces an id that is too long or has other characters with a fresh one.
Serve installs it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.request_ids:proxy_middlewares`
(`PROXY_ENV`), which must be in the proxy's environment: `serve_app.serve_run` and tests/tiny_server.py
set it before Ray starts, and the k8s manifests on every pod.
"""

from __future__ import annotations

import re
import uuid

MAX_LENGTH = 128
_SAFE = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_LENGTH}}}")
HEADER = b"x-request-id"
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve_app.request_ids:proxy_middlewares"}


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex[:24]


def is_valid(request_id: str | None) -> bool:
    return request_id is not None and _SAFE.fullmatch(request_id) is not None


class ProxyRequestIdMiddleware:
    """Pure ASGI, in Serve's proxy: a client's `x-request-id` that is not `is_valid` (or more than one) is
    replaced by a fresh id before Serve reads it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket"):
            headers = scope.get("headers") or []
            given = [v for k, v in headers if k.lower() == HEADER]
            if given and (len(given) > 1 or not is_valid(given[0].decode("latin-1"))):
                fresh = new_request_id().encode()
                scope = {**scope, "headers": [(k, v) for k, v in headers if k.lower() != HEADER] + [(HEADER, fresh)]}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """What Serve's proxy calls through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyRequestIdMiddleware)]
