"""The three stage engines composed in one process: what the Serve app does, without Ray."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from serve_app.config import AppConfig
from serve_app.engines.denoiser import DenoiseRequest, DenoiserEngine
from serve_app.engines.devices import synchronize
from serve_app.engines.text_encoder import TextEncoderEngine
from serve_app.engines.vae import VaeEngine


@dataclass
class GeneratedImage:
    pixels: torch.Tensor  # uint8 [H, W, 3]
    seed: int
    timings_s: dict = field(default_factory=dict)


class StagedPipeline:
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.text_encoder = TextEncoderEngine(cfg.model, cfg.text_encoder)
        self.denoiser = DenoiserEngine(cfg.model, cfg.denoiser, lora=cfg.lora)
        self.vae = VaeEngine(cfg.model, cfg.vae)

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        height: int = 1024,
        width: int = 1024,
        steps: int | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        lora: tuple = (),
    ) -> list[GeneratedImage]:
        """`lora`: ((adapter name, scale), ...) of `lora.dir`, for every image."""
        steps = steps or self.cfg.denoiser.default_steps
        timings = {}
        t0 = time.perf_counter()
        embeds = self.text_encoder.encode(prompts)
        neg = self.text_encoder.encode([negative_prompt or ""] * len(prompts)) if guidance_scale > 0 else [None] * len(prompts)
        synchronize(self.text_encoder.device)
        t1 = time.perf_counter()
        reqs = [
            DenoiseRequest(embeds=e, height=height, width=width, steps=steps, seed=s, guidance_scale=guidance_scale, negative_embeds=n,
                           lora=tuple(lora))
            for e, s, n in zip(embeds, seeds, neg)
        ]
        latents = self.denoiser.denoise(reqs)
        synchronize(self.denoiser.device)
        t2 = time.perf_counter()
        images = self.vae.decode(latents)
        t3 = time.perf_counter()
        timings = {"text_encoder": t1 - t0, "denoiser": t2 - t1, "vae": t3 - t2, "total": t3 - t0}
        return [GeneratedImage(pixels=img, seed=s, timings_s=dict(timings)) for img, s in zip(images, seeds)]

    def edit(
        self,
        prompts: list[str],
        seeds: list[int],
        pixels: torch.Tensor,
        strength: float,
        mask: torch.Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
    ) -> list[GeneratedImage]:
        """Image-to-image (and with `mask`, inpainting) of one uint8 [H, W, 3] image, one output per
        (prompt, seed): serve_app/engines/edit_inputs.py prepares `pixels` and `mask`."""
        steps = steps or self.cfg.denoiser.default_steps
        height, width = pixels.shape[:2]
        t0 = time.perf_counter()
        embeds = self.text_encoder.encode(prompts)
        neg = self.text_encoder.encode([negative_prompt or ""] * len(prompts)) if guidance_scale > 0 else [None] * len(prompts)
        [image_latents] = self.vae.encode([pixels], [seeds])
        reqs = [
            DenoiseRequest(embeds=e, height=height, width=width, steps=steps, seed=s, guidance_scale=guidance_scale, negative_embeds=n,
                           image_latents=lat, strength=strength, mask=mask)
            for e, s, n, lat in zip(embeds, seeds, neg, image_latents)
        ]
        images = self.vae.decode(self.denoiser.denoise(reqs))
        timings = {"total": time.perf_counter() - t0}
        return [GeneratedImage(pixels=img, seed=s, timings_s=dict(timings)) for img, s in zip(images, seeds)]
