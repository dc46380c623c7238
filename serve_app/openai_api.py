"""The OpenAI-compatible images API: request schema, validation against the server's limits, and
errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import LoraConfig, ServerConfig


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded", 504: "timeout"}.get(status, "server_error")

    def __reduce__(self):  # crosses process boundaries (handle API callers) intact
        return (APIError, (self.status, self.message, self.param, self.code, self.type))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class LoraRef(BaseModel):
    """One LoRA adapter of a request and its scale (diffusers' `set_adapters(..., adapter_weights=)`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="An adapter name from GET /v1/loras.")
    scale: float = Field(1.0, description="Its weight: 0 turns it off, 1 is the adapter as trained.")


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations. Fields past `user` are the extensions SGLang-diffusion users know."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(None, description="Model name from GET /v1/models.")
    n: int = Field(1, description="Number of images; fanned out with consecutive seeds so they batch.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT', multiples of 16.", examples=["1024x1024"])
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] | None = None
    quality: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    style: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    user: str | None = None
    seed: int | None = Field(None, description="Seed of the first image; image i uses seed + i.")
    num_inference_steps: int | None = Field(None, description="DiT forwards (Turbo: 8).")
    guidance_scale: float = Field(0.0, description="Classifier-free guidance; 0 (Turbo's default) turns it off.")
    negative_prompt: str | None = None
    lora: str | list[LoraRef] | None = Field(
        None, description="LoRA adapters from GET /v1/loras: one name (scale 1), or a list of {name, scale} applied together.",
        examples=["tiny-demo", [{"name": "tiny-demo", "scale": 0.8}]])
    style_preset: str | None = Field(None, description="A style from GET /v1/styles (id or name): its template wraps the prompt; "
                                     "the prompt used comes back as `revised_prompt`.")
    stream: bool = Field(False, description="Answer with Server-Sent Events as OpenAI streams images: `image_generation.partial_image` "
                         "events (`image_edit.*` for edits), `*.progress` events per step, then `*.completed` per image.")
    partial_images: int | None = Field(None, description="Streaming: previews (0-3) of each image before the completed event, spread over "
                                       "its steps; fewer when it runs fewer steps.")
    preview_kind: Literal["latent_rgb", "vae"] | None = Field(None, description="How a preview is made: `latent_rgb` (default), a linear map of "
                                                               "the latent estimate, or `vae`, the estimate decoded by the VAE (slower).")
    background: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    moderation: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    output_compression: int | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits, less its files (`image`, `mask`): the generation fields plus `strength`.
    Without `size`, the output has the input's size fitted to the server's bounds (serve_app/uploads.py)."""

    strength: float | None = Field(
        None, description="0 < strength <= 1: how much of the schedule runs. Default: diffusers' own, 0.6 without a mask "
        "(ZImageImg2ImgPipeline), 1.0 with one (ZImageInpaintPipeline).")
    input_fidelity: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")


class ValidatedRequest(BaseModel):
    prompt: str
    n: int
    width: int
    height: int
    output_format: str
    seed: int | None
    steps: int
    guidance_scale: float
    negative_prompt: str | None
    strength: float | None = None  # edits only
    lora: tuple[tuple[str, float], ...] = ()  # ((adapter name, scale), ...)
    revised_prompt: str | None = None  # the prompt as the style preset made it (None without one)
    stream: bool = False
    partial_images: int = 0
    preview_kind: str = "latent_rgb"


# The Z-Image-Turbo Space's style presets, as prompt templates: `{prompt}` is the caller's prompt.
# GET /v1/styles lists them; `style_preset` (id or name, any case) applies one on generations and edits.
STYLE_PRESETS: dict[str, tuple[str, str]] = {  # id -> (name, template)
    "none": ("None", "{prompt}"),
    "photorealistic": ("Photorealistic", "{prompt}, photorealistic, ultra detailed, natural lighting, sharp focus, 8k photograph"),
    "cinematic": ("Cinematic", "{prompt}, cinematic still, dramatic lighting, shallow depth of field, film grain, anamorphic"),
    "anime": ("Anime", "{prompt}, anime style, cel shading, vibrant colors, clean line art"),
    "digital-art": ("Digital Art", "{prompt}, digital art, highly detailed, concept art, trending on artstation"),
    "oil-painting": ("Oil Painting", "{prompt}, oil painting on canvas, visible brush strokes, rich colors, classical"),
    "watercolor": ("Watercolor", "{prompt}, watercolor painting, soft washes, paper texture, delicate"),
    "3d-render": ("3D Render", "{prompt}, 3d render, octane render, global illumination, studio lighting"),
    "fantasy": ("Fantasy", "{prompt}, fantasy art, magical atmosphere, epic, intricate details"),
    "sci-fi": ("Sci-Fi", "{prompt}, science fiction, futuristic, neon lights, high tech"),
}
_STYLE_LOOKUP = {k: k for k in STYLE_PRESETS} | {name.lower(): k for k, (name, _) in STYLE_PRESETS.items()}


def styles_list() -> dict:
    return {"object": "list", "data": [{"id": k, "object": "style_preset", "name": name, "template": t} for k, (name, t) in STYLE_PRESETS.items()]}


def apply_style(prompt: str, style_preset: str | None) -> str:
    """The prompt the model gets; 400 naming `style_preset` for one we do not have."""
    if style_preset is None:
        return prompt
    key = _STYLE_LOOKUP.get(style_preset.strip().lower())
    if key is None:
        raise APIError(400, f"unknown style_preset {style_preset[:64]!r}; GET /v1/styles lists them: {', '.join(STYLE_PRESETS)}",
                       param="style_preset", code="invalid_value")
    return STYLE_PRESETS[key][1].replace("{prompt}", prompt)


MAX_PARTIAL_IMAGES = 3  # OpenAI's bound

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def validate_request(req: ImageGenerationRequest, server: ServerConfig, model_name: str, max_steps: int, default_steps: int) -> ValidatedRequest:
    if not req.prompt.strip():
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if len(req.prompt) > server.max_prompt_chars:
        raise APIError(400, f"prompt is longer than {server.max_prompt_chars} characters", param="prompt", code="invalid_value")
    if req.negative_prompt is not None and len(req.negative_prompt) > server.max_prompt_chars:
        raise APIError(400, f"negative_prompt is longer than {server.max_prompt_chars} characters", param="negative_prompt", code="invalid_value")
    for name in ("model", "size", "quality", "style", "user", "style_preset", "background", "moderation"):
        value = getattr(req, name)
        if value is not None and len(value) > server.max_string_chars:
            raise APIError(400, f"{name} is longer than {server.max_string_chars} characters", param=name, code="invalid_value")
    if req.model is not None and req.model != model_name:
        raise APIError(400, f"unknown model {req.model!r}; this server serves {model_name!r}", param="model", code="model_not_found")
    if not 1 <= req.n <= server.max_n:
        raise APIError(400, f"n must be between 1 and {server.max_n}", param="n", code="invalid_value")
    size = req.size or server.default_size
    m = _SIZE.match(size)
    if not m:
        raise APIError(400, f"size must look like '1024x1024', got {size!r}", param="size", code="invalid_value")
    width, height = int(m.group(1)), int(m.group(2))
    for v in (width, height):
        if v % server.size_multiple or not server.min_size <= v <= server.max_size:
            raise APIError(
                400,
                f"size {size!r}: width and height must be multiples of {server.size_multiple} between {server.min_size} and {server.max_size}",
                param="size",
                code="invalid_value",
            )
    steps = req.num_inference_steps if req.num_inference_steps is not None else default_steps
    if not 1 <= steps <= max_steps:
        raise APIError(400, f"num_inference_steps must be between 1 and {max_steps}", param="num_inference_steps", code="invalid_value")
    if not 0.0 <= req.guidance_scale <= 20.0:
        raise APIError(400, "guidance_scale must be between 0 and 20", param="guidance_scale", code="invalid_value")
    if req.seed is not None and not 0 <= req.seed < 2**63 - server.max_n:
        raise APIError(400, "seed must be a non-negative 63-bit integer", param="seed", code="invalid_value")
    if req.partial_images is not None and not 0 <= req.partial_images <= MAX_PARTIAL_IMAGES:
        raise APIError(400, f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}", param="partial_images", code="invalid_value")
    prompt = apply_style(req.prompt, req.style_preset)
    if len(prompt) > server.max_prompt_chars:
        raise APIError(400, f"prompt with its style_preset is longer than {server.max_prompt_chars} characters", param="prompt", code="invalid_value")
    return ValidatedRequest(
        prompt=prompt,
        revised_prompt=prompt if req.style_preset is not None else None,
        stream=req.stream,
        partial_images=req.partial_images or 0,
        preview_kind=req.preview_kind or "latent_rgb",
        n=req.n,
        width=width,
        height=height,
        output_format=req.output_format or server.default_output_format,
        seed=req.seed,
        steps=steps,
        guidance_scale=req.guidance_scale,
        negative_prompt=req.negative_prompt,
    )


def validate_edit_request(req: ImageEditRequest, server: ServerConfig, model_name: str, max_steps: int, default_steps: int,
                          has_mask: bool = False) -> ValidatedRequest:
    """`validate_request`'s checks (with `size` already set: given, or fitted to the upload), and the
    strength: 0 < strength <= 1 and at least one step of the schedule runs (diffusers refuses 0 steps)."""
    out = validate_request(req, server, model_name, max_steps, default_steps)
    strength = req.strength if req.strength is not None else (1.0 if has_mask else 0.6)
    if not 0.0 < strength <= 1.0:
        raise APIError(400, "strength must be greater than 0 and at most 1", param="strength", code="invalid_value")
    if int(max(out.steps - min(out.steps * strength, out.steps), 0)) >= out.steps:
        raise APIError(400, f"strength {strength} with {out.steps} steps runs no step", param="strength", code="invalid_value")
    out.strength = strength
    return out


def validate_lora(value: str | list | None, cfg: LoraConfig, folder) -> tuple[tuple[str, float], ...]:
    """The request's `lora` as ((name, scale), ...): each a name of an adapter inside `folder` (never a path:
    `..`, absolute paths and symlinks out of the folder are unknown names), no name twice, at most
    `lora.max_adapters_per_request`, each |scale| <= `lora.max_abs_scale`. 400 naming `lora` otherwise."""
    import math

    from serve_app.engines.lora import UnknownAdapter, resolve_adapter

    if value is None or value == []:
        return ()
    if not cfg.enabled:
        raise APIError(400, "this server serves no LoRA adapters", param="lora", code="lora_not_found")
    try:
        refs = [LoraRef(name=value)] if isinstance(value, str) else [v if isinstance(v, LoraRef) else LoraRef.model_validate(v) for v in value]
    except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise APIError(400, f"lora must be an adapter name or a list of {{name, scale}}: {e}", param="lora", code="invalid_value") from None
    if len(refs) > cfg.max_adapters_per_request:
        raise APIError(400, f"at most {cfg.max_adapters_per_request} LoRA adapters per request", param="lora", code="invalid_value")
    if len({r.name for r in refs}) < len(refs):
        raise APIError(400, "a LoRA adapter is named twice", param="lora", code="invalid_value")
    out = []
    for r in refs:
        if not math.isfinite(r.scale) or abs(r.scale) > cfg.max_abs_scale:
            raise APIError(400, f"a LoRA scale must be between -{cfg.max_abs_scale} and {cfg.max_abs_scale}", param="lora", code="invalid_value")
        try:
            resolve_adapter(folder, r.name)
        except UnknownAdapter as e:
            raise APIError(400, str(e), param="lora", code="lora_not_found") from None
        out.append((r.name, float(r.scale)))
    return tuple(out)


def parse_lora_form(value: str | None):
    """A multipart `lora` field: an adapter name, or the JSON list a JSON body would carry."""
    import json

    if value is None or not value.lstrip().startswith("["):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise APIError(400, "lora: not a name and not a JSON list of {name, scale}", param="lora", code="invalid_value") from None


def warmup_size(server: ServerConfig) -> str:
    """What `/health` warms up with: the smallest square the server accepts (at least 64 px a side)."""
    return f"{server.smallest_side}x{server.smallest_side}"


def param_from_pydantic_loc(loc: tuple) -> str | None:
    """('body', 'n') -> 'n'; a body that is not an object -> None. The request's own field, never the
    branch of a union pydantic tried (('body', 'lora', 'list[LoraRef]', 0, 'scale') -> 'lora')."""
    parts = [str(p) for p in loc if p != "body"]
    if parts and parts[0] in ImageEditRequest.model_fields:
        return parts[0]
    return ".".join(parts) or None
