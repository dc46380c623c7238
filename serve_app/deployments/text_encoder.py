"""Text-encoder deployment: batches prompts into one padded-to-longest Qwen3 forward."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ray import serve

from serve_app.config import AppConfig
from serve_app.deployments.isolation import run_isolated, unwrap
from serve_app.deployments.stage_stats import StageStats
from serve_app.openai_api import APIError
from serve_app.stage_messages import EncodedPrompt

if TYPE_CHECKING:
    from serve_app.engines.text_encoder import TextEncoderEngine


def _warmup(engine: TextEncoderEngine) -> None:
    engine.encode(["warm-up prompt"])
    engine.warmup()


@serve.deployment
class TextEncoderDeployment:
    def __init__(self, app_config: dict):
        from serve_app.engines.text_encoder import TextEncoderEngine  # here, not where the app is only bound (serve_app/deployments/denoiser.py)

        cfg = AppConfig.model_validate(app_config)
        self.engine, self.stats_ = StageStats.start(lambda: TextEncoderEngine(cfg.model, cfg.text_encoder), _warmup,
                                                    cfg.text_encoder_deployment.gpu_memory_gb, stage="text_encoder")
        self._encode_batch.set_max_batch_size(cfg.text_encoder_deployment.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(cfg.text_encoder_deployment.batch_wait_timeout_s)

    def _encode(self, prompts: list[str]) -> list[EncodedPrompt]:
        embeds, dt = self.stats_.timed(lambda batch: [e.cpu() for e in self.engine.encode(batch)], prompts)
        return [EncodedPrompt(embeds=e, timings={"text_encoder_s": dt}, batch=len(prompts)) for e in embeds]

    async def encode(self, prompt: str) -> EncodedPrompt:
        # what can be checked per prompt is checked before it joins a batch: the tokenizer must take it
        try:
            await asyncio.to_thread(self.engine.count_tokens, prompt)
        except Exception as e:
            raise APIError(400, f"the prompt cannot be tokenized ({type(e).__name__})", param="prompt", code="invalid_value") from None
        return unwrap(await self._encode_batch(prompt))

    @serve.batch
    async def _encode_batch(self, prompts: list[str]) -> list:
        return await asyncio.to_thread(run_isolated, self._encode, prompts)

    def stats(self) -> dict:
        # how many CUDA graphs the encoder replays (0: eager: on CPU, switched off, or a capture failed)
        return {**self.stats_.snapshot(), "cuda_graphs": len(self.engine.graphs.graphs) if self.engine.graphs else 0,
                "norms_compiled": self.engine.norms_compiled}

    def ready(self) -> bool:
        return True
