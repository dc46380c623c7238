"""The inputs of an edit as diffusers' Z-Image img2img / inpaint pipelines prepare them (Ray-free).

  fit_size      the output size when a request gives none: the input's aspect ratio, scaled into the
                server's [min_size, max_size] bounds, each side rounded down to a multiple of 16
  image_pixels  the image resized to the output size as VaeImageProcessor.resize does (PIL, Lanczos;
                no resize when the size is already right), as uint8 [H, W, 3]; the VAE stage
                normalises it (x / 255 * 2 - 1 in float32, as VaeImageProcessor.preprocess)
  openai_mask   OpenAI's mask convention (transparent = paint) as diffusers' (white = paint): 255 - alpha
  latent_mask   ZImageInpaintPipeline's mask: resized as the image (Lanczos, in "L"), / 255, binarised
                at 0.5, then nearest-neighbour down to the latent grid; uint8 [H/8, W/8], 1 = repaint
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from serve_app.engines.dit_positions import PIXELS_PER_LATENT_PATCH as SIZE_MULTIPLE  # VaeImageProcessor(vae_scale_factor=16) in diffusers


def fit_size(width: int, height: int, min_size: int, max_size: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(width, height) of an edit whose request gives no size: scale s = min(1, max_size / longer side),
    then s = max(s, min_size / shorter side) (so a thin input is enlarged before it is cropped by the
    bounds), each side w*s, h*s rounded down to `multiple` and clamped to the bounds (rounded inward to
    `multiple`). An input already within bounds keeps its size, rounded down to 16 as diffusers does."""
    lo = -(-min_size // multiple) * multiple
    hi = max_size // multiple * multiple
    s = min(1.0, max_size / max(width, height))
    s = max(s, min_size / min(width, height))
    fit = lambda v: max(lo, min(hi, int(v * s) // multiple * multiple))
    return fit(width), fit(height)


def image_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """uint8 [height, width, 3] of an RGB image, resized as VaeImageProcessor.resize resizes it."""
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB, got {image.mode}")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def openai_mask(alpha: Image.Image) -> Image.Image:
    """An "L" mask, 255 where the image is repainted, from an alpha channel (0 = transparent = repaint)."""
    return Image.fromarray(255 - np.asarray(alpha.convert("L"), dtype=np.uint8), mode="L")


def latent_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """uint8 [height/8, width/8], 1 where the latent is repainted: ZImageInpaintPipeline's
    mask_processor.preprocess(mask, height, width) then interpolate(mode="nearest") to the latent grid."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    m = torch.from_numpy(np.array(mask.convert("L")).astype(np.float32) / 255.0)[None, None]
    m = (m >= 0.5).float()
    lh, lw = 2 * (height // SIZE_MULTIPLE), 2 * (width // SIZE_MULTIPLE)
    m = torch.nn.functional.interpolate(m, size=(lh, lw), mode="nearest")
    return m[0, 0].to(torch.uint8)
