"""What travels between the deployments: CPU tensors only (never CUDA tensors), in the dtype they
were computed in (bf16 embeddings are half the bytes of fp32), plus each stage's timings so the
ingress can report where a request's time went."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor  # [tokens, hidden], CPU
    timings: dict = field(default_factory=dict)
    # prompts encoded in the same text-encoder batch: their requests reach the DiT together, so with
    # more than one the DiT waits up to its batch_wait_timeout_s for the others
    batch: int = 1


@dataclass
class DenoiseJob:
    """The per-image parameters; the prompt's embeddings travel beside it as an EncodedPrompt."""

    height: int
    width: int
    steps: int
    seed: int
    guidance_scale: float = 0.0
    # images in the request this job belongs to: with more than one, the DiT waits up to its
    # batch_wait_timeout_s for the others so that they share forwards
    burst: int = 1


@dataclass
class DenoisedLatents:
    latents: torch.Tensor  # [C, h, w] float32, CPU
    timings: dict = field(default_factory=dict)


@dataclass
class DecodedImage:
    pixels: torch.Tensor  # uint8 [H, W, 3], CPU
    timings: dict = field(default_factory=dict)
