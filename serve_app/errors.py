"""One error contract for every non-2xx answer of our routes: OpenAI's
`{"error": {"message", "type", "param", "code"}}`, also for FastAPI's own answers (body parse errors,
404, 405) and for the body-size limit (413). A 500 says in words what failed and carries a request id
(Serve's own, which its proxy also returns as the `x-request-id` header); its details (exception, traceback, Ray's repr) go to the server log
under that id, never into the body."""

from __future__ import annotations

import contextvars
from typing import NoReturn
import logging


from fastapi import FastAPI, Request
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.body_limit import BodyTooLarge
from serve_app.openai_api import APIError, param_from_pydantic_loc
from serve_app.request_ids import new_request_id

log = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("serve_app_request_id", default=None)


def current_request_id() -> str:
    """The id Ray Serve gave the request being served: its proxy returns it as the `x-request-id` header
    and Serve's own log lines carry it; else (outside a request) a fresh one."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:
        rid = None
    if not rid:
        rid = _request_id.get()
        if rid is None:
            rid = new_request_id()
            _request_id.set(rid)
    return rid


def unwrap(e: BaseException) -> BaseException:
    """The user exception inside Ray's RayTaskError (which is also an instance of it)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def internal_error(what: str, e: BaseException) -> APIError:
    """A 500 that names what failed and the request id, with the details logged under that id."""
    rid = current_request_id()
    inner = unwrap(e)
    log.error("request %s: %s: %s: %s", rid, what, type(inner).__name__, e, exc_info=e)
    return APIError(500, f"{what} ({type(inner).__name__}); request id {rid}, details are in the server log",
                    code="internal_error", type="server_error")


_HTTP_CODES = {404: ("not_found", "invalid_request_error"), 405: ("method_not_allowed", "invalid_request_error"),
               413: ("request_too_large", "invalid_request_error"), 400: ("invalid_request", "invalid_request_error")}


class StageFailed(Exception):
    """A stage raised on this request (not an overload, a dead worker or a 400): named for the 500."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(stage)
        self.stage, self.error = stage, error


def raise_from_stage(e: Exception, stage: str) -> NoReturn:
    """Re-raise a stage's failure for its caller: ours and Serve's own errors as they are, anything else
    as `StageFailed(stage)` (a 500 that names the stage, its details only in the log)."""
    if isinstance(e, (APIError, RequestCancelledError, BackPressureError, DeploymentUnavailableError, RayActorError)) or isinstance(unwrap(e), APIError):
        raise e
    raise StageFailed(stage, e) from e


async def named_stage(response, stage: str):
    try:
        return await response
    except Exception as e:  # asyncio.CancelledError is not an Exception: it passes as it is
        raise_from_stage(e, stage)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (server.max_body_bytes)", code="request_too_large",
                    type="invalid_request_error")


def error_body(e: APIError) -> dict:
    """The error as OpenAI shapes it; its message ends with the request id (also the x-request-id header)."""
    body = e.body()
    rid = current_request_id()
    if rid not in body["error"]["message"]:
        body["error"]["message"] += f" (request id {rid})"
    return body


def error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=error_body(e), headers=headers or None)


# Module-level (not closures), so that Serve pickles the FastAPI app with references to them.
async def api_error_handler(_: Request, e: APIError):
    return error_response(e)


async def validation_error_handler(_: Request, e: RequestValidationError):
    errors = e.errors()
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if err.get("type") == "json_invalid":
        return error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
    param = param_from_pydantic_loc(tuple(err.get("loc", ())))
    msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    return error_response(APIError(400, msg, param=param, code="invalid_value"))


async def http_error_handler(request: Request, e: StarletteHTTPException):
    if isinstance(e.__cause__, BodyTooLarge):  # FastAPI turns any error reading the body into a 400
        return error_response(too_large(e.__cause__.limit))
    code, type_ = _HTTP_CODES.get(e.status_code, ("http_error", "invalid_request_error" if e.status_code < 500 else "server_error"))
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}.get(
        e.status_code, str(e.detail))
    return error_response(APIError(e.status_code, message, code=code, type=type_), headers=dict(e.headers or {}))


async def unhandled_error_handler(_: Request, e: Exception):
    if isinstance(e, BodyTooLarge):
        return error_response(too_large(e.limit))
    return error_response(internal_error("the server failed to handle the request", e))


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(APIError, api_error_handler)
    api.add_exception_handler(RequestValidationError, validation_error_handler)
    api.add_exception_handler(StarletteHTTPException, http_error_handler)
    api.add_exception_handler(Exception, unhandled_error_handler)
