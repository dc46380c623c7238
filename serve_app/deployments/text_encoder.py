"""Text-encoder deployment: batches prompts into one padded-to-longest Qwen3 forward."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from serve_app.config import AppConfig
from serve_app.deployments.stage_stats import StageStats
from serve_app.stage_messages import EncodedPrompt
from serve_app.text_encoder_engine import TextEncoderEngine


@serve.deployment
class TextEncoderDeployment:
    def __init__(self, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        t0 = time.perf_counter()
        self.engine = TextEncoderEngine(cfg.model, cfg.text_encoder)
        t1 = time.perf_counter()
        self.stats_ = StageStats(self.engine.device)
        self.encode.set_max_batch_size(cfg.text_encoder_deployment.max_batch_size)
        self.encode.set_batch_wait_timeout_s(cfg.text_encoder_deployment.batch_wait_timeout_s)
        self.engine.encode(["warm-up prompt"])
        self.engine.warmup()
        self.stats_.startup_s = {"build": t1 - t0, "warmup": time.perf_counter() - t1}

    def _encode(self, prompts: list[str]) -> list[EncodedPrompt]:
        t0 = time.perf_counter()
        embeds = [e.cpu() for e in self.engine.encode(prompts)]
        dt = time.perf_counter() - t0
        self.stats_.record(len(prompts), dt)
        return [EncodedPrompt(embeds=e, timings={"text_encoder_s": dt}, batch=len(prompts)) for e in embeds]

    @serve.batch
    async def encode(self, prompts: list[str]) -> list[EncodedPrompt]:
        return await asyncio.to_thread(self._encode, prompts)

    def stats(self) -> dict:
        # how many CUDA graphs the encoder replays (0: eager: on CPU, switched off, or a capture failed)
        return {**self.stats_.snapshot(), "cuda_graphs": len(self.engine.graphs.graphs) if self.engine.graphs else 0}

    def ready(self) -> bool:
        return True
