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
    # image-to-image (ZImageImg2ImgPipeline): the encoded image, [C, h, w] CPU in the VAE's dtype, and
    # how much of the schedule runs (0 < strength <= 1); inpainting (ZImageInpaintPipeline) adds `mask`,
    # [h, w] uint8 at latent resolution, 1 where the image is repainted
    image_latents: torch.Tensor | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None
    # LoRA adapters, ((name, scale), ...) in the request's order (serve_app/engines/lora.py); () for none
    lora: tuple[tuple[str, float], ...] = ()
    # streaming (serve_app/engines/previews.py): after which of the steps that run (1-based) a preview of
    # x0 is made, and of which kind; only requests that stream set these, the others cost nothing extra
    preview_steps: tuple[int, ...] = ()
    preview_kind: str = "latent_rgb"

    @property
    def start_step(self) -> int:
        """The first of the schedule's `steps` that runs, as diffusers' img2img `get_timesteps` computes it:
        int(steps - min(steps * strength, steps)); 0 for text-to-image."""
        if self.image_latents is None:
            return 0
        return int(max(self.steps - min(self.steps * self.strength, self.steps), 0))

    @property
    def run_steps(self) -> int:
        """The DiT forwards this request runs: steps - start_step."""
        return self.steps - self.start_step

    @property
    def batch_key(self) -> tuple:
        """Requests share a DiT forward only when this is equal: same latent shape, same schedule, same
        first step (so the same timesteps run; an edit at strength 1 batches with text-to-image), and the
        same LoRA adapters at the same scales (one adapter set per forward)."""
        return (self.height, self.width, self.steps, self.start_step, tuple(self.lora))


@dataclass
class ImageToEncode:
    """An edit's input for the VAE encoder: uint8 pixels (a quarter of fp32's bytes) and the seeds of
    its images (one posterior sample each)."""

    pixels: torch.Tensor  # uint8 [H, W, 3], CPU
    seeds: list[int]


@dataclass
class EncodedImage:
    """The VAE-encoded input of an edit: one latent sample per seed, [C, h, w] CPU in the VAE's dtype."""

    latents: list[torch.Tensor]
    timings: dict = field(default_factory=dict)


@dataclass
class DenoiseProgress:
    """What a streaming denoise call yields before its `DenoisedLatents`: its place in the DiT's queue
    (`queue_position`: requests ahead of it, when it was queued), or a step done (`step` of `steps`), with a
    preview for the steps in `DenoiseRequest.preview_steps`: uint8 RGB [h/8, w/8, 3] (`latent_rgb`) or the
    x0 latents [C, h, w] float32 (`vae`, for the VAE stage to decode). CPU tensors."""

    step: int = 0
    steps: int = 0
    queue_position: int | None = None
    preview: torch.Tensor | None = None
    preview_kind: str | None = None


@dataclass
class DenoisedLatents:
    latents: torch.Tensor  # [C, h, w] float32, CPU
    timings: dict = field(default_factory=dict)


@dataclass
class DecodedImage:
    pixels: torch.Tensor  # uint8 [H, W, 3], CPU
    timings: dict = field(default_factory=dict)
