"""One structured access-log line per HTTP request, and the request counters of serve_app/metrics.py.

`AccessLogMiddleware` (pure ASGI, outermost in the ingress's app, so 401s and 413s count too) writes one
JSON object a line to the ingress replica's stderr (Ray's worker log, and the `serve run` console):

    {"ts": ..., "request_id": "req_...", "method": "POST", "route": "/v1/images/generations", "status": 200,
     "bytes": 1234, "duration_s": 0.41, "n": 2, "steps": 8, "size": "512x512",
     "timings": {"text_encoder_s": ..., "denoiser_s": ..., "vae_s": ..., "encode_s": ..., "queue_s": ..., "total_s": ...}}

`route` is the route's template (`unmatched` for a 404), so the metrics' label values stay bounded;
prompts are never logged. The request id is Serve's (serve_app/request_ids.py): the same as the
`x-request-id` header and the one in Serve's own log lines of every stage for this request.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time

_info: contextvars.ContextVar[dict | None] = contextvars.ContextVar("serve_app_request_info", default=None)

access_log = logging.getLogger("serve_app.access")


def note(**fields) -> None:
    """Add fields (n, steps, size, timings) to the running request's access-log line; outside an HTTP
    request (the handle API) nothing."""
    info = _info.get()
    if info is not None:
        info.update(fields)


class AccessLog:
    """What the middleware uses, set by the ingress at start (a class, as BodyLimit: Serve's pickled copy
    of the app shares it by reference)."""

    metrics = None  # serve_app.metrics.IngressMetrics
    enabled = False

    @classmethod
    def configure(cls, metrics, enabled: bool) -> None:
        cls.metrics, cls.enabled = metrics, enabled
        if enabled and not access_log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            access_log.addHandler(handler)
            access_log.setLevel(logging.INFO)
            access_log.propagate = False  # exactly the JSON line, not Serve's prefixed copy too


def _route(scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class AccessLogMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        info: dict = {}
        token = _info.set(info)
        status, size, started = 500, 0, False

        async def tracking_send(message):
            nonlocal status, size, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:  # the client went away before an answer: nginx's and Serve's 499
            status = status if started else 499
            raise
        finally:
            _info.reset(token)
            route = _route(scope)
            if AccessLog.metrics is not None:
                AccessLog.metrics.request(route, status)
            if AccessLog.enabled:
                from serve_app.errors import current_request_id

                line = {"ts": round(time.time(), 3), "request_id": current_request_id(), "method": scope.get("method"),
                        "route": route, "status": status, "bytes": size, "duration_s": round(time.perf_counter() - t0, 4), **info}
                access_log.info(json.dumps(line, separators=(",", ":")))
