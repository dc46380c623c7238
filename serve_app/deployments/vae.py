"""VAE deployment: batches same-shape latents into one decode (uint8 pixels back), and for edits same-shape
images into one encode (latents back, in the VAE's dtype).

Encode lives here, not in a deployment of its own: encoder and decoder are one AutoencoderKL, loaded once
per replica on the GPU; a second deployment would hold a second copy and a second CUDA context for a
forward (about a decode's cost) that only edits run. Both methods share the replica's batching and
scaling; `vae_deployment.max_batch_size` bounds each."""

from __future__ import annotations

import asyncio

from ray import serve

from serve_app.config import AppConfig
from serve_app.deployments.isolation import run_isolated, unwrap
from serve_app.deployments.stage_stats import StageStats
from serve_app.stage_messages import DecodedImage, DenoisedLatents, EncodedImage, ImageToEncode


@serve.deployment
class VaeDecoderDeployment:
    def __init__(self, app_config: dict):
        from serve_app.engines.vae import VaeEngine  # here, not where the app is only bound (serve_app/deployments/denoiser.py)

        cfg = AppConfig.model_validate(app_config)
        self.engine, self.stats_ = StageStats.start(
            lambda: VaeEngine(cfg.model, cfg.vae),
            lambda engine: engine.warm_up(cfg.vae_start_sizes(engine.compiled)),
            cfg.vae_deployment.gpu_memory_gb, stage="vae",
        )
        self.latent_channels = int(self.engine.vae.config.latent_channels)
        self._decode_batch.set_max_batch_size(cfg.vae_deployment.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(cfg.vae_deployment.batch_wait_timeout_s)
        self._encode_batch.set_max_batch_size(cfg.vae_deployment.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(cfg.vae_deployment.batch_wait_timeout_s)

    def _decode(self, items: list[DenoisedLatents]) -> list[DecodedImage]:
        images, dt = self.stats_.timed(self.engine.decode, [it.latents for it in items], kind="vae_decode")
        return [DecodedImage(pixels=img, timings={**it.timings, "vae_s": dt}) for it, img in zip(items, images)]

    async def decode(self, item: DenoisedLatents) -> DecodedImage:
        lat = item.latents  # checked per item before it joins a batch
        if lat.ndim != 3 or lat.shape[0] != self.latent_channels:
            raise ValueError(f"latents must be [{self.latent_channels}, h, w], got {tuple(lat.shape)}")
        return unwrap(await self._decode_batch(item))

    @serve.batch
    async def _decode_batch(self, items: list[DenoisedLatents]) -> list:
        return await asyncio.to_thread(run_isolated, self._decode, items)

    def _encode(self, items: list[ImageToEncode]) -> list[EncodedImage]:
        latents, dt = self.stats_.timed(lambda its: self.engine.encode([it.pixels for it in its], [it.seeds for it in its]), items, kind="vae_encode")
        return [EncodedImage(latents=lat, timings={"vae_encode_s": dt}) for lat in latents]

    async def encode(self, item: ImageToEncode) -> EncodedImage:
        return unwrap(await self._encode_batch(item))

    @serve.batch
    async def _encode_batch(self, items: list[ImageToEncode]) -> list:
        return await asyncio.to_thread(run_isolated, self._encode, items)

    def stats(self) -> dict:
        return self.stats_.snapshot()

    def ready(self) -> bool:
        return True
