"""VAE-decoder deployment: batches same-shape latents into one decode, returns uint8 pixels."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from serve_app.config import AppConfig
from serve_app.deployments.stage_stats import StageStats
from serve_app.stage_messages import DecodedImage, DenoisedLatents
from serve_app.vae_engine import VaeEngine


@serve.deployment
class VaeDecoderDeployment:
    def __init__(self, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        t0 = time.perf_counter()
        self.engine = VaeEngine(cfg.model, cfg.vae)
        t1 = time.perf_counter()
        self.stats_ = StageStats(self.engine.device)
        self.decode.set_max_batch_size(cfg.vae_deployment.max_batch_size)
        self.decode.set_batch_wait_timeout_s(cfg.vae_deployment.batch_wait_timeout_s)
        for h, w in cfg.denoiser.warmup_sizes or [(64, 64)]:
            self.engine.decode([torch.zeros(16, h // 8, w // 8)])
        self.stats_.startup_s = {"build": t1 - t0, "warmup": time.perf_counter() - t1}

    def _decode(self, items: list[DenoisedLatents]) -> list[DecodedImage]:
        t0 = time.perf_counter()
        images = self.engine.decode([it.latents for it in items])
        dt = time.perf_counter() - t0
        self.stats_.record(len(items), dt)
        return [DecodedImage(pixels=img, timings={**it.timings, "vae_s": dt}) for it, img in zip(items, images)]

    @serve.batch
    async def decode(self, items: list[DenoisedLatents]) -> list[DecodedImage]:
        return await asyncio.to_thread(self._decode, items)

    def stats(self) -> dict:
        return self.stats_.snapshot()

    def ready(self) -> bool:
        return True
