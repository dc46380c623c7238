"""DiT-denoiser deployment: batches requests (serve_app/deployments/gpu_batcher.py) and runs each batch on
its `Denoiser`: a local `DenoiserEngine`, or with ulysses_degree x ring_degree > 1 a sequence-parallel group
of rank workers in the replica's own placement group (serve_app/sp/rank_group.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from serve_app.config import AppConfig
from serve_app.deployments.gpu_batcher import GpuBatcher
from serve_app.deployments.stage_stats import StageStats
from serve_app.engines.denoiser import PIXELS_PER_LATENT_PATCH, Denoiser, DenoiserEngine, check_positions, position_limits
from serve_app.engines.model_sources import load_transformer_config
from serve_app.openai_api import APIError
from serve_app.stage_messages import DenoisedLatents, DenoiseRequest


def make_denoiser(cfg: AppConfig) -> Denoiser:
    if cfg.denoiser.sp_degree > 1:
        import ray

        from serve_app.sp.rank_group import SPGroup

        return SPGroup(cfg, placement_group=ray.util.get_current_placement_group(), first_bundle_index=1)
    return DenoiserEngine(cfg.model, cfg.denoiser)


@serve.deployment
class DenoiserDeployment:
    def __init__(self, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        opts = cfg.denoiser_deployment
        # one thread runs every forward, warm-up included; the next batch is formed when it is free
        self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoiser")
        sizes, batch = cfg.start_sizes(), min(2, opts.max_batch_size)
        # build: load (or random init) + the DiT builder's steps; warmup: the first forwards (compilation)
        self.engine, self.stats_ = StageStats.start(
            lambda: make_denoiser(cfg), lambda engine: self._gpu_thread.submit(engine.warmup, sizes, batch=batch).result(),
            opts.gpu_memory_gb if cfg.denoiser.sp_degree == 1 else None,  # an SP replica holds no GPU itself
            stage="denoiser",
        )
        from serve_app.metrics import DenoiserMetrics

        self.metrics = DenoiserMetrics()  # batch sizes, forwards by batch size, queued requests
        self.stats_.on_batch_start = lambda: self.metrics.queued.set(self._batcher.pending())
        self._batch_started: float | None = None  # when the running batch began (None: idle)
        self.max_batch_s = cfg.denoiser.max_batch_s
        tcfg = load_transformer_config(cfg.model)
        self.cap_feat_dim = tcfg["cap_feat_dim"]
        self.position_limits = position_limits(tcfg)
        self._batcher = GpuBatcher(
            self._denoise, self._gpu_thread, opts.max_batch_size, opts.batch_wait_timeout_s,
            cost_fn=lambda r: r.height * r.width, max_batch_cost=cfg.denoiser.max_batch_pixels,
            wait_fn=lambda r: r.companions > 1,  # wait for company only when some is on its way
        )

    def _denoise(self, requests: list[DenoiseRequest]) -> list[DenoisedLatents]:
        self._batch_started = time.monotonic()
        try:
            latents, dt = self.stats_.timed(lambda reqs: [lat.cpu() for lat in self.engine.denoise(reqs)], requests)
        finally:
            self._batch_started = None
        self.metrics.batch(len(requests), self.engine.stats().get("forward_batch_sizes", {}))
        return [DenoisedLatents(latents=lat, timings={"denoiser_s": dt, "denoiser_batch": len(requests)}) for lat in latents]

    def _validate(self, r: DenoiseRequest) -> None:
        """Per request, before it joins a batch: what the DiT would otherwise fail on inside the forward."""
        if r.embeds.ndim != 2 or r.embeds.shape[1] != self.cap_feat_dim:
            raise ValueError(f"embeds must be [tokens, {self.cap_feat_dim}], got {tuple(r.embeds.shape)}")
        if r.height % PIXELS_PER_LATENT_PATCH or r.width % PIXELS_PER_LATENT_PATCH or r.steps < 1:
            raise ValueError(f"height and width must be multiples of {PIXELS_PER_LATENT_PATCH}, steps at least 1")
        if r.guidance_scale > 0 and r.negative_embeds is None:
            raise ValueError("guidance_scale > 0 needs negative_embeds")
        try:
            check_positions(r, self.position_limits)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else "size", code="invalid_value") from None

    async def denoise(self, request: DenoiseRequest) -> DenoisedLatents:
        self.metrics.queued.set(self._batcher.pending() + 1)  # with this one (one refused next: set right at the next batch)
        self._validate(request)
        return await self._batcher.submit(request)

    def stats(self) -> dict:
        # "engine": what the DiT builder applied on this chip (attention per block group, FP8, compile, SP
        # layout) and every fallback taken; for an SP group, rank 0's, with every rank's place
        return {**self.stats_.snapshot(), **self.engine.stats(), "engine": self.engine.info(), "isolated_retries": self._batcher.isolated_retries}

    def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        # Serve calls this periodically; an SP group with a dead or hung rank raises here, and so does a
        # batch that has run past denoiser.max_batch_s (a wedged forward), so Serve marks the replica
        # unhealthy (/health/ready turns 503) and replaces it, and with it the whole group.
        started = self._batch_started
        if started is not None and time.monotonic() - started > self.max_batch_s:
            raise RuntimeError(f"a DiT batch has run for more than denoiser.max_batch_s={self.max_batch_s} s")
        self.engine.check_health()
