"""Uploaded images of /v1/images/edits: parsing and the checks against hostile input (Ray-free).

Every failure is an `APIError` naming the field (`image` or `mask`), never a crash:
  - more than `server.max_upload_bytes` bytes: 413
  - not PNG / JPEG / WebP (the mask: not PNG), or bytes that are no image: 400
  - more than `server.max_upload_pixels` pixels: 400, decided from the header (Image.open reads only
    the header; nothing is decoded), so a decompression bomb costs a few KB of parsing
  - a truncated or corrupt file: 400 when decoding fails (Pillow's LOAD_TRUNCATED_IMAGES stays off)
  - animated / multi-frame files (APNG, animated WebP): the first frame is used
  - EXIF orientation is applied; CMYK, 16-bit, palette, grayscale and alpha images become 8-bit RGB
    (the image's alpha channel is dropped: only `mask` says where to paint)
  - the mask must carry transparency (an alpha channel, or a palette / tRNS transparency) and, after its
    own EXIF orientation, have the image's size: 400 otherwise
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.config import ServerConfig
from serve_app.engines.edit_inputs import fit_size, image_pixels, latent_mask, openai_mask
from serve_app.openai_api import APIError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MASK_FORMATS = ("PNG",)
_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def _bad(field: str, message: str, code: str = "invalid_image", status: int = 400) -> APIError:
    return APIError(status, f"{field}: {message}", param=field, code=code, type="invalid_request_error")


def open_header(data: bytes, field: str, server: ServerConfig, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """The opened, not yet decoded image, after the byte, format and pixel-count checks."""
    if len(data) > server.max_upload_bytes:
        raise _bad(field, f"the file is larger than {server.max_upload_bytes} bytes", code="payload_too_large", status=413)
    if not data:
        raise _bad(field, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad(field, f"the image has more than {server.max_upload_pixels} pixels", code="image_too_large") from None
    except UnidentifiedImageError:
        raise _bad(field, f"not a {' / '.join(formats)} image") from None
    except Exception as e:  # a header Pillow cannot parse
        raise _bad(field, f"unreadable image ({type(e).__name__})") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > server.max_upload_pixels:
        raise _bad(field, f"the image is {w}x{h}, more than {server.max_upload_pixels} pixels", code="image_too_large")
    return img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from what the header gave (a PNG's eXIf chunk after the
    pixel data is not read here; the decode still applies it)."""
    w, h = img.size
    try:
        exif = img.getexif() if (img.format != "PNG" or "exif" in img.info) else {}
        orientation = exif.get(_ORIENTATION, 1)
    except Exception:
        orientation = 1
    return (h, w) if orientation in _SWAPS_SIDES else (w, h)


def _decode(img: Image.Image, field: str) -> Image.Image:
    """Decode the first frame and apply EXIF orientation."""
    try:
        img.seek(0)
        img.load()
        out = ImageOps.exif_transpose(img)
        out.load()
        return out
    except Exception as e:  # truncated or corrupt data
        raise _bad(field, f"the image could not be decoded ({type(e).__name__}: {str(e)[:100]})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale: scale, do not clip
        a = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _alpha(img: Image.Image, field: str) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img.convert("RGBA").getchannel("A")
    if img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info:
        return img.convert("RGBA").getchannel("A")
    raise _bad(field, "the mask has no transparency: its transparent pixels mark where to edit")


def output_size(image_bytes: bytes, server: ServerConfig) -> tuple[int, int]:
    """The output size of an edit that gives none: the image's (oriented) size fitted by `fit_size`."""
    w, h = oriented_size(open_header(image_bytes, "image", server))
    return fit_size(w, h, server.min_size, server.max_size, server.size_multiple)


@dataclass
class EditInputs:
    pixels: torch.Tensor  # uint8 [height, width, 3]
    mask: torch.Tensor | None  # uint8 [height/8, width/8], 1 = repaint; None: image-to-image


def load_edit_inputs(image_bytes: bytes, mask_bytes: bytes | None, width: int, height: int, server: ServerConfig) -> EditInputs:
    """Decode, check and resize an edit's uploads to (width, height) (CPU work: run it in a thread)."""
    image = _decode(open_header(image_bytes, "image", server), "image")
    pixels = image_pixels(_to_rgb(image), width, height)
    if mask_bytes is None:
        return EditInputs(pixels, None)
    mask_img = _decode(open_header(mask_bytes, "mask", server, MASK_FORMATS), "mask")
    if mask_img.size != image.size:
        raise _bad(field="mask", message=f"the mask is {mask_img.size[0]}x{mask_img.size[1]}, the image {image.size[0]}x{image.size[1]}: they must be the same size")
    return EditInputs(pixels, latent_mask(openai_mask(_alpha(mask_img, "mask")), width, height))
