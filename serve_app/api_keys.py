"""Optional API keys: `Authorization: Bearer <key>`, as OpenAI's SDKs send their `api_key`.

Off until a key is configured (`server.api_keys_env`, default `SERVE_APP_API_KEYS`: keys separated by
commas or whitespace; `server.api_keys_file`: one key a line, `#` comments, e.g. a mounted Kubernetes
Secret); `server.require_api_keys` makes a start without any key an error. With keys, every route but
`/health*` (the probes) needs one of them, else 401 in OpenAI's error shape (code `invalid_api_key`).
A presented key is compared with every configured key (hmac.compare_digest of their SHA-256 digests,
so neither the matching key's position nor its length shows in the time taken).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from serve_app.config import ServerConfig

OPEN_PREFIXES = ("/health",)


class NoApiKeys(ValueError):
    pass


def load_keys(server: ServerConfig) -> list[str]:
    keys: list[str] = []
    if server.api_keys_env:
        keys += re.split(r"[\s,]+", os.environ.get(server.api_keys_env, ""))
    if server.api_keys_file:
        with open(server.api_keys_file) as f:
            keys += [line.split("#", 1)[0] for line in f]
    keys = sorted({k.strip() for k in keys if k.strip()})
    if server.require_api_keys and not keys:
        raise NoApiKeys(f"server.require_api_keys is set but no key was found in ${server.api_keys_env or '(no variable)'} "
                        f"or {server.api_keys_file or '(no file)'}")
    return keys


class ApiKeys:
    """The keys in force; the ingress sets them at start (a class attribute, as BodyLimit's limits)."""

    digests: list[bytes] = []

    @classmethod
    def configure(cls, keys: list[str]) -> None:
        cls.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def accepts(cls, token: str) -> bool:
        presented = hashlib.sha256(token.encode()).digest()
        ok = False
        for digest in cls.digests:  # every key, no early exit
            ok |= hmac.compare_digest(presented, digest)
        return ok


def _bearer(headers) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    """Pure ASGI, outermost in the ingress's app: nothing is read or parsed before the key is checked."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not ApiKeys.digests:
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        token = _bearer(scope.get("headers") or [])
        if token is not None and ApiKeys.accepts(token):
            return await self.app(scope, receive, send)
        import json

        from serve_app.errors import error_body
        from serve_app.openai_api import APIError

        message = "Missing API key: send it as 'Authorization: Bearer <key>'" if token is None else "Incorrect API key provided"
        body = json.dumps(error_body(APIError(401, message, code="invalid_api_key", type="invalid_request_error"))).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="serve_app"')]})
        await send({"type": "http.response.body", "body": body})
