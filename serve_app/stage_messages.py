"""What travels between the deployments: CPU tensors only (never CUDA tensors), in the dtype they were
computed in (bf16 embeddings are half the bytes of fp32), plus each stage's timings so the ingress can
report where a request's time went. `DenoiseRequest` is also what the DiT engines take."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor  # [tokens, hidden], CPU
    timings: dict = field(default_factory=dict)
    batch: int = 1  # prompts encoded in the same text-encoder batch (they reach the DiT together)


@dataclass
class DenoiseRequest:
    """One image for the DiT: the prompt's embeddings and the image's parameters."""

    embeds: torch.Tensor  # [tokens, hidden] for the prompt
    height: int
    width: int
    steps: int
    seed: int
    guidance_scale: float = 0.0
    negative_embeds: torch.Tensor | None = None  # required when guidance_scale > 0
    # images known to reach the DiT together with this one (the request's n, or prompts the text
    # encoder batched together): above 1 the DiT waits up to its batch_wait_timeout_s for them
    companions: int = 1

    @property
    def batch_key(self) -> tuple[int, int, int]:
        """Requests share a DiT forward only when this is equal: same latent shape, same schedule."""
        return (self.height, self.width, self.steps)


@dataclass
class DenoisedLatents:
    latents: torch.Tensor  # [C, h, w] float32, CPU
    timings: dict = field(default_factory=dict)


@dataclass
class DecodedImage:
    pixels: torch.Tensor  # uint8 [H, W, 3], CPU
    timings: dict = field(default_factory=dict)
