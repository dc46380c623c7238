"""The OpenAPI schema as the server behaves: errors are 400 (never FastAPI's 422) and OpenAI-shaped, and
every limit the server enforces is stated on its field, generated from the running config (`server.*`,
`denoiser.max_steps`, the model's prompt limit in tokens)."""

from __future__ import annotations

import copy
import types
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serve_app.config import AppConfig

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "code": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}},
}
_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
ERRORS = {
    "400": "invalid input: the body is not JSON, a field is missing, of the wrong type or out of its bounds (`param` names it)",
    "404": "no such route", "405": "method not allowed on this route",
    "413": "the request body is larger than server.max_body_bytes",
    "429": "server.max_inflight_images are in flight", "500": "a stage failed; the message carries a request id",
    "503": "a stage's queue is full (`overloaded`), a stage is unavailable, or its worker died (`worker_died`); retry",
    "504": "the request took longer than server.request_timeout_s",
    "401": "no API key, or not one of the server's (`invalid_api_key`): send `Authorization: Bearer <key>`",
}


def _constrain(prop: dict, **bounds: Any) -> None:
    """Put bounds on a property, on its non-null branch when it is optional (anyOf [..., null])."""
    target = next((b for b in prop.get("anyOf", []) if b.get("type") not in (None, "null")), prop)
    target.update(bounds)


def build_schema(api: FastAPI, cfg: AppConfig, max_prompt_tokens: int | None) -> dict:
    s, server = cfg.server, cfg.server
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps["Error"] = copy.deepcopy(ERROR_SCHEMA)
    from serve_app.api_keys import ApiKeys

    keys_on = bool(ApiKeys.digests)
    if keys_on:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = ["404", "405", "500"] + (["400", "413", "429", "503", "504"] if method == "post" else [])
            if path.startswith("/health"):
                codes.append("503")
            if keys_on and not path.startswith("/health"):  # serve_app/api_keys.py: every route but the probes
                codes.append("401")
                op["security"] = [{"bearer": []}]
            for code in codes:
                responses[code] = {"description": ERRORS[code], **copy.deepcopy(_ERR)}
            if path in ("/v1/images/generations", "/v1/images/edits") and "200" in responses:
                # stream: true answers with Server-Sent Events (serve_app/streaming.py)
                responses["200"].setdefault("content", {})["text/event-stream"] = {"schema": {
                    "type": "string", "description": "with stream: true, Server-Sent Events: <prefix>.progress, <prefix>.partial_image "
                    "(partial_images of them per image), <prefix>.completed per image, or error; <prefix> is image_generation or image_edit"}}
    req = comps.get("ImageGenerationRequest", {}).get("properties", {})
    tokens = f", and at most {max_prompt_tokens} tokens with the chat template" if max_prompt_tokens else ""
    if req:
        _constrain(req["prompt"], minLength=1, maxLength=s.max_prompt_chars)
        req["prompt"]["description"] = f"What to draw: not blank, at most {s.max_prompt_chars} characters{tokens}."
        _constrain(req["negative_prompt"], maxLength=s.max_prompt_chars)
        _constrain(req["n"], minimum=1, maximum=s.max_n)
        _constrain(req["size"], pattern=r"^[0-9]+x[0-9]+$", maxLength=s.max_string_chars)
        req["size"]["description"] = (f"'WIDTHxHEIGHT', each a multiple of {s.size_multiple} between {s.min_size} and {s.max_size}"
                                      f" (default {s.default_size}).")
        _constrain(req["num_inference_steps"], minimum=1, maximum=cfg.denoiser.max_steps)
        _constrain(req["guidance_scale"], minimum=0, maximum=20)
        _constrain(req["seed"], minimum=0, maximum=2**63 - server.max_n - 1)
        for f in ("model", "quality", "style", "user"):
            _constrain(req[f], maxLength=s.max_string_chars)
        lora = cfg.lora
        if "lora" in req:
            req["lora"]["description"] = (
                ("LoRA adapters from GET /v1/loras: one name (scale 1), or a list of {name, scale} applied together"
                 f" (at most {lora.max_adapters_per_request}, |scale| <= {lora.max_abs_scale}).") if lora.enabled
                else "This server serves no LoRA adapters: only null or [] is accepted.")
    schema["info"]["x-limits"] = {
        "max_body_bytes": s.max_body_bytes, "max_prompt_chars": s.max_prompt_chars, "max_prompt_tokens": max_prompt_tokens,
        "max_string_chars": s.max_string_chars, "max_n": s.max_n, "min_size": s.min_size, "max_size": s.max_size,
        "size_multiple": s.size_multiple, "max_steps": cfg.denoiser.max_steps, "max_inflight_images": s.max_inflight_images,
        "request_timeout_s": s.request_timeout_s,
        "lora_max_adapters_per_request": cfg.lora.max_adapters_per_request if cfg.lora.enabled else 0,
        "lora_max_abs_scale": cfg.lora.max_abs_scale,
    }
    return schema


class Settings:
    """Set by the ingress replica from its config (a class, so that it is shared by reference with the
    copy of the FastAPI app that Serve pickles and serves)."""

    cfg: AppConfig | None = None
    max_prompt_tokens: int | None = None
    schema: dict | None = None


def configure(cfg: AppConfig, max_prompt_tokens: int | None) -> None:
    Settings.cfg, Settings.max_prompt_tokens, Settings.schema = cfg, max_prompt_tokens, None


def served_openapi(app: FastAPI) -> dict:
    if Settings.cfg is None:
        return FastAPI.openapi(app)
    if Settings.schema is None:
        Settings.schema = build_schema(app, Settings.cfg, Settings.max_prompt_tokens)
    return Settings.schema


def install_openapi(api: FastAPI) -> None:
    """FastAPI's /openapi.json and /docs call api.openapi(): make it ours (a bound module-level function,
    which pickles with the app)."""
    api.openapi = types.MethodType(served_openapi, api)
