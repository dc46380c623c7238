"""What the DiT's geometry allows, from its configuration alone (no weights, no diffusers import: the
ingress checks prompts and sizes with it before any stage sees them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.stage_messages import DenoiseRequest

VAE_SCALE_FACTOR = 8  # Flux VAE: 2 ** (len(block_out_channels) - 1)
PIXELS_PER_LATENT_PATCH = VAE_SCALE_FACTOR * 2  # the DiT patchifies latents 2x2
CAPTION_PAD = 32  # Z-Image pads each caption to a multiple of 32 tokens (its pad token is attended)


def position_limits(transformer_config: dict) -> tuple[int, int, int]:
    """(caption tokens, latent-patch rows, latent-patch columns) that the DiT's RoPE tables hold.

    A caption of L tokens is padded to a multiple of CAPTION_PAD and takes positions 1..L' on the first
    axis; the image then sits at position L' + 1 on it; rows and columns take 0..H-1 / 0..W-1 on the
    others. Past these, diffusers indexes out of its tables (IndexError inside the forward)."""
    first, rows, cols = transformer_config["axes_lens"]
    return (first - 2) // CAPTION_PAD * CAPTION_PAD, rows, cols


def check_positions(r: DenoiseRequest, limits: tuple[int, int, int]) -> None:
    """Raise ValueError for a request the DiT's position tables cannot hold."""
    max_tokens, rows, cols = limits
    for what, e in (("prompt", r.embeds), ("negative prompt", r.negative_embeds)):
        if e is not None and e.shape[0] > max_tokens:
            raise ValueError(f"the {what} is {e.shape[0]} tokens; the model takes at most {max_tokens}")
    if r.height // PIXELS_PER_LATENT_PATCH > rows or r.width // PIXELS_PER_LATENT_PATCH > cols:
        raise ValueError(f"the model takes images of at most {rows * PIXELS_PER_LATENT_PATCH}x{cols * PIXELS_PER_LATENT_PATCH} (HxW)")
