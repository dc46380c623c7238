"""`stream: true`: OpenAI's image streaming as Server-Sent Events, from the ingress's per-image events.

Each event is `event: <type>` plus `data: <json>` whose `type` repeats it; `<prefix>` is `image_generation`
(POST /v1/images/generations) or `image_edit` (POST /v1/images/edits):

- `<prefix>.progress` (ours; OpenAI's SDK passes it through): `image_index`, `stage` (`encoding`, `queued`
  with `queue_position`, the requests ahead of it at the DiT, `denoising` with `step` of `steps`, `decoding`);
- `<prefix>.partial_image` (OpenAI's ImageGenPartialImageEvent / ImageEditPartialImageEvent): `b64_json`,
  `partial_image_index`, `size`, `output_format`, `created_at`, `background`, `quality`, and ours:
  `image_index`, `seed`, `step`, `steps`;
- `<prefix>.completed` (ImageGenCompletedEvent / ImageEditCompletedEvent), one per image, after all images
  are done: `b64_json`, `size`, `output_format`, `created_at`, `background`, `quality`, `usage` (zeros: this
  model is not billed by tokens), and ours: `image_index`, `seed`, `timings`, `revised_prompt`;
- `error` with `{"error": {message, type, param, code}}` if the request fails after the stream started (the
  SDK raises it as an APIError); a request that fails its checks never starts a stream (a 4xx JSON answer).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import AsyncIterator, Awaitable, Callable

import numpy as np
import torch
from PIL import Image

from serve_app.config import ServerConfig
from serve_app.errors import internal_error, raise_from_stage
from serve_app.image_encoding import encode_image
from serve_app.openai_api import APIError, ValidatedRequest

_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0, "total_tokens": 0}


def progress(image_index: int, stage: str, step: int, steps: int, queue_position: int | None = None) -> dict:
    ev = {"type": "progress", "image_index": image_index, "stage": stage, "step": step, "steps": steps}
    if queue_position is not None:
        ev["queue_position"] = queue_position
    return ev


def _common(req: ValidatedRequest) -> dict:
    return {"created_at": int(time.time()), "size": f"{req.width}x{req.height}", "output_format": req.output_format,
            "background": "opaque", "quality": "auto"}


def partial_image(image_index: int, seed: int, partial_index: int, step: int, steps: int, image: bytes, req: ValidatedRequest) -> dict:
    return {"type": "partial_image", "b64_json": base64.b64encode(image).decode("ascii"), "partial_image_index": partial_index,
            **_common(req), "image_index": image_index, "seed": seed, "step": step, "steps": steps}


def encode_preview(pixels: torch.Tensor, width: int, height: int, fmt: str, server: ServerConfig) -> bytes:
    """A preview (uint8 RGB, latent or full resolution) at the image's size, in its output format."""
    image = Image.fromarray(np.ascontiguousarray(pixels.numpy()), mode="RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return encode_image(np.asarray(image), fmt, server)


def format_event(prefix: str, event: dict) -> bytes:
    kind = event["type"] if event["type"] == "error" else f"{prefix}.{event['type']}"
    return f"event: {kind}\ndata: {json.dumps({**event, 'type': kind}, separators=(',', ':'))}\n\n".encode()


async def stage_stream(stream, stage: str) -> AsyncIterator:
    """A stage's streaming response, its failures sorted as `errors.named_stage` sorts an awaited one."""
    it = stream.__aiter__()
    while True:
        try:
            item = await it.__anext__()
        except StopAsyncIteration:
            return
        except Exception as e:
            raise_from_stage(e, stage)
        yield item


async def sse(run: Callable[[Callable[[dict], None]], Awaitable[dict]], req: ValidatedRequest, prefix: str) -> AsyncIterator[bytes]:
    """Run `run(emit)` (the ingress's pipeline) and stream what it emits, then the completed images. When
    the client goes away Serve cancels this generator, and with it the pipeline (which frees its work)."""
    events: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(run(events.put_nowait))
    try:
        while not task.done():
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                yield format_event(prefix, get.result())
            else:
                get.cancel()
        while not events.empty():
            yield format_event(prefix, events.get_nowait())
        try:
            result = task.result()
        except APIError as e:
            yield format_event(prefix, {"type": "error", **e.body()})
            return
        except Exception as e:  # the pipeline maps its failures to APIError; anything else is ours
            yield format_event(prefix, {"type": "error", **internal_error("streaming failed", e).body()})
            return
        for i, item in enumerate(result["data"]):
            b64 = await asyncio.to_thread(base64.b64encode, item["image"])
            yield format_event(prefix, {
                "type": "completed", "b64_json": b64.decode("ascii"), **_common(req), "usage": _USAGE,
                "image_index": i, "seed": item["seed"], "timings": item["timings"], "revised_prompt": item.get("revised_prompt"),
            })
    finally:
        if not task.done():
            task.cancel()
