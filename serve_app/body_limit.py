"""A request-body size limit in front of the routes: `server.max_body_bytes` for JSON bodies, and room
for an image and a mask of `server.max_upload_bytes` each on top of it for multipart uploads
(/v1/images/edits). A declared Content-Length over the limit is refused at once, a chunked body as soon
as it has sent more; both with 413 and an OpenAI-shaped error, before anything is parsed."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit


class BodyLimit:
    """The limit in force (None: none); the ingress sets it from `server.max_body_bytes` at start. A class,
    so that Serve's pickled copy of the app shares it by reference."""

    max_body_bytes: int | None = None
    max_multipart_bytes: int | None = None


class BodyLimitMiddleware:
    """Pure ASGI (so that it sees the body before FastAPI reads it). `limits` is any object whose
    `max_body_bytes` and `max_multipart_bytes` are read per request: the ingress sets them at start."""

    def __init__(self, app, limits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        multipart = any(n == b"content-type" and v.lower().startswith(b"multipart/form-data") for n, v in headers)
        limit = getattr(self.limits, "max_multipart_bytes" if multipart else "max_body_bytes", None)
        if not limit:
            return await self.app(scope, receive, send)
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    return await _too_large(send, limit)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send, limit: int) -> None:
    from serve_app.errors import error_body, too_large

    body = json.dumps(error_body(too_large(limit))).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
