"""uint8 RGB pixels -> PNG / JPEG / WebP bytes (Pillow releases the GIL while compressing, so this
runs in a worker thread off the event loop)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from serve_app.config import ServerConfig

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(pixels: np.ndarray, fmt: str, server: ServerConfig) -> bytes:
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=server.png_compress_level)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=server.jpeg_quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=server.webp_quality, method=0)
    else:
        raise ValueError(f"unknown output_format {fmt!r}")
    return buf.getvalue()
